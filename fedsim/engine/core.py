"""The federation engine: clients hosted by ranks, local training, ONE all-reduce per round.

The engine knows models, datasets and process groups, not files or grades: a
client is a name, a sample count, something to train on and a state that
persists between rounds. A rank hosts one or more clients (hospital ``i`` of
``N`` lives on rank ``i mod W``). Each round a rank trains its participating
clients one after another, each from the global model, and accumulates their
sample-weighted models into one buffer; then one all-reduce gives every rank
the weighted mean, and every rank applies the same server step
(:mod:`fedsim.strategies`). With SCAFFOLD the clients' control-variate updates
ride in the same all-reduce.

The figures of a client's update, with ``w_g`` the round's global weights,
``w_k`` the client's after local training and ``w_new`` the aggregate:
``drift`` = ||w_k - w_g||, ``rel_drift`` = drift / ||w_g||, ``divergence`` =
||w_k - w_new||, ``cosine`` = cos(w_k - w_g, w_new - w_g) and
``global_update_norm`` = ||w_new - w_g||. A diverging client shows a drift
that grows round over round while the others settle, a low or negative
cosine, and a growing divergence.

Every draw depends on (seed, round, client index, purpose) alone: the
participants of a round, a client's drop-out or straggling, its data order and
augmentation are the same whatever the number of ranks.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fedsim.client import LossFn, StepSettings, make_optimizer, train_epoch
from fedsim.flat import FlatModel
from fedsim.privacy import Privacy
from fedsim.prox import proximal_value
from fedsim.seeding import derive_seed, generator
from fedsim.strategies import ServerOptimizer

log = logging.getLogger(__name__)
#: Per-client updates are kept for the post-aggregation figures (cosine, divergence) at this many coordinates at
#: most: every k-th one of a larger model (an estimate, said in the README); all of them for smaller ones.
SKETCH_SIZE = 1 << 22
#: Elements per chunk of the passes over the weights (1 MiB of float32): large enough to amortise a call, small
#: enough that the chunk is still in a core's cache when it is read again.
_PASS = 1 << 18
#: Stride of the spot check that the model still equals the refreshed snapshot (17k values of the dual ResNetRS50).
_SPOT = 4099


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
    weight_decay: float = 0.0
    mu: float = 0.0
    local_optimizer: str = "adam"
    clients_per_round: int = 0
    client_optimizer: str = "fresh"
    client_state_device: str = "cpu"
    algorithm: str = "fedavg"
    faults: Faults = Faults()


@dataclass
class ClientOutcome:
    """One client's round: its figures (scalars only) and its sampled update for the post-aggregation figures."""

    figures: dict[str, Any]
    sketch: torch.Tensor | None = None
    norm2: float = 0.0
    steps: int = 0


class Engine:
    """One rank's clients and the round that trains them; the same object on every rank."""

    def __init__(
        self,
        model: nn.Module,
        flat: FlatModel,
        clients: list[Client],
        names: list[str],
        counts: list[int],
        settings: EngineSettings,
        step: StepSettings,
        server: ServerOptimizer | None = None,
        loss_fn: LossFn | None = None,
        show_progress: bool = False,
        privacy: Privacy | None = None,
    ):
        """
        Args:
            clients: The clients this rank hosts.
            names, counts: Every client's name and sample count, by index (counts may cross ranks: they
                decide the weights).
            privacy: Differential privacy and secure aggregation (:mod:`fedsim.privacy`), or None.
        """
        self.model, self.flat, self.clients = model, flat, clients
        self.forward = model  # what training calls: the model, or its torch.compile'd wrapper
        self.names, self.counts = list(names), list(counts)
        self.settings, self.step = settings, step
        self.server = server or ServerOptimizer()
        self.loss_fn, self.show_progress = loss_fn, show_progress
        self.privacy = privacy
        self._refreshed: tuple[int, ...] | None = None  # model version when the snapshot was last refreshed
        self._before_refresh: Callable[[], None] | None = None
        self.num_clients = len(counts)
        self.control: torch.Tensor | None = None  # SCAFFOLD's server control variate c
        if settings.algorithm == "scaffold":
            self.control = torch.zeros_like(flat.global_params)
        self.stride = max(1, math.ceil(flat.global_params.numel() / SKETCH_SIZE))
        # Integer buffers (BatchNorm's num_batches_tracked) live outside the flat buffer: restored per client too.
        self._int_buffers = [b for b in model.buffers() if not b.is_floating_point()]
        self.timings: dict[str, float] = {}
        self.dealt, self.rank, self.world_size = False, 0, 1
        self._chosen_now: set[int] = set()
        self.last_mine: set[int] = set()

    def deal(self, rank: int, world_size: int) -> None:
        """Balance the load: each round's participants are dealt to the ranks in turn instead of staying with
        the rank that hosts them. Every rank then needs every client's data (``clients`` holds all of them),
        and no client may keep state between rounds (it would have to travel): simulations only."""
        if self.flat.local_bn or self.control is not None or self.settings.client_optimizer != "fresh":
            raise ValueError(
                "dealing participants to ranks needs clients without state (no FedBN, SCAFFOLD or "
                "persistent optimizers)"
            )
        self.dealt, self.rank, self.world_size = True, rank, world_size

    # ---- one round ------------------------------------------------------------------------

    def round(
        self,
        r: int,
        validate: Callable[[Client], float | None] | None = None,
        after_epoch: Callable[[Client, int], None] | None = None,
        before_aggregation: Callable[[], None] | None = None,
        before_refresh: Callable[[], None] | None = None,
    ) -> list[ClientOutcome]:
        """Train this round's participants hosted here, aggregate with one all-reduce, apply the server step.

        Args:
            validate: Accuracy of the model now loaded on a client's validation data (its local model, before
                aggregation), or None.
            after_epoch: Called after each local epoch (fault simulation hooks).
            before_aggregation: Called right before the all-reduce (e.g. a monitored barrier that names
                a hung rank instead of waiting in the collective).
            before_refresh: Called before the post-aggregation pass overwrites the round's snapshot with the
                new global model: whatever still reads :meth:`state_views` of the last round must finish.

        Returns:
            One outcome per hosted client (``not sampled`` ones included), in index order.
        """
        s, flat = self.settings, self.flat
        clock = _Clock()
        chosen = set(participants(s.seed, r, self.num_clients, s.clients_per_round))
        self._chosen_now = chosen
        plans = self._plans(r, chosen)
        weights = self._weights(plans)
        self._before_refresh = before_refresh
        start = self._snapshot()  # the global model, with this rank's last local tensors
        start_global = start[flat.global_slice]
        anchor_norm = 0.0  # ||w_g||, computed with the post-aggregation pass (rel_drift is filled in then)
        mine = self._mine(sorted(chosen))
        self.last_mine = mine
        training = [c for c in self.clients if c.index in mine]
        in_place = len(training) == 1 and self.control is None
        # With one client, its weight is applied in the drift pass (the chunk is in cache) unless its update
        # must first be clipped as a whole (client-level DP).
        self._fuse_weight = in_place and (self.privacy is None or self.privacy.level != "client")
        buffer = flat.reduced if in_place else self._accumulator()
        outcomes: dict[int, ClientOutcome] = {}
        for client in self.reported(mine):
            if client.index not in chosen:
                outcomes[client.index] = ClientOutcome({"status": "not sampled", "epochs": 0, "train_loss": None})
                continue
            status, epochs = plans[client.index]
            outcome, weight = self._train_client(
                r, client, status, epochs, start, weights[client.index], anchor_norm, validate, after_epoch, clock
            )
            outcomes[client.index] = outcome
            with torch.no_grad():
                if in_place:
                    if weight > 0:
                        flat.pack_scratch()
                        done = flat.global_params.numel() if self._fuse_weight else 0  # weighted in the pass
                        buffer[done:].mul_(weight)
                    else:
                        buffer.zero_()  # not a multiplication by 0: NaN * 0 is NaN
                elif weight > 0:
                    flat.pack_scratch()
                    buffer[: flat.reduced.numel()].add_(flat.reduced, alpha=weight)
                    if self.control is not None:
                        buffer[flat.reduced.numel() :].add_(self._control_delta(client, start_global, outcome))
            self._save_client_state(client)
        clock.lap("local_training")  # a rank whose clients all sit the round out sends zeros
        if before_aggregation is not None:
            before_aggregation()
        with torch.no_grad():
            if self.privacy is not None and self.privacy.changes_reduce:
                self.privacy.reduce_(buffer, flat, start, r)
            else:
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            total = self._finish_aggregation(buffer, start, in_place)
        clock.lap("aggregation")
        self._release_snapshot()
        clock.lap("checkpoint")
        self._post_aggregation(outcomes, start_global, total)
        if self.privacy is not None:
            self.privacy.charge(r, plans)
            for index, outcome in outcomes.items():
                outcome.figures.update(self.privacy.figures(index))
        clock.lap("diagnostics")
        self.timings = clock.laps
        self.last_total = total
        return [outcomes[c.index] for c in self.reported(mine)]

    def _plans(self, r: int, chosen: set[int]) -> dict[int, tuple[str, int]]:
        """(status, epochs) of each participant: drop-out and straggling drawn from the seed, and (DP-SGD with
        a budget) ``budget spent`` for a hospital whose next round would pass it."""
        s = self.settings
        plans = {i: s.faults.draw(s.seed, r, _Named(i, self.names[i]), s.local_epochs) for i in chosen}
        if self.privacy is not None:
            for i, (_, epochs) in plans.items():
                if self.privacy.budget_spent(i, epochs):
                    plans[i] = ("budget spent", 0)
        return plans

    def _weights(self, plans: dict[int, tuple[str, int]]) -> dict[int, float]:
        """Each participant's aggregation weight, known before anyone trains (participation follows from the
        seed alone): n_k / N over those that take part, or 1/K under client-level DP."""
        fixed = self.privacy.weights(plans) if self.privacy is not None else None
        if fixed is not None:
            return fixed
        expected = sum(self.counts[i] for i, (_, epochs) in plans.items() if epochs > 0)
        return {i: self.counts[i] / max(expected, 1) for i in plans}

    def _mine(self, chosen: list[int]) -> set[int]:
        """The participants this rank trains: those it hosts, or (dealt) every W-th of the round's participants."""
        if not self.dealt:
            return {c.index for c in self.clients if c.index in chosen}
        return {index for j, index in enumerate(chosen) if j % self.world_size == self.rank}

    def reported(self, mine: set[int] | None = None) -> list[Client]:
        """The clients whose outcome this rank reports: the ones it trains, and the rest it owns (i mod W)."""
        if not self.dealt:
            return self.clients
        mine = mine if mine is not None else set()
        return [
            c
            for c in self.clients
            if c.index in mine or (c.index % self.world_size == self.rank and c.index not in self._chosen_now)
        ]

    # ---- a client's local work ------------------------------------------------------------

    def _restore(self, start: torch.Tensor) -> None:
        """The round's global model back into the model: the flat buffer and the integer buffers."""
        with torch.no_grad():
            self.flat.data.copy_(start)
            for buf, value in zip(self._int_buffers, self._start_ints):
                buf.copy_(value)

    def _train_client(
        self,
        r: int,
        client: Client,
        status: str,
        epochs: int,
        start: torch.Tensor,
        weight: float,
        anchor_norm: float,
        validate,
        after_epoch,
        clock: _Clock,
    ) -> tuple[ClientOutcome, float]:
        s, flat = self.settings, self.flat
        if self._dirty:  # an earlier client of this round changed the model
            self._restore(start)
        self._dirty = True
        self._load_client_state(client)
        figures: dict[str, Any] = {
            "hospital": client.name,
            "num_samples": client.num_samples,
            "status": status,
            "epochs": epochs,
        }
        if epochs == 0:  # dropped, or its privacy budget is spent
            figures.update(train_loss=None, prox=0.0)
            return ClientOutcome(figures), 0.0
        torch.manual_seed(derive_seed(s.seed, r, client.index, "torch"))  # dropout layers
        anchor = start[flat.global_slice] if s.mu > 0 else None
        optimizer = make_optimizer(self.model, s.lr, s.weight_decay, s.local_optimizer)
        if s.client_optimizer == "persistent" and "optimizer" in client.state:
            optimizer.load_state_dict(_to_device(client.state["optimizer"], flat.device))
        correction = None
        if self.control is not None:
            own = client.state.get("control")
            correction = self.control - own.to(flat.device) if own is not None else self.control.clone()
        rng = generator(s.seed, r, client.index, "augment")
        if client.reseed is not None:
            client.reseed(derive_seed(s.seed, r, client.index, "shuffle"))
        private = (
            self.privacy.dpsgd(self.model, flat, r, client.index, self.step.amp_dtype)
            if self.privacy is not None
            else None
        )
        result, steps = None, 0
        try:
            for epoch in range(epochs):
                result = train_epoch(
                    self.forward,
                    flat,
                    optimizer,
                    client.loader,
                    anchor,
                    self.step,
                    rng,
                    desc=f"round {r + 1} {client.name} epoch {epoch + 1}/{epochs}",
                    show=self.show_progress,
                    loss_fn=self.loss_fn,
                    correction=correction,
                    dp=private,
                )
                steps += result.steps
                if after_epoch is not None:
                    after_epoch(client, r)
                if not result.finite:
                    break
        finally:
            if private is not None:
                private.close()
        clock.lap("local_training")
        outcome = None
        trained = result is not None and result.finite
        if trained and validate is not None:  # the local model, before the drift pass may weight it
            figures["val_acc_local"] = validate(client)
        clock.lap("validation")
        if trained:
            outcome = self._measure_update(
                figures, start[flat.global_slice], anchor_norm, weight if self._fuse_weight else None
            )
        finite = outcome is not None and math.isfinite(outcome.norm2) and self._all_finite(params_checked=True)
        if not finite:
            # A diverged client restarts from the global model and sits this round out; its BatchNorm statistics
            # went non-finite with its weights (a forward pass in train mode), so everything is restored.
            self._restore(start)
            self._load_client_state(client)
            log.warning(
                "%s: local update is not finite (loss %s): contributing weight 0 this round",
                client.name,
                result.loss if result else None,
            )
            figures.update(status="diverged", train_loss=None, prox=0.0)
            for key in ("drift", "layer_drift", "val_acc_local"):
                figures.pop(key, None)
            return ClientOutcome(figures), 0.0
        figures.update(
            train_loss=result.loss, prox=proximal_value(flat.global_params, anchor, s.mu) if anchor is not None else 0.0
        )
        if self.privacy is not None:
            self.privacy.clip_update_(flat.global_params, start[flat.global_slice])
        outcome.steps = steps
        clock.lap("diagnostics")
        if s.client_optimizer == "persistent":
            client.state["optimizer"] = self._keep(optimizer.state_dict())
        return outcome, weight

    def _measure_update(
        self, figures: dict[str, Any], start_global: torch.Tensor, anchor_norm: float, scale: float | None = None
    ) -> ClientOutcome:
        """drift and per-layer drift in one chunked pass; a strided sample of the update for what follows;
        with ``scale``, the parameters multiplied by it in the same pass (the client's aggregation weight)."""
        flat = self.flat
        with torch.no_grad():
            layer, sketch = self._update_pass(flat.global_params, start_global, scale=scale)
        norm2 = sum(layer)
        figures.update(drift=math.sqrt(norm2), layer_drift=[math.sqrt(v) for v in layer])
        return ClientOutcome(figures, sketch, norm2)

    # ---- buffers reused every round: no model-sized allocation (and its page faults) per round --------

    def _snapshot(self) -> torch.Tensor:
        """The model's flat buffer copied into a buffer kept for the run; the integer buffers beside it.

        The last round's post-aggregation pass already copied the global parameters there; if nothing wrote
        to them since, only the rest (buffers, local tensors, scratch: small) is copied. "Nothing wrote":
        torch's version counters of the parameters and of the buffer (bumped by every in-place write, the
        optimizer's and ``load_state_dict``'s included) are unchanged, and a strided sample still matches
        (writes through ``.data`` bypass the counters)."""
        flat = self.flat
        if getattr(self, "_start", None) is None:
            self._start = torch.empty_like(flat.data)
            self._scratch = torch.empty(min(_PASS, flat.data.numel()), dtype=flat.data.dtype, device=flat.device)
            self._pieces = _chunk_pieces(flat, _PASS)
            self._layers = flat.layer_slices(global_only=True)
        with torch.no_grad():
            if self._refreshed == self._model_version() and self._sample_matches():
                first, stop = flat.global_slice.start, flat.global_slice.stop
                self._start[:first].copy_(flat.data[:first])
                self._start[stop:].copy_(flat.data[stop:])
            else:
                self._release_snapshot()
                self._start.copy_(flat.data)
        self._start_ints = [b.clone() for b in self._int_buffers]
        self._dirty = False
        return self._start

    def _update_pass(
        self,
        weights: torch.Tensor,
        start: torch.Tensor,
        layers: bool = True,
        start_norm: bool = False,
        scale: float | None = None,
        refresh: bool = False,
    ):
        """One chunked pass over ``weights - start``: the squared norm of each parameter tensor (or, with
        ``layers`` False, of the whole) and the strided sample of it (every ``stride``-th coordinate); with
        ``start_norm`` also ||start||², from the chunk still in cache. Chunk sums are float32, added in float64.

        While each chunk is in cache: ``scale`` multiplies ``weights`` by it afterwards; ``refresh`` copies
        ``weights`` into ``start`` afterwards (the next round's snapshot)."""
        sums = [0.0] * (len(self._layers) if layers else 1)
        start_sum = 0.0
        sketch = torch.empty(len(range(0, weights.numel(), self.stride)), dtype=weights.dtype, device=weights.device)
        for lo, hi, pieces in self._pieces:
            part = torch.sub(weights[lo:hi], start[lo:hi], out=self._scratch[: hi - lo])
            first = -lo % self.stride
            taken = part[first :: self.stride]
            at = (lo + first) // self.stride
            sketch[at : at + taken.numel()].copy_(taken)
            if layers:  # dot products read the chunk once; squaring it first would write it once more
                for a, b, layer in pieces:
                    piece = part[a:b]
                    sums[layer] += float(torch.dot(piece, piece))
            else:
                sums[0] += float(torch.dot(part, part))
            if start_norm:
                start_sum += float(torch.dot(start[lo:hi], start[lo:hi]))
            if scale is not None:
                weights[lo:hi].mul_(scale)
            if refresh:
                start[lo:hi].copy_(weights[lo:hi])
        return (sums, sketch, start_sum) if start_norm else (sums, sketch)

    def _release_snapshot(self) -> None:
        """Before the snapshot's global region is overwritten: let readers of :meth:`state_views` finish."""
        if self._before_refresh is not None:
            self._before_refresh()

    def state_views(self) -> dict[str, torch.Tensor] | None:
        """The model's state dict with the global parameters as views of the snapshot the last round's
        post-aggregation pass wrote (no copy of them), the rest copied; None if that snapshot is not the model
        now (before the first round, or after a write to the model) or lives on a GPU (it must be copied to
        the host anyway). The views hold until the next round calls ``before_refresh``: a checkpoint written
        from them must be on disk by then."""
        if self.flat.device.type != "cpu" or self._refreshed != self._model_version() or not self._sample_matches():
            return None
        flat, base, size = self.flat.data, self.flat.data.data_ptr(), self.flat.data.element_size()
        g = self.flat.global_slice
        out = {}
        for key, value in self.model.state_dict().items():
            offset = (value.data_ptr() - base) // size
            inside = (
                value.dtype == flat.dtype
                and g.start <= offset
                and offset + value.numel() <= g.stop
                and value.data_ptr() >= base
            )
            out[key] = (
                self._start.as_strided(value.shape, value.stride(), offset)
                if inside
                else value.detach().to("cpu", copy=True)
            )
        return out

    def _model_version(self) -> tuple[int, ...]:
        return (self.flat.data._version, *(p._version for p in self.model.parameters()))

    def _sample_matches(self) -> bool:
        g = self.flat.global_slice
        return bool(torch.equal(self.flat.data[g][::_SPOT], self._start[g][::_SPOT]))

    def _all_finite(self, params_checked: bool = False) -> bool:
        """No NaN or Inf anywhere in the model: a sum is finite iff every value is (sums of finite float32
        weights cannot reach 3e38), without a model-sized mask. ``params_checked``: the global parameters were
        (the drift pass's sum of squares), so only the rest is summed here."""
        flat = self.flat
        if not params_checked:
            return bool(torch.isfinite(flat.data.sum()))
        rest = [flat.data[: flat.global_slice.start], flat.data[flat.global_slice.stop :]]
        return all(bool(torch.isfinite(part.sum())) for part in rest if part.numel())

    def _control_delta(self, client: Client, start_global: torch.Tensor, outcome: ClientOutcome) -> torch.Tensor:
        """SCAFFOLD option II: c_k+ = c_k - c + (x - y_k) / (K lr); returns c_k+ - c_k and keeps c_k+."""
        steps = max(outcome.steps, 1)
        own = client.state.get("control")
        own = own.to(self.flat.device) if own is not None else torch.zeros_like(self.control)
        with torch.no_grad():
            new = (start_global - self.flat.global_params).div_(steps * self.settings.lr).add_(own).sub_(self.control)
            delta = new - own
        client.state["control"] = self._keep(new)
        return delta

    # ---- aggregation ----------------------------------------------------------------------

    def _accumulator(self) -> torch.Tensor:
        """The round's weighted sum (and SCAFFOLD's control updates), zeroed; one buffer kept for the run."""
        if getattr(self, "_acc", None) is None:
            size = self.flat.reduced.numel() + (self.control.numel() if self.control is not None else 0)
            self._acc = torch.empty(size, dtype=self.flat.data.dtype, device=self.flat.device)
        return self._acc.zero_()

    def _finish_aggregation(self, buffer: torch.Tensor, start: torch.Tensor, in_place: bool) -> float:
        """The weighted mean into the model (unchanged if nobody contributed); the server step; returns the
        total weight (1 unless a participant diverged)."""
        flat = self.flat
        reduced = flat.reduced
        total = float(buffer[reduced.numel() - flat.scratch.numel()].item())
        if total <= 0:
            first = flat.global_slice.start  # the reduced region begins with the global parameters
            reduced.copy_(start[first : first + reduced.numel()])
            return 0.0
        if not in_place:
            reduced.copy_(buffer[: reduced.numel()])
        if abs(total - 1.0) > 1e-5:  # a participant diverged after the weights were fixed: renormalize
            reduced.div_(total)
        flat.unpack_int_buffers()
        start_global = start[flat.global_slice]
        self.server.step_(flat.global_params, flat.global_params, start_global)
        if self.control is not None:
            self.control.add_(buffer[reduced.numel() :], alpha=1.0 / self.num_clients)
        return total

    def _post_aggregation(self, outcomes: dict[int, ClientOutcome], start_global: torch.Tensor, total: float) -> None:
        """rel_drift, divergence and cosine of every trained client against the round's global update."""
        flat = self.flat
        weights = flat.global_params
        with torch.no_grad():
            (g_norm2,), update, w_norm2 = self._update_pass(
                weights, start_global, layers=False, start_norm=True, refresh=True
            )
        self._refreshed = self._model_version()
        anchor_norm = math.sqrt(w_norm2)
        g_norm = math.sqrt(g_norm2)
        for outcome in outcomes.values():
            if "drift" in outcome.figures:
                outcome.figures["rel_drift"] = outcome.figures["drift"] / max(anchor_norm, 1e-12)
        scale = flat.global_params.numel() / max(update.numel(), 1)
        for outcome in outcomes.values():
            outcome.figures["global_update_norm"] = g_norm
            if outcome.sketch is None:
                continue
            dot = float(torch.dot(outcome.sketch, update)) * scale
            u_norm = math.sqrt(outcome.norm2)
            outcome.figures["cosine"] = dot / (u_norm * g_norm) if u_norm and g_norm else 0.0
            outcome.figures["divergence"] = math.sqrt(max(outcome.norm2 - 2 * dot + g_norm2, 0.0))
            outcome.sketch = None

    # ---- client state ---------------------------------------------------------------------

    def _keep(self, value: Any) -> Any:
        """A copy of tensors for the client's state store: pinned host memory, or the device."""
        if isinstance(value, torch.Tensor):
            if self.settings.client_state_device == "device":
                return value.detach().clone()
            out = torch.empty(
                value.shape, dtype=value.dtype, pin_memory=torch.cuda.is_available() and value.device.type == "cuda"
            )
            return out.copy_(value.detach())
        if isinstance(value, dict):
            return {k: self._keep(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._keep(v) for v in value)
        return value

    def _save_client_state(self, client: Client) -> None:
        if self.flat.local_bn:
            client.state["local"] = self._keep(local_tensors(self.flat))
            if self._int_buffers:
                client.state["local_counts"] = self._keep(torch.stack([b.reshape(()) for b in self._int_buffers]))

    def _load_client_state(self, client: Client) -> None:
        if self.flat.local_bn and "local" in client.state:
            set_local_tensors(self.flat, client.state["local"])
            if "local_counts" in client.state:
                self._load_local_counts(client.state["local_counts"])

    def _load_local_counts(self, counts: torch.Tensor) -> None:
        """FedBN: the client's own BatchNorm counters (the shared ones are the aggregate's, set from the flat
        buffer's scratch)."""
        shared = {id(b) for b in self.flat._int_buffers}
        with torch.no_grad():
            for buf, value in zip(self._int_buffers, counts.tolist()):
                if id(buf) not in shared:
                    buf.fill_(int(value))

    def load_client(self, client: Client) -> None:
        """Put the global model together with a client's own tensors (FedBN) into the model, for evaluation."""
        self._load_client_state(client)

    # ---- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The server's state: optimizer moments, SCAFFOLD's control variate."""
        state: dict[str, Any] = {"server_optimizer": self.server.state_dict()}
        if self.control is not None:
            state["control"] = self.control.detach().cpu().clone()
        if self.privacy is not None:
            state["privacy"] = self.privacy.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "server_optimizer" in state:
            self.server.load_state_dict(state["server_optimizer"], self.flat.device)
        if self.control is not None and "control" in state:
            self.control.copy_(state["control"].to(self.flat.device))
        if self.privacy is not None and "privacy" in state:
            self.privacy.load_state_dict(state["privacy"])


@dataclass(frozen=True)
class _Named:
    index: int
    name: str = ""


class _Clock:
    """Seconds spent per phase of a round (``lap`` charges the time since the last lap)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = self.laps.get(phase, 0.0) + now - self._last
        self._last = now


def _chunk_pieces(flat: FlatModel, chunk: int) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """The global parameters cut into chunks, each with the pieces of parameter tensors it holds:
    ``(lo, hi, [(start, end, layer number), ...])``, piece bounds relative to the chunk."""
    layers = flat.layer_slices(global_only=True)
    total = flat.global_params.numel()
    chunks = []
    for lo in range(0, total, chunk):
        hi = min(lo + chunk, total)
        pieces = [(max(a, lo) - lo, min(b, hi) - lo, k) for k, (_, a, b) in enumerate(layers) if a < hi and b > lo]
        chunks.append((lo, hi, pieces))
    return chunks


def local_tensors(flat: FlatModel) -> torch.Tensor:
    """The tensors a client keeps for itself (FedBN's BatchNorm weights and statistics), as one vector."""
    head = flat.data[: flat.global_slice.start]
    tail = flat.data[flat.global_slice.start + flat.reduced.numel() :]
    return torch.cat([head, tail])


def set_local_tensors(flat: FlatModel, values: torch.Tensor) -> None:
    head = flat.global_slice.start
    tail_start = head + flat.reduced.numel()
    with torch.no_grad():
        values = values.to(flat.device)
        flat.data[:head].copy_(values[:head])
        flat.data[tail_start:].copy_(values[head:])


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value
