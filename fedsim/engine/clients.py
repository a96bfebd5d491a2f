"""Clients and who trains when: the client record, its round's outcome, the engine's settings, and the seeded
draws (hosting rank, participants, drop-out and straggling) that depend on (seed, round, client) alone."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedsim.client import round_lr
from fedsim.seeding import derive_seed


def hosted_by(rank: int, world_size: int, num_clients: int) -> list[int]:
    """The clients rank ``rank`` hosts: ``rank, rank + W, rank + 2W, ...`` (by index, so it needs no data)."""
    if num_clients < world_size:
        raise ValueError(f"{num_clients} hospital(s) cannot fill {world_size} ranks: every rank hosts at least one")
    return list(range(rank, num_clients, world_size))


def participants(seed: int, round_index: int, num_clients: int, per_round: int) -> list[int]:
    """The clients of a round: all (``per_round`` 0 or >= N), else ``per_round`` drawn from (seed, round) alone."""
    if per_round <= 0 or per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(derive_seed(seed, round_index, 0, "participants"))
    return sorted(int(i) for i in rng.choice(num_clients, size=per_round, replace=False))


@dataclass(frozen=True)
class Faults:
    """Drop-out and straggling of participants (seeded per client and round), and the clients they apply to."""

    dropout: float = 0.0
    straggler: float = 0.0
    only: tuple[str, ...] = ()

    def draw(self, seed: int, round_index: int, client: Client, local_epochs: int) -> tuple[str, int]:
        """(status, epochs): ``dropped`` with 0 epochs, ``straggler`` with 1..E-1, else ``trained`` with E."""
        if self.only and client.name not in self.only:
            return "trained", local_epochs
        chance = np.random.default_rng(derive_seed(seed, round_index, client.index, "participation"))
        dropped, straggles = chance.random() < self.dropout, chance.random() < self.straggler
        if dropped:
            return "dropped", 0
        if straggles and local_epochs > 1:
            return "straggler", int(chance.integers(1, local_epochs))
        return "trained", local_epochs


@dataclass
class Client:
    """One client (hospital): its training data, its sample count and what it keeps between rounds.

    Attributes:
        loader: Re-iterable batches of its training data (a DataLoader).
        reseed: Called with a seed before each round's epochs (reseeds the loader's sampler), or None.
        state: Tensors that persist between rounds: FedBN's local tensors, a persistent optimizer's
            state, SCAFFOLD's control variate; on the host (pinned) unless the engine keeps them on the device.
    """

    index: int
    name: str
    num_samples: int
    loader: Iterable
    reseed: Callable[[int], None] | None = None
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineSettings:
    """How the engine trains and aggregates (the run config's train section, resolved)."""

    seed: int = 0
    local_epochs: int = 1
    lr: float = 3e-4
    lr_schedule: str = "constant"
    rounds: int = 1
    weight_decay: float = 0.0
    mu: float = 0.0
    local_optimizer: str = "adam"
    clients_per_round: int = 0
    client_optimizer: str = "fresh"
    client_state_device: str = "cpu"
    algorithm: str = "fedavg"
    faults: Faults = Faults()

    def lr_at(self, r: int) -> float:
        """The local learning rate of round ``r`` (0-based): ``lr`` under ``lr_schedule`` over ``rounds``."""
        return round_lr(self.lr, self.lr_schedule, r, self.rounds)


@dataclass
class ClientOutcome:
    """One client's round: its figures (scalars only) and its sampled update for the post-aggregation figures."""

    figures: dict[str, Any]
    sketch: torch.Tensor | None = None
    norm2: float = 0.0
    steps: int = 0


@dataclass(frozen=True)
class ClientId:
    """A client's index and name: all the seeded draws of a round need (its data may live on another rank)."""

    index: int
    name: str = ""
