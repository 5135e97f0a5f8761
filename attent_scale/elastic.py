"""Elastic resume: the per-rank state of a checkpoint written on W ranks, re-cut for a job of W' ranks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from attent_scale import checkpoint as ckpt
from attent_scale.dist import all_reduce_values, group_size
from attent_scale.errors import UserError
from attent_scale.teacher.ledger import block_len, block_range
from attent_scale.train_state import upgrade_state

# Progress counters that are per rank and summed over ranks in the totals: old rank r's go to new rank
# r mod W', then the sums are spread evenly (rank 0's count x W' stays the job's count in the logs)
SPREAD = ("samples_trained", "tokens_trained", "corrupt_samples")


def ranks_read(rank: int, world: int, old_world: int, num_ids: int) -> list[int]:
    """The old ranks whose state files new rank `rank` reads: its base (the same rank, or 0 when the old
    job was smaller), the ranks folded onto it (r mod world == rank) and the owners of the old ledger
    blocks that overlap its new one: O(old_world / world + 2) files, O(N / world) ledger entries."""
    base = rank if rank < old_world else 0
    fold = range(rank, old_world, world)
    lo, hi = block_range(rank, num_ids, world)
    step = block_len(num_ids, old_world)
    owners = range(lo // step, min(old_world, -(-hi // step))) if hi > lo else range(0)
    return sorted({base, *fold, *owners})


def _owed_bits(peers: dict[int, dict[str, Any]], fold: list[int], selected: dict[str, Any], epoch: int, *,
               data_dir: str | Path | Any, split: str, num_ids: int, old_world: int,
               group: Any) -> np.ndarray:
    """Collective: the packed ids (N bits) that the interrupted epoch still owes, over all old ranks.
    Each new rank replays the saved stream positions of the old ranks folded onto it (the epoch plan
    is a pure function of seed, epoch, rank and world), then one bitwise-or all-reduce joins them."""
    from attent_scale.data import ShardStream
    from attent_scale.teacher import Selection

    bits = selected["bits"]
    if selected.get("remainder_bits") is not None and selected.get("remainder_epoch") == epoch:
        bits = selected["remainder_bits"]  # the interrupted epoch was itself a remainder
    selection = None if bits is None else Selection(np.asarray(bits), num_ids)
    owed = np.zeros((num_ids + 7) // 8, dtype=np.uint8)
    for r in fold:
        st = peers[r]["stream"]
        old = ShardStream(data_dir, split, rank=r, world_size=old_world, seed=int(st["seed"]), epoch=epoch,
                          batch_size=int(st["batch_size"]), selection=selection,
                          shuffle_buffer=int(st["shuffle_buffer"]), num_workers=int(st["num_workers"]),
                          pad=bool(st.get("pad", False)))
        old.load_state_dict(st)
        ids = old.remaining_ids()
        np.bitwise_or.at(owed, ids >> 3, np.left_shift(1, ids & 7).astype(np.uint8))
    t = torch.from_numpy(owed)
    if group_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.BOR, group=group)
    return t.numpy()


def load_elastic(path: Path, *, engine: Any, teacher: Any, rank: int, world: int, group: Any,
                 data_dir: str | Path | Any, split: str, num_ids: int) -> dict[str, Any]:
    """Collective: restore a checkpoint written on another number of ranks. The engine reshards (or
    refuses in one line), the teacher re-blocks its ledger, per-rank counters keep their totals, and the
    interrupted epoch's position becomes the set of ids it still owes (selection `remainder_bits` for
    `remainder_epoch`), each trained once over this job's ranks (a padded stream: none dropped). Returns
    this rank's state (the entries of train_state.upgrade_state, less "teacher", plus "old_world")."""
    old_world = ckpt.saved_world(path)
    if not getattr(engine, "can_reshard", False):
        raise UserError(
            f"checkpoint {path}: written by {old_world} ranks, this job has {world}; a DeepSpeed ZeRO "
            f"checkpoint resumes only on the world size that wrote it: run on {old_world} ranks (DeepSpeed's "
            f"`python -m deepspeed.checkpoint.ds_to_universal --input_folder {path / 'engine'} "
            "--output_folder DIR` converts it to a universal checkpoint; attent-scale does not load those)")
    engine.load(path, "engine")
    peers = {r: upgrade_state(ckpt.load_state(path / f"rank-{r:05d}", lazy=True)) for r in
             ranks_read(rank, world, old_world, num_ids)}
    base = peers[rank if rank < old_world else 0]
    fold = sorted(r for r in peers if r % world == rank)
    teacher_state = {k: v for k, v in base["teacher"].items() if k != "ledger"}
    teacher.load_state_dict(ckpt.materialize(teacher_state),
                            peers={r: p["teacher"] for r, p in peers.items()})
    state = {k: ckpt.materialize(v) for k, v in base.items() if k != "teacher"}
    progress, stream_state = state["progress"], state["stream"]
    folded = [sum(int(peers[r]["progress"][k]) for r in fold) for k in SPREAD]
    if stream_state is not None:  # faults the old streams met this epoch, counted at its end
        folded[SPREAD.index("corrupt_samples")] += sum(int(peers[r]["stream"]["faults"]) for r in fold)
    totals = all_reduce_values([int(v) for v in folded], "sum", group)
    for key, total in zip(SPREAD, totals, strict=True):
        progress[key] = total // world + (1 if rank < total % world else 0)
    progress["corrupt_ids"] = sorted({int(i) for r in fold for i in peers[r]["progress"]["corrupt_ids"]})
    if stream_state is not None:
        owed = _owed_bits(peers, fold, state["selection"], int(stream_state["epoch"]), data_dir=data_dir,
                          split=split, num_ids=num_ids, old_world=old_world, group=group)
        state["selection"]["remainder_bits"] = owed
        state["selection"]["remainder_epoch"] = int(stream_state["epoch"])
        state["stream"] = None
    if rank >= old_world:
        state["logs"] = {k: 0 for k in state["logs"]}
    return {**state, "old_world": old_world}
