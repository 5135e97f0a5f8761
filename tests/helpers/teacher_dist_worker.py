"""Multi-process (gloo) worker for the teacher tests: runs every distributed scenario, saves results."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from attent_scale.cli import exit_process
from attent_scale.config import TeacherConfig
from attent_scale.teacher import SelectionMismatchError, Teacher, select_global, strategy_keys, uniform_noise
from attent_scale.teacher.comm import Comm
from attent_scale.teacher.topk import check_agreement

N = 1000
STRATEGIES = ("hard", "soft", "random")
METHODS = ("gather", "threshold")
KS = (0, 1, 137, 500, 999, 1000, 1005)


def losses_of(ids: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random loss per id, with ties (id % 10 == 3) and NaN / inf (id % 97 == 0 / 1)."""
    loss = uniform_noise(ids, seed=99, cycle=7) * 3.0
    loss[ids % 10 == 3] = 1.5
    loss[ids % 97 == 0] = np.nan
    loss[ids % 97 == 1] = np.inf
    return loss


def split(ids: np.ndarray, rank: int, world: int, scheme: str) -> np.ndarray:
    """This rank's share of `ids` under a partition scheme (unequal; rank 2 of 4 gets nothing)."""
    if world == 1:
        return ids
    if scheme == "shuffled":
        perm = np.random.default_rng(5).permutation(ids)
        weights = [3, 1, 0, 2][:world] if world == 4 else [1, 2]
        cuts = np.cumsum([0] + [int(len(ids) * w / sum(weights)) for w in weights])
        cuts[-1] = len(ids)
        return perm[cuts[rank] : cuts[rank + 1]]
    if scheme == "contiguous":
        return np.array_split(ids, world)[rank]
    if scheme == "modulo":
        return ids[ids % world == rank]
    raise ValueError(scheme)


def batches(ids: np.ndarray, losses: np.ndarray | None = None, bs: int = 64) -> list[dict[str, Any]]:
    out = []
    for i in range(0, len(ids), bs):
        chunk = torch.from_numpy(ids[i : i + bs].copy())
        out.append({"ids": chunk, "input_ids": chunk[:, None].repeat(1, 3), "labels": chunk[:, None] * 2})
    return out


def teacher_scenarios(rank: int, world: int, group: Any, tmp: Path) -> dict[str, Any]:
    """Observations spread differently over ranks; selections must not depend on world size."""
    res: dict[str, Any] = {}
    all_ids = np.arange(N, dtype=np.int64)
    for mode in ("cycle", "ledger"):
        for strategy in STRATEGIES:
            for method in METHODS:
                cfg = TeacherConfig(
                    mode=mode,
                    strategy=strategy,
                    topk_method=method,
                    temperature=0.7,
                    warmup_epochs=1,
                    initial_ratio=0.3,
                    final_ratio=0.6,
                    total_cycles=3,
                    initial_interval=2,
                    max_interval=3,
                )
                t = Teacher(
                    cfg,
                    num_samples=N,
                    seed=3,
                    record_path=tmp / f"sel-{mode}-{strategy}-{method}.jsonl",
                    group=group,
                )
                # epoch 0 (training forwards, partition A), then a scoring pass (partition B) over 2/3 of ids
                mine = split(all_ids, rank, world, "modulo")
                for i, b in enumerate(batches(mine, bs=50)):
                    t.observe(b["ids"], torch.from_numpy(losses_of(b["ids"].numpy()) + 0.25), step=i)
                scored = all_ids[all_ids % 3 != 0]
                part = split(scored[::-1].copy(), rank, world, "shuffled")
                t.score_pass(batches(part), lambda b: torch.from_numpy(losses_of(b["ids"].numpy())), step=40)
                shas = []
                sel = t.select(1, 40)
                shas.append(sel.sha256 if rank == 0 else None)
                check_agreement(sel.ids(), Comm(group) if group is not None else None)
                # training forwards in the subset epoch update some scores, then the next subset epoch
                sub = split(sel.ids(), rank, world, "contiguous")
                for b in batches(sub, bs=40):
                    t.observe(b["ids"], torch.from_numpy(losses_of(b["ids"].numpy()) * 0.5), step=41)
                state = t.state_dict()
                sel2 = t.select(2, 45)
                shas.append(sel2.sha256 if rank == 0 else None)
                t2 = Teacher(cfg, num_samples=N, seed=3, record_path=None, group=group)
                t2.load_state_dict(state)
                sel3 = t2.select(2, 45)
                res[f"teacher/{mode}/{strategy}/{method}"] = {
                    "shas": shas,
                    "ids1": sel.ids(),
                    "ids2": sel2.ids(),
                    "resumed_same": sel3.sha256 == sel2.sha256,
                    "record": t.last_record,
                    "stats": t.stats,
                    "count": sel.count,
                }
    return res


N_CKPT = 100_003  # not a multiple of 8 or of the world size


def checkpoint_scenario(rank: int, world: int, group: Any, tmp: Path) -> dict[str, Any]:
    """Training-forward observations with the trainer's periodic exchange, a selection, then a checkpoint
    of (selection bits, teacher state) per rank: its size, its tensors, and a teacher restored from it."""
    from safetensors import safe_open

    from attent_scale.checkpoint import load_state, save_state
    from attent_scale.teacher import Selection
    from attent_scale.teacher.teacher import EXCHANGE_EVERY

    cfg = TeacherConfig(mode="cycle", strategy="hard", topk_method="threshold", warmup_epochs=1,
                        initial_interval=2, max_interval=2, initial_ratio=0.3)
    t = Teacher(cfg, num_samples=N_CKPT, seed=3, group=group)
    ids = np.random.default_rng(1).permutation(N_CKPT)
    mine = np.array_split(ids, world)[rank]
    pending_max = 0
    steps = 150
    for step, part in enumerate(np.array_split(mine, steps), start=1):  # equal step counts on every rank
        t.observe(torch.from_numpy(part), torch.from_numpy(losses_of(part).astype(np.float32)), step)
        t.exchange_due(step)
        pending_max = max(pending_max, t.ledger.pending)
    sel = t.select(1, steps)
    stem = tmp / f"ckpt-rank{rank}"
    save_state(stem, {"progress": {"selection_bits": sel.bits}, "teacher": t.state_dict()})
    with safe_open(str(stem.with_suffix(".safetensors")), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    back = load_state(stem)
    t2 = Teacher(cfg, num_samples=N_CKPT, seed=3, group=group)
    t2.load_state_dict(back["teacher"])
    return {
        "ckpt/pending_max": pending_max,
        "ckpt/per_step": len(mine) / steps,
        "ckpt/size": sum(stem.with_suffix(x).stat().st_size for x in (".safetensors", ".json")),
        "ckpt/shapes": shapes,
        "ckpt/sha": sel.sha256,
        "ckpt/bits_back": Selection(back["progress"]["selection_bits"], N_CKPT).sha256,
        "ckpt/cached_back": t2.select(2, steps + 5).sha256,  # the cycle's second subset epoch: the cache
        "ckpt/ids": sel.ids(),
        "ckpt/every": EXCHANGE_EVERY,
    }


def online_scenario(rank: int, world: int, group: Any) -> dict[str, Any]:
    res: dict[str, Any] = {}
    B = 5
    for method in METHODS:
        for strategy in STRATEGIES:
            cfg = TeacherConfig(mode="online", strategy=strategy, online_ratio=0.4, topk_method=method)
            t = Teacher(cfg, num_samples=N, seed=1, record_path=None, group=group)
            c = t.candidate_batch_size(B)
            ids = np.arange(rank * 100, rank * 100 + c, dtype=np.int64)
            ids[0] = -1 if rank == 0 else ids[0]  # a filler candidate
            batch = batches(ids, bs=c)[0]
            scores = torch.from_numpy(losses_of(np.abs(ids)).astype(np.float32))
            out = t.online_pick(batch, scores, B, step=7)
            ok_rows = bool(
                torch.equal(out["input_ids"][:, 0], out["ids"])
                and torch.equal(out["labels"][:, 0], out["ids"] * 2)
            )
            res[f"online/{strategy}/{method}"] = {
                "ids": out["ids"].numpy(),
                "rows_ok": ok_rows,
                "c": c,
                "record": t.last_record,
            }
    return res


def small_scenarios(rank: int, world: int, group: Any) -> dict[str, Any]:
    """N not a multiple of 8 and N < world: trailing ranks own an empty block [N, N) (it raised)."""
    res: dict[str, Any] = {}
    for n in (9, 3):
        ids = np.arange(n, dtype=np.int64)
        mine = ids[ids % world == rank]
        for strategy in (*STRATEGIES, "prune"):
            for method in METHODS:
                cfg = TeacherConfig(mode="ledger", strategy=strategy, topk_method=method, warmup_epochs=0,
                                    ratio_schedule="constant", initial_ratio=0.5, final_ratio=0.5)
                t = Teacher(cfg, num_samples=n, seed=2, group=group)
                t.observe(torch.from_numpy(mine), torch.from_numpy(losses_of(mine + 2)), step=1)
                res[f"small/{n}/{strategy}/{method}"] = t.select(0, 2).ids()
    return res


class _StopAfter:
    """A stop flag (teacher.StopRequest) that rises on one rank once it has scored `after` batches."""

    def __init__(self, rank: int, on_rank: int, after: int, every: int) -> None:
        self.every, self.rank, self.on_rank, self.after, self.seen = every, rank, on_rank, after, 0

    def requested(self) -> bool:
        return self.rank == self.on_rank and self.seen >= self.after


def stop_scenario(rank: int, world: int, group: Any) -> dict[str, Any]:
    """A scoring pass over unequal shares (rank 2 of 4 has none) stopped by a flag on the last rank only:
    every rank raises ScoringStopped after the same round; a full pass after it selects as if the stopped
    one had never run (what was scored folds in by the max rule)."""
    from attent_scale.teacher import ScoringStopped

    cfg = TeacherConfig(mode="cycle", strategy="hard", warmup_epochs=0, initial_ratio=0.3, final_ratio=0.3)
    all_ids = np.arange(N, dtype=np.int64)
    part = split(all_ids, rank, world, "shuffled")
    res: dict[str, Any] = {}
    for name, on_rank, after in (("late", world - 1, 7), ("none", world, 0)):
        t = Teacher(cfg, num_samples=N, seed=3, group=group)
        stop = _StopAfter(rank, on_rank, after, every=3)

        def scored(b: dict[str, Any], stop: _StopAfter = stop) -> torch.Tensor:
            stop.seen += 1
            return torch.from_numpy(losses_of(b["ids"].numpy()))

        try:
            t.score_pass(batches(part, bs=20), scored, step=5, stop=stop)
            res[f"stop/{name}/raised"] = None
        except ScoringStopped:
            res[f"stop/{name}/raised"] = stop.seen  # batches this rank scored before the agreed stop
        t.score_pass(batches(part, bs=20), lambda b: torch.from_numpy(losses_of(b["ids"].numpy())), step=5)
        res[f"stop/{name}/ids"] = t.select(0, 5).ids()
    return res


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.group.WORLD
    tmp = Path(out_dir)
    res: dict[str, Any] = {}
    all_ids = np.arange(N, dtype=np.int64)
    loss_all = losses_of(all_ids)
    for scheme in ("shuffled", "contiguous"):
        mine = split(all_ids, rank, world, scheme)
        for strategy in STRATEGIES:
            keys = strategy_keys(
                strategy,
                torch.from_numpy(loss_all[mine]),
                torch.from_numpy(mine),
                seed=11,
                cycle=2,
                temperature=0.5,
            )
            for method in METHODS:
                for k in KS:
                    rep: dict[str, Any] = {}
                    got = select_global(
                        keys, torch.from_numpy(mine), k, method=method, group=group, report=rep
                    )
                    res[f"topk/{scheme}/{strategy}/{method}/{k}"] = got.numpy()
        for method in METHODS:  # all-equal keys: ties everywhere
            for k in (0, 1, 333, 1000):
                keys = torch.ones(len(mine), dtype=torch.float64)
                got = select_global(keys, torch.from_numpy(mine), k, method=method, group=group)
                res[f"equal/{scheme}/{method}/{k}"] = got.numpy()
        rep = {}
        keys = strategy_keys(
            "soft", torch.from_numpy(loss_all[mine]), torch.from_numpy(mine), seed=1, cycle=0
        )
        select_global(keys, torch.from_numpy(mine), 400, method="threshold", group=group, report=rep)
        res[f"report/threshold/{scheme}"] = rep
    try:
        check_agreement(np.array([1, 2, 3 + rank], dtype=np.int64), Comm(group))
        res["mismatch"] = None
    except SelectionMismatchError as exc:
        res["mismatch"] = str(exc)
    res.update(online_scenario(rank, world, group))
    res.update(small_scenarios(rank, world, group))
    res.update(teacher_scenarios(rank, world, group, tmp))
    res.update(checkpoint_scenario(rank, world, group, tmp))
    res.update(stop_scenario(rank, world, group))
    torch.save(res, tmp / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    rank = int(os.environ.get("RANK", "0"))
    run(rank, world, port, out_dir)


if __name__ == "__main__":
    main()
    exit_process(0, group_used=True)  # no C++ teardown after the group (attent_scale.cli.exit_process)
