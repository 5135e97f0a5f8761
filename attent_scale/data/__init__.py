"""Data path: shard manifest, shard builder and the rank-balanced, resumable ShardStream."""

from typing import Any

from attent_scale.data.manifest import Manifest, ShardInfo

__all__ = ["Manifest", "ShardInfo", "ShardStream", "collate"]


def __getattr__(name: str) -> Any:
    # the stream needs torch; builder worker processes import this package and must not pay for it
    if name in ("ShardStream", "collate"):
        from attent_scale.data import stream

        return getattr(stream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
