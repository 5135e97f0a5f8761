"""`attent-scale simulate`: one teacher selection at any world size in this process, timed and sized."""

from __future__ import annotations

import argparse

from attent_scale.errors import UserError

MAX_RANKS = 4096  # threads: beyond this a single process spends its time switching between them


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate", help="simulate one distributed selection (ranks as threads): time and bytes per rank",
        description="Runs one ledger-mode selection of N synthetic losses on W simulated ranks (threads "
                    "over a fake process group: the code path of the gloo collectives) and prints the "
                    "selection time and the bytes each rank sends. The ranks share this process's cores, so "
                    "the wall time is the sum of every rank's work, not one rank's.")
    p.add_argument("--samples", type=int, required=True, help="N: sample ids")
    p.add_argument("--ranks", type=int, required=True, help=f"W: simulated ranks (1 to {MAX_RANKS})")
    p.add_argument("--strategy", default="hard", choices=["hard", "soft", "random", "prune"])
    p.add_argument("--method", default="threshold", choices=["gather", "threshold"], help="top-k method")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of the observed ids to select")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_cli)


def _mib(n: float) -> str:
    return f"{n / 2**20:.3f} MiB"


def _run_cli(args: argparse.Namespace) -> int:
    if args.samples < 0:
        raise UserError(f"--samples {args.samples}: must be >= 0")
    if not 1 <= args.ranks <= MAX_RANKS:
        raise UserError(f"--ranks {args.ranks}: must be in [1, {MAX_RANKS}]")
    if not 0.0 <= args.ratio <= 1.0:
        raise UserError(f"--ratio {args.ratio}: must be in [0, 1]")
    if args.method == "gather" and 16 * args.samples * args.ranks > 8 << 30:
        raise UserError(f"--method gather: every simulated rank holds all {args.samples} (key, id) pairs, "
                        f"{16 * args.samples * args.ranks / 2**30:.0f} GiB in all; use --method threshold")
    import numpy as np

    from attent_scale.teacher.simulate import simulate_selection

    out = simulate_selection(args.samples, args.ranks, strategy=args.strategy, method=args.method,
                             ratio=args.ratio, seed=args.seed)
    recs = out["records"]
    sent = np.array([sum(r["bytes_per_rank"].values()) for r in recs], dtype=np.float64)
    phases = sorted({p for r in recs for p in r["bytes_per_rank"]})
    sec = {k: max(r["seconds"].get(k, 0.0) for r in recs) for k in ("select", "collective", "share")}
    selected = int(np.bitwise_count(out["bits"]).sum(dtype=np.int64))
    print(f"simulate: N={args.samples} W={args.ranks} strategy={args.strategy} method={recs[0]['method']}: "
          f"{selected} selected")
    print(f"  selection wall time {out['wall_s']:.3f} s (all {args.ranks} ranks on this process's cores); "
          f"per rank at most: select {sec['select']:.3f} s, collectives {sec['collective']:.3f} s "
          f"(waiting for the other threads included), share {sec['share']:.3f} s")
    print(f"  bytes sent per rank (ring model): max {_mib(sent.max())}, mean {_mib(sent.mean())}")
    for p in phases:
        v = max(r["bytes_per_rank"].get(p, 0) for r in recs)
        print(f"    {p}: max {_mib(v)}")
    return 0
