"""ShardStream: deterministic, rank-balanced, filterable and exactly resumable batches from tar shards.

Epoch plan (a pure function of manifest, selection, seed, epoch, world size): shards are shuffled with a
generator seeded by (seed, epoch) - the same order on every rank - and the selected ids of the shards, in
that order, form the epoch sequence of M ids. Rank r takes the contiguous block
[r * (M // W), (r + 1) * (M // W)); the last M mod W ids are dropped (counted in `dropped`). The rank's
block is cut into ceil(per / B) batches (with `pad`, nothing is dropped: blocks of floor or ceil M / W ids,
the shorter ones padded by one filler row); logical worker w takes a contiguous run of whole batches, reads
only the shards its run touches, and emits its samples in the order of a seeded shuffle buffer that is
computed over positions (not contents), so a worker can resume at any batch by reading at most one buffer
of samples. The DataLoader returns batches round-robin from its workers; the main process tags every
batch with its logical worker, so the position (batches consumed per worker, next worker in the cycle) is
exact, and a restored stream rotates the logical workers so the cycle continues where it stopped. Given a
`StreamWorkers` (data/workers.py), a stream iterates through those long-lived worker processes instead of
starting a DataLoader of its own.
"""

from __future__ import annotations

import copy
import hashlib
import signal
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from attent_scale.data.manifest import Manifest
from attent_scale.data.samples import RawSample, Sample, decode, read_samples
from attent_scale.errors import UserError

if TYPE_CHECKING:
    from attent_scale.data.workers import StreamWorkers

STATE_VERSION = 1
IGNORE_INDEX = -100
FILLER_ID = -1


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples ({"id": int, "input_ids": [T], "labels": [T]}) into a batch of int64 tensors."""
    ids = torch.tensor([int(s["id"]) for s in samples], dtype=torch.int64)
    inputs = torch.from_numpy(np.stack([np.asarray(s["input_ids"], dtype=np.int64) for s in samples]))
    labels = torch.from_numpy(np.stack([np.asarray(s["labels"], dtype=np.int64) for s in samples]))
    return {"ids": ids, "input_ids": inputs, "labels": labels}


def buffer_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The emission order of a shuffle buffer of size `buffer` fed positions 0..n-1 (a permutation)."""
    if buffer <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    draws = rng.random(n)
    out = np.empty(n, dtype=np.int64)
    buf: list[int] = []
    j = 0
    for i in range(n):
        buf.append(i)
        if len(buf) >= buffer:
            k = int(draws[j] * len(buf))
            out[j] = buf[k]
            buf[k] = buf[-1]
            buf.pop()
            j += 1
    while buf:
        k = int(draws[j] * len(buf))
        out[j] = buf[k]
        buf[k] = buf[-1]
        buf.pop()
        j += 1
    return out


def _selection_bits(selection: Any, manifest: Manifest, split: str) -> Any:
    """The filter as a packed bitset over the split's ids (teacher.Selection), or None for all ids.
    Accepts a Selection (used as is, no copy), a bool array/tensor over all ids, or any object with
    .mask(ids) (asked one aligned block of ids at a time: no N-byte mask is built)."""
    from attent_scale.teacher.selection import Selection

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
    """Everything a worker needs for one (epoch, rank): picklable and cheap to copy into workers."""

    def __init__(self, stream: ShardStream) -> None:
        m = stream.manifest
        self.dir = str(m.dir)
        self.seq_len, self.pad_id, self.vocab_size = m.seq_len, m.pad_id, m.vocab_size
        self.dtype = np.dtype(m.token_dtype)
        shards = m.shards(stream.split)
        self.names = [s.name for s in shards]
        self.firsts = np.array([s.first_id for s in shards], dtype=np.int64)
        self.counts = np.array([s.count for s in shards], dtype=np.int64)
        sel = stream._selection
        if sel is None:
            self.sel_counts = self.counts.copy()
        else:
            pairs = zip(self.firsts.tolist(), self.counts.tolist(), strict=True)
            self.sel_counts = np.array([sel.count_range(f, f + c) for f, c in pairs], dtype=np.int64)
        rng = np.random.default_rng([stream.seed, stream.epoch, 0x5EED])
        self.order = rng.permutation(len(shards)) if len(shards) else np.zeros(0, dtype=np.int64)
        self.seg_starts = np.concatenate([[0], np.cumsum(self.sel_counts[self.order])]).astype(np.int64)
        self.total = int(self.seg_starts[-1])
        w = stream.world_size
        self.per = self.total // w
        self.dropped = self.total - self.per * w
        self.rank_start = stream.rank * self.per
        self.real = self.per  # positions of the rank's block that hold ids; the rest are filler rows
        if stream.pad:  # nothing dropped: balanced blocks, the shorter ones get one filler row
            self.per, self.dropped = -(-self.total // w), 0
            self.rank_start = stream.rank * self.total // w
            self.real = (stream.rank + 1) * self.total // w - self.rank_start
        self.batch_size = stream.batch_size
        self.num_batches = -(-self.per // self.batch_size)
        self.logical_workers = max(1, stream.num_workers)
        self.shuffle_buffer = stream.shuffle_buffer
        self.seed, self.epoch, self.rank = stream.seed, stream.epoch, stream.rank
        # the selection's bits of only the shards this rank reads, each re-based to its shard's first id
        self.bits: dict[int, np.ndarray] | None = None
        if sel is not None:
            self.bits = {si: sel.slice_bits(int(self.firsts[si]), int(self.firsts[si] + self.counts[si]))
                         for si in self._shards_in(self.rank_start, self.rank_start + self.real)}

    def _shards_in(self, a: int, b: int) -> list[int]:
        """Indices of the shards holding positions [a, b) of the epoch sequence."""
        if a >= b:
            return []
        k0 = int(np.searchsorted(self.seg_starts, a, side="right")) - 1
        k1 = int(np.searchsorted(self.seg_starts, b, side="left"))
        return [int(si) for k, si in enumerate(self.order[k0:k1], k0)
                if self.seg_starts[k] < self.seg_starts[k + 1]]

    def restrict(self, w: int) -> _EpochPlan:
        """A copy that keeps the selection bits of only the shards logical worker w reads."""
        if self.bits is None:
            return self
        b0, b1 = self.worker_batches(w)
        a = self.rank_start + b0 * self.batch_size
        b = self.rank_start + min(b1 * self.batch_size, self.real)
        out = copy.copy(self)
        out.bits = {si: self.bits[si] for si in self._shards_in(a, b)}
        return out

    @property
    def selection_nbytes(self) -> int:
        """Bytes of selection bits this plan holds."""
        return sum(v.nbytes for v in self.bits.values()) if self.bits is not None else 0

    def worker_batches(self, w: int) -> tuple[int, int]:
        """Batch range [b0, b1) of the rank's batches that logical worker w produces."""
        nb, lw = self.num_batches, self.logical_workers
        return w * nb // lw, (w + 1) * nb // lw

    def segments(self, a: int, b: int) -> list[tuple[int, np.ndarray]]:
        """(shard index, ids) runs covering positions [a, b) of the epoch sequence, in order."""
        out = []
        for k, si in enumerate(self.order):
            s0, s1 = int(self.seg_starts[k]), int(self.seg_starts[k + 1])
            lo, hi = max(a, s0), min(b, s1)
            if lo >= hi:
                continue
            f, c = int(self.firsts[si]), int(self.counts[si])
            if self.bits is None:
                ids = np.arange(f + lo - s0, f + hi - s0, dtype=np.int64)
            else:
                m = np.unpackbits(self.bits[int(si)], count=c, bitorder="little")
                ids = (np.flatnonzero(m) + f)[lo - s0 : hi - s0].astype(np.int64)
            out.append((int(si), ids))
        return out


class _WorkerState:
    def __init__(self) -> None:
        self.warned: set[str] = set()

    def warn(self, shard: str, why: str) -> None:
        if shard not in self.warned:
            self.warned.add(shard)
            warnings.warn(f"{shard}: {why}; its unreadable samples are replaced by filler", stacklevel=2)


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
        path = str(Path(plan.dir) / plan.names[si])
        done = np.zeros(len(ids), dtype=bool)
        remaining = int(want.sum())
        try:
            with open(path, "rb") as f:
                for raw in read_samples(f):
                    sid = raw.id
                    if sid is None:
                        ws.warn(path, f"bad sample key {raw.key!r}")
                        continue
                    j = int(np.searchsorted(ids, sid))
                    if j >= len(ids) or ids[j] != sid or done[j] or not want[j]:
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
        except (OSError, tarfile.TarError, EOFError, ValueError) as exc:
            ws.warn(path, f"unreadable shard ({type(exc).__name__}: {exc})")
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
        b0, b1 = p.worker_batches(w)
        a = b0 * p.batch_size
        b = min(b1 * p.batch_size, p.per)
        n = b - a
        skip = self.done_batches[w] * p.batch_size
        if n <= 0 or skip >= n:
            return
        rng = np.random.default_rng([p.seed, p.epoch, p.rank, w, 0xB0F])
        order = buffer_order(n, p.shuffle_buffer, rng)
        segs = p.segments(p.rank_start + a, p.rank_start + max(a, min(b, p.real)))
        ids = np.concatenate([s[1] for s in segs]) if segs else np.zeros(0, dtype=np.int64)
        needed = np.zeros(n, dtype=bool)
        needed[order[skip:]] = True
        needed[len(ids):] = False  # padding positions (a padded stream's shorter blocks) are never read
        ws = _WorkerState()
        reader = _read_positions(p, segs, needed, ws)
        pending: dict[int, Sample | None] = {}
        t = p.seq_len
        for t0 in range(skip, n, p.batch_size):
            rows = order[t0 : t0 + p.batch_size]
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
            yield {"packed": torch.from_numpy(packed), "_worker": w, "_bad": np.array(bad, dtype=np.int64)}


def _unpack(packed: torch.Tensor, seq_len: int) -> dict[str, torch.Tensor]:
    return {
        "ids": packed[:, 0].contiguous(),
        "input_ids": packed[:, 1 : seq_len + 1].contiguous(),
        "labels": packed[:, seq_len + 1 :].contiguous(),
    }


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers ignore stop signals: torchrun and Slurm signal the rank's whole process group,
    and a worker that died of it would fail the rank before it can write its checkpoint. The rank
    decides; its workers exit when it closes the loader (or when it dies: they watch their parent)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class ShardStream:
    """Batches of one split for one rank; see the module docstring for the guarantees."""

    def __init__(
        self,
        manifest_dir: str | Path,
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
        self.manifest = Manifest.load(manifest_dir)
        self.split = split
        self.manifest.shards(split)
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
        self._finished = False

    def set_epoch(self, epoch: int) -> None:
        """Re-plan for another epoch and rewind to its start."""
        self.epoch = epoch
        self._plan = _EpochPlan(self)
        self._reset_position()

    @property
    def selected(self) -> int:
        """Ids in this epoch's sequence before equalisation (all ranks)."""
        return self._plan.total

    @property
    def samples_per_rank(self) -> int:
        return self._plan.per

    @property
    def dropped(self) -> int:
        """Samples of the epoch no rank yields (the last M mod world_size of the epoch sequence)."""
        return self._plan.dropped

    def __len__(self) -> int:
        return self._plan.num_batches

    def epoch_ids(self) -> np.ndarray:
        """This rank's ids for the epoch as a set (sorted), without reading shards."""
        segs = self._plan.segments(self._plan.rank_start, self._plan.rank_start + self._plan.real)
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
                                     worker_init_fn=_ignore_stop_signals)
        lw = self._plan.logical_workers
        t = self.manifest.seq_len
        for item in batches:
            w = int(item["_worker"])
            bad = np.asarray(item["_bad"]).tolist()
            self.faults += len(bad)
            self._bad_ids += bad
            batch = _unpack(item["packed"], t)
            if self._weigh is not None:
                batch["weights"] = self._weigh(batch["ids"])
            self.worker_batches[w] += 1
            self.next_worker = (w + 1) % lw
            self.batches_consumed += 1
            self.samples_consumed += len(batch["ids"])
            yield batch
        self._finished = True

    def take_bad_ids(self) -> list[int]:
        """Ids of the samples replaced by filler since the last call (corrupt or missing in their shard)."""
        bad, self._bad_ids = self._bad_ids, []
        return bad

    # ---- resume -----------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        m = self.manifest
        shard_hash = hashlib.sha256("".join(s.sha256 for s in m.shards(self.split)).encode()).hexdigest()
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
        for w in range(p.logical_workers):
            b0, b1 = p.worker_batches(w)
            a, b = b0 * p.batch_size, min(b1 * p.batch_size, p.per)
            skip = self.worker_batches[w] * p.batch_size
            if b - a <= 0 or skip >= b - a:
                continue
            # the emission order of _EpochDataset._worker: the same generator, the same buffer
            rng = np.random.default_rng([p.seed, p.epoch, p.rank, w, 0xB0F])
            order = buffer_order(b - a, p.shuffle_buffer, rng)
            segs = p.segments(p.rank_start + a, p.rank_start + max(a, min(b, p.real)))
            ids = np.concatenate([s[1] for s in segs]) if segs else np.zeros(0, dtype=np.int64)
            rest = order[skip:]
            out.append(ids[rest[rest < len(ids)]])
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
