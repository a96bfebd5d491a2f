"""Federated averaging as one collective."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fedsim.flat import flatten, get_flat


def fedavg(model: nn.Module, num_samples: int, group: dist.ProcessGroup | None = None, bn: str = "average") -> int:
    """Replace the model's weights by their sample-weighted mean over the group, in place.

    Every parameter and floating-point buffer (BatchNorm running statistics
    included) becomes ``sum_k n_k * w_k / sum_k n_k`` over the ranks of the
    group, where ``n_k`` is the ``num_samples`` that rank passes. It costs one
    scale, ONE all-reduce over the model's flat buffer (see :mod:`fedsim.flat`)
    and one divide; the first call flattens the model (a one-off copy).

    A rank passing ``num_samples=0`` (a dropped client) contributes nothing and
    receives the mean of the others. If every rank passes 0 the model is left
    unchanged. Integer buffers (``num_batches_tracked``) become their weighted
    mean, rounded, so they end identical on all ranks.

    Args:
        model: The local model, already on its device (CUDA tensors for NCCL).
        num_samples: Training samples this client holds (not batches), >= 0.
        group: Process group; the default group when None.
        bn: ``"average"`` aggregates BatchNorm tensors; ``"local"`` keeps them
            per client (FedBN: weights, biases and running statistics).

    Returns:
        The total number of samples over the group.
    """
    if bn not in ("average", "local"):
        raise ValueError(f"bn must be 'average' or 'local', got {bn!r}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    flat = flatten(model, local_bn=bn == "local", channels_last=_current_channels_last(model))
    region = flat.reduced
    backup = region.clone() if num_samples == 0 else None  # only a dropped client pays for a copy
    with torch.no_grad():
        if num_samples:
            flat.pack_scratch()
            region.mul_(float(num_samples))
        else:
            region.zero_()  # not a multiplication by 0: NaN * 0 is NaN
        dist.all_reduce(region, op=dist.ReduceOp.SUM, group=group)
        total = float(flat.scratch[0].item())
        if total <= 0:
            if backup is not None:
                region.copy_(backup)
            return 0
        region.div_(total)
        flat.unpack_int_buffers()
    return int(round(total))


def allreduce_mean_(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Average a tensor over the group in place (one collective); used for gradients in centralized mode."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor.div_(dist.get_world_size(group))


def _current_channels_last(model: nn.Module) -> bool:
    """Keep an existing flat layout's memory format; plain models are flattened contiguous."""
    flat = get_flat(model)
    return bool(flat is not None and flat.channels_last)
