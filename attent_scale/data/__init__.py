"""Data path: shard manifest, shard builder and the rank-balanced, resumable ShardStream."""

from attent_scale.data.manifest import Manifest, ShardInfo
from attent_scale.data.stream import ShardStream, collate

__all__ = ["Manifest", "ShardInfo", "ShardStream", "collate"]
