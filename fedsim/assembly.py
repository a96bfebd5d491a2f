"""A run's parts built from its config: the step settings, the data loaders, the engine of this rank's
hospitals (with their sample counts, server optimizer and privacy mechanisms), the pooled client of
centralized mode. :class:`fedsim.federation.Federation` puts them together."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SubsetRandomSampler

from data.cache import CachedPairs, collate_batch
from fedsim.client import StepSettings
from fedsim.config import RunConfig
from fedsim.datasetup import DataPlan, device_normalizer
from fedsim.dist import DistInfo, share_figures
from fedsim.engine import Client, Engine, EngineSettings, Faults
from fedsim.flat import FlatModel
from fedsim.privacy import Privacy
from fedsim.strategies import ServerOptimizer

log = logging.getLogger(__name__)


def step_settings(cfg: RunConfig, device: torch.device) -> StepSettings:
    """How every step runs on ``device``, in training and in eval.py alike: precision (``train.precision``;
    auto = bf16 on CUDA), channels-last, the on-device stain normalizer; for training also the proximal term,
    MixUp, augmentation and gradient accumulation."""
    cuda = device.type == "cuda"
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    if cfg.train.compile and not cuda:
        log.info("torch.compile on CPU: expect a long first step")
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed patch sizes: autotuned convolutions pay off at once
    return StepSettings(
        device=device,
        amp_dtype=torch.bfloat16 if precision == "bf16" else None,
        channels_last=cuda,
        mu=cfg.train.mu,
        mixup_alpha=cfg.train.mixup_alpha,
        augment=cfg.data.augment,
        grad_accum=cfg.train.grad_accum,
        normalizer=device_normalizer(cfg),
    )


def make_loader(
    cfg: RunConfig, info: DistInfo, dataset, indices=None, batches=None
) -> tuple[DataLoader, torch.Generator]:
    """A loader for the whole run (persistent workers) whose sampler is re-seeded every round.

    ``batches``: a batch sampler made from the generator (DP-SGD's Poisson batches) instead of shuffling.
    """
    shuffle = torch.Generator()
    workers = cfg.data.num_workers
    common = {
        "collate_fn": collate_batch,
        "num_workers": workers,
        "pin_memory": info.device.type == "cuda",
        "persistent_workers": workers > 0,
    }
    if batches is not None:
        return DataLoader(dataset, batch_sampler=batches(shuffle), **common), shuffle
    sampler = (
        RandomSampler(dataset, generator=shuffle)
        if indices is None
        else SubsetRandomSampler(indices.tolist(), generator=shuffle)
    )
    return DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, **common), shuffle


def build_engine(
    cfg: RunConfig, info: DistInfo, plan: DataPlan, model: nn.Module, flat: FlatModel, step: StepSettings
) -> Engine:
    """The engine of this rank's hospitals: their loaders, the weights (every hospital's sample count, shared),
    the server optimizer and the privacy mechanisms of the config."""
    t = cfg.train
    # Sample counts decide the aggregation weights, so every rank learns every hospital's (a count, no data).
    mine = {h.name: len(h.dataset("train")) for h in plan.mine}
    counts = {name: n for g in share_figures(mine) for name, n in g.items()}
    ordered = [counts[h] for h in plan.hospitals]
    privacy = None
    if t.dp.enabled or t.secure_aggregation:
        privacy = Privacy(
            t.dp,
            t.secure_aggregation,
            t.secagg,
            ordered,
            t.batch_size,
            t.local_epochs,
            t.rounds,
            t.clients_per_round,
            t.seed,
            info.device,
            info.world_size,
        )
        if info.is_main:
            log.info(privacy.describe())
    clients = []
    for hospital in plan.mine:
        sampler = (
            (lambda gen, i=hospital.index: privacy.batch_sampler(i, gen))
            if privacy is not None and privacy.level == "sample"
            else None
        )
        loader, shuffle = make_loader(cfg, info, hospital.dataset("train"), batches=sampler)
        clients.append(Client(hospital.index, hospital.name, mine[hospital.name], loader, reseed=shuffle.manual_seed))
    settings = EngineSettings(
        seed=t.seed,
        local_epochs=t.local_epochs,
        lr=t.lr,
        lr_schedule=t.lr_schedule,
        rounds=t.rounds,
        weight_decay=t.weight_decay,
        mu=t.mu,
        local_optimizer=t.local_optimizer,
        clients_per_round=t.clients_per_round,
        client_optimizer=t.client_optimizer,
        client_state_device=t.client_state_device,
        algorithm=t.algorithm,
        faults=Faults(t.dropout, t.straggler, tuple(t.faulty_hospitals)),
    )
    server = ServerOptimizer(t.server_optimizer, t.server_lr, t.server_momentum, tuple(t.server_betas), t.server_tau)
    return Engine(
        model,
        flat,
        clients,
        plan.hospitals,
        ordered,
        settings,
        step,
        server,
        show_progress=info.is_main,
        privacy=privacy,
    )


def pooled_client(cfg: RunConfig, info: DistInfo, plan: DataPlan) -> Client:
    """Centralized mode: this rank's equal shard of the pooled training data (every step all-reduces
    gradients, so every rank must take the same number of steps)."""
    union = CachedPairs(plan.all_train_folders)
    usable = len(union) // info.world_size * info.world_size
    shard = np.arange(info.rank, usable, info.world_size)
    loader, shuffle = make_loader(cfg, info, union, shard)
    return Client(info.rank, "pooled", len(shard), loader, reseed=shuffle.manual_seed)
