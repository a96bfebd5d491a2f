"""Batched stain normalization of H&E patches in torch: Macenko and Reinhard.

Both normalizers take uint8 batches (B, 3, H, W) on any device and return
uint8 batches of the same shape on the same device. Every image of a batch is
handled independently and without a Python loop over images: per-image
statistics are computed with masks over the whole batch at once.

Images on which a method is not defined (background only, a single colour, too
few tissue pixels, a degenerate stain estimate) come back unchanged and are
counted in the normalizer's ``num_degenerate``; no output is ever NaN.
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

from data.errors import DataError

ImageLike = np.ndarray | torch.Tensor

#: Names accepted by ``build_normalizer``.
NORMALIZERS: tuple[str, ...] = ("macenko", "reinhard", "none")

# Constants of Macenko et al. 2009 as set in the reference ports (schaugf/HEnorm_python
# normalizeStaining.py; torchstain's numpy and torch MacenkoNormalizer).
MACENKO_IO = 240.0  # transmitted light intensity
MACENKO_ALPHA = 1.0  # angle percentiles alpha and 100 - alpha
MACENKO_BETA = 0.15  # optical-density threshold for "transparent" pixels
MACENKO_MAX_C_PERCENTILE = 99.0
MACENKO_HE_REF = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
MACENKO_MAX_C_REF = (1.9705, 1.0308)
# Reinhard's default target, CIE-LAB mean and std over tissue (L* < 88): those of the public-domain
# H&E region "CMU-1-Small-Region" (OpenSlide test data, CC0) after Macenko normalization to the
# reference above (stride 1), so that both methods aim at the same colours unless fitted.
REINHARD_MEAN_REF = (56.7218, 22.1164, -9.5896)
REINHARD_STD_REF = (18.7588, 6.3484, 5.2087)

# sRGB (D65) <-> CIE XYZ, with the constants of skimage.color (rgb2xyz, xyz2lab).
_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_RGB_FROM_XYZ = tuple(map(tuple, np.linalg.inv(np.array(_XYZ_FROM_RGB)).tolist()))
_D65_WHITE = (0.95047, 1.0, 1.08883)
_LAB_EPS = 0.008856  # CIE (6/29)^3, as rounded by skimage
_LAB_KAPPA = 7.787  # CIE linear-segment slope, as rounded by skimage
_LAB_F_EPS = 0.2068966  # 6/29, the inverse break point

# Guards that decide a stain estimate is degenerate (see Macenko._estimate).
_MIN_SIN_ANGLE = 1e-3  # stain vectors closer than ~0.06 degrees are one stain
_MIN_EIG_RATIO = 1e-6  # second eigenvalue relative to the first
_MIN_EIG = 1e-9  # absolute floor: real OD variances are ~1e-2, a flat colour's ~1e-12
_MIN_MAX_C = 1e-6
_LOG2_E = 1.0 / math.log(2.0)
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


class _BatchNormalizer:
    """Shared plumbing: input checks, chunking, degenerate counting, numpy convenience."""

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

    def fit(self, image: ImageLike | Sequence[ImageLike]) -> _BatchNormalizer:
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


class Macenko(_BatchNormalizer):
    """Macenko stain normalization, batched (Macenko et al. 2009, "A method for
    normalizing histology slides for quantitative analysis", ISBI).

    Per image: optical density OD = -ln((I + 1) / Io); pixels with OD < beta in
    any channel are dropped; the two leading eigenvectors of the covariance of
    the kept OD span a plane; the alpha and 100 - alpha percentiles of the
    angles of the kept OD in that plane give the two stain vectors, the one with
    the larger red OD being haematoxylin; concentrations C of every pixel follow
    by least squares, and their 99th percentiles maxC (over all pixels,
    background included) scale them to the reference. The output
    Io * exp(-HERef diag(maxCRef / maxC) C), clipped at 255 and truncated to
    uint8, follows torchstain's numpy backend.

    Sampling, for speed (``stride`` > 1):
        * The covariance and the angle percentiles use the pixels on a grid of
          step ``stride`` in both directions (default 4: 1/16 of the pixels,
          3,136 of a 224 x 224 patch), with exact percentiles of that sample.
        * The 99th percentiles of the concentrations use every pixel. They are
          not sorted for but searched for, starting from the sample's, with
          ``max_c_passes`` rounds of counting the pixels above a threshold (see
          ``_search_percentile``); typical relative error 1e-3.
        On real H&E crops the default moves outputs by about half a grey level
        on average from the unsampled algorithm (tests/test_stain.py checks
        <= 2). ``stride=1`` is the reference algorithm with exact percentiles
        throughout, and so is ``fit``.

    Args:
        stride: Grid step of the stain-vector estimate; 1 uses every pixel.
        chunk_size: Images processed at once, bounding the memory of large
            batches (a chunk holds 8 bytes of concentrations per pixel: 51 MB
            for 128 images of 224 px, kept between calls on CPU); None picks
            128 on CPU and 256 on GPU.
        workers: Chunks normalized at once on CPU, on threads (batches are cut
            into at least this many chunks); 1 runs them one after another.
            While they run, torch's intra-op threads are shared out among
            them (see ``_intra_op_share``).
        min_pixels: Fewest sampled tissue pixels (OD >= beta in all channels)
            for an image to be normalized; fewer and it is returned unchanged.
        max_c_passes: Counting rounds of the 99th-percentile search (stride > 1).
        io, alpha, beta: Constants of the method (defaults from the reference ports).
    """

    def __init__(
        self,
        stride: int = 4,
        chunk_size: int | None = None,
        min_pixels: int = 64,
        workers: int = 2,
        max_c_passes: int = 2,
        io: float = MACENKO_IO,
        alpha: float = MACENKO_ALPHA,
        beta: float = MACENKO_BETA,
    ) -> None:
        super().__init__(chunk_size, min_pixels, workers)
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if max_c_passes < 0:
            raise ValueError(f"max_c_passes must be >= 0, got {max_c_passes}")
        if not 0.0 <= alpha < 50.0:
            raise ValueError(f"alpha must be in [0, 50), got {alpha}")
        self.stride, self.max_c_passes = stride, max_c_passes
        self.io, self.alpha, self.beta = float(io), float(alpha), float(beta)
        self.he_ref = torch.tensor(MACENKO_HE_REF, dtype=torch.float32)
        self.max_c_ref = torch.tensor(MACENKO_MAX_C_REF, dtype=torch.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted reference: ``he_ref`` (3, 2) stain vectors and ``max_c_ref`` (2,)."""
        return {"he_ref": self.he_ref.clone(), "max_c_ref": self.max_c_ref.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a reference saved by ``state_dict``."""
        he_ref = torch.as_tensor(state["he_ref"], dtype=torch.float32).cpu()
        max_c_ref = torch.as_tensor(state["max_c_ref"], dtype=torch.float32).cpu()
        if he_ref.shape != (3, 2) or max_c_ref.shape != (2,):
            raise ValueError(f"bad Macenko state shapes {tuple(he_ref.shape)}, {tuple(max_c_ref.shape)}")
        self.he_ref, self.max_c_ref = he_ref.clone(), max_c_ref.clone()

    @torch.no_grad()
    def stain_matrix(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image stain estimate of a uint8 batch (B, 3, H, W), exactly as ``normalize`` makes it.

        Returns:
            ``he`` (B, 3, 2) unit stain vectors (haematoxylin first), ``max_c``
            (B, 2) 99th-percentile concentrations, ``valid`` (B,) bool.
        """
        _check_batch(batch)
        if batch.shape[0] == 0:
            empty = torch.zeros(0, 3, 2, device=batch.device)
            return empty, empty[:, 0], empty[:, 0, 0].bool()
        parts = [self._estimate(chunk.contiguous()) for chunk in batch.split(self._chunk_for(batch))]
        he, max_c, valid = (torch.cat([part[i] for part in parts]) for i in (0, 2, 3))  # not the scratch (1)
        return he, max_c, valid

    def _fit_pixels(self, pixels: torch.Tensor) -> None:
        od = _optical_density(pixels, self.io).unsqueeze(0)  # (1, 3, N)
        he, ok = self._stain_vectors(od)
        max_c = _percentiles(_pinv_3x2(he)[0] @ od, (MACENKO_MAX_C_PERCENTILE,))[..., 0]
        if not bool((ok & (max_c > _MIN_MAX_C).all(dim=1))[0]):
            raise DataError("Macenko is undefined on the reference: too little tissue or a single stain colour")
        self.he_ref, self.max_c_ref = he[0].cpu(), max_c[0].cpu()

    def _normalize_chunk(self, chunk: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        _, conc, max_c, valid = self._estimate(chunk)
        # OD_out = HERef diag(maxCRef / maxC) C; output Io exp(-OD_out) = 2^(log2(Io) - log2(e) OD_out)
        scale = self.max_c_ref.to(chunk.device) / max_c.clamp(min=_MIN_MAX_C)
        mix = self.he_ref.to(chunk.device) * scale.unsqueeze(1)  # (B, 3, 2)
        mix = torch.where(valid[:, None, None], mix, torch.zeros_like(mix)) * -_LOG2_E  # invalid: kept finite
        b, c, h, w = chunk.shape
        flat_out = out.view(b, c, h * w)
        for part in _blocks(b, c * h * w, chunk.device):
            k = part.stop - part.start
            result = self._buffer("float", (k, c, h * w), torch.float32, chunk.device)
            # exp2 is several times cheaper than exp on CPU
            torch.bmm(mix[part], conc[part], out=result).add_(math.log2(self.io))
            torch.exp2(result, out=result).clamp_(max=255.0)
            _truncate_to_uint8(result, flat_out[part], self._buffer("int", (k, c, h * w), torch.int32, chunk.device))
        return valid

    def _estimate(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stain vectors (B, 3, 2), concentrations of all pixels (B, 2, H*W), their
        99th percentiles (B, 2) and validity (B,) of a uint8 chunk (B, 3, H, W).

        The concentrations live in a scratch buffer, overwritten by the next chunk.
        """
        sample_od = self._sample_od(chunk)
        he, ok = self._stain_vectors(sample_od)
        pinv, _ = _pinv_3x2(he)  # equals numpy's lstsq solution for full-rank HE
        conc = self._concentrations(chunk, pinv)
        if self.stride == 1:
            max_c = _percentiles(conc, (MACENKO_MAX_C_PERCENTILE,))[..., 0]
        else:
            sample_conc = self._buffer("plane", (pinv.shape[0], 2, sample_od.shape[-1]), conc.dtype, conc.device)
            max_c = self._refined_max_c(conc, torch.bmm(pinv, sample_od, out=sample_conc))
        valid = ok & (max_c > _MIN_MAX_C).all(dim=1) & torch.isfinite(max_c).all(dim=1)
        return he, conc, max_c, valid

    def _concentrations(self, chunk: torch.Tensor, pinv: torch.Tensor) -> torch.Tensor:
        """Least-squares concentrations (B, 2, H*W) of every pixel of a uint8 chunk, in a scratch buffer."""
        b, c, h, w = chunk.shape
        conc = self._buffer("conc", (b, 2, h * w), torch.float32, chunk.device)
        pixels = chunk.view(b, c, h * w)
        for part in _blocks(b, c * h * w, chunk.device):  # blocks small enough to stay in cache
            k = part.stop - part.start
            levels = self._buffer("int", (k, c, h * w), torch.int32, chunk.device).copy_(pixels[part])
            od = self._buffer("float", (k, c, h * w), torch.float32, chunk.device)
            torch.index_select(_od_lut(self.io, chunk.device), 0, levels.view(-1), out=od.view(-1))
            torch.bmm(pinv[part], od, out=conc[part])
        return conc

    def _refined_max_c(self, conc: torch.Tensor, sample_conc: torch.Tensor) -> torch.Tensor:
        """99th percentiles (B, 2) of all-pixel concentrations (B, 2, N), searched from a sample's (B, 2, n)."""
        b, _, n = conc.shape
        step = _blocks(2 * b, n, conc.device)[0].stop
        scratch = self._buffer("float", (step, n), torch.float32, conc.device)  # the OD blocks are no longer needed
        rows, sample = conc.view(2 * b, n), sample_conc.reshape(2 * b, -1)
        return _search_percentile(rows, MACENKO_MAX_C_PERCENTILE, sample, self.max_c_passes, scratch).view(b, 2)

    def _sample_od(self, chunk: torch.Tensor) -> torch.Tensor:
        """Optical density (B, 3, n) of the pixels on the ``stride`` grid of a uint8 chunk, in a scratch buffer."""
        rows = chunk[:, :, :: self.stride]
        if self.stride > 1 and chunk.device.type == "cpu":  # whole rows first: a strided read of cold memory is slow
            rows = self._buffer("sample_rows", rows.shape, torch.uint8, chunk.device).copy_(rows)
        grid = rows[..., :: self.stride]
        b, c, h, w = grid.shape
        levels = self._buffer("sample_levels", (b, c, h, w), torch.int32, chunk.device).copy_(grid)
        od = self._buffer("sample_od", (b, c, h * w), torch.float32, chunk.device)
        return torch.index_select(_od_lut(self.io, chunk.device), 0, levels.view(-1), out=od.view(-1)).view(od.shape)

    def _stain_vectors(self, od: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit stain vectors (B, 3, 2), haematoxylin first, and (B,) validity, from OD (B, 3, N)."""
        b, _, n = od.shape
        keep = od.amin(dim=1) >= self.beta  # pixels with OD < beta in any channel are dropped
        count = keep.sum(dim=1)
        plane, eig_ok = _stain_plane(od, keep, count, self._buffer("centred", od.shape, od.dtype, od.device))
        that = torch.bmm(plane.transpose(1, 2), od, out=self._buffer("plane", (b, 2, n), od.dtype, od.device))
        phi = torch.atan2(that[:, 1], that[:, 0], out=self._buffer("angle", (b, n), od.dtype, od.device))
        shifted = self._buffer("shifted", (b, n), od.dtype, od.device)
        lo, hi = _masked_percentiles(phi, keep, count, self.alpha, bound=math.pi, scratch=shifted)
        v_min = plane @ torch.stack((lo.cos(), lo.sin()), dim=1).unsqueeze(-1)  # (B, 3, 1)
        v_max = plane @ torch.stack((hi.cos(), hi.sin()), dim=1).unsqueeze(-1)
        # haematoxylin first: the vector with the larger red OD, the reference ports' rule
        h_first = (v_min[:, 0, 0] > v_max[:, 0, 0])[:, None, None]
        he = torch.where(h_first, torch.cat((v_min, v_max), 2), torch.cat((v_max, v_min), 2))
        _, pinv_ok = _pinv_3x2(he)
        ok = (count >= self.min_pixels) & eig_ok & pinv_ok & torch.isfinite(he).all(dim=(1, 2))
        return he, ok


class Reinhard(_BatchNormalizer):
    """Reinhard colour transfer in CIE-LAB, batched (Reinhard et al. 2001, "Color
    transfer between images", IEEE CG&A).

    Each image's L*, a*, b* channels are shifted and scaled so that their mean
    and standard deviation over the image's tissue match the reference's; the
    same affine map is applied to every pixel. Until ``fit`` replaces it the
    reference is ``REINHARD_MEAN_REF`` / ``REINHARD_STD_REF`` (a real H&E
    region after Macenko normalization). Tissue is every pixel with
    L* < ``max_lightness`` (default 88: glass background in brightfield H&E
    sits at L* of about 94-98). Lab is CIE-LAB under D65 with skimage's
    constants (``skimage.color.rgb2lab``); the output is rounded to uint8.

    Args:
        max_lightness: L* below which a pixel counts as tissue.
        chunk_size: Images processed at once; None picks 128 on CPU and 256 on GPU.
        min_pixels: Fewest tissue pixels for an image to be normalized.
        workers: Chunks normalized at once on CPU threads; 1 runs them one after another
            (see ``Macenko``).
    """

    def __init__(
        self, max_lightness: float = 88.0, chunk_size: int | None = None, min_pixels: int = 64, workers: int = 2
    ) -> None:
        super().__init__(chunk_size, min_pixels, workers)
        self.max_lightness = float(max_lightness)
        self.target_mean = torch.tensor(REINHARD_MEAN_REF, dtype=torch.float32)
        self.target_std = torch.tensor(REINHARD_STD_REF, dtype=torch.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The reference: ``target_mean`` and ``target_std`` (3,) in Lab."""
        return {"target_mean": self.target_mean.clone(), "target_std": self.target_std.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a reference saved by ``state_dict``."""
        mean = torch.as_tensor(state["target_mean"], dtype=torch.float32).cpu()
        std = torch.as_tensor(state["target_std"], dtype=torch.float32).cpu()
        if mean.shape != (3,) or std.shape != (3,):
            raise ValueError(f"bad Reinhard state shapes {tuple(mean.shape)}, {tuple(std.shape)}")
        self.target_mean, self.target_std = mean.clone(), std.clone()

    def tissue_stats(self, lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image mean and std (B, 3) of Lab (B, 3, N) over tissue, and validity (B,)."""
        tissue = lab[:, 0] < self.max_lightness
        count = tissue.sum(dim=1, keepdim=True)
        weight = tissue.unsqueeze(1).to(lab.dtype)
        mean = (lab * weight).sum(-1) / count.clamp(min=1)
        var = (((lab - mean.unsqueeze(-1)) * weight) ** 2).sum(-1) / count.clamp(min=1)
        std = var.sqrt()
        valid = (count[:, 0] >= self.min_pixels) & (std > 1e-3).all(dim=1)
        return mean, std, valid

    def _fit_pixels(self, pixels: torch.Tensor) -> None:
        mean, std, valid = self.tissue_stats(rgb_to_lab(pixels.unsqueeze(0)))
        if not bool(valid[0]):
            raise DataError("Reinhard is undefined on the reference: too little tissue or no colour spread")
        self.target_mean, self.target_std = mean[0].cpu(), std[0].cpu()

    def _normalize_chunk(self, chunk: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        b, c, h, w = chunk.shape
        target_mean, target_std = self.target_mean.to(chunk.device), self.target_std.to(chunk.device)
        valid = torch.empty(b, dtype=torch.bool, device=chunk.device)
        for part in _blocks(b, c * h * w, chunk.device):  # images are independent: blocks stay in cache
            lab = rgb_to_lab(chunk[part].reshape(-1, c, h * w))
            mean, std, valid[part] = self.tissue_stats(lab)
            gain = (target_std / std.clamp(min=1e-3)).unsqueeze(-1)
            lab = (lab - mean.unsqueeze(-1)).mul_(gain).add_(target_mean[None, :, None])
            out[part].copy_(lab_to_rgb(lab).view(-1, c, h, w))
        return valid


def build_normalizer(name: str, **kwargs) -> Macenko | Reinhard | None:
    """A stain normalizer by name: ``"macenko"``, ``"reinhard"`` or ``"none"`` (returns None).

    Keyword arguments go to the normalizer's constructor.
    """
    key = str(name).strip().lower()
    if key == "macenko":
        return Macenko(**kwargs)
    if key == "reinhard":
        return Reinhard(**kwargs)
    if key == "none":
        return None
    raise ValueError(f"unknown stain normalizer {name!r}; allowed: {', '.join(NORMALIZERS)}")


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE-LAB (D65, 2 degree observer) of uint8 sRGB pixels (B, 3, N), as float32 (B, 3, N)."""
    b, _, n = rgb.shape
    linear = _srgb_to_linear_lut(rgb.device).index_select(0, rgb.reshape(-1).int()).view(b, 3, n)
    xyz = _const(_XYZ_FROM_RGB, rgb.device) @ linear
    t = xyz / _const(_D65_WHITE, rgb.device)[:, None]
    f = torch.where(t > _LAB_EPS, t.clamp(min=0).pow(1.0 / 3.0), _LAB_KAPPA * t + 16.0 / 116.0)
    return torch.stack((116.0 * f[:, 1] - 16.0, 500.0 * (f[:, 0] - f[:, 1]), 200.0 * (f[:, 1] - f[:, 2])), dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """uint8 sRGB (B, 3, N) of CIE-LAB (B, 3, N), clipped to the gamut and rounded to the nearest level."""
    fy = (lab[:, 0] + 16.0) / 116.0
    fx = lab[:, 1] / 500.0 + fy
    fz = (fy - lab[:, 2] / 200.0).clamp(min=0)  # as skimage.color.lab2xyz: negative z is set to 0
    f = torch.stack((fx, fy, fz), dim=1)
    t = torch.where(f > _LAB_F_EPS, f**3, (f - 16.0 / 116.0) / _LAB_KAPPA)
    xyz = t * _const(_D65_WHITE, lab.device)[:, None]
    linear = _const(_RGB_FROM_XYZ, lab.device) @ xyz
    # sRGB encoding and rounding by table: indexing by sqrt(linear) keeps the
    # steps fine near black, within 0.01 of a level everywhere
    index = linear.clamp_(0.0, 1.0).sqrt_().mul_(_ENCODE_STEPS - 1).add_(0.5).to(torch.int32)
    table = _srgb_encode_lut(lab.device)
    return table.index_select(0, index.view(-1)).view(lab.shape)


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


def _stain_plane(
    od: torch.Tensor, keep: torch.Tensor, count: torch.Tensor, scratch: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors of the two largest eigenvalues of each image's kept-OD covariance.

    Returns the plane (B, 3, 2), columns in ascending eigenvalue order as
    ``numpy.linalg.eigh`` gives them, and (B,) whether the plane is well defined.
    ``scratch``, if given, is a tensor shaped like ``od`` that is overwritten.
    """
    weight = keep.unsqueeze(1).to(od.dtype)
    n = count.clamp(min=2).to(od.dtype)[:, None, None]
    # per-row sums, not a matrix product: a product's rounding varies with the batch size,
    # and one image's result must not depend on the images beside it
    mean = torch.mul(od, weight, out=scratch).sum(-1, keepdim=True) / n  # (B, 3, 1) masked means
    centred = torch.sub(od, mean, out=scratch).mul_(weight)  # the centring is kept exact: see the guards
    cov = centred @ centred.transpose(1, 2) / (n - 1)
    finite = torch.isfinite(cov).all(dim=(1, 2))
    eye = torch.eye(3, dtype=od.dtype, device=od.device).expand_as(cov)
    # a NaN/inf matrix can stall the eigen-solver, so it is replaced; the tiny ridge
    # shifts eigenvalues only, never eigenvectors
    cov = torch.where(finite[:, None, None], cov, eye) + 1e-12 * eye
    values, vectors = torch.linalg.eigh(cov)
    ok = finite & (values[:, 1] > (_MIN_EIG_RATIO * values[:, 2]).clamp(min=_MIN_EIG))
    return vectors[:, :, 1:3], ok


def _pinv_3x2(he: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-inverse (B, 2, 3) of (B, 3, 2) unit-column matrices, and (B,) whether they are well conditioned."""
    gram = he.transpose(1, 2) @ he
    det = gram[:, 0, 0] * gram[:, 1, 1] - gram[:, 0, 1] * gram[:, 1, 0]
    ok = det > _MIN_SIN_ANGLE**2  # det = sin^2 of the angle between unit columns
    safe = torch.where(ok, det, torch.ones_like(det))[:, None, None]
    adj = torch.stack((gram[:, 1, 1], -gram[:, 0, 1], -gram[:, 1, 0], gram[:, 0, 0]), dim=1).view(-1, 2, 2)
    return (adj / safe) @ he.transpose(1, 2), ok


def _percentiles(values: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """Percentiles ``qs`` (all > 50) over the last dimension of ``values`` (..., N); returns (..., len(qs)).

    Linear interpolation between order statistics, as ``numpy.percentile``'s
    default. Only the top of each row is found, with one ``topk``, not a sort.
    """
    n = values.shape[-1]
    positions = [q / 100.0 * (n - 1) for q in qs]
    reach = min(n, max(n - 1 - math.floor(p) for p in positions) + 1)
    top = values.topk(reach, dim=-1).values  # descending: the i-th smallest sits at n - 1 - i
    out = []
    for p in positions:
        low, high = math.floor(p), min(math.floor(p) + 1, n - 1)
        a, b = top[..., n - 1 - low], top[..., n - 1 - high]
        out.append(a + (p - low) * (b - a))
    return torch.stack(out, dim=-1)


def _masked_percentiles(
    values: torch.Tensor,
    mask: torch.Tensor,
    count: torch.Tensor,
    q_low: float,
    bound: float,
    scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentiles ``q_low`` and ``100 - q_low`` (q_low < 50) of each row of ``values`` (B, N) over its
    ``mask``ed entries (``count`` (B,) of them); all values lie in [-bound, bound].

    Linear interpolation between order statistics, as ``numpy.percentile``'s
    default; one ``topk`` per end, about ``q_low`` % of N long, instead of a
    sort. Rows with no entry give 0 (their images are flagged invalid).
    ``scratch``, if given, is a tensor shaped like ``values`` that is overwritten.
    """
    n = values.shape[-1]
    last = (count - 1).clamp(min=0)
    reach = min(n, math.ceil(q_low / 100.0 * max(n - 1, 0)) + 2)  # how deep into either end a row can need
    # masked entries are pushed past the far end (arithmetic is faster than masked_fill)
    outside = (~mask).to(values.dtype).mul_(2.0 * bound + 1.0)
    results = []
    for q, largest in ((q_low, False), (100.0 - q_low, True)):
        pos = last.double() * (q / 100.0)
        lower = pos.floor().long()
        frac = (pos - lower.double()).to(values.dtype)
        upper = torch.minimum(lower + 1, last)
        if largest:  # descending: the i-th smallest of a row sits at last - i
            ends = torch.sub(values, outside, out=scratch).topk(reach, dim=-1).values
            lower, upper = last - lower, last - upper
        else:
            ends = torch.add(values, outside, out=scratch).topk(reach, dim=-1, largest=False).values
        index = torch.stack((lower, upper), dim=-1).clamp(max=reach - 1)
        a, b = ends.gather(-1, index).unbind(-1)
        results.append(torch.where(count > 0, a + frac * (b - a), torch.zeros_like(a)))
    return results[0], results[1]


def _search_percentile(
    values: torch.Tensor, q: float, sample: torch.Tensor, passes: int, scratch: torch.Tensor
) -> torch.Tensor:
    """``q``-th percentile (50 < q < 100) of each row of ``values`` (R, N), found by counting, not sorting.

    Sorting tens of thousands of values per image is the costliest part of a
    percentile on CPU, so the value is searched for. A(t), the number of entries
    above t, takes one cheap pass: a sum of comparisons, in blocks
    of rows the size of ``scratch`` (k, N) that stay in cache. The answer is
    where A equals (N - 1)(1 - q / 100), the count above numpy's interpolated
    percentile. The search works on log A, nearly linear in t because the
    tails of concentration histograms decay roughly exponentially: it starts
    at the q-th percentile of ``sample`` (R, n), a subset of each row, steps
    once along the slope of the sample's tail, then takes secant steps; each of
    the ``passes`` counts one pass. Steps stay between about the sample's
    (q - 1.5)-th percentile and its maximum. Relative error on 224 px H&E
    crops with 2 passes (the default): median about 1e-3, worst about 1e-2.
    """
    n = values.shape[-1]
    goal = _tail_level(n, q)

    def level(t: torch.Tensor) -> torch.Tensor:  # -log(A(t) + 1/2), increasing in t
        above = torch.empty_like(t)
        for part in _blocks(values.shape[0], n, values.device, rows=scratch.shape[0]):
            k = part.stop - part.start  # a comparison written as floats sums faster than bools
            torch.sum(torch.gt(values[part], t[part, None], out=scratch[:k]), dim=-1, out=above[part])
        return -torch.log(above + 0.5)

    # the sample's percentiles reach no lower than q - 0.5: deeper, topk leaves its partial-sort path
    below, start, above, top = _percentiles(sample, (q - 0.5, q, q + 0.5, 100.0)).unbind(-1)
    floor = below - (above - below)  # about the (q - 1.5)-th percentile where the tail is near linear
    slope = (_tail_level(n, q + 0.5) - _tail_level(n, q - 0.5)) / (above - below).clamp(min=1e-6)
    t_old, t_new = start, start
    u_old = None
    for _ in range(passes):
        u_new = level(t_new)
        if u_old is not None:  # secant slope where it is usable, else the sample's
            secant = (u_new - u_old) / (t_new - t_old)
            slope = torch.where(torch.isfinite(secant) & (secant > 0), secant, slope)
        t_old, u_old = t_new, u_new
        t_new = torch.minimum(torch.maximum(t_new + (goal - u_new) / slope, floor), top)
    return t_new


def _tail_level(n: int, q: float) -> float:
    """-log(A + 1/2) with A = (n - 1)(1 - q / 100), the count above the q-th percentile of n values."""
    return -math.log(max((n - 1) * (1.0 - q / 100.0), 0.0) + 0.5)


def _blocks(count: int, size: int, device: torch.device, rows: int | None = None) -> list[slice]:
    """Slices cutting ``count`` items of ``size`` floats each into blocks of about ``_BLOCK_FLOATS``.

    On CPU every full-resolution step runs block by block so that its
    intermediates stay in cache instead of streaming through memory; on GPU one
    block holds everything. ``rows`` forces the items per block.
    """
    step = rows or (count if device.type != "cpu" else max(1, _BLOCK_FLOATS // max(size, 1)))
    return [slice(i, min(i + step, count)) for i in range(0, count, step)]


def _truncate_to_uint8(values: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> None:
    """Write float ``values`` in [0, 255] into uint8 ``out``, truncated as numpy's ``astype(uint8)``.

    On CPU numpy's cast does it in one pass, where torch's float -> uint8 copy
    is several times slower than going through int32 (``scratch``, shaped like
    ``values``), which other devices do.
    """
    if values.device.type == "cpu" and out.is_contiguous():
        np.copyto(out.numpy(), values.numpy(), casting="unsafe")
    else:
        out.copy_(scratch.copy_(values))


def _check_batch(batch: torch.Tensor) -> None:
    """Raise ValueError unless ``batch`` is a uint8 tensor (B, 3, H, W)."""
    if not isinstance(batch, torch.Tensor) or batch.dtype != torch.uint8:
        raise ValueError("expected a uint8 torch tensor")
    if batch.dim() != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected shape (B, 3, H, W), got {tuple(batch.shape)}")


def _optical_density(pixels: torch.Tensor, io: float) -> torch.Tensor:
    """OD = ln(io) - ln(I + 1), float32, of uint8 pixels of any shape, by table (a gather is cheaper than a log)."""
    flat = _od_lut(io, pixels.device).index_select(0, pixels.reshape(-1).int())
    return flat.view(pixels.shape)


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


_LUT_CACHE: dict[tuple[str, torch.device], torch.Tensor] = {}
_ENCODE_STEPS = 65536


def _srgb_to_linear_lut(device: torch.device) -> torch.Tensor:
    """Linear-light value of each of the 256 sRGB levels (skimage's rgb2xyz formula), float32 on ``device``."""
    key = ("srgb", torch.device(device))
    if key not in _LUT_CACHE:
        v = torch.arange(256, dtype=torch.float64) / 255.0
        lin = torch.where(v > 0.04045, ((v + 0.055) / 1.055) ** 2.4, v / 12.92)
        _LUT_CACHE[key] = lin.float().to(device)
    return _LUT_CACHE[key]


def _srgb_encode_lut(device: torch.device) -> torch.Tensor:
    """uint8 sRGB code of linear light x^2 for x on a grid of ``_ENCODE_STEPS`` in [0, 1], on ``device``."""
    key = ("encode", torch.device(device))
    if key not in _LUT_CACHE:
        lin = (torch.arange(_ENCODE_STEPS, dtype=torch.float64) / (_ENCODE_STEPS - 1)) ** 2
        srgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp(min=0.0031308) ** (1.0 / 2.4) - 0.055, 12.92 * lin)
        _LUT_CACHE[key] = (srgb * 255.0).round().to(torch.uint8).to(device)
    return _LUT_CACHE[key]


def _od_lut(io: float, device: torch.device) -> torch.Tensor:
    """Optical density ln(io) - ln(v + 1) of the 256 uint8 levels v, float32 on ``device``."""
    key = (f"od{io!r}", torch.device(device))
    if key not in _LUT_CACHE:
        _LUT_CACHE[key] = (math.log(io) - torch.log1p(torch.arange(256, dtype=torch.float64))).float().to(device)
    return _LUT_CACHE[key]


def _const(values: tuple, device: torch.device) -> torch.Tensor:
    """A small float32 constant tensor on ``device``."""
    return torch.tensor(values, dtype=torch.float32, device=device)
