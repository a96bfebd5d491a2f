"""One typed config tree: dataclasses, TOML presets, command-line overrides, validation.

Precedence: dataclass defaults < ``--config`` TOML preset < ``--set key=value``
< the named flags (``--rounds`` ...). The resolved tree is written to the run
directory as ``config.json``; its hash guards resume.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from data.sites import MAX_SITE_SHIFT


class ConfigError(ValueError):
    """An invalid setting; the message names the field and what is allowed."""


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} = {value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _at_least(name: str, value: float, low: float, inclusive: bool = True) -> None:
    ok = math.isfinite(value) and (value >= low if inclusive else value > low)
    if not ok:
        raise ConfigError(f"{name} = {value!r} must be a finite number {'>=' if inclusive else '>'} {low}")


@dataclass(kw_only=True)
class SyntheticConfig:
    """The embedded synthetic dataset, used when ``data.path`` is empty."""

    patients_per_grade: int = 4
    """Patients per grade and hospital."""
    images_per_patient: int = 4
    """Images per patient, spread over the magnifications."""
    image_size: int = 800
    """Side of each square image in pixels (CRC-HGD images are 800x800)."""

    def __post_init__(self) -> None:
        _at_least("data.synthetic.patients_per_grade", self.patients_per_grade, 3)
        _at_least("data.synthetic.images_per_patient", self.images_per_patient, 1)
        _at_least("data.synthetic.image_size", self.image_size, 64)


@dataclass(kw_only=True)
class DataConfig:
    """Where images come from and how they become patch pairs."""

    path: str = ""
    """CRC-HGD-style folder, a folder with manifest.csv, or a manifest CSV; empty = embedded synthetic data."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    classes: list[str] = field(default_factory=lambda: ["Grade I", "Grade II", "Grade III"])
    """Classes to use, in label order; add "Normal" / "Mixed" for CRC-HGD's extra folders."""
    num_hospitals: int = 0
    """Hospitals in the federation; 0 = the world size (federated) or 3 (centralized)."""
    partition: str = "natural"
    """natural (manifest hospital column), iid or dirichlet (label skew)."""
    dirichlet_alpha: float = 0.5
    """Concentration of the Dirichlet label skew; small = more skewed."""
    split: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    """Train/val/test fractions of patients."""
    patient_regex: str = ""
    """Regex on the file stem giving the patient id when the data has none."""
    context_size: int = 320
    """Side of the context patch fed to the network."""
    detail_size: int = 224
    """Side of the detail patch fed to the network (native resolution)."""
    context_fov: int = 320
    """Native pixels covered by the context patch, resized to context_size (wider = more context)."""
    patches_per_image: int = 4
    """Patch pairs drawn per training image."""
    eval_patches_per_image: int = 4
    """Patch pairs drawn per validation/test image (their probabilities are averaged)."""
    min_tissue: float = 0.5
    """Minimum tissue fraction of a detail window for its centre to be sampled."""
    stain: str = "macenko"
    """Stain normalization: macenko, reinhard or none."""
    stain_reference: str = ""
    """Image to fit the stain normalizer to; empty = the built-in reference (Macenko: the published
    constants; Reinhard: the Lab statistics of a real H&E region after Macenko, see data/stain.py)."""
    site_shift: float = 0.0
    """Simulated lab differences per hospital (stain vectors, dye strength, light, blur, JPEG); 0 = off, 1 = typical."""
    stain_on_device: bool = False
    """Normalize each patch batch on the training device instead of once in the cache (the cache then holds raw pixels)."""
    cache_dir: str = ""
    """Where decoded, normalized patch pairs are cached; empty = $FEDSIM_CACHE or ~/.cache/fedsim."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    augment: bool = True
    """Random flips, 90-degree rotations and light colour jitter in training."""
    only_hospital: str = ""
    """Centralized mode only: train on this hospital alone (the local-only baseline); tests still cover all."""

    def __post_init__(self) -> None:
        if isinstance(self.synthetic, dict):
            self.synthetic = SyntheticConfig(**self.synthetic)
        _choice("data.partition", self.partition, ("natural", "iid", "dirichlet"))
        _choice("data.stain", self.stain, ("macenko", "reinhard", "none"))
        _at_least("data.num_hospitals", self.num_hospitals, 0)
        _at_least("data.dirichlet_alpha", self.dirichlet_alpha, 0.0, inclusive=False)
        if not 0 <= self.site_shift <= MAX_SITE_SHIFT:
            raise ConfigError(f"data.site_shift = {self.site_shift!r} must lie in [0, {MAX_SITE_SHIFT:g}] "
                              "(0 = off, 1 = typical)")
        if len(self.split) != 3 or not all(math.isfinite(f) and f >= 0 for f in self.split) \
                or abs(sum(self.split) - 1) > 1e-6:
            raise ConfigError(f"data.split = {self.split} must be three non-negative fractions summing to 1")
        for name in ("context_size", "detail_size", "context_fov", "patches_per_image", "eval_patches_per_image"):
            _at_least(f"data.{name}", getattr(self, name), 1)
        if not 0 <= self.min_tissue <= 1:
            raise ConfigError(f"data.min_tissue = {self.min_tissue} must lie in [0, 1]")
        _at_least("data.num_workers", self.num_workers, 0)
        if len(self.classes) < 2:
            raise ConfigError(f"data.classes = {self.classes} must name at least two classes")
        try:
            re.compile(self.patient_regex)
        except re.error as err:
            raise ConfigError(f"data.patient_regex = {self.patient_regex!r} is not a regular expression: {err}") from None


@dataclass(kw_only=True)
class ModelConfig:
    """The dual-stream network."""

    backbone: str = "resnetrs50"
    """Any timm model name; tiny ones (test_resnet, resnet10t) suit CPU demos."""
    scales: str = "dual"
    """dual (context + detail), detail or context (single-stream ablation)."""
    hidden: int = 512
    """Width of the Dense layer of the head."""
    dropout: float = 0.5
    """Dropout before the last layer."""
    pretrained: str = ""
    """Local weights (safetensors or a state dict) for the backbones; nothing is downloaded."""

    def __post_init__(self) -> None:
        _choice("model.scales", self.scales, ("dual", "detail", "context"))
        _at_least("model.hidden", self.hidden, 1)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout = {self.dropout} must lie in [0, 1)")
        if not self.backbone:
            raise ConfigError("model.backbone must name a timm model")


@dataclass(kw_only=True)
class TrainConfig:
    """Local training and the federation around it (defaults: the paper's settings)."""

    mode: str = "federated"
    """federated (one hospital per rank) or centralized (all hospitals' data pooled)."""
    rounds: int = 10
    """Communication rounds."""
    local_epochs: int = 3
    """Local epochs per round (centralized: epochs between evaluations)."""
    batch_size: int = 16
    """Patch pairs per optimizer step on each rank."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (effective batch = batch_size * grad_accum)."""
    lr: float = 3e-4
    """Adam learning rate."""
    weight_decay: float = 1e-4
    """Adam weight decay (L2)."""
    mu: float = 0.01
    """FedProx proximal weight; 0 = plain FedAvg."""
    mixup_alpha: float = 0.2
    """MixUp Beta(alpha, alpha); 0 disables MixUp."""
    bn: str = "average"
    """average (FedAvg of BatchNorm too) or local (FedBN)."""
    dropout: float = 0.0
    """Probability that a client drops out of a round (seeded); it then contributes weight 0."""
    straggler: float = 0.0
    """Probability that a client stops after a random 1..local_epochs-1 epochs in a round."""
    faulty_hospitals: list[str] = field(default_factory=list)
    """Hospitals that dropout/straggler apply to; empty = every hospital."""
    simulate_nan: list[str] = field(default_factory=list)
    """Fault simulation: these hospitals' local updates turn NaN every round (the update guard must catch it)."""
    simulate_crash: str = ""
    """Fault simulation: "H2:3" kills hospital H2's process (SIGKILL) in the middle of round 3, once per run directory."""
    simulate_hang: str = ""
    """Fault simulation: "H2:3" makes hospital H2 stop responding in round 3 (the timeout must name it)."""
    seed: int = 0
    """Every random draw derives from (seed, round, client)."""
    device: str = "auto"
    """auto (CUDA when present), cuda or cpu."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32."""
    compile: bool = False
    """torch.compile the model (GPU runs)."""
    timeout_s: float = 1800.0
    """Collective timeout: a hung rank ends the run with an error instead of hanging it."""
    keep_checkpoints: int = 3
    """Round checkpoints kept in OUT/checkpoints (the latest is also OUT/checkpoint.pt)."""
    resume: bool = False
    """Expect to continue a run: warn when OUT has no checkpoint. Continuing does not need it: a run on a
    directory with round checkpoints of the same config always continues after the last one."""
    xai_per_grade: int = 2
    """Grad-CAM panels per grade written by each hospital at the end (OUT/xai/<hospital>/); 0 = none."""

    def __post_init__(self) -> None:
        _choice("train.mode", self.mode, ("federated", "centralized"))
        _choice("train.bn", self.bn, ("average", "local"))
        _choice("train.device", self.device, ("auto", "cuda", "cpu"))
        _choice("train.precision", self.precision, ("auto", "bf16", "fp32"))
        for name in ("rounds", "local_epochs", "batch_size", "grad_accum", "keep_checkpoints"):
            _at_least(f"train.{name}", getattr(self, name), 1)
        _at_least("train.lr", self.lr, 0.0, inclusive=False)
        for name in ("weight_decay", "mu", "mixup_alpha"):
            _at_least(f"train.{name}", getattr(self, name), 0.0)
        _at_least("train.timeout_s", self.timeout_s, 1.0)
        if self.timeout_s > 1e7:  # timedelta and the stores cap it; 1e7 s is 115 days
            raise ConfigError(f"train.timeout_s = {self.timeout_s!r} must be at most 1e7 seconds")
        for name in ("simulate_crash", "simulate_hang"):
            value = getattr(self, name)
            if value and not re.fullmatch(r"[^:]+:[1-9][0-9]*", value):
                raise ConfigError(f"train.{name} = {value!r} must look like HOSPITAL:ROUND, e.g. H2:3")
        for name in ("dropout", "straggler"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"train.{name} = {getattr(self, name)} must be a probability in [0, 1]")
        _at_least("train.seed", self.seed, 0)


@dataclass(kw_only=True)
class RunConfig:
    """The whole run."""

    out: str = "runs/latest"
    """Run directory: config.json, metrics.jsonl, checkpoint.pt, tb/, final.json."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict."""
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Hash of what determines the trained weights (not the output folder or the resume flag)."""
        tree = self.to_dict()
        tree.pop("out")
        # Settings that do not change the weights: a run may be extended, retimed or restarted with them changed.
        for key in ("resume", "rounds", "xai_per_grade", "keep_checkpoints", "timeout_s", "simulate_crash", "simulate_hang"):
            tree["train"].pop(key)
        tree["data"].pop("num_workers")
        blob = json.dumps(tree, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def from_dict(tree: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from nested dicts, rejecting unknown keys by name."""
    return _build(RunConfig, tree, "")


def _build(cls: type, tree: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(tree) - known)
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"unknown setting {prefix}{unknown[0]} ({where} has: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in tree.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a table of settings")
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, hint)
    return cls(**kwargs)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check/convert one value to its annotated type, with a one-line error."""
    origin = get_origin(hint)
    if origin is list:
        (inner,) = get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(name, v, inner) for v in value]
    try:
        if hint is bool:
            return _to_bool(value)
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return hint(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be of type {hint.__name__}, got {value!r}") from None


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML preset with a one-line error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(t, "train.mu", 0.1)`` sets ``t["train"]["mu"]``, creating tables."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a table of settings")
    node[parts[-1]] = value


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"train.mu=0.1"`` -> ("train.mu", 0.1); the value is read as TOML, else kept as a string."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def resolve(preset: str | None, assignments: list[tuple[str, Any]]) -> RunConfig:
    """Defaults, then the preset, then each assignment in order."""
    tree = load_toml(preset) if preset else {}
    for key, value in assignments:
        set_dotted(tree, key, value)
    return from_dict(tree)


def save(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as JSON (atomically)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
