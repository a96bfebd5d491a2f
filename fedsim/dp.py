"""Differential privacy for fedsim: one import for sample-level DP-SGD, client-level DP-FedAvg and their accounting.

This module only re-exports; the code lives in three modules, by what it does:

* :mod:`fedsim.accounting`: what the mechanisms spend, with Opacus's RDP or PRV
  accountants: :func:`epsilon`, :func:`epsilon_of_history`,
  :func:`noise_for_epsilon`, :func:`steps_per_epoch`, the client-level
  :func:`client_sample_rate` and :func:`client_epsilon`, and the per-hospital
  :class:`PrivacyLedger`. It imports neither torch nor (until called) Opacus.
* :mod:`fedsim.dpsgd`: DP-SGD per hospital (Abadi et al. 2016) on a flat
  model: :class:`PoissonBatchSampler`, the GroupNorm :func:`dp_backbone` and
  :func:`check_private_model`, :class:`DPSGD` (clipped per-sample gradients
  plus Gaussian noise, written into the flat gradient buffer),
  :func:`per_sample_cross_entropy` and :func:`noise_generator`.
* :mod:`fedsim.dpfedavg`: client-level DP-FedAvg (McMahan et al., ICLR 2018):
  :func:`clip_update_` and :func:`add_noise_share_`.

Importing this module loads torch (through :mod:`fedsim.dpsgd`), as it always
has; code that needs only the accounting imports :mod:`fedsim.accounting`.
A test that patches a name must patch it in the module that defines it: the
names here are the same objects, but the code calls its own module's names.
"""

from __future__ import annotations

from fedsim.accounting import (
    ACCOUNTANTS,
    History,
    PrivacyLedger,
    client_epsilon,
    client_sample_rate,
    epsilon,
    epsilon_of_history,
    noise_for_epsilon,
    steps_per_epoch,
)
from fedsim.dpfedavg import add_noise_share_, clip_update_
from fedsim.dpsgd import (
    DPSGD,
    METHODS,
    LossFn,
    PoissonBatchSampler,
    check_private_model,
    dp_backbone,
    noise_generator,
    per_sample_cross_entropy,
)

__all__ = [
    "ACCOUNTANTS",
    "DPSGD",
    "METHODS",
    "History",
    "LossFn",
    "PoissonBatchSampler",
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
