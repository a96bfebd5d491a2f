"""The tables of how a run trains: ``train.*``, with differential privacy (``train.dp.*``) and secure aggregation's
encoding (``train.secagg.*``).

Each field is declared once with :func:`fedsim.settings.setting` (type, default, flags, whether it changes
the weights) and documented by the docstring under it: the README's tables and the command lines' help
come from these declarations, so their wording is part of the interface. Each table checks its own
values in ``__post_init__``; the checks that need more than one table (privacy against the rest of the
run) are the root's, in :mod:`fedsim.config.tree`.
"""

from __future__ import annotations

import math
import re
from dataclasses import field
from typing import ClassVar, Literal

from fedsim.config.checks import (
    MAX_BATCH,
    MAX_CHECKPOINTS,
    MAX_COUNT,
    MAX_EPOCHS,
    MAX_HOSPITALS,
    MAX_LR,
    MAX_MIXUP,
    MAX_MU,
    MAX_SEED,
    MAX_WEIGHT_DECAY,
    MAX_XAI,
    ConfigError,
    _at_least,
    _check_choices,
    _within,
)
from fedsim.settings import setting, table


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
    lr_schedule: Literal["constant", "cosine"] = setting(
        "constant",
        flag="--lr-schedule",
        help="local learning rate over the rounds: constant | cosine (from train.lr down towards 0)",
        omit_default=True,
    )
    """The hospitals' learning rate over the rounds: constant (train.lr every round) or cosine
    (train.lr * (1 + cos(pi * r / rounds)) / 2 in round r = 0..rounds-1; centralized: the same per round)."""
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
