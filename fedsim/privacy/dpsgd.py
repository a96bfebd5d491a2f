"""Sample-level DP-SGD on a flat model: Poisson batches, GroupNorm backbones, clipped and noised gradients.

**DP-SGD** (Abadi et al. 2016) protects each *training sample* of a hospital
(one patch pair) against everything the hospital releases: its local model
every round, hence the global model. Every step takes a Poisson sample of the
hospital's patches (each one in with probability q, :class:`PoissonBatchSampler`),
computes one gradient per sample, clips each to L2 norm C over all parameters
of the global model, sums them, adds N(0, sigma^2 C^2) to every coordinate and
divides by the *expected* batch size q*n (as Opacus does under Poisson
sampling). The result is written into the model's flat gradient buffer
(:mod:`fedsim.flat`), so Adam, weight decay and the FedProx gradient
(:func:`fedsim.prox.add_proximal_grad_`) run on it unchanged: they are
data-independent post-processing.

Per-sample gradients come from one of two engines (``method``, :mod:`fedsim.privacy.grad_sample`):
``"functorch"`` (``torch.func.vmap``) or ``"hooks"`` (per-layer rules driven by tensor hooks:
Opacus's own ``GradSampleModule`` refuses the in-place ops of timm ResNets), the faster on CPU
(``bench/bench_dp.py``), hence the default.

BatchNorm mixes the samples of a batch, so the model must use GroupNorm
(``models.dual_stream.group_norm``, :func:`dp_backbone`); MixUp mixes samples too and has no
place under DP. Per-sample augmentation is fine.

What the steps spend is counted by :mod:`fedsim.privacy.accounting`; :func:`noise_generator` also draws
the noise shares of client-level DP (:mod:`fedsim.privacy.dpfedavg`). :mod:`fedsim.privacy` re-exports every
public name.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.flat import FlatModel, is_batchnorm
from fedsim.privacy.accounting import steps_per_epoch
from fedsim.privacy.grad_sample import FunctorchEngine, HookEngine, LossFn
from models.dual_stream import make_backbone

__all__ = [
    "DPSGD",
    "METHODS",
    "LossFn",
    "PoissonBatchSampler",
    "check_private_model",
    "dp_backbone",
    "noise_generator",
    "per_sample_cross_entropy",
]

#: Added to per-sample norms before dividing, as Opacus does (an all-zero gradient gets factor 1, not NaN).
#: Client-level clipping (:func:`fedsim.privacy.dpfedavg.clip_update_`) uses it too.
_NORM_EPS = 1e-6


# ---- Poisson sampling -----------------------------------------------------------------------


class PoissonBatchSampler(torch.utils.data.Sampler):
    """Batches for a DataLoader's ``batch_sampler``: every step includes each index independently with probability q.

    The batch size is Binomial(n, q) (expected q*n), an epoch is ``steps``
    steps (round(1/q) by default) and a batch may be empty (the DP step then
    adds noise only). Every draw comes from ``generator``; re-seed it per round
    from (seed, round, client, purpose). Indices of a batch come in increasing
    order (sequential reads of the cache).

    Args:
        indices: The dataset indices to sample from, or n for ``range(n)``.
        sample_rate: q in (0, 1].
        generator: A CPU torch generator.
        steps: Batches per pass (default :func:`steps_per_epoch`).
    """

    def __init__(
        self, indices: int | Sequence[int], sample_rate: float, generator: torch.Generator, steps: int | None = None
    ):
        self.indices = torch.arange(indices) if isinstance(indices, int) else torch.as_tensor(indices, dtype=torch.long)
        self.sample_rate = float(sample_rate)
        self.steps = steps_per_epoch(sample_rate) if steps is None else int(steps)
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        n = self.indices.numel()
        for _ in range(self.steps):
            mask = torch.rand(n, generator=self.generator) < self.sample_rate
            yield self.indices[mask].tolist()


# ---- GroupNorm backbones --------------------------------------------------------------------


def dp_backbone(name: str) -> nn.Module:
    """A timm backbone with GroupNorm instead of BatchNorm, no classifier, average-pooled; random weights."""
    return make_backbone(name, norm="group")


def check_private_model(model: nn.Module) -> None:
    """Raise ValueError (one line) if per-sample gradients of ``model`` are not well defined (BatchNorm layers)."""
    names = [n for n, m in model.named_modules() if is_batchnorm(m)]
    if names:
        more = ", ..." if len(names) > 3 else ""
        raise ValueError(
            f"DP-SGD needs per-sample gradients, but the model has {len(names)} BatchNorm layers "
            f"({', '.join(names[:3])}{more}), which mix the samples of a batch: build it with GroupNorm"
        )


# ---- DP-SGD on a flat model ---------------------------------------------------------------------


def per_sample_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample (no reduction), in float32 at least (logits of a bf16 autocast are upcast)."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, reduction="none")


def noise_generator(device: torch.device | str, seed: int | None = None) -> torch.Generator:
    """A generator for DP noise on ``device``; ``seed=None`` draws a fresh secret seed from the OS.

    Noise whose seed is known can be regenerated and subtracted: a seed derived
    from the run's (public) config gives reproducible runs and no privacy.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63) if seed is None else int(seed))
    return gen


def _grad_view(flat: FlatModel, param: torch.Tensor) -> torch.Tensor:
    """The view of ``flat.grad`` at the place of ``param`` in ``flat.data`` (same shape and strides)."""
    offset = (param.data_ptr() - flat.data.data_ptr()) // param.element_size()
    if offset < 0 or offset + param.numel() > flat.num_params:
        raise ValueError("a parameter of the model is not a view of its flat buffer: flatten the model first")
    return flat.grad.as_strided(param.shape, param.stride(), flat.grad.storage_offset() + offset)


METHODS = ("functorch", "hooks")


class DPSGD:
    """Clipped per-sample gradients plus Gaussian noise, written into a flat model's gradient buffer.

    One step: :meth:`backward` once per (physical) batch adds the sum of the
    clipped per-sample gradients to ``flat.grad``; :meth:`privatize_` then adds
    N(0, (sigma*C)^2) to every parameter coordinate and divides by the expected
    batch size. Then add the proximal gradient, step the optimizer and zero the
    flat gradient as without DP. An empty batch needs no :meth:`backward`.

    Args:
        model: The model (GroupNorm, no BatchNorm), flattened: its parameters are views of ``flat``.
        flat: Its :class:`~fedsim.flat.FlatModel`; every parameter is clipped together.
        max_grad_norm: C, the clipping bound of one sample's gradient (L2 over all parameters).
        noise_multiplier: sigma; the noise std per coordinate is sigma*C (0 = clipping only, no privacy).
        expected_batch_size: q*n, what the noisy sum is divided by (not the drawn batch size, which is private).
        generator: Draws the noise; on the model's device (:func:`noise_generator`).
        method: ``"hooks"`` (the faster on CPU, bench/bench_dp.py) or ``"functorch"`` (see the module's documentation).
        max_physical_batch: Per-sample gradients of at most this many samples are held at once (memory).
        loss_fn: Per-sample losses from (logits, labels); cross-entropy by default.
        amp_dtype: Autocast dtype for the forward pass (bf16 on CUDA), or None.
    """

    def __init__(
        self,
        model: nn.Module,
        flat: FlatModel,
        max_grad_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        generator: torch.Generator,
        method: str = "hooks",
        max_physical_batch: int | None = None,
        loss_fn: LossFn = per_sample_cross_entropy,
        amp_dtype: torch.dtype | None = None,
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        if not max_grad_norm > 0 or noise_multiplier < 0 or not expected_batch_size > 0:
            raise ValueError(
                f"need max_grad_norm > 0, noise_multiplier >= 0, expected_batch_size > 0; got "
                f"{max_grad_norm}, {noise_multiplier}, {expected_batch_size}"
            )
        check_private_model(model)
        named = list(model.named_parameters())
        if any(not p.requires_grad for _, p in named):
            raise ValueError("DP-SGD clips and noises every parameter: freeze none")
        if sum(p.numel() for _, p in named) != flat.num_params:
            raise ValueError("the model's parameters do not fill its flat buffer: flatten this model")
        self.model, self.flat = model, flat
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.generator = generator
        self.method = method
        self.max_physical_batch = max_physical_batch
        self.amp_dtype = amp_dtype
        self.params = [p for _, p in named]
        self.grad_views = [_grad_view(flat, p) for p in self.params]
        self.steps = 0
        self.last_norms: torch.Tensor | None = None
        """Per-sample gradient norms (before clipping) of the last :meth:`backward`: for tests, never to release."""
        if method == "functorch":
            self._engine = FunctorchEngine(model, [n for n, _ in named], loss_fn)
        else:
            self._engine = HookEngine(model, self.params, loss_fn)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.flat.device.type, dtype=self.amp_dtype)

    def backward(self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        """Add the clipped per-sample gradients of one batch to the flat gradient; return the summed loss (0-d).

        ``inputs`` are the model's positional inputs (for the dual-stream net: context, detail), batch first.
        """
        total = torch.zeros((), device=self.flat.device)
        batch = labels.shape[0]
        if batch == 0:
            self.last_norms = torch.zeros(0, device=self.flat.device)
            return total
        # In the weights' layout: fedsim's flips leave batches channels-last, and on NCHW weights both engines
        # ran 10-20% slower on those (bench/bench_dp.py's model, CPU).
        layout = torch.channels_last if self.flat.channels_last else torch.contiguous_format
        inputs = tuple(x.contiguous(memory_format=layout) if x.dim() == 4 else x for x in inputs)
        chunk = self.max_physical_batch or batch
        norms = []
        for start in range(0, batch, chunk):
            part = slice(start, start + chunk)
            with self._autocast():
                grads, losses = self._engine(self.params, tuple(x[part] for x in inputs), labels[part])
            norms.append(self._clip_and_add(grads))
            total += losses.float().sum()
        self.last_norms = torch.cat(norms)
        return total

    @torch.no_grad()
    def _clip_and_add(self, grads: list[torch.Tensor]) -> torch.Tensor:
        batch = grads[0].shape[0]
        norms = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.reshape(batch, -1), dim=1) for g in grads]), dim=0
        )
        factor = (self.max_grad_norm / (norms + _NORM_EPS)).clamp_(max=1.0)
        for g, view in zip(grads, self.grad_views):
            view.add_(torch.tensordot(factor.to(g.dtype), g, dims=1))
        return norms

    @torch.no_grad()
    def privatize_(self) -> None:
        """Finish a step: ``flat.grad[params] = (clipped sum + N(0, (sigma C)^2 I)) / expected_batch_size``."""
        grads = self.flat.param_grads
        if self.noise_multiplier > 0:
            noise = torch.empty_like(grads).normal_(generator=self.generator)
            grads.add_(noise, alpha=self.noise_multiplier * self.max_grad_norm)
        grads.div_(self.expected_batch_size)
        self.steps += 1

    def close(self) -> None:
        """Remove the hooks the ``"hooks"`` engine put on the model."""
        self._engine.close()
