"""Multi-process (gloo) worker for strategy signal: one rank's selections and records over three epochs,
and the same after a state round trip, saved to a file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from attent_scale.cli import exit_process
from attent_scale.config import TeacherConfig
from attent_scale.teacher import Teacher, uniform_noise
from attent_scale.teacher.signals import histogram

N = 1000
CFG = dict(mode="ledger", strategy="signal", signal="gap+learn", warmup_epochs=1, ratio_schedule="constant",
           initial_ratio=0.2, signal_tolerance=0.0, signal_gap_allowance=0.0, signal_learned_quantile=0.02,
           signal_unlearnable_quantile=0.98, signal_min_fall=0.05)


def kind(ids: np.ndarray) -> np.ndarray:
    """0 clean (still falling), 1 memorized (falls far below val), 2 noise (high and flat); id % 17 == 4
    never observed, id % 97 == 0 non-finite."""
    return np.where(ids % 10 == 0, 1, np.where(ids % 10 == 1, 2, 0))


def losses(ids: np.ndarray, epoch: int) -> np.ndarray:
    k = kind(ids)
    jitter = uniform_noise(ids, seed=1, cycle=0) * 0.5  # the same every epoch: clean falls 0.3 a step
    clean = 5.0 - 0.3 * epoch + jitter
    loss = np.where(k == 1, 4.0 - 1.5 * epoch, np.where(k == 2, 7.0 + 0.01 * jitter, clean))
    loss[ids % 97 == 0] = np.nan
    return loss.astype(np.float32)


def val_hist() -> np.ndarray:
    """A val distribution over [3.5, 4.5): q02 = 3.52, q98 = 4.48."""
    return histogram(3.5 + uniform_noise(np.arange(500), seed=2, cycle=0))


def observed(rank: int, world: int, epoch: int) -> np.ndarray:
    """This rank's observations in `epoch`: an unequal split that changes every epoch."""
    ids = np.arange(N, dtype=np.int64)
    ids = np.random.default_rng(epoch).permutation(ids[ids % 17 != 4])
    cuts = [0, len(ids) // 3, len(ids)] if world == 2 else [0, len(ids)]
    return ids[cuts[rank]:cuts[rank + 1]]


def teacher(group: Any, **kw: Any) -> Teacher:
    return Teacher(TeacherConfig(**{**CFG, **kw}), num_samples=N, seed=3, group=group)


def scenario(rank: int, world: int, group: Any, **kw: Any) -> dict[str, Any]:
    """Observe epoch e's losses, then select epoch e + 1 (e = 0, 1, 2); after the second selection the
    state goes through state_dict / load_state_dict into a fresh teacher, which makes the third."""
    t = teacher(group, **kw)
    out: dict[str, Any] = {"ids": [], "records": []}
    for epoch in range(3):
        if epoch == 2:
            state = t.state_dict()
            t = teacher(group, **kw)
            t.load_state_dict(state)
        ids = observed(rank, world, epoch)
        t.observe(torch.from_numpy(ids), torch.from_numpy(losses(ids, epoch)), step=10 * epoch)
        t.observe_val(val_hist(), step=10 * epoch + 5)
        sel = t.select(epoch + 1, step=10 * epoch + 9)
        out["ids"].append(sel.ids().tolist())
        out["records"].append(t.last_record)
    out["state"] = t.state_dict()
    return out


def run(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {method: scenario(rank, world, dist.group.WORLD, topk_method=method)
               for method in ("threshold", "gather")}
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_process(0, group_used=True)  # no C++ teardown after the group (attent_scale.cli.exit_process)
