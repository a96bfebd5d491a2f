"""Client-level DP-FedAvg: clip each hospital's update and add a share of the noise on every rank.

**Client-level DP-FedAvg** (McMahan et al., ICLR 2018) protects a whole
hospital, not one of its samples: its update is clipped to norm S
(:func:`clip_update_`) and every rank adds a share N(0, sigma^2 S^2 / num_ranks)
(:func:`add_noise_share_`) before the sum, which then carries N(0, sigma^2 S^2).
The shares are drawn from :func:`fedsim.privacy.dpsgd.noise_generator`; what a round
spends is :func:`fedsim.privacy.accounting.client_epsilon`. :mod:`fedsim.privacy`
re-exports both functions.
"""

from __future__ import annotations

import math

import torch

# The same guard against a zero norm as per-sample clipping, so both clip alike.
from fedsim.privacy.dpsgd import _NORM_EPS

__all__ = ["add_noise_share_", "clip_update_"]


@torch.no_grad()
def clip_update_(update: torch.Tensor, max_norm: float) -> float:
    """Scale a flat update in place to L2 norm at most ``max_norm``; return its norm before clipping.

    That norm is the hospital's own business: under client-level DP it must not be released.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0; got {max_norm}")
    norm = torch.linalg.vector_norm(update.float())
    update.mul_((max_norm / (norm + _NORM_EPS)).clamp(max=1.0).to(update.dtype))
    return float(norm)


@torch.no_grad()
def add_noise_share_(
    tensor: torch.Tensor, noise_multiplier: float, max_norm: float, num_ranks: int, generator: torch.Generator
) -> None:
    """Add this rank's share of the noise, N(0, sigma^2 S^2 / num_ranks) per coordinate, in place.

    Every rank of the sum adds one share (a client that sat the round out
    too), so the sum carries N(0, sigma^2 S^2) and no rank adds all of it.
    A share alone is sigma/sqrt(num_ranks): the guarantee holds for the sum
    only, so the contributions must be summed securely (secure aggregation);
    a plain all-reduce shows partial sums to the ranks it passes through.
    """
    if num_ranks < 1 or noise_multiplier < 0 or not max_norm > 0:
        raise ValueError(f"bad noise share: sigma {noise_multiplier}, S {max_norm}, ranks {num_ranks}")
    if noise_multiplier == 0:
        return
    noise = torch.empty_like(tensor).normal_(generator=generator)
    tensor.add_(noise, alpha=noise_multiplier * max_norm / math.sqrt(num_ranks))
