"""The round's snapshot of the global model and the chunked passes over the weights that read it.

One buffer the size of the flat model is kept for the run: each round starts by copying the model into it
(or only its small part, when the last round's post-aggregation pass already wrote the global parameters
there), clients are restored from it, and the drift and post-aggregation figures are computed chunk by chunk
against it. On CPU, rank 0's checkpoint is written from views of it, without a copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fedsim.flat import FlatModel

#: Per-client updates are kept for the post-aggregation figures (cosine, divergence) at this many coordinates at
#: most: every k-th one of a larger model (an estimate, said in the README); all of them for smaller ones.
SKETCH_SIZE = 1 << 22
#: Elements per chunk of the passes over the weights (1 MiB of float32): large enough to amortise a call, small
#: enough that the chunk is still in a core's cache when it is read again.
_PASS = 1 << 18
#: Stride of the spot check that the model still equals the refreshed snapshot (17k values of the dual ResNetRS50).
_SPOT = 4099


class Snapshot:
    """The global model at the start of the round, kept beside the model it was taken from.

    Attributes:
        buffer: The copy of the model's flat buffer (allocated on the first :meth:`take`).
        stride: Every ``stride``-th coordinate of an update is kept in its sketch.
        before_refresh: Called before a refresh overwrites the buffer (readers of :meth:`state_views` finish).
    """

    def __init__(self, model: nn.Module, flat: FlatModel):
        self.model, self.flat = model, flat
        self.buffer: torch.Tensor | None = None
        self.stride = max(1, math.ceil(flat.global_params.numel() / SKETCH_SIZE))
        # Integer buffers (BatchNorm's num_batches_tracked) live outside the flat buffer: restored per client too.
        self.int_buffers = [b for b in model.buffers() if not b.is_floating_point()]
        self.start_ints: list[torch.Tensor] = []
        self.refreshed: tuple[int, ...] | None = None  # model version when the buffer was last refreshed
        self.before_refresh: Callable[[], None] | None = None

    def take(self) -> torch.Tensor:
        """The model's flat buffer copied into the kept buffer; the integer buffers beside it.

        The last round's post-aggregation pass already copied the global parameters there; if nothing wrote
        to them since, only the rest (buffers, local tensors, scratch: small) is copied. "Nothing wrote":
        torch's version counters of the parameters and of the buffer (bumped by every in-place write, the
        optimizer's and ``load_state_dict``'s included) are unchanged, and a strided sample still matches
        (writes through ``.data`` bypass the counters)."""
        flat = self.flat
        if self.buffer is None:
            self.buffer = torch.empty_like(flat.data)
            self._scratch = torch.empty(min(_PASS, flat.data.numel()), dtype=flat.data.dtype, device=flat.device)
            self._pieces = _chunk_pieces(flat, _PASS)
            self.layers = flat.layer_slices(global_only=True)
        with torch.no_grad():
            if self.refreshed == self._model_version() and self._sample_matches():
                first, stop = flat.global_slice.start, flat.global_slice.stop
                self.buffer[:first].copy_(flat.data[:first])
                self.buffer[stop:].copy_(flat.data[stop:])
            else:
                self.release()
                self.buffer.copy_(flat.data)
        self.start_ints = [b.clone() for b in self.int_buffers]
        return self.buffer

    def restore(self) -> None:
        """The snapshot back into the model: the flat buffer and the integer buffers."""
        with torch.no_grad():
            self.flat.data.copy_(self.buffer)
            for buf, value in zip(self.int_buffers, self.start_ints):
                buf.copy_(value)

    def update_pass(
        self,
        weights: torch.Tensor,
        start: torch.Tensor,
        layers: bool = True,
        start_norm: bool = False,
        scale: float | None = None,
        refresh: bool = False,
    ):
        """One chunked pass over ``weights - start``: the squared norm of each parameter tensor (or, with
        ``layers`` False, of the whole) and the strided sample of it (every ``stride``-th coordinate); with
        ``start_norm`` also ||start||², from the chunk still in cache. Chunk sums are float32, added in float64.

        While each chunk is in cache: ``scale`` multiplies ``weights`` by it afterwards; ``refresh`` copies
        ``weights`` into ``start`` afterwards (the next round's snapshot; the model version is recorded)."""
        sums = [0.0] * (len(self.layers) if layers else 1)
        start_sum = 0.0
        sketch = torch.empty(len(range(0, weights.numel(), self.stride)), dtype=weights.dtype, device=weights.device)
        for lo, hi, pieces in self._pieces:
            part = torch.sub(weights[lo:hi], start[lo:hi], out=self._scratch[: hi - lo])
            first = -lo % self.stride
            taken = part[first :: self.stride]
            at = (lo + first) // self.stride
            sketch[at : at + taken.numel()].copy_(taken)
            if layers:  # dot products read the chunk once; squaring it first would write it once more
                for a, b, layer in pieces:
                    piece = part[a:b]
                    sums[layer] += float(torch.dot(piece, piece))
            else:
                sums[0] += float(torch.dot(part, part))
            if start_norm:
                start_sum += float(torch.dot(start[lo:hi], start[lo:hi]))
            if scale is not None:
                weights[lo:hi].mul_(scale)
            if refresh:
                start[lo:hi].copy_(weights[lo:hi])
        if refresh:
            self.refreshed = self._model_version()
        return (sums, sketch, start_sum) if start_norm else (sums, sketch)

    def release(self) -> None:
        """Before the buffer's global region is overwritten: let readers of :meth:`state_views` finish."""
        if self.before_refresh is not None:
            self.before_refresh()

    def state_views(self) -> dict[str, torch.Tensor] | None:
        """The model's state dict with the global parameters as views of the buffer the last round's
        post-aggregation pass wrote (no copy of them), the rest copied; None if that buffer is not the model
        now (before the first round, or after a write to the model) or lives on a GPU (it must be copied to
        the host anyway). The views hold until the next round calls ``before_refresh``: a checkpoint written
        from them must be on disk by then."""
        if self.flat.device.type != "cpu" or self.refreshed != self._model_version() or not self._sample_matches():
            return None
        flat, base, size = self.flat.data, self.flat.data.data_ptr(), self.flat.data.element_size()
        g = self.flat.global_slice
        out = {}
        for key, value in self.model.state_dict().items():
            offset = (value.data_ptr() - base) // size
            inside = (
                value.dtype == flat.dtype
                and g.start <= offset
                and offset + value.numel() <= g.stop
                and value.data_ptr() >= base
            )
            out[key] = (
                self.buffer.as_strided(value.shape, value.stride(), offset)
                if inside
                else value.detach().to("cpu", copy=True)
            )
        return out

    def _model_version(self) -> tuple[int, ...]:
        return (self.flat.data._version, *(p._version for p in self.model.parameters()))

    def _sample_matches(self) -> bool:
        g = self.flat.global_slice
        return bool(torch.equal(self.flat.data[g][::_SPOT], self.buffer[g][::_SPOT]))


def _chunk_pieces(flat: FlatModel, chunk: int) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """The global parameters cut into chunks, each with the pieces of parameter tensors it holds:
    ``(lo, hi, [(start, end, layer number), ...])``, piece bounds relative to the chunk."""
    layers = flat.layer_slices(global_only=True)
    total = flat.global_params.numel()
    chunks = []
    for lo in range(0, total, chunk):
        hi = min(lo + chunk, total)
        pieces = [(max(a, lo) - lo, min(b, hi) - lo, k) for k, (_, a, b) in enumerate(layers) if a < hi and b > lo]
        chunks.append((lo, hi, pieces))
    return chunks
