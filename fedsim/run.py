"""Run lifecycle: logging, process group, the federation, teardown — and one-line errors."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from fedsim.checkpoint import CheckpointError
from fedsim.config import ConfigError, RunConfig
from fedsim.dist import HungRanks, init_distributed, teardown
from fedsim.logger import print_error, setup_logging
from models import check_backbone

log = logging.getLogger("fedsim")

#: Errors that mean "the input or the settings are wrong": one line, exit code 2 (FEDSIM_DEBUG=1: the traceback too).
USER_ERRORS = (ConfigError, FileNotFoundError, ValueError, CheckpointError)


@record
def run_training(cfg: RunConfig) -> int:
    """Train under the config; returns the process exit code."""
    setup_logging(os.environ.get("RANK", "0"))
    info = None
    try:
        info = init_distributed(cfg.train.device, cfg.train.timeout_s)
        setup_logging(info.rank)
        check_backbone(cfg.model.backbone)
        _prepare_out(cfg, info.is_main)
        if info.is_main:
            log.info("%d rank(s), backend %s on %s (%s); mode %s, %s backbone, scales %s",
                     info.world_size, info.backend, info.device, info.reason, cfg.train.mode,
                     cfg.model.backbone, cfg.model.scales)
        from fedsim.federation import Federation

        federation = Federation(cfg, info)
        setup_logging(info.rank, federation.client.hospital.name if federation.client.hospital else "pooled")
        federation.run()
        return 0
    except USER_ERRORS as err:
        print_error(f"train.py: error (rank {_rank(info)})", err)
        return 2
    except HungRanks as err:
        print_error(f"train.py: error (rank {_rank(info)})", err)
        return 3
    finally:
        teardown()


def _rank(info) -> str:
    return str(info.rank) if info else os.environ.get("RANK", "0")


def _prepare_out(cfg: RunConfig, is_main: bool) -> None:
    if is_main:  # config.json and the other run files follow once a resume, if any, is accepted
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
