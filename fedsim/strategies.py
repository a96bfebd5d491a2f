"""Server optimizers: what every rank does with the aggregated mean (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021).

There is no server process: every rank holds the same global weights ``w_t``,
receives the same all-reduced mean of the participants' weights, and applies
the same update, so the global model stays identical everywhere. With
``delta = mean - w_t`` over the global parameters:

- ``sgd``:     ``w <- w + lr * delta`` (lr 1 = plain FedAvg: ``w <- mean``);
- ``avgm``:    ``m <- beta * m + delta``; ``w <- w + lr * m`` (FedAvgM, Hsu et al. 2019);
- ``adam``:    ``m <- b1 * m + (1 - b1) * delta``; ``v <- b2 * v + (1 - b2) * delta²``;
               ``w <- w + lr * m / (sqrt(v) + tau)``;
- ``yogi``:    as adam, with ``v <- v - (1 - b2) * delta² * sign(v - delta²)``;
- ``adagrad``: as adam, with ``v <- v + delta²``.

``m`` and ``v`` start at 0 and there is no bias correction, as in the paper.
Buffers (BatchNorm running statistics) take the plain weighted mean.
"""

from __future__ import annotations

from typing import Any

import torch

SERVER_OPTIMIZERS = ("sgd", "avgm", "adam", "yogi", "adagrad")
#: Elements updated per chunk: the temporaries stay cache-sized instead of model-sized.
_CHUNK = 1 << 20


class ServerOptimizer:
    """The server step of one run; its state (``m``, ``v``) is saved with every checkpoint."""

    def __init__(
        self,
        name: str = "sgd",
        lr: float = 1.0,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.99),
        tau: float = 1e-3,
    ):
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"server optimizer {name!r} is not one of: {', '.join(SERVER_OPTIMIZERS)}")
        self.name, self.lr, self.momentum, self.tau = name, float(lr), float(momentum), float(tau)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def is_plain_average(self) -> bool:
        """True when the step is ``w <- mean`` (FedAvg): nothing to compute."""
        return self.name == "sgd" and self.lr == 1.0

    @torch.no_grad()
    def step_(self, weights: torch.Tensor, mean: torch.Tensor, start: torch.Tensor) -> None:
        """Move ``weights`` (holding ``mean`` on entry, or the same tensor as ``mean``) from ``start``.

        Args:
            weights: The global parameters to update in place (a view of the flat buffer).
            mean: The aggregated mean of the participants' parameters; may be ``weights`` itself.
            start: ``w_t``, the global parameters the round started from.
        """
        if self.is_plain_average:
            if weights.data_ptr() != mean.data_ptr():
                weights.copy_(mean)
            return
        if self.name != "sgd" and self.m is None:
            self.m = torch.zeros_like(weights)
            if self.name in ("adam", "yogi", "adagrad"):
                self.v = torch.zeros_like(weights)
        for lo in range(0, weights.numel(), _CHUNK):
            hi = min(lo + _CHUNK, weights.numel())
            delta = mean[lo:hi] - start[lo:hi]
            self._chunk(weights[lo:hi], delta, start[lo:hi], lo, hi)

    def _chunk(self, weights: torch.Tensor, delta: torch.Tensor, start: torch.Tensor, lo: int, hi: int) -> None:
        if self.name == "sgd":
            torch.add(start, delta, alpha=self.lr, out=weights)
            return
        m = self.m[lo:hi]
        if self.name == "avgm":
            m.mul_(self.momentum).add_(delta)
            torch.add(start, m, alpha=self.lr, out=weights)
            return
        v = self.v[lo:hi]
        m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        square = delta.square_()  # delta is a temporary of this chunk
        if self.name == "adam":
            v.mul_(self.beta2).add_(square, alpha=1 - self.beta2)
        elif self.name == "yogi":
            v.sub_(torch.sign(v - square).mul_(square), alpha=1 - self.beta2)
        else:  # adagrad
            v.add_(square)
        step = v.sqrt().add_(self.tau)
        torch.addcdiv(start, m, step, value=self.lr, out=weights)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers (``torch.load(weights_only=True)`` reads them back)."""
        state: dict[str, Any] = {"name": self.name}
        for key in ("m", "v"):
            value = getattr(self, key)
            if value is not None:
                state[key] = value.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        if state.get("name", self.name) != self.name:
            raise ValueError(f"the checkpoint's server optimizer is {state.get('name')!r}, this run's {self.name!r}")
        for key in ("m", "v"):
            setattr(self, key, state[key].to(device) if key in state else None)
