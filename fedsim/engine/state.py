"""What a client keeps between rounds, and where: FedBN's local tensors and BatchNorm counters, a persistent
optimizer's state, SCAFFOLD's control variate — in pinned host memory by default, so many hospitals on one
rank do not need a model's worth of device memory each."""

from __future__ import annotations

from typing import Any

import torch

from fedsim.engine.clients import Client
from fedsim.flat import FlatModel


class ClientStateStore:
    """Copies client state out of the model after its local work and back in before it.

    Args:
        flat: The model's flat buffer (FedBN's local tensors live at its two ends).
        int_buffers: The model's integer buffers (BatchNorm's ``num_batches_tracked``), in model order.
        device: ``cpu`` (pinned host memory when CUDA is present) or ``device`` (kept where the model is).
    """

    def __init__(self, flat: FlatModel, int_buffers: list[torch.Tensor], device: str = "cpu"):
        self.flat, self.int_buffers, self.device = flat, int_buffers, device

    def keep(self, value: Any) -> Any:
        """A copy of tensors for the client's state store: pinned host memory, or the device."""
        if isinstance(value, torch.Tensor):
            if self.device == "device":
                return value.detach().clone()
            out = torch.empty(
                value.shape, dtype=value.dtype, pin_memory=torch.cuda.is_available() and value.device.type == "cuda"
            )
            return out.copy_(value.detach())
        if isinstance(value, dict):
            return {k: self.keep(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.keep(v) for v in value)
        return value

    def save(self, client: Client) -> None:
        """FedBN: the client's own tensors and counters, from the model into its state."""
        if self.flat.local_bn:
            client.state["local"] = self.keep(local_tensors(self.flat))
            if self.int_buffers:
                client.state["local_counts"] = self.keep(torch.stack([b.reshape(()) for b in self.int_buffers]))

    def load(self, client: Client) -> None:
        """FedBN: the client's own tensors and counters, from its state into the model."""
        if self.flat.local_bn and "local" in client.state:
            set_local_tensors(self.flat, client.state["local"])
            if "local_counts" in client.state:
                self._load_local_counts(client.state["local_counts"])

    def _load_local_counts(self, counts: torch.Tensor) -> None:
        """The client's own BatchNorm counters (the shared ones are the aggregate's, set from the flat
        buffer's scratch)."""
        shared = {id(b) for b in self.flat._int_buffers}
        with torch.no_grad():
            for buf, value in zip(self.int_buffers, counts.tolist()):
                if id(buf) not in shared:
                    buf.fill_(int(value))


def local_tensors(flat: FlatModel) -> torch.Tensor:
    """The tensors a client keeps for itself (FedBN's BatchNorm weights and statistics), as one vector."""
    head = flat.data[: flat.global_slice.start]
    tail = flat.data[flat.global_slice.start + flat.reduced.numel() :]
    return torch.cat([head, tail])


def set_local_tensors(flat: FlatModel, values: torch.Tensor) -> None:
    """The inverse of :func:`local_tensors`: a client's own tensors into the model's flat buffer."""
    head = flat.global_slice.start
    tail_start = head + flat.reduced.numel()
    with torch.no_grad():
        values = values.to(flat.device)
        flat.data[:head].copy_(values[:head])
        flat.data[tail_start:].copy_(values[head:])


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors of a (nested) state moved to ``device``; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value
