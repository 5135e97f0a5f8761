"""Benchmark the data path: `shards build` MB of text/s, ShardStream samples/s and tokens/s per worker count.

Usage: python tools/benchmarks/bench_stream.py [--max-bytes 8000000] [--batch-size 32] [--workers 0 1 2]
                                               [--vocab-size 8000] [--min-seconds 3]
       python tools/benchmarks/bench_stream.py --build-workers 1 2 [--max-bytes 0] [--repeats 1]
                                               [INPUTS --glob PAT]
Builds the embedded stdlib corpus (capped) at seq_len 128 and 1024 in a temp dir, then streams one epoch
of the train split per worker count (world size 1) and prints one line per measurement.

--build-workers: build throughput with N worker processes instead. Trains one tokenizer first (not
timed: tokenizer training is one pass of its own), then builds the embedded stdlib corpus (or INPUTS)
with `--tokenizer` for every worker count, back to back, checks that every build is byte-identical to
the first, and prints wall and CPU seconds, MB/s, speedup over the first count and the load average
(the machine may be shared: the load says how much of it the builds had).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from attent_scale.data import Manifest, ShardStream
from attent_scale.data.builder import build_shards


def bench_build(out: Path, seq_len: int, max_bytes: int, vocab_size: int) -> Manifest:
    t0 = time.perf_counter()
    m = build_shards([], out, seq_len=seq_len, vocab_size=vocab_size, max_bytes=max_bytes, val_fraction=0.01,
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


def digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def build_scaling(args: argparse.Namespace) -> None:
    """--build-workers: one build per worker count with one tokenizer (see the module docstring)."""
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="bench_build_"))
    cap = args.max_bytes or None
    tok_dir = tmp / "tok"
    if not (tok_dir / "tokenizer.model").exists():
        t0 = time.perf_counter()
        build_shards(args.inputs, tok_dir, glob=args.glob, max_bytes=min(cap or 4_000_000, 4_000_000),
                     seq_len=args.seq_len,
                     vocab_size=args.vocab_size, progress=False, workers=1, overwrite=True)
        print(f"tokenizer: trained on <= 4 MB in {time.perf_counter() - t0:.1f}s (not timed below)")
    first: dict[str, str] | None = None
    base = None
    print(f"{'workers':>7} {'wall s':>8} {'cpu s':>8} {'MB':>7} {'MB/s':>7} {'speedup':>7}  load (1/5/15 min)"
          "  identical")
    for w in args.build_workers:
        best = None
        for _ in range(args.repeats):
            out = tmp / f"w{w}"
            load0 = os.getloadavg()
            c0 = os.times()
            t0 = time.perf_counter()
            m = build_shards(args.inputs, out, glob=args.glob, tokenizer=tok_dir / "tokenizer.model",
                             max_bytes=cap,
                             seq_len=args.seq_len, progress=False, workers=w, overwrite=True)
            wall = time.perf_counter() - t0
            c1 = os.times()
            cpu = (c1.user + c1.system + c1.children_user + c1.children_system
                   - c0.user - c0.system - c0.children_user - c0.children_system)
            load1 = os.getloadavg()
            if best is None or wall < best[0]:
                best = (wall, cpu, load0, load1)
        mb = sum(v.get("text_bytes", 0) for v in m.raw["splits"].values()) / 1e6
        d = digest(out)
        first = first or d
        base = base or best[0]
        loads = "/".join(f"{x:.1f}" for x in best[2]) + " -> " + "/".join(f"{x:.1f}" for x in best[3])
        print(f"{w:>7} {best[0]:>8.1f} {best[1]:>8.1f} {mb:>7.1f} {mb / best[0]:>7.2f} {base / best[0]:>7.2f}"
              f"  {loads}  {d == first}")
    if not args.tmp:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-bytes", type=int, default=None,
                    help="cap the corpus (default 8000000; with --build-workers 0 = all of it, the default)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument("--build-workers", type=int, nargs="+", default=None,
                    help="time `shards build` with these worker counts instead of streaming")
    ap.add_argument("inputs", nargs="*", help="--build-workers: corpus files/directories (default: embedded)")
    ap.add_argument("--glob", default="*", help="--build-workers: file pattern inside input directories")
    ap.add_argument("--seq-len", type=int, default=1024, help="--build-workers: the build's seq_len")
    ap.add_argument("--vocab-size", type=int, default=8000, help="the tokenizer's vocabulary")
    ap.add_argument("--repeats", type=int, default=1, help="--build-workers: builds per count (best shown)")
    ap.add_argument("--tmp", default=None, help="--build-workers: scratch directory (default: a temp dir)")
    args = ap.parse_args()
    if args.build_workers:
        args.max_bytes = args.max_bytes or 0
        build_scaling(args)
        return
    if args.inputs:
        ap.error("INPUTS are for --build-workers (streaming builds the embedded corpus)")
    args.max_bytes = args.max_bytes or 8_000_000
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        for seq_len in (128, 1024):
            m = bench_build(Path(tmp) / f"s{seq_len}", seq_len, args.max_bytes, args.vocab_size)
            for workers in args.workers:
                bench_stream(m, workers, args.batch_size, args.min_seconds)


if __name__ == "__main__":
    main()
