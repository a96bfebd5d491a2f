"""The study's plan: its variants, the train.py run of every (variant, seed), and which runs coincide.

Every (variant, seed) is one ``train.py`` run in ``OUT/runs/<variant>-s<seed>-<hash>``. The hash
covers the run's resolved settings (those that differ from the config defaults) and its number of
ranks, so variants with identical settings share one run and a finished run is found again by its
hash, whatever variant first produced it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import io
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim.config import SETTINGS, ConfigError, DataConfig, RunConfig
from fedsim.errors import UserError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "train.py"
PRESETS = {
    "demo": REPO / "configs" / "demo.toml",
    "paper": REPO / "configs" / "paper.toml",
    "study": REPO / "configs" / "benchmark-study.toml",
    "benchmark-demo": REPO / "configs" / "benchmark-demo.toml",
}
#: Defaults of ``--nproc`` and ``--jobs`` per preset. On the benchmark every run hosts its 3 hospitals on one
#: rank and two runs share the machine's two cores; the others run one hospital per rank, one run at a time.
PRESET_DEFAULTS = {
    "study": {"nproc": 1, "jobs": 2},
    "benchmark-demo": {"nproc": 1, "jobs": 2},
}

#: Settings every variant starts from: the paper's federated configuration.
BASE: dict[str, str] = {
    "--mode": "federated",
    "--mu": "0.01",
    "--bn": "average",
    "--scales": "dual",
    "--stain": "macenko",
}

#: (name, group, flags that differ from BASE). Variants whose settings resolve alike share a run.
VARIANTS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("fedprox", "federation", {}),
    ("fedavg", "federation", {"--mu": "0"}),
    ("fedbn", "federation", {"--bn": "local"}),
    ("centralized", "federation", {"--mode": "centralized"}),
    ("dual", "scales", {}),
    ("detail", "scales", {"--scales": "detail"}),
    ("context", "scales", {"--scales": "context"}),
    ("mu-0", "mu", {"--mu": "0"}),
    ("mu-0.001", "mu", {"--mu": "0.001"}),
    ("mu-0.01", "mu", {}),
    ("mu-0.1", "mu", {"--mu": "0.1"}),
    ("macenko", "stain", {}),
    ("reinhard", "stain", {"--stain": "reinhard"}),
    ("none", "stain", {"--stain": "none"}),
)

#: train.py flags that the study sets itself (they come last, so the study's values win).
STUDY_FLAGS = {*BASE, "--seed", "--out", "--num-hospitals", "--config"}


class StudyError(UserError):
    """A bad study setting; reported as one line with exit code 2."""


@dataclass(frozen=True)
class Variant:
    """One setting of the study; its flags follow the common arguments of every run."""

    name: str
    group: str
    flags: tuple[str, ...]

    @property
    def centralized(self) -> bool:
        """Centralized runs pool the data on one rank."""
        return self.flags[self.flags.index("--mode") + 1] == "centralized"


@dataclass
class Run:
    """One train.py run, shared by every (variant, seed) whose settings resolve alike."""

    folder: Path
    nproc: int
    args: list[str]
    jobs: list[tuple[str, int]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        """A run is complete once train.py has written its final.json (it writes it last)."""
        return (self.folder / "final.json").is_file()

    def command(self) -> list[str]:
        """The run's command line: under torchrun, or on one rank train.py itself (a process group of one,
        the same collectives, without torchrun's start-up of about 4 s)."""
        if self.nproc == 1:
            return [sys.executable, str(TRAIN), *self.args, "--out", str(self.folder)]
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={self.nproc}",
            str(TRAIN),
            *self.args,
            "--out",
            str(self.folder),
        ]


@dataclass(frozen=True)
class Job:
    """One variant at one seed, and the run that produces its numbers."""

    variant: Variant
    seed: int
    run: Run


@dataclass
class Plan:
    """Every job of the study and the distinct runs behind them, in table order."""

    jobs: list[Job]
    runs: list[Run]
    out: Path


def supports_local_only() -> bool:
    """Local-only training needs train.py to restrict a run to one hospital's data."""
    return "only_hospital" in {f.name for f in dataclasses.fields(DataConfig)}


def variants(hospitals: Sequence[str]) -> list[Variant]:
    """The study's variants; ``local-<H>`` for each hospital when train.py can run one alone."""
    table = list(VARIANTS)
    if supports_local_only():
        local = [
            (f"local-{h}", "federation", {"--mode": "centralized", "--set": f"data.only_hospital={json.dumps(h)}"})
            for h in hospitals
        ]
        at = [name for name, _, _ in table].index("centralized") + 1
        table[at:at] = local
    else:
        log.info("local-only needs data.only_hospital; skipping the local-<hospital> variants")
    return [
        Variant(name, group, tuple(x for pair in {**BASE, **flags}.items() for x in pair))
        for name, group, flags in table
    ]


def select(available: list[Variant], only: str | None) -> list[Variant]:
    """Variants named in ``only`` (variant or group names, comma separated); all when empty."""
    if not only:
        return available
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    known = {v.name for v in available} | {v.group for v in available}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        hint = " (local-only needs data.only_hospital)" if unknown[0].startswith("local-") else ""
        raise StudyError(
            f"--only: unknown variant or group {unknown[0]!r}{hint}; choose from: {', '.join(sorted(known))}"
        )
    return [v for v in available if v.name in wanted or v.group in wanted]


def train_args(
    variant: Variant, seed: int, preset: Path, data: str | None, extra: Sequence[str], hospitals: int
) -> list[str]:
    """train.py arguments of one job; the variant's flags and the seed come last so that they win."""
    args = ["--config", str(preset)]
    if data:
        args += ["--data", data]
    return [*args, *extra, "--num-hospitals", str(hospitals), *variant.flags, "--seed", str(seed)]


@functools.lru_cache(maxsize=1)
def _train_cli() -> Any:
    """train.py as a module, for its argument parsing (cheap: it loads no torch before training)."""
    spec = importlib.util.spec_from_file_location("_fedsim_train_cli", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {"train.mu": 0.01, ...}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resolved_settings(args: Sequence[str]) -> dict[str, Any]:
    """The settings train.py would run with, as far as they differ from the config defaults.

    Only the differences count, so a setting added to the config later (with a
    default) leaves the hashes, and with them the finished runs, valid. Settings
    declared ``launch=True`` (where a run writes, how it starts) are left out:
    they do not make another run.

    Raises:
        ConfigError: When train.py would reject the arguments.
    """
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            cfg = _train_cli().parse_args(list(args))
    except SystemExit:
        message = err.getvalue().strip()
        raise ConfigError(message.splitlines()[-1] if message else "bad arguments") from None
    defaults = _flatten(RunConfig().to_dict())
    settings = {k: v for k, v in _flatten(cfg.to_dict()).items() if defaults.get(k, object()) != v}
    for s in SETTINGS:
        if s.launch:
            settings.pop(s.key, None)
    return settings


def settings_key(args: Sequence[str], nproc: int) -> str:
    """Short hash of a run's resolved settings and rank count (the seed is one of the settings)."""
    try:
        settings: Any = resolved_settings(args)
    except ConfigError as err:
        # train.py reports the bad setting when the run starts; the raw arguments still name it.
        log.warning("train.py would reject %s: %s", shlex.join(args), err)
        settings = {"argv": list(args)}
    blob = json.dumps({"nproc": nproc, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def find_folder(root: Path, name: str, seed: int, key: str) -> Path:
    """The run's folder: an existing one with the same hash (finished first), else a new name."""
    found = sorted(root.glob(f"*-s{seed}-{key}"), key=lambda p: (not (p / "final.json").is_file(), p.name))
    return found[0] if found else root / f"{name}-s{seed}-{key}"


def build_plan(
    chosen: Sequence[Variant],
    seeds: int,
    preset: Path,
    data: str | None,
    extra: Sequence[str],
    nproc: int,
    out: Path,
    hospitals: int | None = None,
) -> Plan:
    """Jobs for every chosen variant and seed, with identical settings mapped to one run; ``hospitals``
    (default: ``nproc``, one per rank) hospitals in every run."""
    runs: dict[str, Run] = {}
    jobs = []
    for variant in chosen:
        for seed in range(seeds):
            args = train_args(variant, seed, preset, data, extra, hospitals or nproc)
            ranks = 1 if variant.centralized else nproc
            key = settings_key(args, ranks)
            if key not in runs:
                runs[key] = Run(find_folder(out / "runs", variant.name, seed, key), ranks, args)
            runs[key].jobs.append((variant.name, seed))
            jobs.append(Job(variant, seed, runs[key]))
    return Plan(jobs, list(runs.values()), out)


def describe(plan: Plan) -> str:
    """Human-readable plan: each run, its state and the variants it serves."""
    done = sum(run.done for run in plan.runs)
    head = (
        f"{len(plan.jobs)} jobs -> {len(plan.runs)} runs ({len(plan.jobs) - len(plan.runs)} shared): "
        f"{done} done, {len(plan.runs) - done} to run; out {plan.out}"
    )
    lines = [head]
    for run in plan.runs:
        state = "done" if run.done else "resume" if (run.folder / "checkpoints").is_dir() else "to run"
        served = ", ".join(sorted({name for name, _ in run.jobs}, key=[n for n, _ in run.jobs].index))
        reused = f"  (reused by {len(run.jobs) - 1})" if len(run.jobs) > 1 else ""
        lines.append(f"  {state:<7} {run.folder.name:<28} [{served}]{reused}")
        lines.append(f"          ranks={run.nproc} train.py {shlex.join(run.args)}")
    return "\n".join(lines)


def preset_hospitals(tree: dict[str, Any], nproc: int) -> list[str]:
    """The hospitals of a study's runs: the benchmark's (``data.source = benchmark``), else one per rank."""
    data = tree.get("data", {})
    if data.get("source") == "benchmark" and not data.get("path"):
        from data.benchmark import preset

        return list(preset(data.get("benchmark", {}).get("preset", "demo")).hospital_names)
    count = int(data.get("num_hospitals") or nproc)
    return [f"H{i}" for i in range(1, count + 1)]
