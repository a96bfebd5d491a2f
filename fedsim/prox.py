"""The FedProx proximal term (Li et al. 2020, "Federated Optimization in Heterogeneous Networks").

Each client minimises ``loss(w) + (mu/2) * ||w - w_global||²`` — the norm is
SQUARED, so the gradient of the term is ``mu * (w - w_global)``.

Training never builds the term into the autograd graph: after ``backward()``
the gradient ``mu * (w - w_global)`` is added to the flat gradient buffer in
one fused pass (:func:`add_proximal_grad_`). That is exactly the gradient of
the term, costs no graph memory and no Python loop over parameters.
:func:`proximal_term` is the differentiable reference used by tests and by
models that are not flattened.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def proximal_term(params: Iterable[torch.Tensor], global_params: Iterable[torch.Tensor], mu: float) -> torch.Tensor:
    """Differentiable ``(mu/2) * sum_i ||p_i - g_i||²`` over matching tensors."""
    params = list(params)
    if mu == 0 or not params:
        return torch.zeros((), device=params[0].device if params else None)
    total = sum((p - g.detach()).pow(2).sum() for p, g in zip(params, global_params, strict=True))
    return 0.5 * mu * total


def proximal_value(params: torch.Tensor, global_params: torch.Tensor, mu: float) -> float:
    """``(mu/2) * ||params - global_params||²`` for flat vectors, as a float (no graph)."""
    if mu == 0:
        return 0.0
    with torch.no_grad():
        return 0.5 * mu * float(torch.sub(params, global_params).pow_(2).sum())


def add_proximal_grad_(grads: torch.Tensor, params: torch.Tensor, global_params: torch.Tensor, mu: float) -> None:
    """``grads += mu * (params - global_params)`` on flat vectors, in place; nothing when mu == 0."""
    if mu == 0:
        return
    with torch.no_grad():
        # Two in-place passes rather than one with a temporary: no 4*num_params-byte allocation per step.
        grads.add_(params, alpha=mu).sub_(global_params, alpha=mu)
