"""The config tree refuses every value the code cannot use, with one line naming the field, before any work."""

from __future__ import annotations

import os

import pytest

from fedsim.config import ConfigError, RunConfig, check_inputs, from_dict, load_toml, parse_assignment, resolve, save


@pytest.mark.parametrize(
    "key, value, message",
    [
        # numeric bounds: the field and the allowed range
        ("train.mu", 1e300, "train.mu = 1e+300 is too large: it must lie in [0, 10000]"),
        ("model.hidden", 10**9, "model.hidden = 1000000000 is too large: it must lie in [1, 65536]"),
        ("train.seed", 2**32, "train.seed = 4294967296 is too large: it must lie in [0, 4294967295]"),
        ("train.lr", 100.0, "train.lr = 100.0 is too large: it must lie in (0, 10]"),
        ("train.weight_decay", 1e6, "train.weight_decay = 1000000.0 is too large: it must lie in [0, 10]"),
        ("train.mixup_alpha", 1e9, "train.mixup_alpha = 1000000000.0 is too large: it must lie in [0, 1000]"),
        ("train.batch_size", 10**6, "train.batch_size = 1000000 is too large: it must lie in [1, 65536]"),
        ("train.grad_accum", 10**6, "train.grad_accum = 1000000 is too large: it must lie in [1, 65536]"),
        ("train.rounds", 10**6, "train.rounds = 1000000 is too large: it must lie in [1, 100000]"),
        ("train.rounds", 10**400, "train.rounds = 100000...(401 digits) is too large: it must lie in [1, 100000]"),
        ("train.local_epochs", 10**5, "train.local_epochs = 100000 is too large: it must lie in [1, 10000]"),
        ("train.keep_checkpoints", 10**5, "train.keep_checkpoints = 100000 is too large: it must lie in [1, 10000]"),
        ("train.xai_per_grade", -1, "train.xai_per_grade = -1 must be a finite number >= 0"),
        ("train.xai_per_grade", 10**4, "train.xai_per_grade = 10000 is too large: it must lie in [0, 1000]"),
        ("data.context_size", 10**5, "data.context_size = 100000 is too large: it must lie in [1, 8192]"),
        ("data.detail_size", 10**5, "data.detail_size = 100000 is too large: it must lie in [1, 8192]"),
        ("data.context_fov", 10**5, "data.context_fov = 100000 is too large: it must lie in [1, 8192]"),
        ("data.patches_per_image", 10**5, "data.patches_per_image = 100000 is too large: it must lie in [1, 4096]"),
        ("data.num_hospitals", 10**5, "data.num_hospitals = 100000 is too large: it must lie in [0, 4096]"),
        ("data.num_workers", 10**4, "data.num_workers = 10000 is too large: it must lie in [0, 256]"),
        ("data.dirichlet_alpha", 1e300, "data.dirichlet_alpha = 1e+300 is too large: it must lie in (0, 1e+06]"),
        (
            "data.synthetic.patients_per_grade",
            10**6,
            "data.synthetic.patients_per_grade = 1000000 is too large: it must lie in [3, 1000]",
        ),
        (
            "data.synthetic.images_per_patient",
            10**6,
            "data.synthetic.images_per_patient = 1000000 is too large: it must lie in [1, 1000]",
        ),
        (
            "data.synthetic.image_size",
            10**6,
            "data.synthetic.image_size = 1000000 is too large: it must lie in [64, 8192]",
        ),
        # strict TOML types
        ("data.path", ["a"], "data.path must be a string, got the list ['a']"),
        ("data.stain_reference", 3, "data.stain_reference must be a string, got 3"),
        ("out", {"a": 1}, "out must be a string, got a table"),
        ("train.rounds", True, "train.rounds must be an integer, got the boolean true"),
        ("train.batch_size", False, "train.batch_size must be an integer, got the boolean false"),
        ("train.rounds", 2.5, "train.rounds must be an integer, got 2.5"),
        ("train.rounds", {"a": 1}, "train.rounds must be an integer, got a table"),
        ("train.rounds", [3], "train.rounds must be an integer, got the list [3]"),
        ("train.rounds", "three", "train.rounds must be an integer, got 'three'"),
        ("train.lr", True, "train.lr must be a number, got the boolean true"),
        ("train.mu", "a lot", "train.mu must be a number, got 'a lot'"),
        ("train.mu", {"x": 1.0}, "train.mu must be a number, got a table"),
        ("train.compile", 1, "train.compile must be true or false, got 1"),
        ("train.compile", "maybe", "train.compile must be true or false, got 'maybe'"),
        ("data.split", [0.5, True, 0.5], "data.split[1] must be a number, got the boolean true"),
        ("train.faulty_hospitals", [1], "train.faulty_hospitals[0] must be a string, got 1"),
        # names
        ("out", "", "out = '' must name a run directory"),
        ("out", "  ", "out = '  ' must name a run directory"),
        (
            "data.classes",
            ["Grade I", "Grade II", "Grade I"],
            "data.classes = ['Grade I', 'Grade II', 'Grade I'] names 'Grade I' twice",
        ),
        ("data.classes", ["Grade I", "grade i"], "names 'Grade I' twice ('Grade I' and 'grade i' differ only in case"),
        ("data.classes", ["Grade I", ""], "data.classes = ['Grade I', ''] holds an empty class name"),
        (
            "data.partition",
            "random",
            "data.partition = 'random' is not allowed; choose one of: auto, natural, iid, dirichlet",
        ),
    ],
)
def test_bad_value_is_refused_naming_the_field(key, value, message):
    with pytest.raises(ConfigError) as info:
        resolve(None, [(key, value)])
    text = str(info.value)
    assert message in text
    assert key.split(".")[-1] in text and "\n" not in text


@pytest.mark.parametrize(
    "key, value, message",
    [
        # refused before these bounds came (every float field finite, the lower bounds): they stay refused
        ("train.mu", float("inf"), "train.mu = inf must be a finite number >= 0"),
        ("train.mu", float("nan"), "train.mu = nan must be a finite number >= 0"),
        ("model.hidden", 0, "model.hidden = 0 must be a finite number >= 1"),
        ("train.seed", -1, "train.seed = -1 must be a finite number >= 0"),
        ("train.lr", 0.0, "train.lr = 0.0 must be a finite number > 0"),
        ("train.lr", float("nan"), "train.lr = nan must be a finite number > 0"),
        ("train.weight_decay", float("inf"), "train.weight_decay = inf must be a finite number"),
        ("train.timeout_s", float("nan"), "train.timeout_s = nan must be a finite number >= 1.0"),
        ("data.eval_patches_per_image", 0, "data.eval_patches_per_image = 0 must be a finite number >= 1"),
        ("data.dirichlet_alpha", float("inf"), "data.dirichlet_alpha = inf must be a finite number > 0"),
        ("data.min_tissue", float("nan"), "data.min_tissue = nan must lie in [0, 1]"),
        ("data.site_shift", float("inf"), "data.site_shift = inf must lie in [0, 4]"),
        ("model.dropout", float("nan"), "model.dropout = nan must lie in [0, 1)"),
        ("train.dropout", float("inf"), "train.dropout = inf must be a probability in [0, 1]"),
        ("data", 3, "data must be a table of settings"),
    ],
)
def test_non_finite_and_low_values_stay_refused(key, value, message):
    test_bad_value_is_refused_naming_the_field(key, value, message)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("train.mu", 1e4, 1e4),
        ("train.lr", 10.0, 10.0),
        ("model.hidden", 65536, 65536),
        ("train.seed", 2**32 - 1, 2**32 - 1),
        ("data.context_size", 8192, 8192),
        ("train.rounds", 100_000, 100_000),
        ("train.xai_per_grade", 0, 0),
        ("train.rounds", 3.0, 3),
        ("train.mu", 1, 1.0),
        ("train.rounds", "3", 3),
        ("train.mu", "0.5", 0.5),
        ("train.compile", "yes", True),
    ],
)
def test_values_at_the_bounds_are_accepted(key, value, expected):
    cfg = resolve(None, [(key, value)])
    section, name = key.split(".")
    got = getattr(getattr(cfg, section), name)
    assert got == expected and type(got) is type(expected)


def test_set_values_parse_as_toml_else_stay_text():
    # Prepare: what --set gives to resolve
    texts = [
        "data.path=/x/y",
        "train.rounds=3",
        "train.mu=0.1",
        "train.compile=true",
        "data.only_hospital=1.10",
        "train.faulty_hospitals=H1,H2",
        'train.simulate_crash="H2:3"',
        "data.split=[0.6, 0.2, 0.2]",
        "out=2024-01-01",
        "train.resume=1",
        "data.classes=Grade I,Grade II",
    ]

    # Execute
    cfg = resolve(None, [parse_assignment(t) for t in texts])

    # Assert
    assert cfg.data.path == "/x/y"
    assert cfg.train.rounds == 3 and isinstance(cfg.train.rounds, int)
    assert cfg.train.mu == 0.1 and cfg.train.compile is True and cfg.train.resume is True
    assert cfg.data.only_hospital == "1.10"  # text as written, not the number 1.1
    assert cfg.train.faulty_hospitals == ["H1", "H2"]
    assert cfg.train.simulate_crash == "H2:3"
    assert cfg.data.split == [0.6, 0.2, 0.2]
    assert cfg.out == "2024-01-01"  # not a TOML date
    assert cfg.data.classes == ["Grade I", "Grade II"]


def test_set_of_a_bad_number_names_the_field():
    with pytest.raises(ConfigError, match=r"^train.rounds must be an integer, got 'lots'$"):
        resolve(None, [parse_assignment("train.rounds=lots")])
    with pytest.raises(ConfigError, match=r"^train.rounds must be an integer, got the boolean true$"):
        resolve(None, [parse_assignment("train.rounds=true")])


def test_auto_is_the_default_partition():
    assert RunConfig().data.partition == "auto"
    for method in ("auto", "natural", "iid", "dirichlet"):
        assert from_dict({"data": {"partition": method}}).data.partition == method


def test_toml_types_are_strict_in_a_preset(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('out = "runs/x"\n[train]\nrounds = true\n')
    with pytest.raises(ConfigError, match="train.rounds must be an integer, got the boolean true"):
        resolve(str(preset), [])
    preset.write_text('[data]\npath = ["a", "b"]\n')
    with pytest.raises(ConfigError, match=r"data.path must be a string, got the list \['a', 'b'\]"):
        resolve(str(preset), [])


def test_non_utf8_preset_names_the_file_and_line(tmp_path):
    # Prepare: Latin-1 text with an é on line 3
    preset = tmp_path / "latin1.toml"
    preset.write_bytes('out = "runs/x"\n[model]\n# modèle de démo\nbackbone = "test_resnet"\n'.encode("latin-1"))

    # Execute
    with pytest.raises(ConfigError) as info:
        load_toml(preset)

    # Assert
    text = str(info.value)
    assert f"config file {preset} is not UTF-8 (line 3" in text
    assert "\n" not in text

    # the line is the same after a UTF-8 byte-order mark, and a preset with one alone reads
    preset.write_bytes(b"\xef\xbb\xbf" + 'out = "runs/x"\n\n# d\xe9mo\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 \(line 3: byte 0xe9\)"):
        load_toml(preset)
    preset.write_bytes(b"\xef\xbb\xbf" + b'out = "runs/x"\n')
    assert load_toml(preset) == {"out": "runs/x"}


def test_non_utf8_preset_stops_the_study_dry_run(tmp_path, capsys):
    from fedsim import experiments

    preset = tmp_path / "latin1.toml"
    preset.write_bytes("[train]\nrounds = 1\n# é\n".encode("latin-1"))
    code = experiments.main(["--preset", str(preset), "--out", str(tmp_path / "study"), "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("experiments: error: --preset") and "is not UTF-8 (line 3" in err[-1]


def test_malformed_and_missing_presets_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_toml(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_toml(tmp_path / "nope.toml")


def _cfg(**data) -> RunConfig:
    return from_dict({"data": data} if data else {})


def test_check_inputs_refuses_missing_files(tmp_path):
    # data.path
    with pytest.raises(ConfigError, match=r"^data.path = '.*nope': data path does not exist$"):
        check_inputs(_cfg(path=str(tmp_path / "nope")))
    # data.stain_reference: missing, a folder
    with pytest.raises(ConfigError, match=r"^data.stain_reference = '.*ref.png' does not exist$"):
        check_inputs(_cfg(stain_reference=str(tmp_path / "ref.png")))
    with pytest.raises(ConfigError, match=r"^data.stain_reference = '.*' is not a file$"):
        check_inputs(_cfg(stain_reference=str(tmp_path)))
    # model.pretrained
    with pytest.raises(ConfigError, match=r"^model.pretrained = '.*w.pt' does not exist$"):
        check_inputs(from_dict({"model": {"pretrained": str(tmp_path / "w.pt")}}))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_check_inputs_refuses_an_unreadable_stain_reference(tmp_path):
    ref = tmp_path / "ref.png"
    ref.write_bytes(b"\x89PNG")
    ref.chmod(0)
    try:
        with pytest.raises(ConfigError, match=r"^data.stain_reference = '.*' cannot be read"):
            check_inputs(_cfg(stain_reference=str(ref)))
    finally:
        ref.chmod(0o600)


def test_check_inputs_accepts_what_exists(tmp_path):
    ref = tmp_path / "ref.png"
    ref.write_bytes(b"\x89PNG")
    check_inputs(_cfg(path=str(tmp_path), stain_reference=str(ref)))
    check_inputs(RunConfig())  # embedded data, built-in reference, no weights


def test_check_inputs_refuses_weights_of_another_backbone(tmp_path):
    import timm
    import torch

    path = tmp_path / "resnet10t.pt"
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), path)
    cfg = from_dict({"model": {"backbone": "test_resnet", "pretrained": str(path)}})
    with pytest.raises(ConfigError) as info:
        check_inputs(cfg)
    text = str(info.value)
    assert text.startswith("model.pretrained: pretrained weights") and "does not fit the test_resnet backbone" in text
    assert "shape mismatches (conv1.0.weight: saved (24, 3, 3, 3) vs model (16, 3, 3, 3)" in text
    assert "\n" not in text


def test_save_is_atomic_json(tmp_path, monkeypatch):
    import json

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    path = tmp_path / "config.json"
    save(RunConfig(), path)
    assert synced, "config.json is fsync'd before the rename"
    assert from_dict(json.loads(path.read_text())) == RunConfig()
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_the_package_keeps_every_public_name_of_the_old_module():
    # fedsim/config.py became the package fedsim/config/; callers import from fedsim.config alone.
    import fedsim.config

    tables = ["DPConfig", "DataConfig", "ModelConfig", "RunConfig", "SecAggConfig", "SyntheticConfig", "TrainConfig"]
    loading = ["check_inputs", "field_type", "from_dict", "load_toml", "parse_assignment", "resolve", "save"]
    bounds = [name for name in fedsim.config.__all__ if name.startswith("MAX_")]
    assert len(bounds) == 17
    assert set(fedsim.config.__all__) >= {*tables, *loading, "ConfigError", "SETTINGS", "set_dotted", "setting_of"}
    assert all(hasattr(fedsim.config, name) for name in fedsim.config.__all__)
