"""Files shipped beside the code: run configs, launch scripts, the Grafana dashboard, the Prometheus config.

They are package data (pyproject.toml's ``[tool.setuptools.package-data]``), read through
``importlib.resources``, so a checkout and an installed wheel find the same files; in a checkout the
top-level ``configs/``, ``launch/``, ``tools/ops/grafana`` and ``tools/ops/prometheus`` are links to
these folders (one copy of each file)::

    configs/   demo.yaml, demo_smollm2.yaml, ..., deepspeed_zero3.json   (`--config demo` names one)
    launch/    slurm_torchrun.sbatch, slurm_srun.sbatch, slurm_deepspeed.sbatch, local.sh
    ops/       grafana/attent-scale.json, prometheus/prometheus.yml
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from attent_scale.errors import UserError

DEEPSPEED_DEFAULT = "deepspeed_zero3.json"  # engine.name deepspeed with engine.deepspeed_config unset


def root() -> Path:
    """The folder of the shipped files (pip installs packages as plain files, so this is a real path)."""
    return Path(str(resources.files(__name__)))


def path(*parts: str) -> Path:
    """A shipped file, e.g. ``path("configs", "demo.yaml")``; UserError when the install lacks it."""
    found = root().joinpath(*parts)
    if not found.exists():
        raise UserError(f"{'/'.join(parts)}: not in this attent-scale install ({root()}); reinstall it")
    return found


def config_names() -> list[str]:
    """The packaged run configs, by the name `--config` takes (file name without .yaml)."""
    return sorted(p.stem for p in (root() / "configs").glob("*.yaml"))


def is_bare_name(value: str) -> bool:
    """A config given as a bare name (``demo``): no folder, no suffix."""
    return bool(value) and "/" not in value and "\\" not in value and "." not in value


def resolve_config(value: str | Path) -> Path:
    """`--config VALUE`: an existing file as it is; a bare name that is no file here is a packaged config
    (``demo`` -> configs/demo.yaml); anything else is returned unchanged (the reader names it)."""
    given = Path(value)
    if given.exists() or not is_bare_name(str(value)):
        return given
    packaged = root() / "configs" / f"{value}.yaml"
    if packaged.is_file():
        return packaged
    raise UserError(f"config file {value}: no such file, and no packaged config of that name "
                    f"(packaged: {', '.join(config_names())})")


def deepspeed_default() -> Path:
    """The packaged ZeRO-3 JSON that engine.name=deepspeed uses when engine.deepspeed_config is unset."""
    return path("configs", DEEPSPEED_DEFAULT)
