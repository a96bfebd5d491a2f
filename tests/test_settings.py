"""Every setting is declared once: flags, defaults, choices, the digest and the study's keys derive from it.

The pinned values (digests, config.json hashes, study keys) were computed on the code before the settings
were declared in one place; they must never change, since run folders resume by them.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim import errors
from fedsim.config import SETTINGS, ConfigError, RunConfig, from_dict, resolve, save, setting_of
from fedsim.settings import choices

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"default": None, "demo": REPO / "configs" / "demo.toml", "paper": REPO / "configs" / "paper.toml"}


# ---- what must not change ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, digest, saved",
    [
        ("default", "377b6811e039b08a", "b90e92785bc912e0"),
        ("demo", "92a4e2510f993029", "4dc2bdaebb04a422"),
        ("paper", "a886cc5e00b75cc8", "537e839515b0633a"),
    ],
)
def test_digest_and_config_json_are_those_of_before(preset, digest, saved, tmp_path):
    cfg = resolve(PRESETS[preset], [])
    save(cfg, tmp_path / "config.json")
    assert cfg.digest() == digest
    assert hashlib.sha256((tmp_path / "config.json").read_bytes()).hexdigest()[:16] == saved


def test_the_digest_leaves_out_exactly_the_settings_that_do_not_change_the_weights():
    assert {s.key for s in SETTINGS if not s.weights} == {
        "out",
        "train.resume",
        "train.rounds",
        "train.xai_per_grade",
        "train.keep_checkpoints",
        "train.timeout_s",
        "train.simulate_crash",
        "train.simulate_hang",
        "train.client_state_device",
        "data.num_workers",
    }
    base = RunConfig().digest()
    for key, value in (("train.rounds", 99), ("data.num_workers", 4), ("out", "elsewhere")):
        assert resolve(None, [(key, value)]).digest() == base
    assert resolve(None, [("train.mu", 0.5)]).digest() != base


def test_the_study_tells_runs_apart_by_every_setting_but_where_and_how_they_start():
    from fedsim.study.plan import PRESETS as STUDY_PRESETS
    from fedsim.study.plan import settings_key, train_args, variants

    assert {s.key for s in SETTINGS if s.launch} == {"out", "train.resume"}
    demo = ["--config", str(STUDY_PRESETS["demo"])]
    assert settings_key([*demo, "--resume", "--out", "x"], 3) == "b1d01081"
    assert settings_key([*demo, "--rounds", "1", "--workers", "2", "--set", "train.timeout_s=30"], 3) == "e170dc61"
    keys = {
        v.name: settings_key(train_args(v, 0, STUDY_PRESETS["demo"], None, [], 3), 3)
        for v in variants(["H1", "H2", "H3"])
    }
    assert keys["fedprox"] == keys["dual"] == keys["macenko"] == keys["mu-0.01"] == "3e183424"
    assert (keys["fedavg"], keys["fedbn"], keys["centralized"], keys["none"]) == (
        "599edd41",
        "fca51c8d",
        "c594c973",
        "40f5b31a",
    )


def test_the_study_sets_declared_flags_only():
    from fedsim.study.plan import BASE, STUDY_FLAGS, VARIANTS

    used = {*BASE, *STUDY_FLAGS, *(flag for _, _, flags in VARIANTS for flag in flags)} - {"--config", "--set"}
    assert used <= {s.flag for s in SETTINGS if s.flag}


#: train.py's flags before they were declared with the settings: (flag, config key).
TRAIN_FLAGS = {
    "--data": "data.path",
    "--data-source": "data.source",  # added since, with the embedded benchmark
    "--out": "out",
    "--rounds": "train.rounds",
    "--local-epochs": "train.local_epochs",
    "--mu": "train.mu",
    "--seed": "train.seed",
    "--mode": "train.mode",
    "--scales": "model.scales",
    "--backbone": "model.backbone",
    "--bn": "train.bn",
    "--batch-size": "train.batch_size",
    "--lr": "train.lr",
    "--lr-schedule": "train.lr_schedule",
    "--device": "train.device",
    "--precision": "train.precision",
    "--stain": "data.stain",
    "--partition": "data.partition",
    "--num-hospitals": "data.num_hospitals",
    "--clients-per-round": "train.clients_per_round",
    "--server-optimizer": "train.server_optimizer",
    "--server-lr": "train.server_lr",
    "--algorithm": "train.algorithm",
    "--pretrained": "model.pretrained",
    "--dropout": "train.dropout",
    "--straggler": "train.straggler",
    "--workers": "data.num_workers",
    "--dp": "train.dp.level",
    "--noise-multiplier": "train.dp.noise_multiplier",
    "--target-epsilon": "train.dp.target_epsilon",
    "--mixup-alpha": "train.mixup_alpha",
    "--resume": "train.resume",
    "--compile": "train.compile",
    "--secure-aggregation": "train.secure_aggregation",
}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.option_strings[0]: action for action in parser._actions if action.option_strings}


def test_train_py_keeps_every_flag_name_and_meaning():
    import train

    options = _options(train.parser())
    assert {
        flag: action.dest for flag, action in options.items() if "." in action.dest or action.dest == "out"
    } == TRAIN_FLAGS
    assert {"--config", "--set"} <= set(options)
    cfg = train.parse_args(
        [
            "--rounds",
            "2",
            "--mu",
            "0",
            "--resume",
            "--compile",
            "--secure-aggregation",
            "--set",
            "train.rounds=7",
            "--set",
            "data.context_fov=640",
        ]
    )
    assert (cfg.train.rounds, cfg.train.mu, cfg.train.resume, cfg.train.compile) == (2, 0.0, True, True)
    assert cfg.train.secure_aggregation and cfg.data.context_fov == 640  # a named flag wins over --set
    assert train.parse_args([]).to_dict() == RunConfig().to_dict()


#: data.prepare's optional flags and their defaults before they came from the config.
PREPARE_DEFAULTS = {
    "--partition": "auto",
    "--alpha": 0.5,
    "--seed": 0,
    "--split": [0.7, 0.15, 0.15],
    "--classes": ["Grade I", "Grade II", "Grade III"],
    "--patient-regex": "",
    "--context-size": 320,
    "--detail-size": 224,
    "--context-fov": 320,
    "--min-tissue": 0.5,
    "--patches-per-image": 4,
    "--eval-patches-per-image": 4,
    "--stain": "macenko",
    "--stain-reference": "",
    "--site-shift": 0.0,
    "--patch-centres": "tissue",  # added since, with the embedded benchmark
}


def test_data_prepare_takes_the_data_settings_with_the_config_defaults():
    from data import prepare

    declared = {s.prepare: s.default for s in SETTINGS if s.prepare}
    assert declared == PREPARE_DEFAULTS
    args = prepare.parse_args(["--data", "d", "--out", "o", "--hospitals", "2"])
    cfg = prepare.settings(args)
    assert cfg.data == from_dict({"data": {"path": "d", "num_hospitals": 2}}).data
    args = prepare.parse_args(
        [
            "--data",
            "d",
            "--out",
            "o",
            "--hospitals",
            "2",
            "--split",
            "1",
            "0",
            "0",
            "--classes",
            "Grade I, Grade III",
            "--alpha",
            "2",
            "--seed",
            "5",
        ]
    )
    cfg = prepare.settings(args)
    assert (cfg.data.split, cfg.data.classes, cfg.data.dirichlet_alpha, cfg.train.seed) == (
        [1.0, 0.0, 0.0],
        ["Grade I", "Grade III"],
        2.0,
        5,
    )


def test_data_prepare_builds_the_cache_training_looks_for():
    from data.cache import split_specs
    from data.patches import PatchSpec
    from data.prepare import parse_args, settings
    from fedsim.datasetup import cache_specs

    for extra in ([], ["--context-fov", "640", "--stain", "reinhard", "--seed", "3", "--site-shift", "1"]):
        cfg = settings(parse_args(["--data", "d", "--out", "o", "--hospitals", "3", *extra]))
        d = cfg.data
        prepared = split_specs(
            PatchSpec(d.context_size, d.detail_size, d.context_fov, d.min_tissue),
            d.patches_per_image,
            d.eval_patches_per_image,
            d.stain,
            d.stain_reference,
            cfg.train.seed,
            d.site_shift,
        )
        assert prepared == cache_specs(cfg)


def test_data_prepare_refuses_a_bad_setting_in_one_line(tmp_path, capsys):
    from data import prepare

    code = prepare.main(
        ["--data", str(tmp_path), "--out", str(tmp_path / "c"), "--hospitals", "2", "--partition", "sideways"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        (
            "data.prepare: error: data.partition = 'sideways' is not allowed; "
            "choose one of: auto, natural, iid, dirichlet"
        )
    ]


# ---- choices from Literal types ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [s.key for s in SETTINGS if s.choices])
def test_a_choice_outside_its_literal_is_refused_naming_every_value(key):
    allowed = setting_of(key).choices
    tree: dict = {}
    node = tree
    *tables, name = key.split(".")
    for table in tables:
        node = node.setdefault(table, {})
    node[name] = "nope"
    with pytest.raises(ConfigError) as info:
        from_dict(tree)
    assert str(info.value) == f"{key} = 'nope' is not allowed; choose one of: {', '.join(allowed)}"


def test_choices_are_literal_values_only():
    assert setting_of("train.device").choices == ("auto", "cuda", "cpu")
    assert choices(int) is None and setting_of("train.rounds").choices is None


# ---- the README ---------------------------------------------------------------------------------------------------


def _section(title: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _rows(section: str) -> list[list[str]]:
    """The cells of every table row of a README section, header and rule left out."""
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines() if line.startswith("|")
    ]
    return [r for r in rows[2:] if r]


def _keys(cell: str) -> list[str]:
    """`train.secagg.clip`, `.levels` -> [train.secagg.clip, train.secagg.levels]."""
    keys = re.findall(r"`([a-z_.]+)`", cell)
    table = keys[0].rsplit(".", 1)[0] if keys else ""
    return [table + k if k.startswith(".") else k for k in keys]


def _check_default(key: str, meaning: str) -> None:
    """A row's trailing "(value)", when it is one word, is the declared default."""
    found = re.search(r"\(([^()\s]+)\)\s*$", meaning)
    if not found:
        return
    shown, default = found.group(1).strip("`"), setting_of(key).default
    if isinstance(default, bool):
        assert shown == str(default).lower(), key
    elif isinstance(default, (int, float)):
        assert float(shown) == pytest.approx(default), key
    else:
        assert shown == default, key


def test_readme_flags_table_lists_exactly_the_declared_flags():
    listed: dict[str, str] = {}
    for flag_cell, key_cell, meaning in _rows(_section("Flags")):
        keys = _keys(key_cell)
        if flag_cell.startswith("`--config"):
            continue
        assert keys and all(k in {s.key for s in SETTINGS} for k in keys), key_cell
        if flag_cell == "—":
            assert all(setting_of(k).flag is None for k in keys), key_cell
        else:
            listed[flag_cell.strip("`").split()[0]] = keys[0]
        if len(keys) == 1:
            _check_default(keys[0], meaning)
    assert listed == {s.flag: s.key for s in SETTINGS if s.flag}


def test_readme_privacy_table_agrees_with_the_declarations():
    for setting_cell, meaning in _rows(_section("Privacy")):
        keys = _keys(setting_cell)
        flag = re.search(r"\(`(--[a-z-]+)`\)", setting_cell)
        for key in keys:
            assert setting_of(key).flag == (flag.group(1) if flag else None), setting_cell
        if len(keys) == 1:
            _check_default(keys[0], meaning)


# ---- light entry points -------------------------------------------------------------------------------------------


def _imports(*argv: str) -> tuple[set[str], subprocess.CompletedProcess]:
    """The top-level packages a command imports (``python -X importtime``), and its result."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *argv], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    names = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return names, proc


@pytest.mark.parametrize(
    "argv",
    [
        ["train.py", "--help"],
        ["train.py", "--rounds", "0"],
        ["train.py", "--mode", "sideways", "--set", "train.nope=1"],
        ["train.py", "--config", "configs/missing.toml"],
        ["eval.py", "--help"],
    ],
)
def test_help_and_a_bad_setting_load_no_torch(argv):
    names, proc = _imports(*argv)
    assert proc.returncode in (0, 2), proc.stderr[-2000:]
    assert "fedsim" in names and not names & {"torch", "numpy", "PIL", "timm"}
    if proc.returncode == 2:
        assert proc.stderr.strip().splitlines()[-1].startswith("train.py: error: ")


def test_a_study_dry_run_loads_no_torch(tmp_path):
    names, proc = _imports(
        "-m", "fedsim.experiments", "--dry-run", "--only", "fedavg", "--seeds", "1", "--out", str(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 jobs -> 1 runs" in proc.stdout and "torch" not in names


def test_the_public_api_loads_on_first_use():
    import fedsim

    assert fedsim.__all__ == sorted(fedsim._EXPORTS)
    assert callable(fedsim.fedavg) and callable(fedsim.federate)
    with pytest.raises(AttributeError):
        fedsim.nope  # noqa: B018


# ---- user errors and bugs -----------------------------------------------------------------------------------------


def test_user_errors_are_one_family():
    from data.cache import CorruptCache
    from fedsim.checkpoint import CheckpointError
    from fedsim.evaluation.offline import EvalError
    from fedsim.study.plan import StudyError

    for kind in (
        ConfigError,
        CorruptCache,
        CheckpointError,
        EvalError,
        StudyError,
        errors.DataError,
        errors.WeightsError,
    ):
        assert issubclass(kind, errors.UserError) and issubclass(kind, ValueError)
    assert issubclass(CheckpointError, RuntimeError) and issubclass(EvalError, RuntimeError)  # as before


def test_a_bug_in_training_shows_its_traceback(monkeypatch):
    from fedsim import run

    def bug(cfg):
        raise ValueError("an internal bug")

    monkeypatch.setattr(run, "check_inputs", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        run.run_training(RunConfig())


def test_a_bug_in_eval_and_prepare_shows_its_traceback(monkeypatch, tmp_path):
    import eval as eval_py
    import fedsim.evaluation.offline
    from data import prepare

    def bug(args):
        raise ValueError("an internal bug")

    monkeypatch.setattr(fedsim.evaluation.offline, "evaluate_checkpoint", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        eval_py.main(["--checkpoint", str(tmp_path / "c.pt")])
    monkeypatch.setattr(prepare, "prepare", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        prepare.main(["--data", str(tmp_path), "--out", str(tmp_path / "c"), "--hospitals", "1"])


def test_bad_data_is_a_user_error():
    from data.datasets import resolve_classes

    with pytest.raises(errors.DataError, match="unknown class name 'Tumour'"):
        resolve_classes(["Tumour"])
