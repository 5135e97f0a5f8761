"""attent_scale: AtteNT loss-based example selection for distributed transformer training.

The Python API, imported on first use (so ``import attent_scale`` and ``attent-scale --help`` stay light)::

    from attent_scale import load_config, train
    cfg = load_config("demo", ["data.dir=runs/shards", "train.max_steps=10"])  # a packaged config, or a path
    exit_code = train(cfg)          # the native trainer, as `attent-scale train` runs it

``train`` is the module ``attent_scale.train`` itself, callable as ``train(cfg)``; ``RunConfig`` and
``load_config`` come from ``attent_scale.config``, ``Teacher`` from ``attent_scale.teacher``,
``ShardStream`` from ``attent_scale.data``, ``AttentTrainer`` (the HF Trainer, needs the ``hf`` extra)
from ``attent_scale.integrations.hf``, ``AttentCallback`` (PyTorch Lightning, needs the ``lightning`` extra)
from ``attent_scale.integrations.lightning``, ``UserError`` (a ValueError) from ``attent_scale.errors``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# exported name -> (module, attribute); attribute None: the module itself
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "train": ("attent_scale.train", None),
    "load_config": ("attent_scale.config", "load_config"),
    "RunConfig": ("attent_scale.config", "RunConfig"),
    "Teacher": ("attent_scale.teacher", "Teacher"),
    "ShardStream": ("attent_scale.data", "ShardStream"),
    "AttentTrainer": ("attent_scale.integrations.hf", "AttentTrainer"),
    "AttentCallback": ("attent_scale.integrations.lightning", "AttentCallback"),
    "UserError": ("attent_scale.errors", "UserError"),
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'attent_scale' has no attribute {name!r}")
    module_name, attr = _EXPORTS[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
