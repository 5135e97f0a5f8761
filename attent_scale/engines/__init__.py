"""Training engines (local, deepspeed, fsdp) behind one small Engine protocol; `build_engine` picks one."""

from __future__ import annotations

from typing import Any

from attent_scale.config import RunConfig
from attent_scale.engines.base import Engine, StepResult, per_sample_loss

__all__ = ["Engine", "StepResult", "build_engine", "per_sample_loss"]


def build_engine(cfg: RunConfig, manifest: Any = None, *, vocab_size: int | None = None) -> Engine:
    """Build the engine named by `cfg.engine.name` for data described by `manifest` (its vocab_size).

    `vocab_size` may be given instead of a manifest (tests, tools). Distributed engines join the
    process group from the torchrun / deepspeed-launcher environment.
    """
    if manifest is not None:
        vocab_size = int(manifest.vocab_size)
    name = cfg.engine.name
    if name == "local":
        from attent_scale.engines.local import LocalEngine

        return LocalEngine(cfg, vocab_size)
    from attent_scale.dist import init_distributed
    from attent_scale.extras import available, missing

    if name == "deepspeed" and not available("deepspeed"):  # found, not imported: DS_ACCELERATOR comes first
        raise missing("deepspeed", "config key 'engine.name': 'deepspeed'")
    info = init_distributed()
    if name == "deepspeed":
        from attent_scale.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, vocab_size, info)
    if name == "fsdp":
        from attent_scale.engines.fsdp import FSDPEngine

        return FSDPEngine(cfg, vocab_size, info)
    raise ValueError(f"unknown engine {name!r}")
