"""Client drift: how far each client's local update moved, and how it relates to the consensus.

With ``w_g`` the global weights a round starts from, ``w_k`` client k's weights
after local training and ``w_new`` the aggregated result:

- ``drift`` = ||w_k - w_g||: the length of the client's update (before aggregation);
- ``rel_drift`` = drift / ||w_g||;
- ``divergence`` = ||w_k - w_new||: distance from the consensus after aggregation;
- ``cosine`` = cos(w_k - w_g, w_new - w_g): agreement of the client's direction with the aggregate;
- ``global_update_norm`` = ||w_new - w_g||.

A diverging client shows a drift that grows round over round while the others
settle, a low or negative cosine, and a growing divergence.
"""
from __future__ import annotations

import torch

from fedsim.flat import FlatModel


class DriftTracker:
    """Holds one client's update of a round (one flat vector) and derives the measures."""

    def __init__(self, flat: FlatModel, anchor: torch.Tensor):
        """``anchor``: the round's global weights, aligned with ``flat.global_params`` (FedBN's local
        BatchNorm parameters have no global value, so they take no part)."""
        self.anchor = anchor
        with torch.no_grad():
            self.update = flat.global_params.detach() - anchor
        self.lengths = torch.tensor([end - start for _, start, end in flat.layer_slices(global_only=True)],
                                    device=anchor.device)

    def before_aggregation(self) -> dict[str, float]:
        """drift and rel_drift (scalars)."""
        drift = float(self.update.norm())
        return {"drift": drift, "rel_drift": drift / max(float(self.anchor.norm()), 1e-12)}

    def after_aggregation(self, flat: FlatModel) -> dict[str, float]:
        """Everything, once the global weights have been aggregated into ``flat``."""
        with torch.no_grad():
            global_update = flat.global_params.detach() - self.anchor
            g_norm = float(global_update.norm())
            u_norm = float(self.update.norm())
            cosine = float(torch.dot(self.update, global_update)) / (u_norm * g_norm) if u_norm and g_norm else 0.0
            divergence = float((self.update - global_update).norm())
        return {**self.before_aggregation(), "divergence": divergence, "cosine": cosine, "global_update_norm": g_norm}

    def layer_drift(self) -> list[float]:
        """||w_k - w_g|| of every parameter tensor, in model order (for a histogram)."""
        with torch.no_grad():
            sums = torch.segment_reduce(self.update.pow(2), "sum", lengths=self.lengths)
        return sums.sqrt().cpu().tolist()
