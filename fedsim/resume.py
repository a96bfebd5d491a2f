"""Resuming a run: the newest usable checkpoint of the same config and federation, the same on every rank."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from fedsim import checkpoint
from fedsim.config import ConfigError, RunConfig
from fedsim.dist import DistInfo, broadcast_object
from fedsim.engine import Engine

log = logging.getLogger(__name__)


def resume_round(
    cfg: RunConfig, info: DistInfo, out: Path, hospitals: list[str], model: nn.Module, engine: Engine | None
) -> int:
    """Continue after the newest usable checkpoint of this config, if the run directory has one.

    Rank 0 picks the file (falling back past corrupt ones) and every rank
    loads that same file, so a restarted group agrees on the round.
    """
    chosen = None
    if info.is_main:
        found = checkpoint.load_latest_usable(out)
        chosen = str(found[1]) if found else None
    chosen = broadcast_object(chosen)
    if chosen is None:
        if cfg.train.resume:
            log.warning("--resume: no checkpoint in %s, starting from round 1", out)
        return 0
    state = checkpoint.load(chosen)
    if state.get("config_digest") != cfg.digest():
        raise ConfigError(
            f"{chosen} was written by a run with another config; use a new --out, or the same settings to resume"
        )
    if state.get("hospitals") != list(hospitals):  # e.g. another data.num_hospitals
        raise ConfigError(
            f"{chosen} was written by a federation of {', '.join(state.get('hospitals') or ['?'])}; "
            f"this run has {', '.join(hospitals)}: use a new --out, or the same hospitals"
        )
    model.load_state_dict(state["model"])  # copies into the flat views, keeping them bound
    if engine is not None:
        engine.load_state_dict(state.get("engine", {}))
        for client in engine.clients:
            client.state = checkpoint.load_client_state(out, client.name, state["round"])
    start = state["round"] + 1
    if info.is_main:
        log.info("resuming after round %d from %s", start, chosen)
    return start
