"""ShardStream: deterministic, rank-balanced, filterable and exactly resumable batches from tar shards.

Epoch plan: which positions of the epoch sequence (the selected ids of the shards, in a seeded shard
order that is the same on every rank) each rank's logical workers emit, in which batch, is the pure
function data/partition.py:partition_epoch of the shards' selected counts, seed, epoch, rank, world size,
batch size, workers, shuffle buffer and `pad` (see there for the rank blocks, the M mod W ids dropped or,
with `pad`, the filler rows). Logical worker w reads only the shards its run of batches touches, and its
shuffle buffer is computed over positions (not contents), so a worker can resume at any batch by reading at
most one buffer of samples. The DataLoader returns batches round-robin from its workers; the main process
tags every batch with its logical worker, so the position (batches consumed per worker, next worker in the
cycle) is exact, and a restored stream rotates the logical workers so the cycle continues where it
stopped. Given a `StreamWorkers` (data/workers.py), a stream iterates through those long-lived worker
processes instead of starting a DataLoader of its own.
"""

from __future__ import annotations

import copy
import os
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from attent_scale.data import remote
from attent_scale.data.manifest import Manifest
from attent_scale.data.partition import FILLER, partition_epoch
from attent_scale.data.samples import RawSample, Sample, decode, read_samples
from attent_scale.data.selection import Selection
from attent_scale.data.workers import StreamWorkers, ignore_stop_signals
from attent_scale.errors import UserError

STATE_VERSION = 1
IGNORE_INDEX = -100
FILLER_ID = -1


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples ({"id": int, "input_ids": [T], "labels": [T]}) into a batch of int64 tensors."""
    ids = torch.tensor([int(s["id"]) for s in samples], dtype=torch.int64)
    inputs = torch.from_numpy(np.stack([np.asarray(s["input_ids"], dtype=np.int64) for s in samples]))
    labels = torch.from_numpy(np.stack([np.asarray(s["labels"], dtype=np.int64) for s in samples]))
    return {"ids": ids, "input_ids": inputs, "labels": labels}


def _selection_bits(selection: Any, manifest: Manifest, split: str) -> Selection | None:
    """The filter as a packed bitset over the split's ids (a Selection), or None for all ids.
    Accepts a Selection (used as is, no copy), a bool array/tensor over all ids, or any object with
    .mask(ids) (asked one aligned block of ids at a time: no N-byte mask is built)."""
    n = manifest.num_samples(split)
    if selection is None:
        return None
    if isinstance(selection, Selection):
        if selection.num_ids != n:
            raise UserError(f"selection: covers {selection.num_ids} ids, expected {n} for {split!r}")
        return selection
    if isinstance(selection, torch.Tensor):
        selection = selection.detach().cpu().numpy()
    if isinstance(selection, np.ndarray):
        if selection.shape != (n,):
            raise UserError(f"selection: array of shape {selection.shape}, expected ({n},) for {split!r}")
        return Selection.from_mask(selection)
    if not hasattr(selection, "mask"):
        raise UserError(f"selection: expected None, a Selection, a bool array/tensor or an object with "
                        f".mask(ids), got {type(selection).__name__}")
    bits = np.zeros((n + 7) // 8, dtype=np.uint8)
    step = 1 << 20
    for a in range(0, n, step):
        ids = np.arange(a, min(n, a + step), dtype=np.int64)
        m = np.asarray(selection.mask(ids), dtype=bool)
        if m.shape != ids.shape:
            raise UserError(f"selection.mask returned shape {m.shape} for {len(ids)} ids")
        packed = np.packbits(m, bitorder="little")
        bits[a // 8:a // 8 + packed.shape[0]] = packed
    return Selection(bits, n)


class _EpochPlan:
    """A rank's epoch partition plus what a worker needs to read it (shard paths, the sample format and the
    selection bits of only the shards it reads): picklable and cheap to copy into workers."""

    def __init__(self, stream: ShardStream) -> None:
        m = stream.manifest
        self.seq_len, self.pad_id, self.vocab_size = m.seq_len, m.pad_id, m.vocab_size
        self.dtype = np.dtype(m.token_dtype)
        # one part per shard of the dataset (a blend: of every source, repeated copies and drawn subsets)
        self.parts = m.parts(stream.split)
        self.firsts = np.array([p.first_id for p in self.parts], dtype=np.int64)
        self.counts = np.array([p.count for p in self.parts], dtype=np.int64)
        self.remote = remote.options()  # a worker process reads URLs the way its rank was told to
        sel = stream._selection
        if sel is None:
            selected = self.counts
        else:
            pairs = zip(self.firsts.tolist(), self.counts.tolist(), strict=True)
            selected = np.array([sel.count_range(f, f + c) for f, c in pairs], dtype=np.int64)
        self.part = partition_epoch(selected, seed=stream.seed, epoch=stream.epoch, rank=stream.rank,
                                    world_size=stream.world_size, batch_size=stream.batch_size,
                                    workers=stream.num_workers, shuffle_buffer=stream.shuffle_buffer,
                                    pad=stream.pad)
        p = self.part
        # the selection's bits of only the shards this rank reads, each re-based to its shard's first id
        self.bits: dict[int, np.ndarray] | None = None
        if sel is not None:
            self.bits = {si: sel.slice_bits(int(self.firsts[si]), int(self.firsts[si] + self.counts[si]))
                         for si in p.shards_in(p.rank_start, p.rank_start + p.real)}

    @property
    def logical_workers(self) -> int:
        return self.part.workers

    def restrict(self, w: int) -> _EpochPlan:
        """A copy that keeps the selection bits of only the shards logical worker w reads."""
        if self.bits is None:
            return self
        a, _, real = self.part.worker_span(w)
        start = self.part.rank_start + a
        out = copy.copy(self)
        out.bits = {si: self.bits[si] for si in self.part.shards_in(start, start + real)}
        return out

    def run(self, done_batches: Sequence[int], w: int) -> Iterator[dict[str, Any]]:
        """Logical worker w's batches after `done_batches[w]` (what a StreamWorkers process yields)."""
        return _EpochDataset(self, done_batches, 0)._worker(w)

    @property
    def selection_nbytes(self) -> int:
        """Bytes of selection bits this plan holds."""
        return sum(v.nbytes for v in self.bits.values()) if self.bits is not None else 0

    def segments(self, a: int, b: int) -> list[tuple[int, np.ndarray]]:
        """(shard index, ids) runs covering positions [a, b) of the epoch sequence, in order."""
        out = []
        for si, k0, k1 in self.part.runs(a, b):
            f, c = int(self.firsts[si]), int(self.counts[si])
            if self.bits is None:
                ids = np.arange(f + k0, f + k1, dtype=np.int64)
            else:
                m = np.unpackbits(self.bits[si], count=c, bitorder="little")
                ids = (np.flatnonzero(m) + f)[k0:k1].astype(np.int64)
            out.append((si, ids))
        return out

    def worker_segments(self, w: int) -> list[tuple[int, np.ndarray]]:
        """The (shard index, ids) runs of logical worker w's span, by local position (its filler rows, if
        any, come after them)."""
        a, _, real = self.part.worker_span(w)
        start = self.part.rank_start + a
        return self.segments(start, start + real)


class _WorkerState:
    def __init__(self) -> None:
        self.warned: set[str] = set()
        self.unreachable: list[str] = []  # one line per shard URL given up on since the last batch

    def warn(self, shard: str, why: str) -> None:
        shard = remote.redact(shard)
        if shard not in self.warned:
            self.warned.add(shard)
            warnings.warn(f"{shard}: {why}; its unreadable samples are replaced by filler", stacklevel=2)

    def take_unreachable(self) -> list[str]:
        out, self.unreachable = self.unreachable, []
        return out


def _decode(raw: RawSample, plan: _EpochPlan) -> Sample | str:
    """The sample (tokens, optional loss mask) or why it does not decode: the one rule of data/samples."""
    return decode(raw, plan.dtype, plan.seq_len, plan.vocab_size)


def _read_positions(
    plan: _EpochPlan, segs: list[tuple[int, np.ndarray]], needed: np.ndarray, ws: _WorkerState
) -> Iterator[tuple[int, Sample | None]]:
    """Yield (position, sample or None) once for every needed position, reading shards in order."""
    base = 0
    for si, ids in segs:
        lo, hi = base, base + len(ids)
        base = hi
        want = needed[lo:hi]
        if not want.any():
            continue
        part = plan.parts[si]
        path = part.location
        local = part.local_ids(ids)  # the keys the shard's samples carry (a blend's ids are offset)
        done = np.zeros(len(ids), dtype=bool)
        remaining = int(want.sum())
        try:
            with remote.open_shard(path, part.bytes, part.sha256) as f:
                for raw in read_samples(f):
                    sid = raw.id
                    if sid is None:
                        ws.warn(path, f"bad sample key {raw.key!r}")
                        continue
                    j = int(np.searchsorted(local, sid))
                    if j >= len(ids) or local[j] != sid or done[j] or not want[j]:
                        continue
                    done[j] = True
                    remaining -= 1
                    sample = _decode(raw, plan)
                    if isinstance(sample, str):
                        ws.warn(path, f"sample {raw.key} does not decode ({sample})")
                        sample = None
                    yield lo + j, sample
                    if remaining == 0:
                        break
        except remote.Unreachable as exc:  # the rank decides (train.py: stop every rank, or skip)
            ws.unreachable.append(str(exc))
            ws.warn(path, f"unreachable after {exc.attempts} attempt(s)")
        except (OSError, tarfile.TarError, EOFError, ValueError) as exc:
            ws.warn(path, remote.redact(f"unreadable shard ({type(exc).__name__}: {exc})"))
        if remaining:
            ws.warn(path, f"{remaining} sample(s) missing or unreadable")
            for j in np.flatnonzero(want & ~done):
                yield lo + int(j), None


class _EpochDataset(IterableDataset):
    """The per-rank iterable a DataLoader runs; each (logical) worker yields its run of batches."""

    def __init__(self, plan: _EpochPlan, done_batches: list[int], rotation: int) -> None:
        super().__init__()
        self.plan, self.done_batches, self.rotation = plan, list(done_batches), rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is None and self.plan.logical_workers > 1:
            raise RuntimeError("_EpochDataset with several logical workers runs inside a DataLoader")
        w = (physical + self.rotation) % self.plan.logical_workers
        if info is not None:  # a DataLoader worker keeps only its own shards' selection bits
            self.plan = self.plan.restrict(w)
        yield from self._worker(w)

    def _worker(self, w: int) -> Iterator[dict[str, Any]]:
        p = self.plan
        remote.configure(p.remote)
        _, n, _ = p.part.worker_span(w)
        skip = self.done_batches[w] * p.part.batch_size
        if n <= 0 or skip >= n:
            return
        order = p.part.emission(w)
        segs = p.worker_segments(w)
        ids = np.concatenate([s[1] for s in segs]) if segs else np.zeros(0, dtype=np.int64)
        needed = np.zeros(n, dtype=bool)
        needed[order[skip:]] = True
        needed[len(ids):] = False  # padding positions (a padded stream's shorter blocks) are never read
        ws = _WorkerState()
        reader = _read_positions(p, segs, needed, ws)
        pending: dict[int, Sample | None] = {}
        t = p.seq_len
        for t0 in range(skip, n, p.part.batch_size):
            rows = order[t0 : t0 + p.part.batch_size]
            # one int64 block per batch [B, 1 + 2T] = id | input_ids | labels: one shared-memory
            # transfer per batch from a worker instead of three
            packed = np.empty((len(rows), 1 + 2 * t), dtype=np.int64)
            packed[:, 1 : t + 1] = p.pad_id
            packed[:, t + 1 :] = IGNORE_INDEX
            bad: list[int] = []  # ids of the samples replaced by filler
            for row, pos in enumerate(rows):
                pos = int(pos)
                if pos >= len(ids):  # padding: a filler row without targets, not a fault
                    packed[row, 0] = FILLER_ID
                    continue
                while pos not in pending:
                    q, window = next(reader)
                    pending[q] = window
                window = pending.pop(pos)
                if window is None:
                    bad.append(int(ids[pos]))
                    packed[row, 0] = FILLER_ID
                    continue
                k = len(window.tokens) - 1
                packed[row, 0] = ids[pos]
                packed[row, 1 : 1 + k] = window.inputs
                packed[row, t + 1 : t + 1 + k] = window.labels  # -100 where a loss mask says so
            yield {"packed": torch.from_numpy(packed), "_worker": w, "_bad": np.array(bad, dtype=np.int64),
                   "_remote": remote.take_stats(), "_unreachable": ws.take_unreachable()}


def _unpack(packed: torch.Tensor, seq_len: int) -> dict[str, torch.Tensor]:
    return {
        "ids": packed[:, 0].contiguous(),
        "input_ids": packed[:, 1 : seq_len + 1].contiguous(),
        "labels": packed[:, seq_len + 1 :].contiguous(),
    }


class ShardStream:
    """Batches of one split for one rank; see the module docstring for the guarantees."""

    def __init__(
        self,
        manifest_dir: str | Path | Any,
        split: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        batch_size: int = 1,
        selection: Any = None,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        workers: StreamWorkers | None = None,
        pad: bool = False,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
        if batch_size < 1:
            raise UserError(f"batch_size {batch_size}: must be at least 1")
        if shuffle_buffer < 0 or num_workers < 0:
            raise UserError("shuffle_buffer and num_workers must be >= 0")
        if epoch < 0:
            raise UserError(f"epoch {epoch}: must be >= 0")
        if workers is not None and workers.num_workers != num_workers:
            raise UserError(f"workers: {workers.num_workers} processes, but num_workers is {num_workers}")
        # a directory, or a dataset already opened (a Manifest, or a data/blend.Blend of several)
        opened = not isinstance(manifest_dir, (str, os.PathLike))
        self.manifest = manifest_dir if opened else Manifest.load(manifest_dir)
        self.split = split
        self.manifest.parts(split)  # UserError naming the manifest when the split does not exist
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batch_size, self.shuffle_buffer, self.num_workers = batch_size, shuffle_buffer, num_workers
        # pad: no id dropped for rank equalisation; blocks differ by at most one id and the shorter ones
        # get one filler row (the remainder of an epoch resumed on another world size)
        self.pad = pad
        self._workers = workers  # shared, run-long worker processes; None: a DataLoader per iteration
        # held for re-planning other epochs (the caller's object, not a copy); plans and workers get
        # only their shards' slices of it
        self._selection = _selection_bits(selection, self.manifest, split)
        self.selection_sha256 = "all" if self._selection is None else self._selection.sha256
        # a weighted selection (unbiased pruning) puts per-sample loss weights into every batch
        self._weigh = selection.sample_weights if getattr(selection, "weighted", False) else None
        self.epoch = epoch
        self._plan = _EpochPlan(self)
        self._reset_position()

    # ---- plan and position ------------------------------------------------------------------------
    def _reset_position(self) -> None:
        self.worker_batches = [0] * self._plan.logical_workers
        self.next_worker = 0
        self.batches_consumed = 0
        self.samples_consumed = 0
        self.faults = 0
        self._bad_ids: list[int] = []
        self._unreachable: list[str] = []
        self._finished = False

    def set_epoch(self, epoch: int) -> None:
        """Re-plan for another epoch and rewind to its start."""
        self.epoch = epoch
        self._plan = _EpochPlan(self)
        self._reset_position()

    @property
    def selected(self) -> int:
        """Ids in this epoch's sequence before equalisation (all ranks)."""
        return self._plan.part.total

    @property
    def samples_per_rank(self) -> int:
        return self._plan.part.per

    @property
    def dropped(self) -> int:
        """Samples of the epoch no rank yields (the last M mod world_size of the epoch sequence)."""
        return self._plan.part.dropped

    def __len__(self) -> int:
        return self._plan.part.num_batches

    def epoch_ids(self) -> np.ndarray:
        """This rank's ids for the epoch as a set (sorted), without reading shards."""
        p = self._plan.part
        segs = self._plan.segments(p.rank_start, p.rank_start + p.real)
        return np.sort(np.concatenate([s[1] for s in segs])) if segs else np.zeros(0, dtype=np.int64)

    # ---- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._finished:
            self._reset_position()  # an epoch this object ran to its end iterates again from its start
        nw = self.num_workers
        batches: Any
        if self._workers is not None:
            batches = self._workers.iterate(self._plan, self.worker_batches, self.next_worker)
        else:
            dataset = _EpochDataset(self._plan, self.worker_batches, self.next_worker)
            if nw == 0:
                batches = dataset._worker(0)
            else:
                batches = DataLoader(dataset, batch_size=None, num_workers=nw, persistent_workers=False,
                                     worker_init_fn=ignore_stop_signals)
        lw = self._plan.logical_workers
        t = self.manifest.seq_len
        for item in batches:
            w = int(item["_worker"])
            bad = np.asarray(item["_bad"]).tolist()
            self.faults += len(bad)
            self._bad_ids += bad
            remote.add_stats(item.get("_remote") or {})  # a worker's retries and downloads, counted here
            self._unreachable += list(item.get("_unreachable") or ())
            batch = _unpack(item["packed"], t)
            if self._weigh is not None:
                batch["weights"] = self._weigh(batch["ids"])
            self.worker_batches[w] += 1
            self.next_worker = (w + 1) % lw
            self.batches_consumed += 1
            self.samples_consumed += len(batch["ids"])
            yield batch
        self._finished = True

    def take_unreachable(self) -> list[str]:
        """One line per shard URL given up on after the retries since the last call (its samples are among
        the bad ids)."""
        out, self._unreachable = self._unreachable, []
        return out

    def take_bad_ids(self) -> list[int]:
        """Ids of the samples replaced by filler since the last call (corrupt or missing in their shard)."""
        bad, self._bad_ids = self._bad_ids, []
        return bad

    # ---- resume -----------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        shard_hash = self.manifest.fingerprint(self.split)
        return {
            "split": self.split,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer,
            "num_workers": self.num_workers,
            "shards_sha256": shard_hash,
            "selection_sha256": self.selection_sha256,
            **({"pad": True} if self.pad else {}),
        }

    def state_dict(self) -> dict[str, Any]:
        """The exact position: restore with `load_state_dict` on a stream built with the same arguments."""
        return {
            "version": STATE_VERSION,
            **self._identity(),
            "epoch": self.epoch,
            "worker_batches": list(self.worker_batches),
            "next_worker": self.next_worker,
            "batches_consumed": self.batches_consumed,
            "samples_consumed": self.samples_consumed,
            "faults": self.faults,
        }

    def remaining_ids(self) -> np.ndarray:
        """Ids of this rank's epoch block not yielded yet (after `load_state_dict`: what the saved stream
        still owes), in no particular order; O(samples per rank), without reading shards. A resume on
        another world size gathers these over the old ranks (attent_scale/elastic.py)."""
        p = self._plan
        out = []
        for w in range(p.part.workers):
            rest = p.part.worker_positions(w, self.worker_batches[w])  # what _EpochDataset._worker emits
            rest = rest[rest != FILLER]
            if not len(rest):
                continue
            segs = p.worker_segments(w)
            ids = np.concatenate([s[1] for s in segs])
            out.append(ids[rest - (p.part.rank_start + p.part.worker_span(w)[0])])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the saved stream was (its epoch included)."""
        if state.get("version") != STATE_VERSION:
            raise UserError(f"stream state version {state.get('version')!r}: expected {STATE_VERSION}")
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise UserError(f"stream state {key}={state.get(key)!r} differs from {value!r}")
        if int(state["epoch"]) != self.epoch:
            self.set_epoch(int(state["epoch"]))
        wb = [int(x) for x in state["worker_batches"]]
        if len(wb) != self._plan.logical_workers:
            raise UserError(f"stream state worker_batches has {len(wb)} entries")
        self.worker_batches = wb
        self.next_worker = int(state["next_worker"])
        self.batches_consumed = int(state["batches_consumed"])
        self.samples_consumed = int(state["samples_consumed"])
        self.faults = int(state["faults"])
