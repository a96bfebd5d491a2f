"""The privacy layer of fedsim: differential privacy, secure aggregation, and the modes that put them in a round.

The modules, from the engine's side down:

* :mod:`fedsim.privacy.modes`: :class:`Privacy`, the privacy modes as the engine runs them (one object per
  rank, built from the ``train.dp`` and ``train.secagg`` settings): who is charged what, the weights, the
  noised and masked sum in place of the all-reduce, the checkpoint state and ``final.json``'s report.
* :mod:`fedsim.privacy.accounting`: what the mechanisms spend, with Opacus's RDP or PRV accountants:
  :func:`epsilon`, :func:`epsilon_of_history`, :func:`noise_for_epsilon`, :func:`steps_per_epoch`, the
  client-level :func:`client_sample_rate` and :func:`client_epsilon`, and the per-hospital
  :class:`PrivacyLedger`. It imports neither torch nor (until called) Opacus.
* :mod:`fedsim.privacy.dpsgd`: DP-SGD per hospital (Abadi et al. 2016) on a flat model:
  :class:`PoissonBatchSampler`, the GroupNorm :func:`dp_backbone` and :func:`check_private_model`,
  :class:`DPSGD` (clipped per-sample gradients plus Gaussian noise, written into the flat gradient buffer),
  :func:`per_sample_cross_entropy` and :func:`noise_generator`.
* :mod:`fedsim.privacy.grad_sample`: DP-SGD's two per-sample gradient engines (``torch.func``, tensor hooks).
* :mod:`fedsim.privacy.dpfedavg`: client-level DP-FedAvg (McMahan et al., ICLR 2018): :func:`clip_update_`
  and :func:`add_noise_share_`.
* :mod:`fedsim.privacy.secagg`: secure aggregation (Bonawitz et al. 2017), pairwise masks that cancel in the
  one all-reduce: :class:`~fedsim.privacy.secagg.SecureAggregation`; on the fixed-point grid of
  :mod:`fedsim.privacy.fixedpoint`, with the keystreams of :mod:`fedsim.privacy.masks`.

This package re-exports :class:`Privacy` and the public names of accounting, dpsgd and dpfedavg
(``from fedsim.privacy import DPSGD, PrivacyLedger, epsilon``). Each is imported from its module the first
time it is asked for (PEP 562), so importing the package, or :mod:`fedsim.privacy.accounting`, loads no torch.
A test that patches a name must patch it in the module that defines it: the names here are the same objects,
but the code calls its own module's names.
"""

from __future__ import annotations

from fedsim.lazy import lazy_exports

#: Public name -> the module of this package that defines it.
_EXPORTS = {
    "Privacy": "fedsim.privacy.modes",
    "ACCOUNTANTS": "fedsim.privacy.accounting",
    "History": "fedsim.privacy.accounting",
    "PrivacyLedger": "fedsim.privacy.accounting",
    "client_epsilon": "fedsim.privacy.accounting",
    "client_sample_rate": "fedsim.privacy.accounting",
    "epsilon": "fedsim.privacy.accounting",
    "epsilon_of_history": "fedsim.privacy.accounting",
    "noise_for_epsilon": "fedsim.privacy.accounting",
    "steps_per_epoch": "fedsim.privacy.accounting",
    "DPSGD": "fedsim.privacy.dpsgd",
    "METHODS": "fedsim.privacy.dpsgd",
    "LossFn": "fedsim.privacy.dpsgd",
    "PoissonBatchSampler": "fedsim.privacy.dpsgd",
    "check_private_model": "fedsim.privacy.dpsgd",
    "dp_backbone": "fedsim.privacy.dpsgd",
    "noise_generator": "fedsim.privacy.dpsgd",
    "per_sample_cross_entropy": "fedsim.privacy.dpsgd",
    "add_noise_share_": "fedsim.privacy.dpfedavg",
    "clip_update_": "fedsim.privacy.dpfedavg",
}

__all__ = [
    "ACCOUNTANTS",
    "DPSGD",
    "METHODS",
    "History",
    "LossFn",
    "PoissonBatchSampler",
    "Privacy",
    "PrivacyLedger",
    "add_noise_share_",
    "check_private_model",
    "client_epsilon",
    "client_sample_rate",
    "clip_update_",
    "dp_backbone",
    "epsilon",
    "epsilon_of_history",
    "noise_for_epsilon",
    "noise_generator",
    "per_sample_cross_entropy",
    "steps_per_epoch",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
