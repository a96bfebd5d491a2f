"""The batching engine shared by the stain normalizers: ``StainNormalizer``.

It holds what Macenko and Reinhard have in common and what makes them fast on
whole batches: input checks, fitting from numpy or torch images, cutting a
batch into chunks run on CPU threads (with torch's intra-op threads shared out
among them), blocks sized for the cache, reusable scratch buffers, passing
degenerate images through unchanged and counting them. A method only supplies
``_fit_pixels`` and ``_normalize_chunk``.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

ImageLike = np.ndarray | torch.Tensor

# Images per chunk when chunk_size is None. A chunk pays a fixed cost of a few
# hundred small per-image-statistics ops, so it should be large (on a 2-core VM
# 128 images normalized 1.2x faster than 64, 32 no faster than 64); on CPU the
# full-resolution work runs in blocks inside it (_BLOCK_FLOATS), and scratch
# tensors are kept between chunks: fresh multi-megabyte tensors cost page
# faults that, on a 2-core VM, took as long as the arithmetic.
_CPU_CHUNK, _GPU_CHUNK = 128, 256
# 4 MiB of float32 (about 7 images of 224 px): blocks stay in the last-level cache
# while each op is long enough to split well across threads (2 MiB and 16 MiB
# blocks were slower on a 2-core VM, 512 KiB ones 25% slower).
_BLOCK_FLOATS = 1 << 20


class StainNormalizer:
    """A stain normalizer that works on whole uint8 batches; the base of ``Macenko`` and ``Reinhard``.

    Shared plumbing: input checks, chunking, degenerate counting, numpy
    convenience. Subclasses implement ``_fit_pixels`` and ``_normalize_chunk``.
    """

    def __init__(self, chunk_size: int | None, min_pixels: int, workers: int) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        if min_pixels < 2:
            raise ValueError(f"min_pixels must be >= 2, got {min_pixels}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.chunk_size = chunk_size
        self.min_pixels = min_pixels
        self.workers = workers
        self.num_degenerate = 0
        self._local = threading.local()  # the scratch set the current thread works in
        self._free_scratch: queue.SimpleQueue[dict[str, torch.Tensor]] = queue.SimpleQueue()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_local"], state["_free_scratch"]  # scratch is rebuilt where the normalizer lands
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._free_scratch = queue.SimpleQueue()

    def fit(self, image: ImageLike | Sequence[ImageLike]) -> StainNormalizer:
        """Take the reference from an image, or from the pooled pixels of a list of images.

        Args:
            image: uint8 image as a numpy HxWx3 array or a torch HxWx3 / 3xHxW tensor,
                or a list of such images.

        Returns:
            self.

        Raises:
            ValueError: If the input is not uint8 RGB or the method is undefined on it.
        """
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise ValueError("fit needs at least one image")
        pixels = torch.cat([_pixels_of(im) for im in images], dim=1)
        self._fit_pixels(pixels)  # outside a scratch set: a reference's temporaries are not kept
        return self

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalize a uint8 batch (B, 3, H, W); returns a new uint8 batch on the same device.

        One call at a time per normalizer: concurrent calls from several
        threads would share its scratch and its ``num_degenerate`` count.
        """
        _check_batch(batch)
        out = torch.empty_like(batch)
        spans = self._spans(batch)
        inference = torch.is_inference_mode_enabled()  # like grad mode, it is per thread

        def run(span: slice) -> int:
            with self._scratch_set(), torch.inference_mode(inference), torch.no_grad():
                return self._normalize_span(batch, out, span)

        if len(spans) > 1 and self.workers > 1 and batch.device.type == "cpu":
            # Chunks on CPU threads at once: while one runs its many small per-image
            # statistics ops, the other keeps the cores busy. The threads end with the
            # call: idle OpenMP teams of kept threads would spin against the caller's work.
            threads = min(self.workers, len(spans))
            with _intra_op_share(threads), ThreadPoolExecutor(threads, thread_name_prefix="stain") as pool:
                degenerate = list(pool.map(run, spans))
        else:
            degenerate = [run(span) for span in spans]
        self.num_degenerate += sum(degenerate)
        return out

    def _normalize_span(self, batch: torch.Tensor, out: torch.Tensor, span: slice) -> int:
        """Normalize ``batch[span]`` into ``out[span]``; returns how many images were degenerate."""
        chunk, target = batch[span].contiguous(), out[span]
        invalid = (~self._normalize_chunk(chunk, target)).nonzero()[:, 0]
        if invalid.numel():
            target[invalid] = chunk[invalid]  # degenerate images pass through untouched
        return int(invalid.numel())

    def _spans(self, batch: torch.Tensor) -> list[slice]:
        """The chunks of a batch: at most ``chunk_size`` images, and at least one per CPU worker."""
        count = batch.shape[0]
        step = self._chunk_for(batch)
        if batch.device.type == "cpu" and self.workers > 1:
            step = min(step, max(1, -(-count // self.workers)))
        return [slice(start, min(start + step, count)) for start in range(0, count, step)]

    @contextlib.contextmanager
    def _scratch_set(self) -> Iterator[None]:
        """Let the current thread work in a free set of scratch buffers, kept for later calls.

        There are as many sets as chunks ever ran at once, so threads of
        different calls reuse the same memory.
        """
        try:
            buffers = self._free_scratch.get_nowait()
        except queue.Empty:
            buffers = {}
        self._local.buffers = buffers
        try:
            yield
        finally:
            self._local.buffers = None
            self._free_scratch.put(buffers)

    def normalize_image(self, image: np.ndarray) -> np.ndarray:
        """Normalize one uint8 HxWx3 numpy image; returns uint8 HxWx3."""
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"normalize_image expects a uint8 HxWx3 array, got {arr.dtype} {arr.shape}")
        batch = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).unsqueeze(0)
        return np.ascontiguousarray(self.normalize(batch)[0].permute(1, 2, 0).numpy())

    def _chunk_for(self, batch: torch.Tensor) -> int:
        """Images per chunk for this batch's device."""
        return self.chunk_size or (_GPU_CHUNK if batch.is_cuda else _CPU_CHUNK)

    def _fit_pixels(self, pixels: torch.Tensor) -> None:
        """Set the reference from uint8 pixels (3, N)."""
        raise NotImplementedError

    def _normalize_chunk(self, chunk: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write the normalized chunk (B, 3, H, W) into ``out``; return (B,) which images are valid."""
        raise NotImplementedError

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A reusable scratch tensor of the given shape (contents undefined).

        On CPU, chunks take megabytes of scratch per step; keeping it between
        chunks and calls saves reallocating and re-faulting that memory. Each
        running chunk has a set of its own (``_scratch_set``). Outside one, and
        on other devices, tensors are allocated afresh: GPU caching allocators
        already recycle memory, and held scratch would cost GPU memory.
        """
        numel = math.prod(shape)
        buffers = getattr(self._local, "buffers", None)
        if buffers is None or torch.device(device).type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        buf = buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != torch.device(device):
            buf = torch.empty(numel, dtype=dtype, device=device)
            buffers[name] = buf
        return buf[:numel].view(shape)


_SHARE_LOCK = threading.Lock()
_SHARE_STATE = {"calls": 0, "saved": 0}


@contextlib.contextmanager
def _intra_op_share(workers: int) -> Iterator[None]:
    """Give each of ``workers`` CPU threads an equal share of torch's intra-op threads while they run.

    Each chunk thread then runs on cores of its own: left at the full count,
    every thread's ops would spread over all cores and contend with the other
    threads' (on 2 cores, one intra-op thread per chunk thread normalized 10%
    faster than two). Torch's setting is process-wide, so calls that overlap
    share one saved value, restored when the last of them ends.
    """
    with _SHARE_LOCK:
        if _SHARE_STATE["calls"] == 0:
            _SHARE_STATE["saved"] = torch.get_num_threads()
            torch.set_num_threads(max(1, _SHARE_STATE["saved"] // workers))
        _SHARE_STATE["calls"] += 1
    try:
        yield
    finally:
        with _SHARE_LOCK:
            _SHARE_STATE["calls"] -= 1
            if _SHARE_STATE["calls"] == 0:
                torch.set_num_threads(_SHARE_STATE["saved"])


def _blocks(count: int, size: int, device: torch.device, rows: int | None = None) -> list[slice]:
    """Slices cutting ``count`` items of ``size`` floats each into blocks of about ``_BLOCK_FLOATS``.

    On CPU every full-resolution step runs block by block so that its
    intermediates stay in cache instead of streaming through memory; on GPU one
    block holds everything. ``rows`` forces the items per block.
    """
    step = rows or (count if device.type != "cpu" else max(1, _BLOCK_FLOATS // max(size, 1)))
    return [slice(i, min(i + step, count)) for i in range(0, count, step)]


def _check_batch(batch: torch.Tensor) -> None:
    """Raise ValueError unless ``batch`` is a uint8 tensor (B, 3, H, W)."""
    if not isinstance(batch, torch.Tensor) or batch.dtype != torch.uint8:
        raise ValueError("expected a uint8 torch tensor")
    if batch.dim() != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected shape (B, 3, H, W), got {tuple(batch.shape)}")


def _pixels_of(image: ImageLike) -> torch.Tensor:
    """uint8 pixels (3, N) of a numpy HxWx3 array or a torch HxWx3 / 3xHxW tensor (on CPU).

    A torch tensor whose last dimension is 3 is read as HxWx3, else as 3xHxW.
    """
    is_numpy = isinstance(image, np.ndarray)
    if is_numpy:  # a read-only array (e.g. from a decoder) is copied: torch wants writable memory
        image = np.ascontiguousarray(image) if image.flags.writeable else np.array(image, order="C")
    tensor = torch.from_numpy(image) if is_numpy else image
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.dim() != 3:
        raise ValueError("expected a uint8 image, HxWx3 (numpy or torch) or 3xHxW (torch)")
    tensor = tensor.detach().cpu()
    if tensor.shape[-1] == 3:
        return tensor.reshape(-1, 3).t().contiguous()
    if not is_numpy and tensor.shape[0] == 3:
        return tensor.reshape(3, -1).contiguous()
    raise ValueError(f"expected HxWx3 or 3xHxW, got shape {tuple(tensor.shape)}")
