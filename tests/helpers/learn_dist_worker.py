"""Multi-process (gloo) worker for strategies learn and rho: one rank's selections and records, and the same
after a state round trip, saved to a file (learn_scenario's reference and losses)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import learn_scenario as sc
import numpy as np
import torch
import torch.distributed as dist

from attent_scale.cli import exit_process
from attent_scale.teacher.ledger import SCORE

LEARN = dict(mode="ledger", strategy="learn", warmup_epochs=0, ratio_schedule="constant", initial_ratio=0.5,
             learn_tails="both", reference="ref.safetensors")
RHO = dict(mode="cycle", strategy="rho", warmup_epochs=1, ratio_schedule="constant", initial_ratio=0.5,
           rescore="all", interval_schedule="fixed", initial_interval=2, max_interval=2,
           full_epochs_per_cycle=0, reference="ref.safetensors")


def share(ids: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's part of an observation: an unequal split (a third to rank 0 on two ranks)."""
    cuts = [0, len(ids) // 3, len(ids)] if world == 2 else [0, len(ids)]
    return ids[cuts[rank]:cuts[rank + 1]]


def scenario(rank: int, world: int, group: Any, ref_path: Path, **kw: Any) -> dict[str, Any]:
    """learn: three epochs' selections (the third after a state round trip). rho: a warm-up epoch of
    training forwards, the cycle's scoring pass, its two subset epochs (the second reuses the first's
    selection, after a state round trip)."""
    ref = sc.reference(ref_path)
    out: dict[str, Any] = {"learn": [], "rho": [], "records": []}
    t = sc.teacher({**LEARN, **kw}, ref, group)
    for epoch in range(3):
        if epoch == 2:
            state = t.state_dict()
            t = sc.teacher({**LEARN, **kw}, ref, group)
            t.load_state_dict(state)
        out["learn"].append(t.select(epoch, step=epoch).ids().tolist())
        out["records"].append(t.last_record)
    t = sc.teacher({**RHO, **kw}, ref, group)
    ids = np.random.default_rng(0).permutation(np.arange(sc.N))
    mine = share(ids, rank, world)
    seen = sc.train_forward_losses(mine, np.arange(mine.size))
    t.observe(torch.from_numpy(mine), torch.from_numpy(seen), 3)
    scored = share(np.arange(sc.N)[::-1].copy(), rank, world)
    t.ledger.observe(scored, sc.scoring_losses(scored), 10, kind=SCORE)
    out["rho"].append(t.select(1, step=10).ids().tolist())
    out["records"].append(t.last_record)
    state = t.state_dict()
    t = sc.teacher({**RHO, **kw}, ref, group)
    t.load_state_dict(state)
    out["rho"].append(t.select(2, step=20).ids().tolist())
    return out


def run(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ref = Path(out) / "ref.safetensors"
        res = {method: scenario(rank, world, dist.group.WORLD, ref, topk_method=method)
               for method in ("threshold", "gather")}
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_process(0, group_used=True)  # no C++ teardown after the group (attent_scale.cli.exit_process)
