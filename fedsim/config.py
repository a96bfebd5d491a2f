"""One typed config tree: dataclasses, TOML presets, command-line overrides, validation.

Precedence: dataclass defaults < ``--config`` TOML preset < ``--set key=value``
< the named flags (``--rounds`` ...). The resolved tree is written to the run
directory as ``config.json``; its hash guards resume.

Every value is checked when the tree is built, each problem one :class:`ConfigError`
line naming the field: TOML types strictly (no boolean for a count, no list for a
path), a choice against its ``Literal`` type, every float finite, every number within
its documented range (bounds far above real use, that stop what the code cannot use).
:func:`check_inputs` then checks the files the config names, before any work.

Each field is declared once (:func:`fedsim.settings.setting`): its type, default,
docstring, its flags and whether it changes the trained weights. A field with a plain
default has no flag and changes the weights. :data:`SETTINGS` lists them all; the
command lines, :meth:`RunConfig.digest` and the study runner derive from it. This
module loads neither torch nor numpy, so ``train.py --help`` and a bad setting are fast.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import sys
from dataclasses import field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from data.files import write_atomic
from data.limits import MAX_SITE_SHIFT
from data.records import GRADE_NAMES
from fedsim.errors import UserError
from fedsim.settings import Setting, choices, declared, plain_type, setting, table


class ConfigError(UserError):
    """An invalid setting; the message names the field and what is allowed."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The evaluated annotations of a table (evaluating them is slow; every config build needs them)."""
    return get_type_hints(cls)


def _check_choices(table: Any) -> None:
    """Each field of ``table`` whose type is a ``Literal`` holds one of its values; the message lists them."""
    hints = _hints(type(table))
    for f in fields(table):
        allowed, value = choices(hints[f.name]), getattr(table, f.name)
        if allowed and value not in allowed:
            raise ConfigError(
                f"{table.PREFIX}{f.name} = {value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}"
            )


def _show(value: Any) -> str:
    """``repr`` of a value in an error, cut short when it is a huge number or a long text."""
    text = repr(value)
    if len(text) <= 40:
        return text
    if isinstance(value, int):
        return f"{text[:6]}...({len(str(abs(value)))} digits)"
    return text[:37] + "..."


def _at_least(name: str, value: float, low: float, inclusive: bool = True) -> None:
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float is still finite
        finite = True
    ok = finite and (value >= low if inclusive else value > low)
    if not ok:
        raise ConfigError(f"{name} = {_show(value)} must be a finite number {'>=' if inclusive else '>'} {low}")


def _num(value: float) -> str:
    """A bound as people write it: 65536, 1e+04 -> 10000, 4294967295."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def _within(name: str, value: float, low: float, high: float, inclusive: bool = True) -> None:
    """``low <= value <= high`` (``low < value`` unless inclusive), finite; one line naming the field and the range."""
    _at_least(name, value, low, inclusive)
    if value > high:
        raise ConfigError(
            f"{name} = {_show(value)} is too large: it must lie in "
            f"{'[' if inclusive else '('}{_num(low)}, {_num(high)}]"
        )


#: Upper bounds. They stop values the code cannot use (overflow, absurd allocations), far above real use.
MAX_SIDE = 8192  # patch sides and fields of view, pixels
MAX_PATCHES = 4096  # patch pairs per image
MAX_COUNT = 100_000  # rounds
MAX_EPOCHS = 10_000
MAX_BATCH = 65_536
MAX_HIDDEN = 65_536
MAX_HOSPITALS = 4096
MAX_WORKERS = 256
MAX_CHECKPOINTS = 10_000
MAX_XAI = 1000
MAX_SYNTHETIC = 1000  # synthetic patients per grade, images per patient
MAX_LR = 10.0
MAX_WEIGHT_DECAY = 10.0
MAX_MU = 1e4
MAX_MIXUP = 1000.0
MAX_DIRICHLET = 1e6
MAX_SEED = 2**32 - 1  # numpy's legacy seeding range; torch.manual_seed and SeedSequence take it too


@table
class SyntheticConfig:
    """The embedded synthetic dataset, used when ``data.path`` is empty."""

    PREFIX: ClassVar[str] = "data.synthetic."  # the dotted name of a field, in its error messages

    patients_per_grade: int = 4
    """Patients per grade and hospital, 3..1000."""
    images_per_patient: int = 4
    """Images per patient, spread over the magnifications, 1..1000."""
    image_size: int = 800
    """Side of each square image in pixels, 64..8192 (CRC-HGD images are 800x800)."""

    def __post_init__(self) -> None:
        _check_choices(self)
        _within("data.synthetic.patients_per_grade", self.patients_per_grade, 3, MAX_SYNTHETIC)
        _within("data.synthetic.images_per_patient", self.images_per_patient, 1, MAX_SYNTHETIC)
        _within("data.synthetic.image_size", self.image_size, 64, MAX_SIDE)


@table
class DataConfig:
    """Where images come from and how they become patch pairs."""

    PREFIX: ClassVar[str] = "data."

    path: str = setting(
        "",
        flag="--data",
        help="CRC-HGD-style folder, folder with manifest.csv, or manifest CSV (default: embedded synthetic data)",
    )
    """CRC-HGD-style folder, a folder with manifest.csv, or a manifest CSV (it must exist); empty = embedded
    synthetic data."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    classes: list[str] = setting(list(GRADE_NAMES), prepare="--classes", help="comma-separated classes in label order")
    """Classes to use, in label order (at least two, no two alike ignoring case); add "Normal" / "Mixed"
    for CRC-HGD's extra folders."""
    num_hospitals: int = setting(
        0, flag="--num-hospitals", help="hospitals, at least the number of ranks (default: one per rank)"
    )
    """Hospitals in the federation, 0..4096; 0 = the world size (federated) or 3 (centralized)."""
    partition: Literal["auto", "natural", "iid", "dirichlet"] = setting(
        "auto",
        flag="--partition",
        prepare="--partition",
        help="auto (natural when every image names its hospital, else iid) | natural | iid | dirichlet",
    )
    """How images are assigned to hospitals: auto (natural when every image has a hospital, else
    stratified iid), natural (the manifest's hospital column), iid (patients dealt out per split and
    grade) or dirichlet (label skew)."""
    dirichlet_alpha: float = setting(0.5, prepare="--alpha", help="Dirichlet concentration (partition dirichlet)")
    """Concentration of the Dirichlet label skew, in (0, 1e6]; small = more skewed."""
    split: list[float] = setting([0.7, 0.15, 0.15], prepare="--split", metavar=("TRAIN", "VAL", "TEST"))
    """Train/val/test fractions of patients."""
    patient_regex: str = setting("", prepare="--patient-regex", help="regex on file stems giving patient ids")
    """Regex on the file stem giving the patient id when the data has none."""
    context_size: int = setting(320, prepare="--context-size")
    """Side of the context patch fed to the network, 1..8192 pixels."""
    detail_size: int = setting(224, prepare="--detail-size")
    """Side of the detail patch fed to the network (native resolution), 1..8192 pixels."""
    context_fov: int = setting(320, prepare="--context-fov")
    """Native pixels covered by the context patch, resized to context_size (wider = more context), 1..8192."""
    patches_per_image: int = setting(4, prepare="--patches-per-image")
    """Patch pairs drawn per training image, 1..4096."""
    eval_patches_per_image: int = setting(4, prepare="--eval-patches-per-image")
    """Patch pairs drawn per validation/test image (their probabilities are averaged), 1..4096."""
    min_tissue: float = setting(0.5, prepare="--min-tissue")
    """Minimum tissue fraction of a detail window for its centre to be sampled."""
    stain: Literal["macenko", "reinhard", "none"] = setting(
        "macenko", flag="--stain", prepare="--stain", help="macenko | reinhard | none"
    )
    """Stain normalization: macenko, reinhard or none."""
    stain_reference: str = setting(
        "",
        prepare="--stain-reference",
        help="image to fit the normalizer to (default: the built-in reference of data/stain.py)",
    )
    """Image file to fit the stain normalizer to (it must exist and be readable); empty = the built-in
    reference (Macenko: the published constants; Reinhard: the Lab statistics of a real H&E region after
    Macenko, see data/stain.py)."""
    site_shift: float = setting(
        0.0,
        prepare="--site-shift",
        help="simulated lab differences per hospital (data.sites): 0 = off, 1 = a typical spread",
    )
    """Simulated lab differences per hospital (stain vectors, dye strength, light, blur, JPEG); 0 = off, 1 = typical."""
    stain_on_device: bool = False
    """Normalize each patch batch on the training device instead of once in the cache (the cache then holds
    raw pixels)."""
    cache_dir: str = ""
    """Where decoded, normalized patch pairs are cached; empty = $FEDSIM_CACHE or ~/.cache/fedsim."""
    num_workers: int = setting(0, flag="--workers", help="DataLoader workers per rank", weights=False)
    """DataLoader worker processes per rank, 0..256."""
    augment: bool = True
    """Random flips, 90-degree rotations and light colour jitter in training."""
    only_hospital: str = ""
    """Centralized mode only: train on this hospital alone (the local-only baseline); tests still cover all."""

    def __post_init__(self) -> None:
        if isinstance(self.synthetic, dict):
            self.synthetic = SyntheticConfig(**self.synthetic)
        _check_choices(self)
        _within("data.num_hospitals", self.num_hospitals, 0, MAX_HOSPITALS)
        _within("data.dirichlet_alpha", self.dirichlet_alpha, 0.0, MAX_DIRICHLET, inclusive=False)
        if not 0 <= self.site_shift <= MAX_SITE_SHIFT:
            raise ConfigError(
                f"data.site_shift = {self.site_shift!r} must lie in [0, {MAX_SITE_SHIFT:g}] (0 = off, 1 = typical)"
            )
        if (
            len(self.split) != 3
            or not all(math.isfinite(f) and f >= 0 for f in self.split)
            or abs(sum(self.split) - 1) > 1e-6
        ):
            raise ConfigError(f"data.split = {self.split} must be three non-negative fractions summing to 1")
        for name in ("context_size", "detail_size", "context_fov"):
            _within(f"data.{name}", getattr(self, name), 1, MAX_SIDE)
        for name in ("patches_per_image", "eval_patches_per_image"):
            _within(f"data.{name}", getattr(self, name), 1, MAX_PATCHES)
        if not 0 <= self.min_tissue <= 1:
            raise ConfigError(f"data.min_tissue = {self.min_tissue} must lie in [0, 1]")
        _within("data.num_workers", self.num_workers, 0, MAX_WORKERS)
        if len(self.classes) < 2:
            raise ConfigError(f"data.classes = {self.classes} must name at least two classes")
        seen: dict[str, str] = {}
        for name in self.classes:
            if not name.strip():
                raise ConfigError(f"data.classes = {self.classes} holds an empty class name")
            key = name.strip().casefold()
            if key in seen:
                how = "" if seen[key] == name else f" ({seen[key]!r} and {name!r} differ only in case or spaces)"
                raise ConfigError(f"data.classes = {self.classes} names {seen[key]!r} twice{how}")
            seen[key] = name
        try:
            re.compile(self.patient_regex)
        except re.error as err:
            raise ConfigError(
                f"data.patient_regex = {self.patient_regex!r} is not a regular expression: {err}"
            ) from None


@table
class ModelConfig:
    """The dual-stream network."""

    PREFIX: ClassVar[str] = "model."

    backbone: str = setting("resnetrs50", flag="--backbone", help="timm model name (default resnetrs50)")
    """Any timm model name; tiny ones (test_resnet, resnet10t) suit CPU demos."""
    scales: Literal["dual", "detail", "context"] = setting("dual", flag="--scales", help="dual | detail | context")
    """dual (context + detail), detail or context (single-stream ablation)."""
    hidden: int = 512
    """Width of the Dense layer of the head, 1..65536."""
    dropout: float = 0.5
    """Dropout before the last layer."""
    pretrained: str = setting("", flag="--pretrained", help="local backbone weights (.safetensors or torch state dict)")
    """Local weights (safetensors or a state dict) for the backbones (the file must exist and fit the
    backbone); nothing is downloaded."""
    norm: Literal["auto", "batch", "group"] = "auto"
    """The backbones' normalization: batch, group (GroupNorm, gcd(C, 32) groups) or auto (group under
    differential privacy, whose per-sample gradients BatchNorm would mix, else batch)."""

    def __post_init__(self) -> None:
        _check_choices(self)
        _within("model.hidden", self.hidden, 1, MAX_HIDDEN)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout = {self.dropout} must lie in [0, 1)")
        if not self.backbone:
            raise ConfigError("model.backbone must name a timm model")


@table
class DPConfig:
    """Differential privacy (off by default; README "Privacy")."""

    PREFIX: ClassVar[str] = "train.dp."

    level: Literal["off", "sample", "client"] = setting(
        "off", flag="--dp", help="off | sample (DP-SGD in each hospital) | client (DP-FedAvg)"
    )
    """off; sample (DP-SGD inside each hospital: per-sample clipping and noise at every step, Poisson
    batches; protects each patch pair) or client (DP-FedAvg: each participant's update clipped, noise on the
    sum; protects a whole hospital)."""
    noise_multiplier: float = setting(1.0, flag="--noise-multiplier", help="DP noise multiplier sigma (default 1.0)")
    """sigma, in [0, 1e4]: the noise std is sigma times the clipping bound (ignored when target_epsilon > 0)."""
    target_epsilon: float = setting(
        0.0, flag="--target-epsilon", help="derive sigma so the run spends this epsilon (0 = use sigma)"
    )
    """> 0: derive sigma so that the whole run spends this epsilon (per hospital for sample, for the
    federation for client); 0: use noise_multiplier."""
    max_grad_norm: float = 1.0
    """sample: C, the L2 bound of one sample's gradient over all parameters, in (0, 1e6]."""
    max_update_norm: float = 1.0
    """client: S, the L2 bound of one hospital's update (its weights minus the round's global ones), in (0, 1e6]."""
    delta: float = 1e-5
    """delta of the (epsilon, delta) guarantee, in (0, 0.1]; keep it below 1/(samples of a hospital) for
    sample, below 1/(hospitals) for client."""
    accountant: Literal["rdp", "prv"] = "rdp"
    """Opacus's accountant: rdp (Renyi DP) or prv (privacy random variables, tighter)."""
    max_epsilon: float = 0.0
    """> 0: a budget. sample: a hospital whose next round would spend more sits out the rest of the run
    ("budget spent"); client: the run ends before such a round. 0 = no budget."""
    noise_seed: Literal["secret", "derived"] = "secret"
    """secret (noise from the OS's randomness: private, not reproducible) or derived (from the seed: runs
    and resumes repeat bit for bit, but anyone who knows the config can remove the noise: studies only)."""
    method: Literal["hooks", "functorch"] = "hooks"
    """sample: how per-sample gradients are computed, hooks (per-layer rules, faster on CPU) or functorch
    (torch.func.vmap)."""

    def __post_init__(self) -> None:
        _check_choices(self)
        _within("train.dp.noise_multiplier", self.noise_multiplier, 0.0, 1e4)
        _within("train.dp.target_epsilon", self.target_epsilon, 0.0, 1e6)
        _within("train.dp.max_epsilon", self.max_epsilon, 0.0, 1e6)
        for name in ("max_grad_norm", "max_update_norm"):
            _within(f"train.dp.{name}", getattr(self, name), 0.0, 1e6, inclusive=False)
        _within("train.dp.delta", self.delta, 0.0, 0.1, inclusive=False)

    @property
    def enabled(self) -> bool:
        return self.level != "off"


@table
class SecAggConfig:
    """Secure aggregation's fixed-point encoding and masks (README "Privacy")."""

    PREFIX: ClassVar[str] = "train.secagg."

    clip: float = 8.0
    """Each rank's weighted update is clipped to [-clip, clip] per coordinate before quantization, in (0, 1e6]
    (Flower SecAgg+'s default 8); clipped coordinates are counted in the round's record."""
    levels: int = 2**22
    """Quantization levels over [-clip, clip]: a power of two with ranks * levels < 2**32 (Flower's 2**22)."""
    wire: Literal["int64", "int32"] = "int32"
    """What the all-reduce carries: int32 (the masked values in place; the backend's int32 sum wraps modulo
    2**32, which is the arithmetic the masks need: checked by a probe all-reduce at start) or int64 (values in
    [0, 2**32) whose sum cannot overflow: twice the bytes, for a backend whose int32 sum does not wrap)."""
    prg: Literal["aes", "device"] = "aes"
    """Mask generator: aes (AES-128-CTR, cryptographic) or device (torch's generator on the device:
    statistical, masks never leave the GPU)."""

    def __post_init__(self) -> None:
        _within("train.secagg.clip", self.clip, 0.0, 1e6, inclusive=False)
        _within("train.secagg.levels", self.levels, 2, 2**31)
        if self.levels & (self.levels - 1):
            raise ConfigError(f"train.secagg.levels = {self.levels} must be a power of two")
        _check_choices(self)


@table
class TrainConfig:
    """Local training and the federation around it (defaults: the paper's settings)."""

    PREFIX: ClassVar[str] = "train."

    mode: Literal["federated", "centralized"] = setting("federated", flag="--mode", help="federated | centralized")
    """federated (each rank hosts one or more hospitals) or centralized (all hospitals' data pooled)."""
    rounds: int = setting(10, flag="--rounds", help="communication rounds (paper: 10)", weights=False)
    """Communication rounds, 1..100000."""
    local_epochs: int = setting(3, flag="--local-epochs", help="local epochs per round (paper: 3)")
    """Local epochs per round (centralized: epochs between evaluations), 1..10000."""
    batch_size: int = setting(16, flag="--batch-size", help="patch pairs per step and rank")
    """Patch pairs per optimizer step on each rank, 1..65536."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (effective batch = batch_size * grad_accum), 1..65536."""
    lr: float = setting(3e-4, flag="--lr", help="Adam learning rate (paper: 3e-4)")
    """Adam learning rate, in (0, 10]."""
    weight_decay: float = 1e-4
    """Adam weight decay (L2), in [0, 10]."""
    mu: float = setting(0.01, flag="--mu", help="FedProx proximal weight; 0 = FedAvg (paper: 0.01)")
    """FedProx proximal weight, in [0, 1e4]; 0 = plain FedAvg."""
    mixup_alpha: float = setting(
        0.2, flag="--mixup-alpha", help="MixUp alpha; 0 disables it (needed under --dp sample)"
    )
    """MixUp Beta(alpha, alpha), alpha in [0, 1000]; 0 disables MixUp."""
    bn: Literal["average", "local"] = setting("average", flag="--bn", help="average | local (FedBN)")
    """average (FedAvg of BatchNorm too) or local (FedBN)."""
    clients_per_round: int = setting(
        0, flag="--clients-per-round", help="hospitals trained per round, drawn from (seed, round); 0 = all"
    )
    """Hospitals that train in each round, drawn from (seed, round) alone; 0 = all of them."""
    algorithm: Literal["fedavg", "scaffold"] = setting(
        "fedavg", flag="--algorithm", help="fedavg (FedProx with --mu > 0) | scaffold"
    )
    """fedavg (with train.mu > 0: FedProx) or scaffold (control variates, option II of Karimireddy et al. 2020)."""
    server_optimizer: Literal["sgd", "avgm", "adam", "yogi", "adagrad"] = setting(
        "sgd", flag="--server-optimizer", help="sgd (FedAvg with --server-lr 1) | avgm | adam | yogi | adagrad"
    )
    """What every rank does with the aggregated mean: sgd (with server_lr 1: plain FedAvg), avgm, adam, yogi,
    adagrad (Reddi et al. 2021)."""
    server_lr: float = setting(
        1.0, flag="--server-lr", help="server learning rate (default 1.0: with sgd, plain FedAvg)"
    )
    """Server learning rate, in (0, 100]; 1 with sgd = FedAvg."""
    server_momentum: float = 0.9
    """avgm's momentum, in [0, 1)."""
    server_betas: list[float] = setting([0.9, 0.99])
    """adam/yogi/adagrad's (beta1, beta2), each in [0, 1)."""
    server_tau: float = 1e-3
    """adam/yogi/adagrad's adaptivity tau, in (0, 1]."""
    local_optimizer: Literal["adam", "sgd"] = "adam"
    """The hospitals' optimizer: adam (the paper's) or sgd."""
    client_optimizer: Literal["fresh", "persistent"] = "fresh"
    """fresh (a new optimizer every round, as in the paper) or persistent (each hospital keeps its optimizer's
    state between rounds, in its state store)."""
    client_state_device: Literal["cpu", "device"] = setting("cpu", weights=False)
    """Where hospitals' persistent state lives between rounds: cpu (pinned host memory) or device."""
    dropout: float = setting(0.0, flag="--dropout", help="probability a client drops out of a round")
    """Probability that a client drops out of a round (seeded); it then contributes weight 0."""
    straggler: float = setting(0.0, flag="--straggler", help="probability a client stops early in a round")
    """Probability that a client stops after a random 1..local_epochs-1 epochs in a round."""
    faulty_hospitals: list[str] = setting([])
    """Hospitals that dropout/straggler apply to; empty = every hospital."""
    simulate_nan: list[str] = setting([])
    """Fault simulation: these hospitals' local updates turn NaN every round (the update guard must catch it)."""
    simulate_crash: str = setting("", weights=False)
    """Fault simulation: "H2:3" kills hospital H2's process (SIGKILL) in the middle of round 3, once per run directory;
    "H1:3:POINT" kills it at POINT of round 3's commit sequence instead: before-checkpoint, checkpoint (during its
    write) or after-checkpoint (rank 0, the writer, is the one that matters there)."""
    simulate_hang: str = setting("", weights=False)
    """Fault simulation: "H2:3" makes hospital H2 stop responding in round 3 (the timeout must name it)."""
    seed: int = setting(0, flag="--seed", prepare="--seed", help="seed of every random draw")
    """Every random draw derives from (seed, round, client); 0..2**32-1 (4294967295)."""
    device: Literal["auto", "cuda", "cpu"] = setting("auto", flag="--device", help="auto | cuda | cpu")
    """auto (CUDA when present), cuda or cpu."""
    precision: Literal["auto", "bf16", "fp32"] = setting("auto", flag="--precision", help="auto | bf16 | fp32")
    """auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32."""
    compile: bool = setting(False, flag="--compile", help="torch.compile the model (GPU)")
    """torch.compile the model (GPU runs)."""
    timeout_s: float = setting(1800.0, weights=False)
    """Collective timeout, 1..1e7 seconds: a hung rank ends the run with an error instead of hanging it."""
    keep_checkpoints: int = setting(3, weights=False)
    """Round checkpoints kept in OUT/checkpoints (the latest is also OUT/checkpoint.pt), 1..10000."""
    resume: bool = setting(
        False,
        flag="--resume",
        launch=True,
        help="expect to continue a run: warn if OUT has no "
        "checkpoint (a run on a directory with round checkpoints of the same config always "
        "continues after the last)",
    )
    """Expect to continue a run: warn when OUT has no checkpoint. Continuing does not need it: a run on a
    directory with round checkpoints of the same config always continues after the last one."""
    xai_per_grade: int = setting(2, weights=False)
    """Grad-CAM panels per grade written by each hospital at the end (OUT/xai/<hospital>/), 0..1000; 0 = none."""
    dp: DPConfig = field(default_factory=DPConfig)
    """Differential privacy: the train.dp table."""
    secure_aggregation: bool = setting(
        False,
        flag="--secure-aggregation",
        help="sum the hospitals' contributions with pairwise masks that cancel in the all-reduce",
    )
    """Sum the hospitals' contributions with pairwise masks that cancel in the all-reduce (Bonawitz et al.
    2017, without dropout recovery): no rank sees another's contribution, only the sum."""
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    """Secure aggregation's encoding: the train.secagg table."""

    def __post_init__(self) -> None:
        _check_choices(self)
        _within("train.clients_per_round", self.clients_per_round, 0, MAX_HOSPITALS)
        _within("train.server_lr", self.server_lr, 0.0, 100.0, inclusive=False)
        _within("train.server_tau", self.server_tau, 0.0, 1.0, inclusive=False)
        for name, value in (
            ("train.server_momentum", self.server_momentum),
            *((f"train.server_betas[{i}]", b) for i, b in enumerate(self.server_betas)),
        ):
            if not (math.isfinite(value) and 0 <= value < 1):
                raise ConfigError(f"{name} = {value!r} must lie in [0, 1)")
        if len(self.server_betas) != 2:
            raise ConfigError(f"train.server_betas = {self.server_betas} must be two numbers (beta1, beta2)")
        for name, high in (
            ("rounds", MAX_COUNT),
            ("local_epochs", MAX_EPOCHS),
            ("batch_size", MAX_BATCH),
            ("grad_accum", MAX_BATCH),
            ("keep_checkpoints", MAX_CHECKPOINTS),
        ):
            _within(f"train.{name}", getattr(self, name), 1, high)
        _within("train.lr", self.lr, 0.0, MAX_LR, inclusive=False)
        for name, high in (("weight_decay", MAX_WEIGHT_DECAY), ("mu", MAX_MU), ("mixup_alpha", MAX_MIXUP)):
            _within(f"train.{name}", getattr(self, name), 0.0, high)
        _at_least("train.timeout_s", self.timeout_s, 1.0)
        if self.timeout_s > 1e7:  # timedelta and the stores cap it; 1e7 s is 115 days
            raise ConfigError(f"train.timeout_s = {self.timeout_s!r} must be at most 1e7 seconds")
        for name in ("simulate_crash", "simulate_hang"):
            value = getattr(self, name)
            crash_points = "training|before-checkpoint|checkpoint|after-checkpoint"
            points = crash_points if name == "simulate_crash" else "training"
            if value and not re.fullmatch(rf"[^:]+:[1-9][0-9]*(:({points}))?", value):
                raise ConfigError(
                    f"train.{name} = {value!r} must look like HOSPITAL:ROUND, e.g. H2:3"
                    + (
                        " (or HOSPITAL:ROUND:POINT, POINT one of " + points.replace("|", ", ") + ")"
                        if name == "simulate_crash"
                        else ""
                    )
                )
        for name in ("dropout", "straggler"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"train.{name} = {getattr(self, name)} must be a probability in [0, 1]")
        _within("train.seed", self.seed, 0, MAX_SEED)
        _within("train.xai_per_grade", self.xai_per_grade, 0, MAX_XAI)


@table
class RunConfig:
    """The whole run."""

    PREFIX: ClassVar[str] = ""

    out: str = setting("runs/latest", flag="--out", help="run directory (default runs/latest)", launch=True)
    """Run directory: config.json, metrics.jsonl, checkpoint.pt, tb/, final.json; must not be empty."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _check_choices(self)
        if not str(self.out).strip():
            raise ConfigError(f"out = {self.out!r} must name a run directory")
        _check_privacy(self)

    @property
    def norm(self) -> str:
        """The backbones' normalization layers, ``model.norm`` with auto resolved."""
        if self.model.norm != "auto":
            return self.model.norm
        return "group" if self.train.dp.enabled else "batch"

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict."""
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Hash of the settings that determine the trained weights (those declared ``weights=True``).

        A run may be extended, retimed or restarted with any other setting changed (rounds, timeouts,
        the output folder ...): resume compares this hash.
        """
        tree = self.to_dict()
        for s in SETTINGS:
            if not s.weights:
                _pop_dotted(tree, s.key)
        blob = json.dumps(tree, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _pop_dotted(tree: dict[str, Any], key: str) -> None:
    *path, name = key.split(".")
    for part in path:
        tree = tree[part]
    del tree[name]


def _check_privacy(cfg: RunConfig) -> None:
    """Settings that differential privacy or secure aggregation cannot honour, refused in one line."""
    t, level = cfg.train, cfg.train.dp.level
    if level != "off":
        why = f"train.dp.level = {level}"
        refusals = [
            (t.mode == "centralized", "train.mode = centralized (DP applies to federated hospitals)"),
            (cfg.norm == "batch", "model.norm = batch (BatchNorm mixes samples; use group or auto)"),
            (t.bn == "local", "train.bn = local (FedBN keeps BatchNorm layers; DP models have none)"),
            (t.compile, "train.compile (the per-sample gradient hooks need the eager model)"),
        ]
        if level == "sample":
            refusals += [
                (
                    t.mixup_alpha > 0,
                    "train.mixup_alpha > 0 (MixUp mixes samples, which per-sample accounting "
                    "cannot charge: set train.mixup_alpha = 0)",
                ),
                (t.grad_accum > 1, "train.grad_accum > 1 (a DP step is one Poisson batch)"),
            ]
        else:
            refusals += [
                (
                    t.algorithm == "scaffold",
                    "train.algorithm = scaffold (its control variates would cross ranks unclipped and without noise)",
                )
            ]
        for bad, what in refusals:
            if bad:
                raise ConfigError(f"{why} cannot be combined with {what}")
    if t.secure_aggregation and t.mode == "centralized":
        raise ConfigError("train.secure_aggregation applies to federated runs, not train.mode = centralized")


#: Every leaf setting of the tree, in declaration order: the source of the flags, the digest and the study's keys.
SETTINGS: tuple[Setting, ...] = declared(RunConfig)
_BY_KEY = {s.key: s for s in SETTINGS}


def setting_of(key: str) -> Setting:
    """The declaration of a dotted key (``"train.mu"``); KeyError names an unknown one."""
    return _BY_KEY[key]


def from_dict(tree: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from nested dicts, rejecting unknown keys by name."""
    return _build(RunConfig, tree, "")


def _build(cls: type, tree: dict[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
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


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _describe(value: Any) -> str:
    """How a wrong value is shown in an error: its TOML kind, and the value when short."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (list, tuple)):
        text = repr(list(value))
        return f"the list {text}" if len(text) <= 60 else f"a list of {len(value)} values"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check one value against its annotated type, strictly, with a one-line error.

    A string field takes strings only, a count integers only (no booleans: ``true``
    is not 1), a float field numbers (integers included), a boolean ``true``/``false``
    (or yes/no/on/off/1/0 written as a string); a numeric field also takes a string
    that spells a number. Lists take lists, or a comma-separated string.
    """
    hint = plain_type(hint)  # a Literal is checked as its values' type here, its choices by the table
    origin = get_origin(hint)
    if origin is list:
        (inner,) = get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {_describe(value)}")
        return [_coerce(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
    wrong = ConfigError(f"{name} must be {_KINDS.get(hint, hint.__name__)}, got {_describe(value)}")
    if hint is str:
        if not isinstance(value, str):
            raise wrong
        return value
    if hint is bool:
        try:
            return _to_bool(value)
        except ValueError:
            raise wrong from None
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise wrong
        if isinstance(value, str):
            try:
                value = int(value.strip(), 10) if hint is int else float(value)
            except ValueError:
                try:
                    value = float(value)
                except ValueError:
                    raise wrong from None
        if hint is int and isinstance(value, float):
            if not value.is_integer():
                raise wrong
            value = int(value)
        try:
            return hint(value)
        except OverflowError:
            raise ConfigError(f"{name} = {_show(value)} is too large for a number") from None
    raise ConfigError(f"{name}: unsupported setting type {hint!r}")  # pragma: no cover - a config field of a new type


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ValueError(value)
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML preset; a missing, unreadable, non-UTF-8 or malformed file is one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        text = blob.decode("utf-8-sig")  # a byte-order mark, as some editors write, is no error
    except UnicodeDecodeError as err:
        decoded = bytes(err.object)  # the bytes after a byte-order mark, which err.start counts in
        line = decoded[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {path} is not UTF-8 (line {line}: byte 0x{decoded[err.start]:02x}); save it as UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
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


def field_type(key: str) -> Any:
    """The annotated type of a dotted config key (``"data.path"`` -> str), or None if there is no such field."""
    cls: Any = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return None
        hint = _hints(cls).get(part)
        if hint is None:
            return None
        if i == len(parts) - 1:
            return hint
        cls = hint
    return None


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"train.mu=0.1"`` -> ("train.mu", 0.1): the value is read as TOML, else kept as a string.

    For a text field (``data.path=/x``, ``data.only_hospital=2``) and a list of texts an unquoted
    value stays the text as written; a quoted one is read as TOML (``train.simulate_crash='"H2:3"'``).
    A boolean field also takes 1/0, yes/no, on/off.
    """
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return key, raw
    hint = plain_type(field_type(key))
    textual = hint is str or (get_origin(hint) is list and get_args(hint) == (str,))
    if textual and not isinstance(value, (str, list)):
        return key, raw  # a number, boolean or date written where text is expected: the text itself
    if hint is bool and not isinstance(value, bool):
        return key, raw  # --set train.compile=1 / yes: the word decides
    return key, value


def resolve(preset: str | None, assignments: list[tuple[str, Any]]) -> RunConfig:
    """Defaults, then the preset, then each assignment in order."""
    tree = load_toml(preset) if preset else {}
    for key, value in assignments:
        set_dotted(tree, key, value)
    return from_dict(tree)


def check_inputs(cfg: RunConfig) -> None:
    """Refuse, before any work, files named in the config that are missing or unreadable.

    Checks ``data.path`` (exists), ``data.stain_reference`` (a readable file) and
    ``model.pretrained`` (a readable file whose tensors fit ``model.backbone``).

    Raises:
        ConfigError: one line naming the field and the file.
        UserError: ``model.backbone`` is not a timm model (checked when weights are to be loaded into it).
    """
    data = cfg.data
    if data.path and not Path(data.path).exists():
        raise ConfigError(f"data.path = {data.path!r}: data path does not exist")
    for name, value in (("data.stain_reference", data.stain_reference), ("model.pretrained", cfg.model.pretrained)):
        if value:
            _readable_file(name, value)
    if cfg.model.pretrained:
        from models import check_backbone, check_pretrained

        check_backbone(cfg.model.backbone)  # a UserError naming model.backbone
        try:
            check_pretrained(
                cfg.model.backbone,
                cfg.model.scales,
                cfg.model.pretrained,
                len(cfg.data.classes),
                cfg.model.hidden,
                cfg.norm,
            )
        except (UserError, FileNotFoundError) as err:
            raise ConfigError(f"model.pretrained: {err}") from None


def _readable_file(name: str, value: str) -> None:
    path = Path(value)
    if not path.exists():
        raise ConfigError(f"{name} = {value!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"{name} = {value!r} is not a file")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as err:
        raise ConfigError(f"{name} = {value!r} cannot be read: {err.strerror or err}") from None


def save(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as JSON (atomically: temporary file, fsync, rename)."""
    write_atomic(path, json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
