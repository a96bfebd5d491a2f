"""The root of the config tree, :class:`RunConfig`, and :data:`SETTINGS`, every leaf setting declared under it.

The root holds the checks that span tables (what differential privacy and secure aggregation cannot be
combined with) and the digest that guards resume: the hash of the settings declared ``weights=True``.
:data:`SETTINGS` is derived from the declarations once, here, and the command lines, the digest and the
study runner all read it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import field
from typing import Any, ClassVar

from fedsim.config.checks import ConfigError, _check_choices
from fedsim.config.data_and_model import DataConfig, ModelConfig
from fedsim.config.train_and_privacy import TrainConfig
from fedsim.settings import Setting, declared, setting, table


@table
class RunConfig:
    """The whole run."""

    PREFIX: ClassVar[str] = ""

    out: str = setting("runs/latest", flag="--out", help="run directory (default runs/latest)", launch=True)
    """Run directory: config.json, metrics.jsonl, checkpoint.pt, tb/, final.json; must not be empty."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _check_choices(self)
        if not str(self.out).strip():
            raise ConfigError(f"out = {self.out!r} must name a run directory")
        _check_privacy(self)

    @property
    def norm(self) -> str:
        """The backbones' normalization layers, ``model.norm`` with auto resolved."""
        if self.model.norm != "auto":
            return self.model.norm
        return "group" if self.train.dp.enabled else "batch"

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict."""
        return dataclasses.asdict(self)

    def record(self) -> dict[str, Any]:
        """What ``config.json`` holds and the digest reads: :meth:`to_dict` without the settings added after
        run folders existed (``omit_default``) while they are at their default, nor tables left empty by that."""
        tree = self.to_dict()
        for s in SETTINGS:
            if s.omit_default and _get_dotted(tree, s.key) == s.default:
                _pop_dotted(tree, s.key, prune=True)
        return tree

    def digest(self) -> str:
        """Hash of the settings that determine the trained weights (those declared ``weights=True``).

        A run may be extended, retimed or restarted with any other setting changed (rounds, timeouts,
        the output folder ...): resume compares this hash.
        """
        tree = self.record()
        for s in SETTINGS:
            if not s.weights and _has_dotted(tree, s.key):
                _pop_dotted(tree, s.key)
        blob = json.dumps(tree, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _get_dotted(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def _has_dotted(tree: dict[str, Any], key: str) -> bool:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def _pop_dotted(tree: dict[str, Any], key: str, prune: bool = False) -> None:
    """Remove ``key``; with ``prune``, also the tables that are left empty by it."""
    *path, name = key.split(".")
    parents = [tree]
    for part in path:
        parents.append(parents[-1][part])
    del parents[-1][name]
    if prune:
        for parent, part in zip(reversed(parents[:-1]), reversed(path)):
            if parent[part]:
                break
            del parent[part]


def _check_privacy(cfg: RunConfig) -> None:
    """Settings that differential privacy or secure aggregation cannot honour, refused in one line."""
    t, level = cfg.train, cfg.train.dp.level
    if level != "off":
        why = f"train.dp.level = {level}"
        refusals = [
            (t.mode == "centralized", "train.mode = centralized (DP applies to federated hospitals)"),
            (cfg.norm == "batch", "model.norm = batch (BatchNorm mixes samples; use group or auto)"),
            (t.bn == "local", "train.bn = local (FedBN keeps BatchNorm layers; DP models have none)"),
            (t.compile, "train.compile (the per-sample gradient hooks need the eager model)"),
        ]
        if level == "sample":
            refusals += [
                (
                    t.mixup_alpha > 0,
                    "train.mixup_alpha > 0 (MixUp mixes samples, which per-sample accounting "
                    "cannot charge: set train.mixup_alpha = 0)",
                ),
                (t.grad_accum > 1, "train.grad_accum > 1 (a DP step is one Poisson batch)"),
            ]
        else:
            refusals += [
                (
                    t.algorithm == "scaffold",
                    "train.algorithm = scaffold (its control variates would cross ranks unclipped and without noise)",
                )
            ]
        for bad, what in refusals:
            if bad:
                raise ConfigError(f"{why} cannot be combined with {what}")
    if t.secure_aggregation and t.mode == "centralized":
        raise ConfigError("train.secure_aggregation applies to federated runs, not train.mode = centralized")


#: Every leaf setting of the tree, in declaration order: the source of the flags, the digest and the study's keys.
SETTINGS: tuple[Setting, ...] = declared(RunConfig)
_BY_KEY = {s.key: s for s in SETTINGS}


def setting_of(key: str) -> Setting:
    """The declaration of a dotted key (``"train.mu"``); KeyError names an unknown one."""
    return _BY_KEY[key]
