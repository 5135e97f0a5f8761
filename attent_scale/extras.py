"""Optional dependencies: each is imported where one path needs it, or fails in one line naming its extra."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from attent_scale.errors import UserError

# top-level module -> the pyproject extra that installs it (`pip install 'attent-scale[EXTRA]'`)
EXTRAS: dict[str, str] = {
    "deepspeed": "deepspeed",
    "accelerate": "hf",
    "pyarrow": "parquet",
    "matplotlib": "plot",
    "tensorboard": "tensorboard",
    "s3fs": "s3",
    "gcsfs": "gcs",
    "fsspec": "http",
    "aiohttp": "http",
    "gguf": "smollm2",
    "wandb": "wandb",
    "pytorch_lightning": "lightning",
}


class MissingExtra(UserError):
    """An optional package this path needs is not installed."""


def install_hint(module: str) -> str:
    """The pip command that installs `module`'s extra."""
    return f"pip install 'attent-scale[{EXTRAS[module.split('.')[0]]}]'"


def missing(module: str, what: str) -> MissingExtra:
    """The one-line error for `what` (a config key, a feature) needing `module`."""
    top = module.split(".")[0]
    return MissingExtra(f"{what} needs the {top} package, which is not installed: {install_hint(top)}")


def available(module: str) -> bool:
    """True when `module` can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, what: str) -> ModuleType:
    """Import `module` for `what`; MissingExtra (one line, naming the extra) when it is not installed.
    An ImportError from inside an installed package (a broken dependency of it) is not hidden."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] != module.split(".")[0]:
            raise
        raise missing(module, what) from None
