"""Benchmark of selection: strategy keys + top-k on one core, gather vs threshold bytes/time over ranks."""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attent_scale.teacher import block_range, select_global, strategy_keys, uniform_noise
from attent_scale.teacher.topk import RADIX_BITS

STRATEGIES = ("hard", "soft", "random")


def analytic_bytes(method: str, n: int, world: int, *, tie_rounds: int = 0) -> int:
    """Bytes sent per rank (ring model: all_gather of S per rank sends (W-1)*S, all_reduce of S sends
    2(W-1)/W*S) by select_global with `n` keys spread evenly, no tie descent unless tie_rounds > 0."""
    per = math.ceil(n / world)
    control = (world - 1) * 32
    check = (world - 1) * 8
    if method == "gather":
        return control + (world - 1) * 16 * per + check
    red = 2 * (world - 1) / world
    widths = [RADIX_BITS] * (64 // RADIX_BITS) + ([64 % RADIX_BITS] if 64 % RADIX_BITS else [])
    hist = red * 8 * (sum(1 << b for b in widths) + tie_rounds * (1 << RADIX_BITS))
    bitset = red * math.ceil(n / 8)
    return int(control + hist + bitset + check)


def _losses(ids: np.ndarray) -> np.ndarray:
    return (uniform_noise(ids, seed=123, cycle=0) * 5).astype(np.float32)


def bench_one_core(sizes: list[int], ratio: float) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    rows = []
    for n in sizes:
        ids = torch.arange(n, dtype=torch.int64)
        losses = torch.from_numpy(_losses(ids.numpy()))
        for strategy in STRATEGIES:
            t0 = time.perf_counter()
            keys = strategy_keys(strategy, losses, ids, seed=1, cycle=0, temperature=0.5)
            t1 = time.perf_counter()
            chosen = select_global(keys, ids, int(ratio * n))
            t2 = time.perf_counter()
            rows.append({"n": n, "strategy": strategy, "keys_s": t1 - t0, "topk_s": t2 - t1,
                         "total_s": t2 - t0, "k": int(chosen.numel())})
            print(f"  1 core  N={n:>11,}  {strategy:6s} keys {t1 - t0:7.3f} s  top-k {t2 - t1:7.3f} s",
                  flush=True)
            del keys, chosen
        del ids, losses
    return rows


def _worker(rank: int, world: int, port: int, sizes: list[int], methods: list[str], ratio: float,
            out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = []
    for n in sizes:
        lo, hi = block_range(rank, n, world)
        ids = torch.arange(lo, hi, dtype=torch.int64)
        keys = strategy_keys("soft", torch.from_numpy(_losses(ids.numpy())), ids, seed=1, cycle=0)
        for method in methods:
            if method == "gather" and n * 16 * world > 8 * 2**30:  # every rank would hold all N pairs
                continue
            dist.barrier()
            rep: dict[str, Any] = {}
            t0 = time.perf_counter()
            chosen = select_global(keys, ids, int(ratio * n), method=method, report=rep)
            dt = torch.tensor([time.perf_counter() - t0, rep["bytes_total"]], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            rows.append({"n": n, "world": world, "method": method, "seconds_max": float(dt[0]),
                         "bytes_per_rank_max": int(dt[1]), "bytes_rank0": rep["bytes_total"],
                         "phases_rank0": rep["seconds"], "k": int(chosen.numel()),
                         "analytic_bytes": analytic_bytes(method, n, world)})
            if rank == 0:
                print(f"  {world} ranks N={n:>11,}  {method:9s} {float(dt[0]):7.3f} s  "
                      f"{int(dt[1]) / 2**20:10.2f} MiB/rank", flush=True)
            del chosen
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def bench_ranks(world: int, sizes: list[int], methods: list[str], ratio: float) -> list[dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(world, port, sizes, methods, ratio, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def _fmt_bytes(b: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= div:
            return f"{b / div:.2f} {unit}"
    return f"{int(b)} B"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="1e5,1e6,1e7,1e8", help="one-core sizes")
    p.add_argument("--rank-sizes", default="1e5,1e6,1e7", help="sizes for the multi-rank runs")
    p.add_argument("--threshold-only-sizes", default="1e8", help="multi-rank sizes run with threshold only")
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--json", default=None, help="write all rows here")
    a = p.parse_args(argv)
    sizes = [int(float(x)) for x in a.sizes.split(",") if x]
    rank_sizes = [int(float(x)) for x in a.rank_sizes.split(",") if x]
    thr_sizes = [int(float(x)) for x in a.threshold_only_sizes.split(",") if x]
    worlds = [int(x) for x in a.worlds.split(",") if x]
    print("one core (torch.set_num_threads(1)), ratio", a.ratio, flush=True)
    one = bench_one_core(sizes, a.ratio)
    multi: list[dict[str, Any]] = []
    for world in worlds:
        print(f"{world} local ranks (gloo)", flush=True)
        multi += bench_ranks(world, rank_sizes, ["gather", "threshold"], a.ratio)
        if thr_sizes:
            multi += bench_ranks(world, thr_sizes, ["threshold"], a.ratio)

    print("\n### One core: strategy keys + top-k (k = N/2)\n")
    print("| N | strategy | keys (s) | top-k (s) | total (s) |\n|---:|---|---:|---:|---:|")
    for r in one:
        print(f"| {r['n']:.0e} | {r['strategy']} | {r['keys_s']:.3f} | {r['topk_s']:.3f} | "
              f"{r['total_s']:.3f} |")
    print("\n### Local ranks (gloo, 2 shared cores): bytes sent per rank (max over ranks) and time\n")
    print("| N | ranks | method | time (s) | bytes/rank | analytic | threshold/gather |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in multi:
        g = analytic_bytes("gather", r["n"], r["world"])
        frac = f"{100 * r['bytes_per_rank_max'] / g:.2f}%" if r["method"] == "threshold" else ""
        print(f"| {r['n']:.0e} | {r['world']} | {r['method']} | {r['seconds_max']:.3f} | "
              f"{_fmt_bytes(r['bytes_per_rank_max'])} | {_fmt_bytes(r['analytic_bytes'])} | {frac} |")
    print("\n### Analytic bytes sent per rank, 1024 ranks x 1e9 samples\n")
    print("| method | bytes/rank | vs gather |\n|---|---:|---:|")
    g = analytic_bytes("gather", 10**9, 1024)
    for method in ("gather", "threshold"):
        b = analytic_bytes(method, 10**9, 1024)
        print(f"| {method} | {_fmt_bytes(b)} | {100 * b / g:.2f}% |")
    if a.json:
        Path(a.json).write_text(json.dumps({"one_core": one, "ranks": multi}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
