"""Demo shards: built once from the capped embedded corpus, reused when a valid manifest is there."""

from __future__ import annotations

from pathlib import Path

from attent_scale.data import Manifest, ShardStream
from attent_scale.demo import DEMO_SETTINGS, ensure_demo_shards


def test_ensure_demo_shards_builds_once_and_streams_balanced(tmp_path: Path) -> None:
    out = ensure_demo_shards(tmp_path / "demo", progress=False)
    m = Manifest.load(out)
    assert m.seq_len == DEMO_SETTINGS["seq_len"] and m.vocab_size == DEMO_SETTINGS["vocab_size"]
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert ensure_demo_shards(out, progress=False) == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    counts = [sum(len(b["ids"]) for b in ShardStream(out, "train", rank=r, world_size=2, batch_size=64))
              for r in range(2)]
    assert counts[0] == counts[1] == m.num_samples("train") // 2
