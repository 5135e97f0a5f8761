"""`attent-scale demo`: build demo shards from the embedded corpus and stream one epoch across 2 ranks."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attent_scale.data.builder import build_shards
from attent_scale.data.manifest import Manifest
from attent_scale.data.stream import ShardStream
from attent_scale.errors import UserError

DEMO_DIR = Path("runs/demo/shards")
DEMO_SETTINGS = {
    "seq_len": 128,
    "vocab_size": 2000,
    "model_type": "bpe",
    "val_fraction": 0.05,
    "max_bytes": 4_000_000,
    "samples_per_shard": 1000,
    "seed": 0,
}


def ensure_demo_shards(out_dir: str | Path = DEMO_DIR, *, progress: bool = True) -> Path:
    """Shards of the capped embedded corpus in `out_dir`; rebuilt only when no valid manifest is there."""
    out = Path(out_dir)
    try:
        m = Manifest.load(out)
        if m.seq_len == DEMO_SETTINGS["seq_len"] and m.num_samples("train") > 0:
            return out
    except UserError:
        pass
    build_shards([], out, overwrite=True, progress=progress, **DEMO_SETTINGS)
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="build demo shards and stream one epoch across ranks")
    p.add_argument("--out", default=str(DEMO_DIR), help="demo shard directory")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, shards: str, args: argparse.Namespace) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        stream = ShardStream(shards, "train", rank=rank, world_size=world, seed=args.seed, epoch=0,
                             batch_size=args.batch_size, num_workers=args.num_workers)
        t0 = time.perf_counter()
        samples = tokens = batches = 0
        for batch in stream:
            batches += 1
            samples += len(batch["ids"])
            tokens += int((batch["labels"] != -100).sum())
        secs = time.perf_counter() - t0
        row = torch.tensor([rank, batches, samples, tokens, stream.faults], dtype=torch.int64)
        rows = [torch.zeros_like(row) for _ in range(world)]
        dist.all_gather(rows, row)  # every rank reaches this collective: counts are equal by construction
        if rank == 0:
            print(f"epoch 0: {stream.selected} samples, world {world}, dropped {stream.dropped}")
            for r in rows:
                rk, nb, ns, nt, nf = (int(x) for x in r)
                print(f"  rank {rk}: {nb} batches, {ns} samples, {nt} target tokens, faults {nf}")
            print(f"  rank 0 streamed in {secs:.2f}s ({samples / max(secs, 1e-9):.0f} samples/s)")
    finally:
        dist.destroy_process_group()


def cmd_demo(args: argparse.Namespace) -> int:
    if args.world_size < 1:
        raise UserError(f"--world-size {args.world_size}: must be at least 1")
    t0 = time.perf_counter()
    shards = ensure_demo_shards(args.out)
    m = Manifest.load(shards)
    print(f"shards: {shards} ({m.num_samples('train')} train / {m.num_samples('val')} val samples, "
          f"seq_len {m.seq_len}, vocab {m.vocab_size}) ready in {time.perf_counter() - t0:.1f}s")
    sys.stdout.flush()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_main, args=(args.world_size, _free_port(), str(shards), args), nprocs=args.world_size)
    return 0
