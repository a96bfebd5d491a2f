"""fedsim: federated learning for histopathological grading, one torchrun rank per hospital.

Public API:
    federate(model, datasets, rounds=3, ...) -> history
        Federated training of any nn.Module over per-client Datasets on fedsim's engine (fedsim/api.py).
    fedavg(model, num_samples, group=None, bn="average") -> int
        In-place sample-weighted FedAvg with one all-reduce over the model's flat buffer.
    flatten(model, local_bn=False, channels_last=False) -> FlatModel
        Rebind a model's float tensors to one contiguous buffer (done by fedavg on first use).
    proximal_term(params, global_params, mu) -> Tensor
        The FedProx term (mu/2)·||w - w_global||², differentiable.

The names are imported on first use: ``import fedsim.config`` (the command lines' settings, their
errors) then runs without loading torch.
"""

from __future__ import annotations

from fedsim.lazy import lazy_exports

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "federate": "fedsim.api",
    "fedavg": "fedsim.aggregate",
    "flatten": "fedsim.flat",
    "FlatModel": "fedsim.flat",
    "proximal_term": "fedsim.prox",
    "proximal_value": "fedsim.prox",
    "add_proximal_grad_": "fedsim.prox",
}

__all__ = ["FlatModel", "add_proximal_grad_", "fedavg", "federate", "flatten", "proximal_term", "proximal_value"]
__version__ = "0.1.0"


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
