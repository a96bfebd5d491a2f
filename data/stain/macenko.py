"""Macenko stain normalization on batches: the method's constants, ``Macenko`` and its linear algebra.

The stain vectors of each image come from an eigen-decomposition of its
optical-density covariance (``_stain_plane``) and a closed-form 3x2
pseudo-inverse (``_pinv_3x2``), both batched so that no Python loop runs over
images; the guards below decide when an image's estimate is degenerate, so
that it passes through unchanged instead of coming out NaN.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from data.errors import DataError
from data.stain.batching import StainNormalizer, _blocks, _check_batch
from data.stain.colour import _od_lut, _optical_density
from data.stain.percentiles import _masked_percentiles, _percentiles, _search_percentile

# Constants of Macenko et al. 2009 as set in the reference ports (schaugf/HEnorm_python
# normalizeStaining.py; torchstain's numpy and torch MacenkoNormalizer).
MACENKO_IO = 240.0  # transmitted light intensity
MACENKO_ALPHA = 1.0  # angle percentiles alpha and 100 - alpha
MACENKO_BETA = 0.15  # optical-density threshold for "transparent" pixels
MACENKO_MAX_C_PERCENTILE = 99.0
MACENKO_HE_REF = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
MACENKO_MAX_C_REF = (1.9705, 1.0308)

# Guards that decide a stain estimate is degenerate (see Macenko._estimate).
_MIN_SIN_ANGLE = 1e-3  # stain vectors closer than ~0.06 degrees are one stain
_MIN_EIG_RATIO = 1e-6  # second eigenvalue relative to the first
_MIN_EIG = 1e-9  # absolute floor: real OD variances are ~1e-2, a flat colour's ~1e-12
_MIN_MAX_C = 1e-6
_LOG2_E = 1.0 / math.log(2.0)


class Macenko(StainNormalizer):
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
