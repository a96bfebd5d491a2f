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
import traceback
from pathlib import Path
from typing import Any

from data.files import write_atomic

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


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never half of it."""
    write_atomic(path, text)


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic, strict JSON (NaN becomes null)."""
    atomic_write_text(path, json.dumps(clean(obj), indent=2, allow_nan=False) + "\n")


def clean(obj: Any) -> Any:
    """Replace NaN/Inf floats by None, recursively, so the JSON stays standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


class RunLogger:
    """metrics.jsonl and TensorBoard scalars for the round summaries (rank 0 only)."""

    def __init__(self, out: str | Path, enabled: bool, tensorboard: bool = True):
        self.out = Path(out)
        self.enabled = enabled
        self.tensorboard = enabled and tensorboard
        self.writer = None

    def _open_writer(self, first_step: int) -> None:
        """Open the events file at the first logged round; purge_step drops events a resumed run redoes."""
        if self.tensorboard and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=first_step or None)

    def truncate(self, first_round: int) -> None:
        """Drop metrics of rounds >= first_round (they are about to be recomputed after a resume)."""
        path = self.out / "metrics.jsonl"
        if not self.enabled or not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["round"] < first_round]
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def log_round(self, record: dict[str, Any]) -> None:
        """Append one round to metrics.jsonl and write its scalars."""
        if not self.enabled:
            return
        self._open_writer(record["round"])
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(clean(record), allow_nan=False) + "\n")
        if self.writer is not None:
            self._scalars(record)

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
        import tempfile

        import numpy as np
        from PIL import Image

        from fedsim.metrics import save_confusion_matrix_png

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "cm.png"
            save_confusion_matrix_png(cm, list(class_names), path, title=tag)
            image = np.asarray(Image.open(path).convert("RGB"))
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_round(record: dict[str, Any]) -> str:
    """The one-line round summary printed by rank 0."""
    g = record.get("global", {})
    parts = [f"round {record['round'] + 1}/{record['rounds']}"]
    for c in record.get("clients", []):
        loss = c.get("train_loss")
        bits = [f"{c['hospital']}: loss {loss:.3f}" if loss is not None else f"{c['hospital']}:"]
        if c.get("drift") is not None:
            bits.append(f"drift {c['drift']:.3g}")
        if c.get("val_acc_global") is not None:
            bits.append(f"val {c['val_acc_global']:.3f}")
        if c.get("status", "ok") != "ok":
            bits.append(c["status"])
        parts.append(" ".join(bits))
    if g.get("val_acc") is not None:
        parts.append(f"global val acc {g['val_acc']:.3f}")
    parts.append(f"{record.get('seconds', 0):.0f}s")
    return " | ".join(parts)
