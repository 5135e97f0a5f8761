"""Memory and time per rank at scale: N simulated samples (a synthetic manifest, no tokens) on W gloo ranks.

Each rank runs, in order: one epoch of ledger updates (the ids its epoch-0 stream would train, a
deterministic loss per id, `--batch` ids per simulated step, the trainer's periodic ledger exchange), one
threshold selection (ledger mode, ratio `--ratio`), the next epoch's stream plan with that selection
(per-shard counts, this rank's and each DataLoader worker's slice of the bits), and optionally a checkpoint
of its teacher state plus the selection bits (`--checkpoint`). Prints seconds per phase (max over ranks),
peak RSS per rank after each phase (ru_maxrss) and what a rank holds. No timed assertions: numbers only.

    OMP_NUM_THREADS=1 python tools/benchmarks/bench_scale.py --samples 1e8 --ranks 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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

from attent_scale.config import TeacherConfig
from attent_scale.data import Manifest, ShardStream
from attent_scale.data.partition import partition_epoch
from attent_scale.teacher import Teacher, uniform_noise


def write_manifest(root: Path, n: int, per_shard: int) -> None:
    """A manifest of ceil(n / per_shard) empty shard files holding the dense ids 0..n-1 (no tokens)."""
    shards = []
    for i, first in enumerate(range(0, n, per_shard)):
        name = f"train-{i:06d}.tar"
        (root / name).touch()
        shards.append({"name": name, "first_id": first, "count": min(per_shard, n - first), "bytes": 0,
                       "sha256": "0" * 64, "tokens": 0})
    (root / "tokenizer.model").touch()
    manifest = {"format_version": 1, "seq_len": 8, "vocab_size": 256, "eos_id": 1, "pad_id": 0,
                "tokenizer": {"file": "tokenizer.model", "sha256": "0" * 64}, "token_dtype": "uint16",
                "splits": {"train": {"shards": shards}, "val": {"shards": []}}}
    (root / "manifest.json").write_text(json.dumps(manifest))


def peak_rss() -> int:
    """Peak resident set size of this process so far, bytes (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rank(rank: int, world: int, port: int, a: argparse.Namespace, root: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    n = a.samples
    row: dict[str, Any] = {"rank": rank, "rss_start": peak_rss(), "seconds": {}, "cpu": {}, "rss": {}}
    cfg = TeacherConfig(mode="ledger", strategy=a.strategy, ratio_schedule="constant", initial_ratio=a.ratio,
                        warmup_epochs=1, topk_method="threshold")
    teacher = Teacher(cfg, num_samples=n, seed=1)

    # phase 1: one epoch of training-forward observations, in the order of this rank's epoch-0 stream
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    # the rank's block of the epoch-0 sequence, as ShardStream plans it (data/partition.py, the pure epoch
    # plan), walked as (shard, k0, k1) runs: ids are made one batch at a time, never N/W of them at once
    parts = Manifest.load(root).parts("train")
    part = partition_epoch([p.count for p in parts], seed=1, epoch=0, rank=rank, world_size=world,
                           batch_size=a.batch, workers=0, shuffle_buffer=1000)
    step = 0
    for si, k0, k1 in part.runs(part.rank_start, part.rank_start + part.real):
        first = parts[si].first_id
        for p in range(k0, k1, a.batch):
            ids = np.arange(first + p, first + min(p + a.batch, k1), dtype=np.int64)
            loss = (uniform_noise(ids, seed=123, cycle=0) * 5).astype(np.float32)
            teacher.observe(torch.from_numpy(ids), torch.from_numpy(loss), step)
            step += 1
            teacher.exchange_due(step)
    # ranks may differ by one step at the end: the trainer never does (equal batches per rank); here one
    # more lockstep exchange per missing step keeps the collective sequence equal
    steps = torch.tensor([step], dtype=torch.int64)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    while step < int(steps.item()):
        step += 1
        teacher.exchange_due(step)
    row["seconds"]["ledger"] = time.perf_counter() - t0
    row["cpu"]["ledger"] = time.process_time() - c0
    row["rss"]["ledger"] = peak_rss()
    row["steps"] = step

    # phase 2: one threshold selection (exchange of the rest, counts, radix rounds, bits all_gather)
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    sel = teacher.select(1, step)
    row["seconds"]["select"] = time.perf_counter() - t0
    row["cpu"]["select"] = time.process_time() - c0
    row["rss"]["select"] = peak_rss()
    row["record_seconds"] = teacher.last_record["seconds"]
    row["k"] = sel.count

    # phase 3: the next epoch's stream plan with that selection, and each worker's slice
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    stream = ShardStream(root, "train", rank=rank, world_size=world, seed=1, epoch=1, batch_size=a.batch,
                         selection=sel, num_workers=a.workers)
    workers = [stream._plan.restrict(w).selection_nbytes for w in range(max(1, a.workers))]
    row["seconds"]["stream"] = time.perf_counter() - t0
    row["cpu"]["stream"] = time.process_time() - c0
    row["rss"]["stream"] = peak_rss()
    row["held"] = {"ledger_block": teacher.ledger.nbytes, "selection_bits": sel.nbytes,
                   "stream_slice": stream._plan.selection_nbytes, "worker_slices": workers,
                   "samples_per_rank": stream.samples_per_rank}
    del stream, parts, part

    if a.checkpoint:
        from attent_scale.checkpoint import save_state

        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        stem = Path(a.checkpoint) / f"rank-{rank:05d}"
        save_state(stem, {"progress": {"selection_bits": sel.bits}, "teacher": teacher.state_dict()})
        row["seconds"]["checkpoint"] = time.perf_counter() - t0
        row["cpu"]["checkpoint"] = time.process_time() - c0
        row["rss"]["checkpoint"] = peak_rss()
        row["checkpoint_bytes"] = sum(p.stat().st_size for p in stem.parent.glob(stem.name + ".*"))
    rows: list[Any] = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=float, required=True, help="N simulated samples (1e9 allowed)")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--strategy", default="hard", choices=["hard", "soft", "random", "prune"])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=4096, help="ids per simulated training step and rank")
    p.add_argument("--shard-size", type=int, default=100_000, help="ids per synthetic shard")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers whose slices are measured")
    p.add_argument("--checkpoint", action="store_true", help="also write each rank's teacher state")
    p.add_argument("--json", default=None, help="write the per-rank rows here")
    a = p.parse_args(argv)
    a.samples = int(a.samples)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        root = Path(tmp) / "shards"
        root.mkdir()
        write_manifest(root, a.samples, a.shard_size)
        if a.checkpoint:
            a.checkpoint = str(Path(tmp) / "ckpt")
            Path(a.checkpoint).mkdir()
        out = str(Path(tmp) / "rows.json")
        t0 = time.perf_counter()
        mp.spawn(_rank, args=(a.ranks, port, a, str(root), out), nprocs=a.ranks, join=True)
        wall = time.perf_counter() - t0
        rows = json.loads(Path(out).read_text())
    gib = 2**30
    n, w = a.samples, a.ranks
    print(f"N={n:.3g} samples, {w} gloo ranks, strategy {a.strategy}, ratio {a.ratio}, "
          f"batch {a.batch}/step, {-(-n // a.shard_size)} shards, OMP/torch threads 1, "
          f"load {os.getloadavg()[0]:.1f}, wall {wall:.1f} s")
    phases = list(rows[0]["seconds"])
    print("| phase | wall s (max over ranks) | CPU s (max over ranks) | CPU s (sum) / cores | "
          "peak RSS after phase, max over ranks (GiB) |")
    print("|---|---:|---:|---:|---:|")
    cores = os.cpu_count() or 1
    for ph in phases:
        secs, rss = max(r["seconds"][ph] for r in rows), max(r["rss"][ph] for r in rows)
        cpu = [r["cpu"][ph] for r in rows]
        print(f"| {ph} | {secs:.1f} | {max(cpu):.1f} | {sum(cpu) / cores:.1f} | {rss / gib:.2f} |")
    rec = rows[0]["record_seconds"]
    print("selection phases (rank 0, s): " + ", ".join(f"{k} {v:.1f}" for k, v in rec.items()))
    h = rows[0]["held"]
    per_id = h["ledger_block"] / max(1, n / w)
    print(f"rank 0 holds: ledger block {h['ledger_block'] / gib:.3f} GiB ({per_id:.1f} "
          f"B per owned id), selection bits {h['selection_bits'] / 2**20:.1f} MiB, stream slice "
          f"{h['stream_slice'] / 2**20:.1f} MiB, worker slices "
          f"{', '.join(f'{b / 2**20:.1f}' for b in h['worker_slices'])} MiB; "
          f"k={rows[0]['k']}, start RSS {rows[0]['rss_start'] / gib:.2f} GiB")
    if a.checkpoint:
        print(f"checkpoint bytes per rank: {max(r['checkpoint_bytes'] for r in rows) / gib:.3f} GiB "
              f"(bound 8*N/W + N/8 = {(8 * -(-n // w) + n / 8) / gib:.3f} GiB)")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "wall": wall, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
