"""Per-sample gradients of a flat model, for DP-SGD (:class:`fedsim.privacy.dpsgd.DPSGD`): two engines.

- :class:`FunctorchEngine`: ``torch.func.vmap(grad(...))`` over ``functional_call`` of the model;
- :class:`HookEngine`: per-layer rules (:func:`conv2d_grad_sample` for convolutions, Opacus's
  ``GradSampleModule.GRAD_SAMPLERS`` for the rest) driven by forward hooks and tensor hooks on layer
  outputs. Opacus's own ``GradSampleModule`` uses module full-backward hooks, which refuse the in-place
  ops of timm ResNets (``x += shortcut`` on a norm layer's output, in-place ReLU); a tensor hook sees the
  gradient of the value before the in-place op, which is what the layer's per-sample gradient needs. The
  backward pass asks for input gradients only, so the summed weight gradients are never computed.

Each engine is called with the parameters and a batch and returns the per-sample gradients, one tensor per
parameter with the batch first, and the per-sample losses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: ``loss_fn(logits, labels) -> per-sample losses``.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class FunctorchEngine:
    """Per-sample gradients by ``vmap(grad(loss of one sample))`` over ``functional_call``."""

    def __init__(self, model: nn.Module, names: list[str], loss_fn: LossFn):
        from torch.func import functional_call, grad, vmap

        def one(params, buffers, inputs, label):
            out = functional_call(
                model, ({**dict(zip(names, params)), **buffers}), tuple(x.unsqueeze(0) for x in inputs)
            )
            loss = loss_fn(out, label.unsqueeze(0)).sum()
            return loss, loss.detach()

        self.model = model
        self._fn = vmap(grad(one, has_aux=True), in_dims=(None, None, 0, 0), randomness="different")

    def __call__(self, params: list[torch.Tensor], inputs: tuple[torch.Tensor, ...], labels: torch.Tensor):
        buffers = dict(self.model.named_buffers())
        grads, losses = self._fn(tuple(p.detach() for p in params), buffers, inputs, labels)
        return list(grads), losses

    def close(self) -> None:
        pass


def conv2d_grad_sample(
    layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a Conv2d (integer padding, any groups), from its input and output gradient.

    Opacus's algorithm (im2col by ``as_strided``, then one batched matmul)
    with the strides the padded input really has: Opacus's ``unfold2d``
    assumes NCHW-contiguous strides and returns wrong gradients for
    channels-last activations, which fedsim's flips and CUDA training produce
    (an N x C x 1 x 1 tensor passes ``is_contiguous()`` in either layout, and
    padding keeps the layout). Faster than ``F.unfold`` on CPU.
    """
    x = activations[0].to(backprops.dtype)
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = layer.kernel_size, layer.stride, layer.dilation, layer.padding
    x = F.pad(x, (pw, pw, ph, ph))
    n, c, height, width = x.shape
    out_h, out_w = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    s_n, s_c, s_h, s_w = x.stride()
    cols = x.as_strided((n, c, kh, kw, out_h, out_w), (s_n, s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw))
    groups = layer.groups
    cols = cols.reshape(n, groups, c // groups * kh * kw, out_h * out_w)
    grads = backprops.reshape(n, groups, layer.out_channels // groups, out_h * out_w)
    out = {layer.weight: torch.einsum("ngol,ngpl->ngop", grads, cols).reshape(n, *layer.weight.shape)}
    if layer.bias is not None:
        out[layer.bias] = grads.sum(-1).reshape(n, -1)
    return out


def _sampler_for(module: nn.Module) -> Callable | None:
    """The per-sample gradient rule for a layer: fedsim's for Conv2d (integer padding), else Opacus's."""
    from opacus.grad_sample import GradSampleModule

    if type(module) is nn.Conv2d and not isinstance(module.padding, str) and module.padding_mode == "zeros":
        return conv2d_grad_sample
    return GradSampleModule.GRAD_SAMPLERS.get(type(module))


class HookEngine:
    """Per-sample gradients from per-layer rules, fed by forward hooks (inputs) and output tensor hooks (gradients)."""

    def __init__(self, model: nn.Module, params: list[torch.Tensor], loss_fn: LossFn):
        from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer

        self.model, self.loss_fn = model, loss_fn
        self.index = {id(p): i for i, p in enumerate(params)}
        self.active = False
        self.grads: list[torch.Tensor | None] = []
        self._handles = []
        self._samplers: dict[nn.Module, Callable] = {}
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            sampler = _sampler_for(module)
            if sampler is None:
                if any(True for _ in module.children()):
                    raise NotImplementedError(
                        f"no per-sample gradient rule for {name} ({type(module).__name__}), "
                        f"a module with parameters of its own and submodules"
                    )
                prepare_layer(module)  # Opacus's functorch fallback for a leaf layer it has no rule for
                sampler = ft_compute_per_sample_gradient
            self._samplers[module] = sampler
            self._handles.append(module.register_forward_hook(self._capture))

    def _capture(self, module: nn.Module, inputs, output) -> None:
        if not self.active or not torch.is_grad_enabled():
            return
        if not isinstance(output, torch.Tensor):
            raise NotImplementedError(
                f"per-sample gradients of a {type(module).__name__} returning "
                f"{type(output).__name__}: only layers returning one tensor are supported"
            )
        activations = [x.detach() if isinstance(x, torch.Tensor) else x for x in inputs]
        sampler = self._samplers[module]

        def on_grad(grad_output: torch.Tensor) -> None:
            for param, sample in sampler(module, activations, grad_output.detach()).items():
                i = self.index[id(param)]
                sample = sample.to(param.dtype)  # bf16 under autocast: clip and sum in the parameters' dtype
                self.grads[i] = sample if self.grads[i] is None else self.grads[i] + sample

        # Registered before any in-place op on the output: receives the gradient of this value.
        output.register_hook(on_grad)

    def __call__(self, params: list[torch.Tensor], inputs: tuple[torch.Tensor, ...], labels: torch.Tensor):
        inputs = tuple(x.detach().requires_grad_() for x in inputs)
        self.grads = [None] * len(params)
        self.active = True
        try:
            losses = self.loss_fn(self.model(*inputs), labels)
            # Input gradients only: backprop reaches every layer (its tensor hook fires) without summed
            # weight gradients, which nothing needs.
            torch.autograd.grad(losses.sum(), inputs)
        finally:
            self.active = False
        batch = labels.shape[0]
        grads = [
            torch.zeros((batch, *p.shape), dtype=p.dtype, device=p.device) if g is None else g
            for g, p in zip(self.grads, params)
        ]
        self.grads = []
        return grads, losses.detach()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
