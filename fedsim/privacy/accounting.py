"""Privacy accounting: what DP-SGD and DP-FedAvg spend, in (epsilon, delta), with Opacus's accountants.

Both mechanisms of fedsim are sequences of Poisson-subsampled Gaussian
mechanisms, described by (noise multiplier sigma, sample rate q, steps)
entries: per hospital under DP-SGD (:mod:`fedsim.privacy.dpsgd`; q = expected batch
over the hospital's patches, one entry per local step), and for the
federation under client-level DP-FedAvg (:mod:`fedsim.privacy.dpfedavg`; q = clients
per round over hospitals, one step per round). The RDP or PRV accountant of
Opacus turns such a history into epsilon at a given delta
(:func:`epsilon_of_history`, :func:`epsilon`, :func:`client_epsilon`), and
:func:`noise_for_epsilon` inverts it. A :class:`PrivacyLedger` records what
each round spent and serializes to a plain dict for checkpoints.

Opacus is imported inside the functions that call it and torch not at all, so
importing this module (and reading a ledger) stays light; so does the package's
``__init__``, which loads its modules only when one of its names is asked for.
:mod:`fedsim.privacy` re-exports every public name.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

__all__ = [
    "ACCOUNTANTS",
    "History",
    "PrivacyLedger",
    "client_epsilon",
    "client_sample_rate",
    "epsilon",
    "epsilon_of_history",
    "noise_for_epsilon",
    "steps_per_epoch",
]

#: Accountants of Opacus that fedsim offers.
ACCOUNTANTS = ("rdp", "prv")

History = Sequence[tuple[float, float, int]]
"""(noise multiplier, sample rate, steps) entries, in order."""


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}; got {accountant!r}")


def epsilon_of_history(history: History, delta: float, accountant: str = "rdp") -> float:
    """epsilon spent by a sequence of Poisson-subsampled Gaussian mechanisms, at ``delta``: one accountant call.

    Entries with no steps are ignored; an empty history spent nothing (0); a step without noise spent
    everything (inf).
    """
    from opacus.accountants import create_accountant

    _check_accountant(accountant)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1); got {delta}")
    entries = [(float(s), float(q), int(t)) for s, q, t in history if int(t) > 0 and float(q) > 0]
    if not entries:
        return 0.0
    if any(s <= 0 for s, _, _ in entries):
        return math.inf
    acc = create_accountant(mechanism=accountant)
    acc.history = entries
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        # q = 1 takes a log(0) branch in the PRV code that np.where then discards; RDP warns when the best
        # order is its largest one (a loose but valid bound at very large epsilon).
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(acc.get_epsilon(delta=delta))


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """epsilon after ``steps`` steps of noise ``noise_multiplier`` at Poisson rate ``sample_rate``, at ``delta``."""
    return epsilon_of_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def noise_for_epsilon(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (to ``tolerance`` in epsilon) whose ``steps`` steps spend at most
    ``target_epsilon``.

    Opacus's ``get_noise_multiplier`` (a bisection): ``epsilon(result, ...) <= target_epsilon`` and within
    ``tolerance`` of it.

    Raises:
        ValueError: the target is not positive, or no noise up to Opacus's limit (1e6) reaches it.
    """
    from opacus.accountants.utils import get_noise_multiplier

    _check_accountant(accountant)
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be > 0; got {target_epsilon}")
    if steps <= 0:
        raise ValueError(f"steps must be > 0; got {steps}")
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=int(steps),
                accountant=accountant,
                epsilon_tolerance=tolerance,
            )
        )


def steps_per_epoch(sample_rate: float) -> int:
    """Poisson steps that make one epoch in expectation: round(1/q), at least 1."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1]; got {sample_rate}")
    return max(1, round(1 / sample_rate))


class PrivacyLedger:
    """What one hospital (or, at client level, the federation) has spent: (noise, q, steps) per round.

    A hospital is charged only for the steps it took: a round it sat out adds
    nothing, a straggler's round adds its partial steps. :meth:`state_dict`
    gives a plain dict (floats, ints, strings; JSON and ``torch.load(...,
    weights_only=True)`` take it) for checkpoints and resume.
    """

    def __init__(self, delta: float, accountant: str = "rdp"):
        _check_accountant(accountant)
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1); got {delta}")
        self.delta = float(delta)
        self.accountant = accountant
        self.records: list[dict] = []
        self._cache: tuple[int, float] | None = None

    def record(self, noise_multiplier: float, sample_rate: float, steps: int, round_index: int | None = None) -> None:
        """Charge ``steps`` steps of noise ``noise_multiplier`` at rate ``sample_rate`` (no-op for 0 steps)."""
        if steps < 0 or not 0 <= sample_rate <= 1 or noise_multiplier < 0:
            raise ValueError(f"bad privacy charge: noise {noise_multiplier}, sample rate {sample_rate}, steps {steps}")
        if steps == 0:
            return
        self.records.append(
            {
                "round": None if round_index is None else int(round_index),
                "noise_multiplier": float(noise_multiplier),
                "sample_rate": float(sample_rate),
                "steps": int(steps),
            }
        )
        self._cache = None

    @property
    def steps(self) -> int:
        """Steps charged so far."""
        return sum(r["steps"] for r in self.records)

    @property
    def rounds(self) -> list[int | None]:
        """The rounds charged, in order."""
        return [r["round"] for r in self.records]

    def history(self) -> list[tuple[float, float, int]]:
        """Consecutive records with the same (noise, q) merged: the accountant's history."""
        merged: list[tuple[float, float, int]] = []
        for r in self.records:
            s, q, t = r["noise_multiplier"], r["sample_rate"], r["steps"]
            if merged and merged[-1][:2] == (s, q):
                merged[-1] = (s, q, merged[-1][2] + t)
            else:
                merged.append((s, q, t))
        return merged

    def epsilon(self) -> float:
        """epsilon spent so far at the ledger's delta (computed once per new record)."""
        if self._cache is None or self._cache[0] != len(self.records):
            self._cache = (len(self.records), epsilon_of_history(self.history(), self.delta, self.accountant))
        return self._cache[1]

    def epsilon_if(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """epsilon that charging one more (noise, q, steps) would bring: for a ``max_epsilon`` check before a round."""
        return epsilon_of_history(
            [*self.history(), (noise_multiplier, sample_rate, steps)], self.delta, self.accountant
        )

    def state_dict(self) -> dict:
        """A plain dict.

        ``{"delta", "accountant", "records": [{"round", "noise_multiplier", "sample_rate", "steps"}]}``.
        """
        return {"delta": self.delta, "accountant": self.accountant, "records": [dict(r) for r in self.records]}

    @classmethod
    def from_state_dict(cls, state: dict) -> PrivacyLedger:
        """The ledger :meth:`state_dict` described."""
        ledger = cls(state["delta"], state["accountant"])
        for r in state["records"]:
            ledger.record(r["noise_multiplier"], r["sample_rate"], r["steps"], r.get("round"))
        return ledger


# ---- client level: one hospital's whole data, one step per round ------------------------


def client_sample_rate(clients_per_round: int, num_hospitals: int) -> float:
    """q of client-level accounting: hospitals sampled per round over hospitals."""
    if not 0 < clients_per_round <= num_hospitals:
        raise ValueError(f"need 0 < clients per round <= hospitals; got {clients_per_round}, {num_hospitals}")
    return clients_per_round / num_hospitals


def client_epsilon(
    noise_multiplier: float,
    clients_per_round: int,
    num_hospitals: int,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """epsilon of a hospital under DP-FedAvg: the same accountant with q = clients per round / hospitals,
    steps = rounds."""
    return epsilon(noise_multiplier, client_sample_rate(clients_per_round, num_hospitals), rounds, delta, accountant)
