"""``fedsim.federate``: any ``nn.Module`` over any per-client ``Dataset``, on the same engine as the study.

    history = fedsim.federate(model, {"H1": dataset_1, "H2": dataset_2, ...}, rounds=3)

Run it as a plain script (a process group of one hosts every client) or
under ``torchrun`` (client ``i`` lives on rank ``i mod W``; each rank builds
only the datasets it hosts if they are made lazily). Every rank returns the
same history: one record per round with each client's figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from fedsim.client import StepSettings
from fedsim.dist import init_distributed, share_figures, teardown
from fedsim.engine import Client, Engine, EngineSettings, Faults, hosted_by
from fedsim.flat import flatten
from fedsim.strategies import ServerOptimizer


def classification_loss(model: nn.Module, batch, settings: StepSettings, rng: torch.Generator):
    """Cross-entropy of ``model(x)`` on an ``(x, y)`` batch (the default loss)."""
    x, y = batch
    x, y = x.to(settings.device), y.to(settings.device)
    return F.cross_entropy(model(x), y), len(y)


def federate(
    model: nn.Module,
    datasets: Mapping[str, Dataset] | Sequence[Dataset],
    *,
    rounds: int = 3,
    local_epochs: int = 1,
    batch_size: int = 16,
    lr: float = 3e-4,
    lr_schedule: str = "constant",
    weight_decay: float = 0.0,
    mu: float = 0.0,
    clients_per_round: int = 0,
    algorithm: str = "fedavg",
    server_optimizer: str = "sgd",
    server_lr: float = 1.0,
    local_optimizer: str = "adam",
    client_optimizer: str = "fresh",
    seed: int = 0,
    device: str = "cpu",
    loss_fn=None,
    dropout: float = 0.0,
    balance: bool = True,
) -> list[dict[str, Any]]:
    """Federated training of ``model`` (in place) over the clients' datasets.

    Args:
        datasets: One ``Dataset`` per client, by name (a sequence is named ``H1, H2, ...``). Batches are what a
            ``DataLoader`` makes of it; the default loss takes ``(x, y)`` batches.
        lr_schedule: ``constant`` or ``cosine`` (``lr * (1 + cos(pi * r / rounds)) / 2`` in round ``r``).
        clients_per_round: Clients drawn per round from (seed, round) alone; 0 = all.
        algorithm: ``fedavg`` (FedProx with ``mu`` > 0) or ``scaffold``.
        server_optimizer: ``sgd`` (with ``server_lr`` 1: FedAvg), ``avgm``, ``adam``, ``yogi``, ``adagrad``.
        loss_fn: ``loss_fn(model, batch, settings, rng) -> (mean loss, batch size)``; default cross-entropy.
        balance: Deal each round's participants to the ranks in turn (every rank holds every dataset here), so
            the ranks train equally many; clients with state between rounds (``client_optimizer="persistent"``,
            SCAFFOLD) stay with the rank that hosts them (client ``i`` on rank ``i mod W``) instead.

    Returns:
        One record per round: ``{"round": r, "clients": [{"hospital", "status", "num_samples", "train_loss",
        "drift", ...}, ...]}`` with every client in index order, the same on every rank.
    """
    named = dict(datasets) if isinstance(datasets, Mapping) else {f"H{k + 1}": d for k, d in enumerate(datasets)}
    names = list(named)
    owned = not dist.is_initialized()
    info = init_distributed(device)
    try:
        model.to(info.device)
        torch.manual_seed(seed)
        flat = flatten(model)
        if info.world_size > 1:
            dist.broadcast(flat.data, src=0)  # one initial model everywhere
        stateful = client_optimizer != "fresh" or algorithm != "fedavg"
        balance = balance and not stateful and info.world_size > 1
        indices = range(len(names)) if balance else hosted_by(info.rank, info.world_size, len(names))
        clients = []
        for index in indices:
            dataset = named[names[index]]
            shuffle = torch.Generator()
            loader = DataLoader(dataset, batch_size=batch_size, sampler=RandomSampler(dataset, generator=shuffle))
            clients.append(Client(index, names[index], len(dataset), loader, reseed=shuffle.manual_seed))
        counts = {n: c for g in share_figures({c.name: c.num_samples for c in clients}) for n, c in g.items()}
        settings = EngineSettings(
            seed=seed,
            local_epochs=local_epochs,
            lr=lr,
            lr_schedule=lr_schedule,
            rounds=rounds,
            weight_decay=weight_decay,
            mu=mu,
            local_optimizer=local_optimizer,
            clients_per_round=clients_per_round,
            client_optimizer=client_optimizer,
            algorithm=algorithm,
            faults=Faults(dropout),
        )
        step = StepSettings(info.device, None, False, mu, 0.0, False, 1)
        engine = Engine(
            model,
            flat,
            clients,
            names,
            [counts[n] for n in names],
            settings,
            step,
            ServerOptimizer(server_optimizer, server_lr),
            loss_fn=loss_fn or classification_loss,
        )
        if balance:
            engine.deal(info.rank, info.world_size)
        history = []
        for r in range(rounds):
            outcomes = engine.round(r)
            mine = [
                {**o.figures, "hospital": c.name, "rank": info.rank}
                for c, o in zip(engine.reported(engine.last_mine), outcomes)
            ]
            for figures in mine:
                figures.pop("layer_drift", None)
            everyone = sorted(
                (f for g in share_figures({"clients": mine}) for f in g["clients"]),
                key=lambda f: names.index(f["hospital"]),
            )
            history.append({"round": r, "clients": everyone})
        return history
    finally:
        if owned:
            teardown()
