"""Benchmark the data path: `shards build` MB of text/s, ShardStream samples/s and tokens/s per worker count.

Usage: python tools/bench_stream.py [--max-bytes 8000000] [--batch-size 32] [--workers 0 1 2]
Builds the embedded stdlib corpus (capped) at seq_len 128 and 1024 in a temp dir, then streams one epoch
of the train split per worker count (world size 1) and prints one line per measurement.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from attent_scale.data import Manifest, ShardStream
from attent_scale.data.builder import build_shards


def bench_build(out: Path, seq_len: int, max_bytes: int) -> Manifest:
    t0 = time.perf_counter()
    m = build_shards([], out, seq_len=seq_len, vocab_size=8000, max_bytes=max_bytes, val_fraction=0.01,
                     shard_size_mb=4, progress=False)
    secs = time.perf_counter() - t0
    text = sum((m.raw or {})["splits"][s]["text_bytes"] for s in m.splits) / 1e6
    print(f"build  seq_len {seq_len:5d}: {text:.1f} MB text in {secs:.1f}s = {text / secs:.2f} MB/s "
          f"(tokenizer training included), {m.num_samples('train')} train samples, "
          f"{len(m.splits['train'])} shards")
    return m


def bench_stream(m: Manifest, workers: int, batch_size: int, min_seconds: float) -> None:
    samples = tokens = epochs = 0
    steady_samples, steady_secs, first_batch = 0, 0.0, []
    t0 = time.perf_counter()
    while True:
        e0 = time.perf_counter()
        s = ShardStream(m.dir, "train", batch_size=batch_size, num_workers=workers, epoch=epochs,
                        shuffle_buffer=1000)
        t_first = None
        for batch in s:
            n = len(batch["ids"])
            if t_first is None:
                t_first = time.perf_counter()
                first_batch.append(t_first - e0)
            else:
                steady_samples += n
            samples += n
            tokens += int((batch["labels"] != -100).sum())
        steady_secs += time.perf_counter() - (t_first or e0)
        epochs += 1
        secs = time.perf_counter() - t0
        if secs >= min_seconds:
            break
    print(f"stream seq_len {m.seq_len:5d} workers {workers}: {samples / secs:9.0f} samples/s "
          f"{tokens / secs:11.0f} tokens/s incl. start-up; steady {steady_samples / steady_secs:9.0f} "
          f"samples/s; first batch {1e3 * sum(first_batch) / len(first_batch):.0f} ms "
          f"({epochs} epoch(s), {secs:.1f}s, batch {batch_size})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-bytes", type=int, default=8_000_000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--min-seconds", type=float, default=3.0)
    args = ap.parse_args()
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        for seq_len in (128, 1024):
            m = bench_build(Path(tmp) / f"s{seq_len}", seq_len, args.max_bytes)
            for workers in args.workers:
                bench_stream(m, workers, args.batch_size, args.min_seconds)


if __name__ == "__main__":
    main()
