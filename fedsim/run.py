"""Run lifecycle: logging, process group, run-directory lock, the federation, teardown — and one-line errors."""

from __future__ import annotations

import logging
import os

from torch.distributed.elastic.multiprocessing.errors import record

from data.files import WriteError
from fedsim.config import ConfigError, RunConfig, check_inputs
from fedsim.dist import HungRanks, broadcast_object, init_distributed, teardown
from fedsim.errors import UserError
from fedsim.logger import report_error, setup_logging
from fedsim.rundir import RunLock
from models import check_backbone

log = logging.getLogger("fedsim")

#: Errors that mean "the input or the settings are wrong" (a UserError: ConfigError, DataError, CheckpointError ...;
#: a data path that does not exist; a disk that is full or read-only): one line, exit code 2 (FEDSIM_DEBUG=1: the
#: traceback too). Anything else is a bug and shows its traceback.
USER_ERRORS = (UserError, FileNotFoundError, WriteError)


@record
def run_training(cfg: RunConfig) -> int:
    """Train under the config; returns the process exit code."""
    setup_logging(os.environ.get("RANK", "0"))
    info, lock = None, None
    try:
        check_inputs(cfg)  # files named in the settings, before any work
        info = init_distributed(cfg.train.device, cfg.train.timeout_s)
        setup_logging(info.rank)
        check_backbone(cfg.model.backbone)
        lock = _own_out(cfg, info.is_main)
        if info.is_main:
            log.info(
                "%d rank(s), backend %s on %s (%s); mode %s, %s backbone, scales %s",
                info.world_size,
                info.backend,
                info.device,
                info.reason,
                cfg.train.mode,
                cfg.model.backbone,
                cfg.model.scales,
            )
        from fedsim.federation import Federation

        federation = Federation(cfg, info)
        hosted = [h.name for h in federation.plan.mine] if federation.federated else ["pooled"]
        setup_logging(info.rank, ",".join(hosted) if len(hosted) <= 3 else f"{hosted[0]}..{hosted[-1]}")
        federation.run()
        return 0
    except USER_ERRORS as err:
        report_error("train.py: error", err, _rank(info))
        return 2
    except HungRanks as err:
        report_error("train.py: error", err, _rank(info), every_rank=True)
        return 3
    finally:
        teardown()
        if lock is not None:
            lock.release()


def _rank(info) -> str:
    return str(info.rank) if info else os.environ.get("RANK", "0")


def _own_out(cfg: RunConfig, is_main: bool) -> RunLock | None:
    """Rank 0 takes the run directory for the life of the run; every rank learns whether it could.

    Raises:
        RunDirBusy: on every rank, when another run owns ``OUT``.
        WriteError: on every rank, when ``OUT`` cannot be written.
    """
    lock, refusal = None, None
    if is_main:
        try:
            lock = RunLock(cfg.out).acquire()
        except (ConfigError, WriteError) as err:
            refusal = (type(err).__name__, str(err))
    refusal = broadcast_object(refusal)
    if refusal is not None:
        kind, message = refusal
        raise (WriteError(message) if kind == "WriteError" else ConfigError(message))
    return lock
