"""Faults on purpose and faults by accident: the simulations a config asks for (``train.simulate_nan``,
``simulate_hang``, ``simulate_crash``) and the meeting of all ranks before aggregation, which turns a hung or
crashed rank into an error naming its hospitals instead of a collective that waits for ever."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import torch

from fedsim import checkpoint
from fedsim.config import RunConfig
from fedsim.dist import HungRanks, wait_for_all
from fedsim.flat import FlatModel

log = logging.getLogger(__name__)


class FaultDrills:
    """One rank's fault simulations and its meeting with the others.

    Args:
        hospitals: Every hospital of the run, by index (a hung rank ``k`` hosts ``k, k + W, ...``).
        mine: The hospitals this rank hosts (empty in centralized mode: no hospital is simulated there).
    """

    def __init__(
        self, cfg: RunConfig, out: Path, flat: FlatModel, hospitals: list[str], mine: list[str], world_size: int
    ):
        self.cfg, self.out, self.flat = cfg, out, flat
        self.hospitals, self.mine, self.world_size = list(hospitals), list(mine), world_size

    def wait_for_clients(self, r: int) -> None:
        """Meet every rank before aggregating; a hung one ends the run with its hospitals named, not a hang."""
        try:
            wait_for_all(self.cfg.train.timeout_s, f"round {r + 1} aggregation")
        except HungRanks as err:
            hosted = [i for k in err.ranks for i in range(k, len(self.hospitals), self.world_size)]
            names = [self.hospitals[i] for i in hosted] if self.mine else []
            who = f"hospital(s) {', '.join(names)} " if names else ""
            hint = "" if err.crashed else " (raise train.timeout_s if local training is that slow)"
            raise HungRanks(err.ranks, f"{who}{err}{hint}", err.crashed) from None

    def after_epoch(self, name: str, r: int) -> None:
        """The fault simulations of the config for one hospital (a diverging client, a hang, a crash)."""
        cfg = self.cfg.train
        if name in cfg.simulate_nan:
            with torch.no_grad():
                self.flat.params.fill_(float("nan"))
        if cfg.simulate_hang == f"{name}:{r + 1}":
            log.warning("simulated hang: hospital %s stops responding in round %d", name, r + 1)
            time.sleep(10**7)
        self.crash(r, "training", name)

    def crash(self, r: int, point: str, name: str | None = None) -> None:
        """train.simulate_crash = "HOSPITAL:ROUND[:POINT]": SIGKILL this process there, once per run directory.

        POINT is ``training`` (the default: in the middle of local training),
        ``before-checkpoint`` (the round's metrics and events written, its
        checkpoint not), ``checkpoint`` (the checkpoint written but not yet
        renamed into place) or ``after-checkpoint``; the last three concern
        rank 0, the writer of the run files.
        """
        parts = self.cfg.train.simulate_crash.split(":")
        names = [name] if name else self.mine
        if len(parts) < 2 or parts[0] not in names or parts[1] != str(r + 1):
            return
        where = parts[2] if len(parts) > 2 else "training"
        marker = self.out / (f".crashed-{parts[0]}-round{r + 1}" + ("" if where == "training" else f"-{where}"))
        if where != point or marker.exists():
            return
        marker.touch()
        if point == "checkpoint":  # checkpoint.save_atomic kills the process once the file is written
            checkpoint.CRASH_DURING.add(str(checkpoint.round_path(self.out / "checkpoints", r)))
            return
        log.warning("simulated crash: killing this process (SIGKILL) in round %d (%s)", r + 1, point)
        os.kill(os.getpid(), signal.SIGKILL)
