"""Resume: the newest undamaged checkpoint in run_dir, checked against this run's config and loaded on the
same number of ranks or another (elastic: re-blocked ledger, the interrupted epoch's owed ids, per-rank
totals kept), with the one "resumed from" line: one call from the trainer."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
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

# config keys a checkpoint must agree on to be resumed (dotted prefixes)
RESUME_KEYS = ("seed", "model", "engine.name", "teacher.mode", "data.train_split", "data.blend_samples")
# per-rank counters summed over ranks in the totals (entry, key): old rank r's go to new rank r mod W', then
# the sums are spread evenly (rank 0's count x W' stays the job's count in the logs)
SPREAD = (("progress", "samples_trained"), ("progress", "tokens_trained"), ("faults", "corrupt_samples"))


@dataclass(frozen=True)
class Resumed:
    """A checkpoint a run resumed from: its path, the world size that wrote it, and the stream position of
    the epoch it interrupted (None: the run goes on at an epoch's start)."""

    path: Path
    old_world: int
    stream: dict[str, Any] | None


def resume(run_dir: Path, *, rank: int, world: int, group: Any, engine: Any, session: Any,
           parts: Mapping[str, Any], config: dict[str, Any], data: Any, split: str) -> Resumed | None:
    """Collective: load the newest checkpoint in `run_dir` every rank finds whole (a newer damaged one is
    skipped with a warning): refused in one line when it was written under another model, engine, teacher
    mode, seed or split (`config`: this run's, as config_to_dict gives it); the engine, the teacher
    `session` (teacher and selection) and the RNG restored, and each of `parts` (checkpoint entry name ->
    an object with `load_state_dict`) its own entry, on this world size or another. Rank 0 prints what the
    run continues from. None when there is no checkpoint."""
    num_ids = session.num_samples
    def verify(p: Path) -> str | None:
        return _verify(p, engine, rank=rank, world=world, num_ids=num_ids)

    path, skipped = ckpt.find_checkpoint(run_dir, verify, rank=rank, group=group)
    if path is None:
        return None
    if skipped and rank == 0:
        print(f"attent-scale: warning: skipped damaged checkpoint(s) {'; '.join(skipped)}; "
              f"resuming from {path.name}", file=sys.stderr)
    check_resumable(path, config, num_ids)
    old_world = ckpt.saved_world(path)
    try:
        if old_world == world:
            state = ckpt.load_checkpoint(path, engine, rank=rank, world_size=world)
            session.load_state_dict(state)
        else:
            state = load_elastic(path, engine=engine, session=session, rank=rank, world=world, group=group,
                                 data=data, split=split)
    except UserError:
        raise
    except ValueError as exc:  # a state that does not fit this run (teacher, stream)
        raise UserError(f"checkpoint {path}: {exc}") from None
    ckpt.set_rng_state(state["rng"])
    for name, part in parts.items():
        part.load_state_dict(state.get(name) or {})
    if rank == 0:
        line = resume_line(path, state["progress"], session, state["stream"], world, old_world)
        print(line, file=sys.stderr)
    return Resumed(path, old_world, state["stream"])


def _verify(path: Path, engine: Any, *, rank: int, world: int, num_ids: int) -> str | None:
    """The first problem with the files of checkpoint `path` this rank reads (None: they look whole)."""
    try:
        old_world = ckpt.saved_world(path)
    except (OSError, ValueError, KeyError):
        return "COMPLETE unreadable"
    ranks = [rank] if old_world == world else ranks_read(rank, world, old_world, num_ids)
    return ckpt.check_rank_files(path, ranks) or engine.verify(path, "engine")


def check_resumable(path: Path, config: dict[str, Any], n_train: int) -> None:
    """A checkpoint written under another model, engine, teacher mode, seed or split: one line naming the
    changed keys (every rank reads the same file, so every rank raises together)."""
    from attent_scale.data.blend import blend_layout_changes

    saved = ckpt.saved_config(path)
    if saved is None:
        return
    changed = ckpt.changed_keys(saved, config, RESUME_KEYS) + blend_layout_changes(saved, config)
    changed += ckpt.data_changes(path, saved, config, n_train)
    if changed:
        raise UserError(f"checkpoint {path}: resume refused, changed since it was written: "
                        f"{'; '.join(changed)} (use another run_dir, or checkpoint.resume=false)")


def resume_line(path: Path, progress: Mapping[str, Any], session: Any, stream: dict[str, Any] | None,
                world: int, old_world: int) -> str:
    """One line saying what a resumed run continues from."""
    from attent_scale.teacher import Selection

    n, state, epoch = session.num_samples, session.state, int(progress["epoch"])
    if state.bits is None:
        chosen = f"full data (ratio {state.ratio:.3g})"
    else:
        sel = Selection(state.bits, n)
        chosen = f"selection sha256 {sel.sha256} ({sel.count} ids, ratio {state.ratio:.3g})"
    where = "at its start"
    if stream is not None:
        where = f"after {stream['batches_consumed']} of its batches"
    elif state.remainder_due(epoch):
        where = f"with {Selection(state.remainder_bits, n).count} ids still owed"
    if old_world != world:
        where += f", written on {old_world} ranks, continued on {world}"
    samples = int(progress["samples_trained"]) * world  # equal shares on every rank
    return (f"attent-scale: resumed from {path} (step {progress['step']}, {samples} samples trained, "
            f"epoch {epoch} {where}, {chosen})")


# ---------------------------------------------------------------------------------------- elastic


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
               data: Any, split: str, num_ids: int, old_world: int, group: Any) -> np.ndarray:
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
        old = ShardStream(data, split, rank=r, world_size=old_world, seed=int(st["seed"]), epoch=epoch,
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


def load_elastic(path: Path, *, engine: Any, session: Any, rank: int, world: int, group: Any, data: Any,
                 split: str) -> dict[str, Any]:
    """Collective: restore a checkpoint written on another number of ranks. The engine reshards (or
    refuses in one line), the teacher re-blocks its ledger, per-rank counters keep their totals, and the
    interrupted epoch's position becomes the set of ids it still owes (selection `remainder_bits` for
    `remainder_epoch`), each trained once over this job's ranks (a padded stream: none dropped). Returns
    this rank's state (the entries of train_state.upgrade_state, the teacher's loaded already)."""
    old_world = ckpt.saved_world(path)
    num_ids = session.num_samples
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
    state = {k: ckpt.materialize(v) for k, v in base.items() if k != "teacher"}
    stream_state = state["stream"]
    folded = [sum(int(peers[r][entry][key]) for r in fold) for entry, key in SPREAD]
    if stream_state is not None:  # faults the old streams met this epoch, counted at its end
        folded[SPREAD.index(("faults", "corrupt_samples"))] += sum(int(peers[r]["stream"]["faults"])
                                                                  for r in fold)
    totals = all_reduce_values([int(v) for v in folded], "sum", group)
    for (entry, key), total in zip(SPREAD, totals, strict=True):
        state[entry][key] = total // world + (1 if rank < total % world else 0)
    state["faults"]["corrupt_ids"] = sorted({int(i) for r in fold for i in peers[r]["faults"]["corrupt_ids"]})
    if stream_state is not None:
        owed = _owed_bits(peers, fold, state["selection"], int(stream_state["epoch"]), data=data,
                          split=split, num_ids=num_ids, old_world=old_world, group=group)
        state["selection"]["remainder_bits"] = owed
        state["selection"]["remainder_epoch"] = int(stream_state["epoch"])
        state["stream"] = None
    if rank >= old_world:
        state["logs"] = {k: 0 for k in state["logs"]}
    teacher_state = ckpt.materialize({k: v for k, v in base["teacher"].items() if k != "ledger"})
    session.load_state_dict({"teacher": teacher_state, "selection": state["selection"],
                             "tokens": state.get("tokens")},  # teacher.unit token: global counts
                            peers={r: p["teacher"] for r, p in peers.items()})
    return state
