"""The federation's privacy modes, as the engine uses them: DP-SGD, DP-FedAvg, secure aggregation, accounting.

One :class:`Privacy` object per rank, built from the ``train.dp`` and
``train.secagg`` settings and the hospitals' sample counts (public: they set
the aggregation weights). Everything it decides follows from those and the
seed, so every rank keeps the same ledgers and takes the same decisions
without a word exchanged:

- **sample** level (DP-SGD, :class:`fedsim.privacy.dpsgd.DPSGD`): hospital k draws
  Poisson batches at rate q_k = batch_size / n_k, ``round(1/q_k)`` steps an
  epoch, and is charged those steps for every round it is scheduled to train
  (a straggler for its epochs; a hospital that diverges is still charged, which
  can only overstate its epsilon). A hospital whose next round would take it
  past ``train.dp.max_epsilon`` sits the rest of the run out ("budget spent").
- **client** level (DP-FedAvg, McMahan et al. 2018): each participant's update
  is clipped to norm S; the K participants of a round weigh 1/K each, not by
  sample count (a weight of n_k/N would scale one hospital's sensitivity by
  n_k/N), with the fixed denominator K whoever drops out; every rank adds its
  share of N(0, (sigma S / K)^2) to its contribution; the federation is charged
  one step at rate q = K/N per round. The run ends before a round that would
  pass ``max_epsilon``.
- **secure aggregation** (:class:`fedsim.privacy.secagg.SecureAggregation`): each rank
  sends its weighted *update* (its contribution minus its weight times the
  round's global model, small numbers that fit the fixed-point grid), masked;
  the sample weights and integer counters go in one small plain all-reduce.

The engine calls :meth:`Privacy.reduce_` in place of its all-reduce whenever
any mode is on.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import fedsim.privacy as dp  # the package's names of accounting, DP-SGD and DP-FedAvg, loaded on first use
from fedsim.config import ConfigError, DPConfig, SecAggConfig
from fedsim.flat import FlatModel
from fedsim.seeding import derive_seed

__all__ = ["Privacy"]

log = logging.getLogger(__name__)

#: Statuses of a hospital that trains this round (and is charged for it).
TRAINING = ("trained", "straggler")


class Privacy:
    """The privacy state of one rank's view of the federation (identical on every rank).

    Args:
        settings: The ``train.dp`` table.
        secure: Sum with pairwise masks (``train.secure_aggregation``).
        secagg: The ``train.secagg`` table.
        counts: Every hospital's training sample count, by index.
        batch_size, local_epochs, rounds, clients_per_round: As the run's train settings.
        seed: The run's seed (for ``noise_seed = derived``).
        device: Where the model lives.
        world_size: Ranks of the all-reduce.
    """

    def __init__(
        self,
        settings: DPConfig,
        secure: bool,
        secagg: SecAggConfig,
        counts: list[int],
        batch_size: int,
        local_epochs: int,
        rounds: int,
        clients_per_round: int,
        seed: int,
        device: torch.device,
        world_size: int,
    ):
        self.settings, self.secagg_settings = settings, secagg
        self.level = settings.level
        self.counts, self.seed, self.device, self.world_size = list(counts), seed, device, world_size
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        n = len(counts)
        self.per_round = clients_per_round if 0 < clients_per_round < n else n
        if self.level == "sample":
            self.rates = [min(1.0, batch_size / max(c, 1)) for c in counts]
            self.steps_per_epoch = [dp.steps_per_epoch(q) for q in self.rates]
            self.sigmas = [self._sigma(q, rounds * local_epochs * s) for q, s in zip(self.rates, self.steps_per_epoch)]
            self.ledgers = [dp.PrivacyLedger(settings.delta, settings.accountant) for _ in counts]
        elif self.level == "client":
            self.rates = [self.per_round / n] * n
            self.sigmas = [self._sigma(self.rates[0], rounds)] * n
            self.ledgers = [dp.PrivacyLedger(settings.delta, settings.accountant)]
        self.secure = None
        if secure:
            from fedsim.privacy.secagg import SecureAggregation, check_parameters

            try:  # the config cannot know the number of ranks: these settings are checked here
                check_parameters(world_size, secagg.clip, secagg.levels)
            except ValueError as err:
                raise ConfigError(f"train.secagg: {err}") from None
            self.secure = SecureAggregation(device=device, prg=secagg.prg, wire=secagg.wire)
        self.last_clipped = 0

    @property
    def dp(self) -> bool:
        return self.level != "off"

    def _sigma(self, rate: float, steps: int) -> float:
        s = self.settings
        if s.target_epsilon <= 0:
            return s.noise_multiplier
        try:
            return dp.noise_for_epsilon(s.target_epsilon, rate, steps, s.delta, s.accountant)
        except ValueError as err:  # no noise up to Opacus's limit reaches the target: the setting asks too much
            raise ConfigError(f"train.dp.target_epsilon = {s.target_epsilon:g}: {err}") from None

    def describe(self) -> str:
        """One log line: what is protected, and how."""
        parts = []
        if self.level == "sample":
            sig = ", ".join(f"{s:.3g}" for s in self.sigmas)
            parts.append(
                f"DP-SGD per hospital (C {self.settings.max_grad_norm:g}, sigma {sig}, "
                f"q {', '.join(f'{q:.3g}' for q in self.rates)}, delta {self.settings.delta:g}, "
                f"{self.settings.accountant}); GroupNorm backbones"
            )
        elif self.level == "client":
            parts.append(
                f"DP-FedAvg (S {self.settings.max_update_norm:g}, sigma {self.sigmas[0]:.3g}, "
                f"q {self.rates[0]:.3g}, equal weights 1/{self.per_round}, delta {self.settings.delta:g}, "
                f"{self.settings.accountant})"
            )
        if self.dp and min(self.sigmas) == 0:
            parts.append("noise multiplier 0: clipping only, no privacy (epsilon is infinite)")
        if self.level == "client" and self.secure is None and self.world_size > 1:
            parts.append(
                f"each rank adds 1/sqrt({self.world_size}) of the noise, so without "
                "train.secure_aggregation the ranks see partial sums with less noise"
            )
        if self.dp and self.settings.noise_seed == "derived":
            parts.append("noise derived from the seed: reproducible, NOT private")
        if self.secure is not None:
            g = self.secagg_settings
            parts.append(f"secure aggregation ({g.prg} masks, {g.wire} wire, clip {g.clip:g}, {g.levels} levels)")
        return "privacy: " + "; ".join(parts)

    # ---- the round's plan ---------------------------------------------------------------------

    def _ledger(self, index: int) -> dp.PrivacyLedger:
        return self.ledgers[index if self.level == "sample" else 0]

    def budget_spent(self, index: int, epochs: int) -> bool:
        """sample level: would ``epochs`` more epochs take hospital ``index`` past ``max_epsilon``?"""
        if self.level != "sample" or self.settings.max_epsilon <= 0 or epochs <= 0:
            return False
        steps = epochs * self.steps_per_epoch[index]
        return self._ledger(index).epsilon_if(self.sigmas[index], self.rates[index], steps) > self.settings.max_epsilon

    def run_spent(self) -> bool:
        """client level: would one more round pass ``max_epsilon``?"""
        if self.level != "client" or self.settings.max_epsilon <= 0:
            return False
        return self._ledger(0).epsilon_if(self.sigmas[0], self.rates[0], 1) > self.settings.max_epsilon

    def weights(self, plans: dict[int, tuple[str, int]]) -> dict[int, float] | None:
        """client level: 1/K for every participant (the fixed denominator); else None (sample counts)."""
        if self.level != "client":
            return None
        return {i: 1.0 / self.per_round for i in plans}

    def charge(self, r: int, plans: dict[int, tuple[str, int]]) -> None:
        """Record what round ``r`` spent, from its plan alone (the same on every rank)."""
        if self.level == "sample":
            for i, (status, epochs) in plans.items():
                if status in TRAINING:
                    self.ledgers[i].record(self.sigmas[i], self.rates[i], epochs * self.steps_per_epoch[i], r)
        elif self.level == "client":
            self.ledgers[0].record(self.sigmas[0], self.rates[0], 1, r)

    def figures(self, index: int) -> dict[str, Any]:
        """A hospital's privacy figures for its round record."""
        if not self.dp:
            return {}
        ledger = self._ledger(index)
        return {
            "epsilon": ledger.epsilon() if ledger.records else 0.0,
            "dp_steps": ledger.steps,
            "sample_rate": self.rates[index],
            "noise_multiplier": self.sigmas[index],
            "accountant": self.settings.accountant,
            "delta": self.settings.delta,
        }

    # ---- local work ---------------------------------------------------------------------------

    def _generator(self, r: int, index: int, purpose: str) -> torch.Generator:
        seed = derive_seed(self.seed, r, index, purpose) if self.settings.noise_seed == "derived" else None
        return dp.noise_generator(self.device, seed)

    def batch_sampler(self, index: int, generator: torch.Generator) -> dp.PoissonBatchSampler | None:
        """sample level: Poisson batches for hospital ``index``'s loader; else None."""
        if self.level != "sample":
            return None
        return dp.PoissonBatchSampler(self.counts[index], self.rates[index], generator, self.steps_per_epoch[index])

    def dpsgd(self, model: nn.Module, flat: FlatModel, r: int, index: int, amp_dtype) -> dp.DPSGD | None:
        """sample level: the round's DP-SGD for hospital ``index`` (close it after training); else None."""
        if self.level != "sample":
            return None
        expected = self.rates[index] * self.counts[index]
        return dp.DPSGD(
            model,
            flat,
            self.settings.max_grad_norm,
            self.sigmas[index],
            expected,
            self._generator(r, index, "dp-noise"),
            method=self.settings.method,
            amp_dtype=amp_dtype,
        )

    def clip_update_(self, weights: torch.Tensor, start: torch.Tensor) -> None:
        """client level: ``weights`` moved so that ``weights - start`` has norm at most S."""
        if self.level != "client":
            return
        with torch.no_grad():
            update = weights.sub_(start)
            dp.clip_update_(update, self.settings.max_update_norm)
            update.add_(start)

    # ---- aggregation --------------------------------------------------------------------------

    @property
    def changes_reduce(self) -> bool:
        return self.level == "client" or self.secure is not None

    def reduce_(self, buffer: torch.Tensor, flat: FlatModel, start: torch.Tensor, r: int) -> None:
        """In place of ``all_reduce(buffer, SUM)``: the same sum, as updates, noised and/or masked.

        ``buffer`` is ``[weighted models | scratch | control updates]``: the reduced region's layout
        (weighted shared tensors, then the weight and integer counters) and SCAFFOLD's part, if any.
        """
        body_len = flat.reduced.numel() - flat.scratch.numel()
        body, scratch = buffer[:body_len], buffer[body_len : flat.reduced.numel()]
        control = buffer[flat.reduced.numel() :]
        first = flat.global_slice.start
        start_body = start[first : first + body_len]
        body.sub_(start_body, alpha=float(scratch[0]))  # this rank's weight times its update
        if self.level == "client":
            sd = self.settings.max_update_norm / self.per_round
            dp.add_noise_share_(body, self.sigmas[0], sd, self.world_size, self._generator(r, self.rank, "dp-share"))
        if self.secure is None:
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        else:
            dist.all_reduce(scratch, op=dist.ReduceOp.SUM)  # weights and counters: counts, not data
            self._secure_sum(body, 4 * r)
            if control.numel():
                self._secure_sum(control, 4 * r + 1)
        total = float(scratch[0])
        if self.level == "client" and total > 0:
            body.add_(start_body)  # the fixed denominator K: g + sum of the (1/K)-weighted updates + noise
            scratch[0] = 1.0  # ... which is the mean already: nothing to renormalize
        else:
            body.add_(start_body, alpha=total)

    def _secure_sum(self, tensor: torch.Tensor, index: int) -> None:
        g = self.secagg_settings
        self.secure.secure_sum_(tensor, index, g.clip, g.levels)
        clipped = self.secure.last_clipped
        self.last_clipped += clipped
        if clipped:
            log.warning(
                "secure aggregation clipped %d coordinate(s) outside [-%g, %g] this round (raise train.secagg.clip)",
                clipped,
                g.clip,
                g.clip,
            )

    # ---- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"ledgers": [ledger.state_dict() for ledger in getattr(self, "ledgers", [])]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("ledgers") or []
        if self.dp and len(saved) == len(self.ledgers):
            self.ledgers = [dp.PrivacyLedger.from_state_dict(s) for s in saved]

    def report(self, names: list[str]) -> dict[str, Any]:
        """final.json's ``privacy`` section."""
        out: dict[str, Any] = {"level": self.level, "secure_aggregation": self.secure is not None}
        if self.dp:
            out.update(
                delta=self.settings.delta,
                accountant=self.settings.accountant,
                noise_seed=self.settings.noise_seed,
                epsilon={name: self.figures(i)["epsilon"] for i, name in enumerate(names)},
                noise_multiplier={name: self.sigmas[i] for i, name in enumerate(names)},
            )
        if self.secure is not None:
            out["secagg_clipped"] = self.last_clipped
        return out
