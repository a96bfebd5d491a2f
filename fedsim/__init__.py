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
"""
from fedsim.aggregate import fedavg
from fedsim.api import federate
from fedsim.flat import FlatModel, flatten
from fedsim.prox import add_proximal_grad_, proximal_term, proximal_value

__all__ = ["federate", "fedavg", "flatten", "FlatModel", "proximal_term", "proximal_value", "add_proximal_grad_"]
__version__ = "0.1.0"
