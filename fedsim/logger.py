"""Run outputs and log lines: stdout, metrics.jsonl, TensorBoard. Rank 0 alone writes shared files.

Layout of a run directory (one place decides it)::

    OUT/config.json         resolved config
    OUT/metrics.jsonl       one JSON object per round
    OUT/tb/                 TensorBoard events (client/<hospital>/..., global/...)
    OUT/checkpoint.pt       latest global model; OUT/checkpoints/round-NNNN.pt the last k
    OUT/splits.csv          the patient-level split and hospital of every image
    OUT/data_report.json    skipped files by reason, per hospital
    OUT/final.json          test metrics of the final global model
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from data.files import clean_json as clean
from data.files import storage_error, write_atomic, write_json  # noqa: F401 - write_json: for the run's writers

FORMAT = "%(asctime)s %(levelname).1s [rank %(rank)s %(hospital)s] %(message)s"


class _Context(logging.Filter):
    """Stamps every record with this process's rank and hospital."""

    def __init__(self) -> None:
        super().__init__()
        self.rank, self.hospital = "-", "-"

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank, record.hospital = self.rank, self.hospital
        return True


_CONTEXT = _Context()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be replaced after set-up)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(rank: int | str = "-", hospital: str = "-", level: int | None = None) -> None:
    """Route stdlib logging to stderr with the rank and hospital in every line.

    Rank 0 logs at INFO; the other ranks at WARNING unless ``level`` says
    otherwise, so a line that every rank would print appears once.
    """
    if level is None:
        level = logging.INFO if str(rank) in ("0", "-", "eval") else logging.WARNING
    _CONTEXT.rank, _CONTEXT.hospital = rank, hospital
    root = logging.getLogger()
    if not any(getattr(h, "_fedsim", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_CONTEXT)
        handler._fedsim = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)


def print_error(prefix: str, err: BaseException) -> None:
    """The one-line error of a command line tool; with ``FEDSIM_DEBUG=1`` the traceback first."""
    if os.environ.get("FEDSIM_DEBUG"):
        traceback.print_exception(err)
    print(f"{prefix}: {err}", file=sys.stderr)


#: How long a rank other than 0 waits before it exits on a settings error that rank 0 reports.
_SETTINGS_ERROR_WAIT_S = 10.0


def report_error(prefix: str, err: BaseException, rank: str = "0", every_rank: bool = False) -> None:
    """The one-line error of a run, printed once, and recorded for torchrun's failure summary.

    Settings errors are the same on every rank, so only rank 0 prints them; an
    error of one hospital's data (or a hung peer) is printed by the rank that
    met it. Under torchrun the line also goes into torch elastic's error file,
    so the summary torchrun prints after it ends with the reason instead of a
    link to its documentation.
    """
    shared = _is_settings_error(err) and not every_rank
    if rank in ("0", "-") or not shared:
        label = prefix if rank in ("0", "-") or shared else f"{prefix} (rank {rank})"
        print_error(label, err)
    _record_for_torchrun(f"{prefix}: {err}")
    if shared and rank not in ("0", "-") and os.environ.get("TORCHELASTIC_ERROR_FILE"):
        # Let rank 0 fail first: torchrun stops the other ranks at the first failure it sees, and a rank
        # that exits before rank 0 has printed would take the only copy of the line with it. When rank 0
        # exits, torchrun ends this wait; without it (rank 0 on another node, say) this rank exits after it.
        time.sleep(_SETTINGS_ERROR_WAIT_S)


def _record_for_torchrun(line: str) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({"message": line, "timestamp": int(time.time())}, handle)
    except OSError:
        pass


def _is_settings_error(err: BaseException) -> bool:
    from fedsim.config import ConfigError

    return isinstance(err, ConfigError)


class RunLogger:
    """metrics.jsonl and TensorBoard scalars for the round summaries (rank 0 only)."""

    def __init__(self, out: str | Path, enabled: bool, tensorboard: bool = True):
        self.out = Path(out)
        self.enabled = enabled
        self.tensorboard = enabled and tensorboard
        self.writer = None

    def start(self, first_round: int) -> None:
        """Begin logging at ``first_round``: every round before it is committed (its checkpoint exists).

        Whatever a previous attempt logged for ``first_round`` and later (a crash
        between its metrics line and its checkpoint, or before any checkpoint)
        is dropped: lines from ``metrics.jsonl`` now, TensorBoard events through
        the writer's ``purge_step`` (readers discard earlier events at or after it).
        """
        if not self.enabled:
            return
        path = self.out / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _committed(line, first_round)]
            write_atomic(path, "".join(line + "\n" for line in kept))
        if self.tensorboard and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=first_round)

    def log_round(self, record: dict[str, Any]) -> None:
        """Append one round to metrics.jsonl (fsync'd) and write its scalars."""
        if not self.enabled:
            return
        path = self.out / "metrics.jsonl"
        line = (json.dumps(clean(record), allow_nan=False) + "\n").encode("utf-8")
        try:
            with open(path, "ab") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:
            raise storage_error(err, path, len(line)) from None
        if self.writer is not None:
            self._scalars(record)

    def flush(self) -> None:
        """Everything logged so far is on disk (before the round's checkpoint commits it)."""
        if self.writer is not None:
            self.writer.flush()

    def _scalars(self, record: dict[str, Any]) -> None:
        step = record["round"]
        for client in record.get("clients", []):
            for key, value in client.items():
                if _is_number(value):
                    self.writer.add_scalar(f"client/{client['hospital']}/{key}", value, step)
        for key, value in record.get("global", {}).items():
            if _is_number(value):
                self.writer.add_scalar(f"global/{key}", value, step)
        self.writer.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def confusion_matrix(self, tag: str, cm, class_names, step: int) -> None:
        """The matrix as an image (rendered as in eval.py's confusion_matrix.png)."""
        if self.writer is None:
            return
        import numpy as np

        from fedsim.plots import confusion_matrix_image

        image = np.asarray(confusion_matrix_image(cm, list(class_names), title=tag))
        self.writer.add_image(tag, image.transpose(2, 0, 1), step)

    def histogram(self, tag: str, values, step: int) -> None:
        if self.writer is not None:
            self.writer.add_histogram(tag, values, step)

    def image(self, tag: str, chw, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, chw, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _committed(line: str, first_round: int) -> bool:
    """A metrics line of a round before ``first_round`` (a torn last line of a crash is dropped too)."""
    try:
        return json.loads(line)["round"] < first_round
    except (ValueError, KeyError, TypeError):
        return False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_round(record: dict[str, Any]) -> str:
    """The one-line round summary printed by rank 0."""
    g = record.get("global", {})
    parts = [f"round {record['round'] + 1}/{record['rounds']}"]
    clients = record.get("clients", [])
    for c in clients:
        if c.get("status") == "not sampled":
            continue
        loss = c.get("train_loss")
        bits = [f"{c['hospital']}: loss {loss:.3f}" if loss is not None else f"{c['hospital']}:"]
        if c.get("drift") is not None:
            bits.append(f"drift {c['drift']:.3g}")
        if c.get("val_acc_global") is not None:
            bits.append(f"val {c['val_acc_global']:.3f}")
        if c.get("epsilon") is not None:
            bits.append(f"eps {c['epsilon']:.3g}")
        if c.get("status", "trained") != "trained":
            bits.append(c["status"])
        parts.append(" ".join(bits))
    idle = sum(c.get("status") == "not sampled" for c in clients)
    if idle:
        parts.append(f"{idle} not sampled")
    if g.get("val_acc") is not None:
        parts.append(f"global val acc {g['val_acc']:.3f}")
    seconds = record.get("seconds", {})
    if isinstance(seconds, dict) and seconds:
        overhead = seconds["total"] - seconds.get("local_training", 0.0) - seconds.get("validation", 0.0)
        parts.append(f"{seconds['total']:.1f}s (overhead {overhead:.2f}s)")
    return " | ".join(parts)
