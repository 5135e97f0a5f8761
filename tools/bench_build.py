"""Shard build throughput with N worker processes: MB of text per second, speedup over one worker.

    PYTHONPATH=. python tools/bench_build.py --workers 1 2 [--max-bytes 0] [--repeats 1] [INPUTS --glob PAT]

Trains one tokenizer first (not timed: tokenizer training is one pass of its own), then builds the
embedded stdlib corpus (or INPUTS) with `--tokenizer` for every worker count, back to back, checks that
every build is byte-identical to the first, and prints wall seconds, MB/s, speedup and the load average
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

from attent_scale.data.builder import build_shards


def digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*", help="corpus files/directories (default: embedded stdlib corpus)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--glob", default="*", help="file pattern inside input directories")
    ap.add_argument("--max-bytes", type=int, default=0, help="cap the corpus (0 = all of it)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--repeats", type=int, default=1, help="builds per worker count (best is reported)")
    ap.add_argument("--tmp", default=None, help="scratch directory (default: a new temp dir)")
    args = ap.parse_args()
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
    for w in args.workers:
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


if __name__ == "__main__":
    main()
