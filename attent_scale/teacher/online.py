"""Online picking (teacher.mode: online): each step's global top over every rank's candidates, dealt back
so that every rank trains the same number of samples."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attent_scale.teacher.strategies import strategy_keys
from attent_scale.teacher.topk import select_global
from attent_scale.teacher.view import TeacherView


@dataclass(frozen=True)
class OnlineStep:
    """What one online pick decided: this rank's `batch` to train, the candidates it scored, its
    non-finite keys, the record's fields when one is due (without seconds and bytes), the top-k's report
    and the seconds of key work and of the rebalance."""

    batch: dict[str, Any]
    scored: int
    nonfinite: int
    record: dict[str, Any] | None
    report: dict[str, Any]
    seconds_keys: float
    seconds_rebalance: float


def online_pick(v: TeacherView, batch: dict[str, Any], scores: torch.Tensor, batch_size: int, step: int, *,
                record: bool) -> OnlineStep:
    """Collective: global top over all ranks' candidates, then all_to_all so that every rank returns
    exactly b = min(B, ceil(min_c * online_ratio)) samples (b = B for full candidate batches). The chosen
    samples, ordered by global candidate slot (rank-major), are dealt in consecutive runs of b: slots
    j*b..(j+1)*b-1 of the sorted chosen list go to rank j. `record`: build this step's record fields."""
    cfg, comm = v.cfg, v.comm
    t0 = time.perf_counter()
    ids = batch["ids"].detach().cpu().reshape(-1).to(torch.int64)
    c = int(ids.shape[0])
    if comm is not None:
        sizes = torch.cat(comm.all_gather(torch.tensor([c], dtype=torch.int64), "collective")).tolist()
    else:
        sizes = [c]
    offset = int(sum(sizes[: v.rank]))
    b = min(int(batch_size), math.ceil(min(sizes) * cfg.online_ratio - 1e-9))
    k = b * v.world_size
    raw = scores.detach().float().cpu().reshape(-1).numpy()
    scores = torch.from_numpy(v.excess(ids.clamp(min=0).numpy(), raw))
    keys = strategy_keys(cfg.strategy, scores, ids.clamp(min=0), seed=v.seed, cycle=step,
                         temperature=cfg.temperature, normalization=cfg.normalization)
    keys[ids < 0] = float("nan")  # filler samples go last
    n_nonfinite = int((~torch.isfinite(keys)).sum())
    slots = torch.arange(offset, offset + c, dtype=torch.int64)
    t_keys = time.perf_counter() - t0
    report: dict[str, Any] = {}
    chosen = select_global(keys, slots, k, method=cfg.topk_method, group=v.group, report=report)
    t1 = time.perf_counter()
    chosen_np = chosen.numpy()
    local = chosen_np[(chosen_np >= offset) & (chosen_np < offset + c)]
    dest = np.searchsorted(chosen_np, local) // max(1, b)
    counts = np.bincount(dest, minlength=v.world_size).tolist()
    rows = torch.from_numpy(local - offset)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == c:
            picked = value.detach().cpu()[rows].contiguous()
            out[key] = comm.all_to_all(picked, counts, "rebalance") if comm is not None else picked
        else:
            out[key] = value
    t_rebalance = time.perf_counter() - t1
    nonfin = v.all_sum([n_nonfinite])[0]
    fields = None
    if record:
        sha = hashlib.sha256(chosen_np.astype("<i8").tobytes()).hexdigest() if v.rank == 0 else None
        fields = dict(step=int(step), epoch=None, cycle=None, mode="online", strategy=cfg.strategy,
                      method=report["method"], ratio=cfg.online_ratio, k=int(k), n_scored=int(sum(sizes)),
                      n_selected=int(chosen_np.shape[0]), n_unseen=0, n_nonfinite=nonfin,
                      world_size=v.world_size, sha256=sha, staleness=None)
    return OnlineStep(out, c, n_nonfinite, fields, report, t_keys, t_rebalance)
