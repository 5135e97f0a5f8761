"""Multi-process (gloo) worker for the pruning tests: one rank's selections and weights, saved to a file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from attent_scale.cli import exit_process
from attent_scale.config import TeacherConfig
from attent_scale.teacher import Teacher, uniform_noise

N = 1000
CASES = [(q, method) for q in (0.0, 0.7) for method in ("gather", "threshold")]


def losses_of(ids: np.ndarray) -> np.ndarray:
    """A fixed loss per id with ties (id % 10 == 3) and NaN / inf (id % 97 == 0 / 1)."""
    loss = uniform_noise(ids, seed=99, cycle=7) * 3.0
    loss[ids % 10 == 3] = 1.5
    loss[ids % 97 == 0] = np.nan
    loss[ids % 97 == 1] = np.inf
    return loss


def observed(rank: int, world: int) -> np.ndarray:
    """This rank's observations: a shuffled, unequal split; ids with id % 13 == 5 are never observed."""
    ids = np.arange(N, dtype=np.int64)
    ids = np.random.default_rng(5).permutation(ids[ids % 13 != 5])
    cuts = [0, len(ids) // 3, len(ids)] if world == 2 else [0, len(ids)]
    return ids[cuts[rank]:cuts[rank + 1]]


def digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).hexdigest()


def scenarios(rank: int, world: int, group: Any) -> dict[str, Any]:
    res: dict[str, Any] = {}
    mine = observed(rank, world)
    for q, method in CASES:
        cfg = TeacherConfig(mode="ledger", strategy="prune", warmup_epochs=1, prune_ratio=0.6,
                            prune_quantile=q, topk_method=method)
        teacher = Teacher(cfg, num_samples=N, seed=3, group=group)
        teacher.observe(torch.from_numpy(mine), torch.from_numpy(losses_of(mine)), step=0)
        for epoch in (1, 2):
            sel = teacher.select(epoch, step=10 * epoch)
            up = np.flatnonzero(sel.sample_weights(np.arange(N)).numpy() != 1.0)
            res[f"{q}/{method}/{epoch}"] = {"selected": digest(sel.ids()), "upweighted": digest(up),
                                            "count": sel.count, "n_up": int(up.shape[0]),
                                            "weight": sel.weight, "ids": sel.ids().tolist(),
                                            "up": up.tolist()}
    return res


def run(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(scenarios(rank, world, dist.group.WORLD), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_process(0, group_used=True)  # no C++ teardown after the group (attent_scale.cli.exit_process)
