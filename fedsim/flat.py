"""One contiguous buffer behind every floating-point tensor of a model.

Federated averaging touches every weight of the model once per round. If each
parameter lives in its own allocation, that costs either one collective per
tensor or a pack/unpack copy around a single collective. Here the parameters
and floating-point buffers are rebound to *views* of one flat buffer, so a
round costs one scale, one all-reduce and one divide over memory that is
already contiguous.

Layout of the buffer (``shared`` = averaged across clients, ``local`` = kept
by each client, e.g. BatchNorm tensors under FedBN)::

    [ local params | shared params | shared buffers | scratch | local buffers ]
      \\________ params ________/ \\________ reduced region _______/

Parameters are contiguous (the FedProx term and drift measures are one vector
op) and the reduced region is contiguous (aggregation is one collective). The
scratch tail carries the client's sample weight and its integer buffers
(``num_batches_tracked``) so they travel in the same all-reduce.

Gradients get the same treatment: ``grad`` of every parameter is a view of one
flat gradient buffer, so the proximal gradient is a single fused update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_ATTR = "_fedsim_flat"


@dataclass(frozen=True)
class _Slot:
    """Where one tensor lives in the flat buffer."""

    module: nn.Module
    name: str
    is_param: bool
    offset: int
    shape: torch.Size
    channels_last: bool

    @property
    def numel(self) -> int:
        return self.shape.numel()


def is_batchnorm(module: nn.Module) -> bool:
    """True for BatchNorm layers (of any dimensionality, synced or not)."""
    return isinstance(module, nn.modules.batchnorm._NormBase)


class FlatModel:
    """The flat parameter/buffer storage of one model.

    Build it with :func:`flatten`; do not move the model to another device or
    memory format afterwards (that would reallocate the tensors and break the
    views; :func:`flatten` checks this and rebuilds when needed).

    Attributes:
        data: The flat buffer (float, on the model's device).
        grad: The flat gradient buffer, same layout as ``data``.
        params: View of ``data`` over all parameters.
        global_slice: Where the parameters of the global model lie in ``data``: all of them, except the
            BatchNorm ones under FedBN, which lie first and stay each client's own.
        global_params: ``data[global_slice]``: what FedProx anchors and client drift measures.
        reduced: View of ``data`` over what one aggregation all-reduces.
        num_params: Number of parameter elements.
        local_bn: Whether BatchNorm tensors are kept local (FedBN).
    """

    def __init__(self, model: nn.Module, local_bn: bool = False, channels_last: bool = False):
        self.local_bn = local_bn
        self.channels_last = channels_last
        groups = _collect(model, local_bn)
        self._int_buffers = groups["ints"]
        dtype, device = _common_dtype_device(groups)
        self._slots, layout = _assign_offsets(groups, channels_last)
        total = layout["end"]
        self.data = torch.zeros(total, dtype=dtype, device=device)
        self.grad = torch.zeros(total, dtype=dtype, device=device)
        self._bind(model)
        self.num_params = layout["params_end"]
        self.params = self.data[: self.num_params]
        self.param_grads = self.grad[: self.num_params]
        self.global_slice = slice(layout["reduced_start"], self.num_params)
        self.global_params = self.data[self.global_slice]
        self.global_param_grads = self.grad[self.global_slice]
        self.reduced = self.data[layout["reduced_start"] : layout["scratch_end"]]
        self.scratch = self.data[layout["scratch_start"] : layout["scratch_end"]]
        self.device = device
        self._module_names = {id(m): n for n, m in model.named_modules()}

    def _bind(self, model: nn.Module) -> None:
        """Copy every tensor into the buffer and rebind it as a view."""
        with torch.no_grad():
            for slot in self._slots:
                old = _get(slot)
                view = _view(self.data, slot)
                view.copy_(old)
                if slot.is_param:
                    param = slot.module._parameters[slot.name]
                    param.data = view
                    param.grad = _view(self.grad, slot)
                else:
                    slot.module._buffers[slot.name] = view

    def is_intact(self) -> bool:
        """False if a tensor was reallocated (``.to()``, ``load_state_dict`` with assign, ...)."""
        return all(_get(slot).data_ptr() == _view(self.data, slot).data_ptr() for slot in self._slots)

    def zero_grad(self) -> None:
        """Zero all gradients in one op (the views stay bound)."""
        self.grad.zero_()
        for slot in self._slots:
            if slot.is_param and slot.module._parameters[slot.name].grad is None:
                # Something set the grad to None (e.g. zero_grad(set_to_none=True)): rebind.
                slot.module._parameters[slot.name].grad = _view(self.grad, slot)

    def pack_scratch(self) -> None:
        """Write 1 (the sample weight's unit) and each integer buffer's value into the scratch tail.

        Scaling the reduced region by a client's sample count then scales these
        too, so after the all-reduce ``scratch[0]`` is the total sample count.
        """
        self.scratch[0] = 1.0
        if self._int_buffers:
            # One stacked copy on the device: no host round trip per buffer.
            self.scratch[1:].copy_(torch.stack([buf.reshape(()) for buf in self._int_buffers]))

    def unpack_int_buffers(self) -> None:
        """Set each integer buffer from the (already averaged) scratch tail, rounded."""
        if not self._int_buffers:
            return
        rounded = self.scratch[1:].round().to(self._int_buffers[0].dtype)
        torch._foreach_copy_([b.view(1) for b in self._int_buffers], list(rounded.split(1)))

    def layer_slices(self, global_only: bool = False) -> list[tuple[str, int, int]]:
        """(qualified name, start, end) of every parameter inside ``params`` in order; with ``global_only``
        those of ``global_params``, offsets counted from its start."""
        first = self.global_slice.start if global_only else 0
        return [
            (
                f"{self._module_names.get(id(s.module), '')}.{s.name}".lstrip("."),
                s.offset - first,
                s.offset - first + s.numel,
            )
            for s in self._slots
            if s.is_param and s.offset >= first
        ]


def flatten(model: nn.Module, local_bn: bool = False, channels_last: bool = False) -> FlatModel:
    """Rebind the model's float tensors to one flat buffer (idempotent).

    Args:
        model: The model; already on its final device.
        local_bn: Keep BatchNorm tensors out of the aggregated region (FedBN).
        channels_last: Lay 4-d parameters out channels-last (fast convs on GPUs).

    Returns:
        The :class:`FlatModel`, also stored on the model.
    """
    flat = getattr(model, _ATTR, None)
    if flat is not None and flat.local_bn == local_bn and flat.channels_last == channels_last and flat.is_intact():
        return flat
    flat = FlatModel(model, local_bn=local_bn, channels_last=channels_last)
    # A plain attribute: not a parameter, buffer or submodule, so state_dict() ignores it.
    model.__dict__[_ATTR] = flat
    return flat


def get_flat(model: nn.Module) -> FlatModel | None:
    """The model's flat storage if it has one and it is intact."""
    flat = model.__dict__.get(_ATTR)
    return flat if flat is not None and flat.is_intact() else None


def _collect(model: nn.Module, local_bn: bool) -> dict[str, list]:
    """Sort (module, name, tensor) triples into the layout's groups."""
    groups: dict[str, list] = {k: [] for k in ("local_p", "shared_p", "shared_b", "local_b", "ints")}
    seen: set[int] = set()
    for module in model.modules():
        local = local_bn and is_batchnorm(module)
        for name, param in module._parameters.items():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                groups["local_p" if local else "shared_p"].append((module, name, param, True))
        for name, buf in module._buffers.items():
            if buf is None or id(buf) in seen:
                continue
            seen.add(id(buf))
            if buf.is_floating_point():
                groups["local_b" if local else "shared_b"].append((module, name, buf, False))
            elif not local and buf.numel() == 1:
                groups["ints"].append(buf)
    return groups


def _common_dtype_device(groups: dict[str, list]) -> tuple[torch.dtype, torch.device]:
    tensors = [t for k in ("local_p", "shared_p", "shared_b", "local_b") for (_, _, t, _) in groups[k]]
    if not tensors:
        raise ValueError("model has no floating-point parameters or buffers to flatten")
    dtypes = {t.dtype for t in tensors}
    devices = {t.device for t in tensors}
    if len(dtypes) != 1 or len(devices) != 1:
        raise ValueError(
            f"all floating-point tensors must share one dtype and device to be flattened; "
            f"found dtypes {sorted(map(str, dtypes))} on devices {sorted(map(str, devices))}"
        )
    return dtypes.pop(), devices.pop()


def _assign_offsets(groups: dict[str, list], channels_last: bool) -> tuple[list[_Slot], dict[str, int]]:
    slots: list[_Slot] = []
    offset = 0
    layout: dict[str, int] = {}

    def place(key: str) -> None:
        nonlocal offset
        for module, name, tensor, is_param in groups[key]:
            cl = channels_last and tensor.dim() == 4
            slots.append(_Slot(module, name, is_param, offset, tensor.shape, cl))
            offset += tensor.numel()

    place("local_p")
    layout["reduced_start"] = offset
    place("shared_p")
    layout["params_end"] = offset
    place("shared_b")
    layout["scratch_start"] = offset
    offset += 1 + len(groups["ints"])  # sample weight, then one slot per integer buffer
    layout["scratch_end"] = offset
    place("local_b")
    layout["end"] = offset
    return slots, layout


def _get(slot: _Slot) -> torch.Tensor:
    store = slot.module._parameters if slot.is_param else slot.module._buffers
    return store[slot.name]


def _view(buffer: torch.Tensor, slot: _Slot) -> torch.Tensor:
    """The slot's tensor as a view of ``buffer`` (channels-last strides for 4-d if asked)."""
    chunk = buffer[slot.offset : slot.offset + slot.numel]
    if slot.channels_last:
        n, c, h, w = slot.shape
        return chunk.view(n, h, w, c).permute(0, 3, 1, 2)
    return chunk.view(slot.shape)
