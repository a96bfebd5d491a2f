"""What a round's record holds beyond each client's own figures: the weights' agreement checksum, the global
figures pooled from the clients' rows, and the time by phase. Every writer (metrics.jsonl, TensorBoard, the
round line) reads the record these build."""

from __future__ import annotations

import time
from typing import Any

import torch

#: The statuses of clients whose update went into the aggregate.
AGGREGATED = ("trained", "straggler")
#: The phases of a round's ``seconds``; ``other`` is the rest, so the parts sum to ``total``.
PHASES = ("local_training", "validation", "aggregation", "diagnostics", "checkpoint")


def weights_checksum(values: torch.Tensor) -> list[float]:
    """Sums of a strided sample of the aggregated weights (every 61st, and every 61st from the 30th), in float64:
    equal on every rank iff the ranks agree (up to chance), at a small fraction of a pass over the weights."""
    v = values.detach()
    return [float(v[::61].sum(dtype=torch.float64)), float(v[30::61].sum(dtype=torch.float64))]


def global_figures(clients: list[dict[str, Any]]) -> dict[str, Any]:
    trained = [c for c in clients if c["status"] in AGGREGATED]
    drifts = [c["drift"] for c in trained if c.get("drift") is not None]
    accs = [(c["val_acc_global"], c["num_val"]) for c in clients if c.get("val_acc_global") is not None]
    losses = [(c["train_loss"], c["num_samples"]) for c in clients if c.get("train_loss") is not None]
    weighted = lambda pairs: sum(a * n for a, n in pairs) / max(sum(n for _, n in pairs), 1) if pairs else None  # noqa: E731
    return {
        "val_acc": weighted(accs),
        "train_loss": weighted(losses),
        "samples_aggregated": sum(c["num_samples"] for c in trained),
        "drift_spread": (max(drifts) - min(drifts)) if drifts else None,
        "update_norm": clients[0].get("global_update_norm") if clients else None,
        "clients_aggregated": len(trained),
    }


def round_seconds(timings: dict[str, float], started: float) -> dict[str, float]:
    """The round's time by phase; ``other`` is the rest, so the parts sum to ``total``."""
    total = time.perf_counter() - started
    parts = {key: timings.get(key, 0.0) for key in PHASES}
    return {"total": total, **parts, "other": max(total - sum(parts.values()), 0.0)}
