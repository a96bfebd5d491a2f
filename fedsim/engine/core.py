"""The engine's round: train this rank's participants from the global model, accumulate their weighted models,
ONE all-reduce, the server step, and the figures of every client's update (see :mod:`fedsim.engine`)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fedsim.client import LossFn, StepSettings, make_optimizer, train_epoch
from fedsim.engine.clients import Client, ClientId, ClientOutcome, EngineSettings, participants
from fedsim.engine.snapshot import Snapshot
from fedsim.engine.state import ClientStateStore, to_device
from fedsim.flat import FlatModel
from fedsim.privacy import Privacy
from fedsim.prox import proximal_value
from fedsim.seeding import derive_seed, generator
from fedsim.strategies import ServerOptimizer

log = logging.getLogger(__name__)


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
        self.snapshot = Snapshot(model, flat)
        self.store = ClientStateStore(flat, self.snapshot.int_buffers, settings.client_state_device)
        self.num_clients = len(counts)
        self.control: torch.Tensor | None = None  # SCAFFOLD's server control variate c
        if settings.algorithm == "scaffold":
            self.control = torch.zeros_like(flat.global_params)
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
        self.snapshot.before_refresh = before_refresh
        start = self.snapshot.take()  # the global model, with this rank's last local tensors
        self._dirty = False
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
                        buffer[flat.reduced.numel() :].add_(self._control_delta(client, start_global, outcome, r))
            self.store.save(client)
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
        self.snapshot.release()
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
        plans = {i: s.faults.draw(s.seed, r, ClientId(i, self.names[i]), s.local_epochs) for i in chosen}
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
            self.snapshot.restore()
        self._dirty = True
        self.store.load(client)
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
        lr = s.lr_at(r)
        optimizer = make_optimizer(self.model, lr, s.weight_decay, s.local_optimizer)
        if s.client_optimizer == "persistent" and "optimizer" in client.state:
            optimizer.load_state_dict(to_device(client.state["optimizer"], flat.device))
            for group in optimizer.param_groups:  # the saved state holds the rate of the round that saved it
                group["lr"] = lr
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
            self.snapshot.restore()
            self.store.load(client)
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
            client.state["optimizer"] = self.store.keep(optimizer.state_dict())
        return outcome, weight

    def _measure_update(
        self, figures: dict[str, Any], start_global: torch.Tensor, anchor_norm: float, scale: float | None = None
    ) -> ClientOutcome:
        """drift and per-layer drift in one chunked pass; a strided sample of the update for what follows;
        with ``scale``, the parameters multiplied by it in the same pass (the client's aggregation weight)."""
        flat = self.flat
        with torch.no_grad():
            layer, sketch = self.snapshot.update_pass(flat.global_params, start_global, scale=scale)
        norm2 = sum(layer)
        figures.update(drift=math.sqrt(norm2), layer_drift=[math.sqrt(v) for v in layer])
        return ClientOutcome(figures, sketch, norm2)

    def _all_finite(self, params_checked: bool = False) -> bool:
        """No NaN or Inf anywhere in the model: a sum is finite iff every value is (sums of finite float32
        weights cannot reach 3e38), without a model-sized mask. ``params_checked``: the global parameters were
        (the drift pass's sum of squares), so only the rest is summed here."""
        flat = self.flat
        if not params_checked:
            return bool(torch.isfinite(flat.data.sum()))
        rest = [flat.data[: flat.global_slice.start], flat.data[flat.global_slice.stop :]]
        return all(bool(torch.isfinite(part.sum())) for part in rest if part.numel())

    def _control_delta(
        self, client: Client, start_global: torch.Tensor, outcome: ClientOutcome, r: int
    ) -> torch.Tensor:
        """SCAFFOLD option II: c_k+ = c_k - c + (x - y_k) / (K lr), lr the round's; returns c_k+ - c_k, keeps c_k+."""
        steps = max(outcome.steps, 1)
        own = client.state.get("control")
        own = own.to(self.flat.device) if own is not None else torch.zeros_like(self.control)
        with torch.no_grad():
            moved = (start_global - self.flat.global_params).div_(steps * self.settings.lr_at(r))
            new = moved.add_(own).sub_(self.control)
            delta = new - own
        client.state["control"] = self.store.keep(new)
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
            (g_norm2,), update, w_norm2 = self.snapshot.update_pass(
                weights, start_global, layers=False, start_norm=True, refresh=True
            )
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

    def load_client(self, client: Client) -> None:
        """Put the global model together with a client's own tensors (FedBN) into the model, for evaluation."""
        self.store.load(client)

    def state_views(self) -> dict[str, torch.Tensor] | None:
        """The model's state without copying the global parameters (see :meth:`Snapshot.state_views`)."""
        return self.snapshot.state_views()

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


class _Clock:
    """Seconds spent per phase of a round (``lap`` charges the time since the last lap)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = self.laps.get(phase, 0.0) + now - self._last
        self._last = now
