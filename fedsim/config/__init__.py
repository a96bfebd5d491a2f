"""One typed config tree: dataclasses, TOML presets, command-line overrides, validation.

Precedence: dataclass defaults < ``--config`` TOML preset < ``--set key=value``
< the named flags (``--rounds`` ...). The resolved tree is written to the run
directory as ``config.json``; its hash guards resume.

Every value is checked when the tree is built, each problem one :class:`ConfigError`
line naming the field: TOML types strictly (no boolean for a count, no list for a
path), a choice against its ``Literal`` type, every float finite, every number within
its documented range (bounds far above real use, that stop what the code cannot use).
:func:`check_inputs` then checks the files the config names, before any work.

Each field is declared once (:func:`fedsim.settings.setting`): its type, default,
docstring, its flags and whether it changes the trained weights. A field with a plain
default has no flag and changes the weights. :data:`SETTINGS` lists them all; the
command lines, :meth:`RunConfig.digest` and the study runner derive from it. This
package loads neither torch nor numpy, so ``train.py --help`` and a bad setting are fast.

The package is split by what each part holds; everyone imports from ``fedsim.config`` itself:

- :mod:`fedsim.config.checks`: :class:`ConfigError`, the ``MAX_*`` bounds and the checks the tables run;
- :mod:`fedsim.config.data_and_model`: the ``data.*``, ``data.synthetic.*`` and ``model.*`` tables;
- :mod:`fedsim.config.train_and_privacy`: the ``train.*``, ``train.dp.*`` and ``train.secagg.*`` tables;
- :mod:`fedsim.config.tree`: the root :class:`RunConfig`, its cross-table checks, :data:`SETTINGS`;
- :mod:`fedsim.config.loading`: building the tree from dicts, TOML and ``--set``; checking inputs; saving.
"""

from __future__ import annotations

from fedsim.config.checks import (
    MAX_BATCH,
    MAX_CHECKPOINTS,
    MAX_COUNT,
    MAX_DIRICHLET,
    MAX_EPOCHS,
    MAX_HIDDEN,
    MAX_HOSPITALS,
    MAX_LR,
    MAX_MIXUP,
    MAX_MU,
    MAX_PATCHES,
    MAX_SEED,
    MAX_SIDE,
    MAX_SYNTHETIC,
    MAX_WEIGHT_DECAY,
    MAX_WORKERS,
    MAX_XAI,
    ConfigError,
)
from fedsim.config.data_and_model import BenchmarkConfig, DataConfig, ModelConfig, SyntheticConfig
from fedsim.config.loading import (
    check_inputs,
    field_type,
    from_dict,
    load_toml,
    parse_assignment,
    resolve,
    save,
    set_dotted,
)
from fedsim.config.train_and_privacy import DPConfig, SecAggConfig, TrainConfig
from fedsim.config.tree import SETTINGS, RunConfig, setting_of

#: The public names of the module this package replaced, all still importable from ``fedsim.config``.
__all__ = [
    "MAX_BATCH",
    "MAX_CHECKPOINTS",
    "MAX_COUNT",
    "MAX_DIRICHLET",
    "MAX_EPOCHS",
    "MAX_HIDDEN",
    "MAX_HOSPITALS",
    "MAX_LR",
    "MAX_MIXUP",
    "MAX_MU",
    "MAX_PATCHES",
    "MAX_SEED",
    "MAX_SIDE",
    "MAX_SYNTHETIC",
    "MAX_WEIGHT_DECAY",
    "MAX_WORKERS",
    "MAX_XAI",
    "SETTINGS",
    "ConfigError",
    "DPConfig",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "SecAggConfig",
    "SyntheticConfig",
    "BenchmarkConfig",
    "TrainConfig",
    "check_inputs",
    "field_type",
    "from_dict",
    "load_toml",
    "parse_assignment",
    "resolve",
    "save",
    "set_dotted",
    "setting_of",
]
