"""Per-rank ledger of the last observed loss and step per sample id: a dense block per owner rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from attent_scale.teacher.comm import Comm, resolve_group

TRAIN = 0  # observation kinds: a training forward ...
SCORE = 1  # ... and a scoring pass (at the same step a scoring pass is the more recent one)
MAX_STEP = (1 << 31) - 2  # step * 2 + kind + 1 must fit the top 32 bits of an entry
EXCHANGE_CHUNK = 1 << 20  # entries per all_to_all round when pending observations go to their owners
_LOW32 = np.uint64(0xFFFFFFFF)
_SIGN32 = np.uint32(0x80000000)
POS_INF_IMAGE = np.uint32(0xFF800000)  # loss_image(+inf)
NEG_INF_IMAGE = np.uint32(0x007FFFFF)  # loss_image(-inf)


def block_len(num_ids: int, world_size: int) -> int:
    """Ids per owner block: a multiple of 8, so that every block is whole bytes of a selection bitset."""
    return 8 * -(-((num_ids + 7) // 8) // max(1, world_size))


def block_owner(ids: np.ndarray, num_ids: int, world_size: int) -> np.ndarray:
    """Owner rank of each id: rank r owns the contiguous block [r * L, (r + 1) * L) (L = block_len)."""
    return np.asarray(ids, dtype=np.int64) // max(1, block_len(num_ids, world_size))


def block_range(rank: int, num_ids: int, world_size: int) -> tuple[int, int]:
    """The [lo, hi) id range owned by `rank` (lo is a multiple of 8; a block may be empty)."""
    n = block_len(num_ids, world_size)
    return min(num_ids, rank * n), min(num_ids, (rank + 1) * n)


def _full(t: Any) -> torch.Tensor:
    """A state tensor, read in full when it is a lazy handle (has .load())."""
    t = t.load() if hasattr(t, "load") else t
    return torch.as_tensor(t)


def loss_image(loss: np.ndarray) -> np.ndarray:
    """Order-preserving uint32 image of float32 losses (-0.0 == +0.0; NaN -> 0, below -inf)."""
    x = np.asarray(loss, dtype=np.float32) + np.float32(0.0)
    b = x.view(np.uint32)
    u = b ^ ((b >> np.uint32(31)) * np.uint32(0x7FFFFFFF) | _SIGN32)
    u[np.isnan(x)] = 0
    return u


def loss_from_image(u: np.ndarray) -> np.ndarray:
    """Inverse of loss_image (0 -> NaN)."""
    u = np.asarray(u, dtype=np.uint32)
    b = np.where(u >= _SIGN32, u ^ _SIGN32, np.bitwise_not(u))
    return b.view(np.float32)


def pack_entries(loss: np.ndarray, step: int, kind: int) -> np.ndarray:
    """uint64 entries whose order is the ledger's "most recent wins" rule: larger step, then a scoring
    pass over a training forward, then the larger loss (NaN lowest). 0 means "never observed"."""
    hi = np.uint64(int(step) * 2 + int(kind) + 1) << np.uint64(32)
    return loss_image(loss).astype(np.uint64) | hi


def unpack_entries(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(loss float32, step int32, kind int8) of observed entries."""
    hi = (v >> np.uint64(32)).astype(np.int64) - 1
    loss = loss_from_image((v & _LOW32).astype(np.uint32))
    return loss, (hi >> 1).astype(np.int32), (hi & 1).astype(np.int8)


class Ledger:
    """What this rank knows. It owns the id block [lo, hi) (see block_range) as one dense uint64 entry per
    id (8 bytes per owned id, O(N / world)); observations of ids other ranks own wait in a pending list
    until `exchange` sends them to their owners. Merging is a max over entries (pack_entries), so the result
    does not depend on which rank observed what, in which order, or how often it exchanged."""

    def __init__(self, num_ids: int, rank: int = 0, world_size: int = 1, *, history: bool = False) -> None:
        self.num_ids = int(num_ids)
        self.rank, self.world_size = int(rank), int(world_size)
        self.lo, self.hi = block_range(self.rank, self.num_ids, self.world_size)
        self._val = np.zeros(self.hi - self.lo, dtype=np.uint64)
        # history (teacher.strategy signal): also the observation before the last one, 8 more bytes per id
        self._prev = np.zeros(self.hi - self.lo, dtype=np.uint64) if history else None
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending = 0  # observations waiting for an exchange

    def observe(self, ids: torch.Tensor | np.ndarray, losses: torch.Tensor | np.ndarray, step: int,
                *, kind: int = TRAIN) -> int:
        """Record losses of `ids` at `step` (O(len(ids)), no collective, no sort); ids outside [0, N)
        (e.g. -1 fillers) are ignored. Returns the number of non-finite losses among the recorded ones."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        if isinstance(losses, torch.Tensor):
            losses = losses.detach().float().cpu().numpy()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        loss = np.asarray(losses, dtype=np.float32).reshape(-1)
        if ids.shape != loss.shape:
            raise ValueError(f"ids and losses differ in length: {ids.shape[0]} vs {loss.shape[0]}")
        if not 0 <= int(step) <= MAX_STEP:
            raise ValueError(f"step {step} outside [0, {MAX_STEP}]")
        ok = (ids >= 0) & (ids < self.num_ids)
        ids, loss = ids[ok], loss[ok]
        val = pack_entries(loss, step, kind)
        mine = (ids >= self.lo) & (ids < self.hi)
        if mine.all():
            self._fold(ids - self.lo, val)
        else:
            self._fold(ids[mine] - self.lo, val[mine])
            self._pending.append((ids[~mine], val[~mine]))
            self.pending += int(ids.shape[0] - np.count_nonzero(mine))
        return int(np.count_nonzero(~np.isfinite(loss)))

    def merge(self, ids: np.ndarray, val: np.ndarray) -> None:
        """Fold packed entries of owned ids in (the max rule)."""
        self._fold(np.asarray(ids, dtype=np.int64) - self.lo, np.asarray(val, dtype=np.uint64))

    def _fold(self, idx: np.ndarray, val: np.ndarray) -> None:
        """The last entry is the max of all observations; with history the previous one is the max of
        those made at an earlier (step, kind) than the last: both depend only on the set of observations,
        not on their order or on which rank made them. Repeated ids are folded in rounds."""
        if self._prev is None:
            np.maximum.at(self._val, idx, val)
            return
        while idx.size:
            uniq, first = np.unique(idx, return_index=True)
            x = val[first]
            cur, prev = self._val[uniq], self._prev[uniq]
            tx, tc = x >> np.uint64(32), cur >> np.uint64(32)
            newer, older = tx > tc, tx < tc
            self._prev[uniq] = np.where(newer, cur, np.where(older, np.maximum(prev, x), prev))
            self._val[uniq] = np.where(older, cur, np.maximum(cur, x))
            if first.size == idx.size:
                return
            rest = np.ones(idx.size, dtype=bool)
            rest[first] = False
            idx, val = idx[rest], val[rest]

    @property
    def history(self) -> bool:
        return self._prev is not None

    def enable_history(self) -> None:
        """Keep previous observations from now on (a state saved without them has none yet)."""
        if self._prev is None:
            self._prev = np.zeros_like(self._val)

    def block_prev(self, a: int, b: int) -> np.ndarray | None:
        """The previous entries (0 = none) of owned ids [a, b), or None without history."""
        return None if self._prev is None else self._prev[a - self.lo:b - self.lo]

    def _take_pending(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The oldest pending observations, at most `n` entries; O(entries taken + chunks), not quadratic
        in the number of pending chunks (one observe call each): the taken prefix is cut off once."""
        ids, vals, got, k = [], [], 0, 0
        pending = self._pending
        while k < len(pending) and got < n:
            i, v = pending[k]
            if got + i.shape[0] > n:
                cut = n - got
                pending[k] = (i[cut:], v[cut:])
                i, v = i[:cut], v[:cut]
            else:
                k += 1
            ids.append(i)
            vals.append(v)
            got += i.shape[0]
        del pending[:k]
        self.pending -= got
        if not ids:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
        return np.concatenate(ids), np.concatenate(vals)

    def exchange(self, group: Any = None, comm: Comm | None = None) -> None:
        """Collective: send every pending observation to its owner rank, in rounds of at most
        EXCHANGE_CHUNK entries per rank (memory stays bounded). Afterwards each rank's block holds every
        observation of its ids made anywhere."""
        if comm is None:
            pg = resolve_group(group)
            comm = Comm(pg) if pg is not None else None
        if comm is None:
            return
        n = torch.tensor([self.pending], dtype=torch.int64)
        comm.all_reduce(n, "consolidate", op=dist.ReduceOp.MAX)
        for _ in range(-(-int(n.item()) // EXCHANGE_CHUNK)):
            ids, val = self._take_pending(EXCHANGE_CHUNK)
            owner = block_owner(ids, self.num_ids, comm.world)
            order = np.argsort(owner, kind="stable")
            counts = np.bincount(owner, minlength=comm.world).tolist()
            packed = np.empty((ids.shape[0], 2), dtype=np.int64)
            packed[:, 0] = ids[order]
            packed[:, 1] = val[order].view(np.int64)
            got = comm.all_to_all(torch.from_numpy(packed), counts, "consolidate").numpy()
            self.merge(got[:, 0], got[:, 1].copy().view(np.uint64))

    consolidate = exchange  # the name the Teacher used before the dense ledger

    def block_entries(self, a: int, b: int) -> np.ndarray:
        """The packed entries (uint64, 0 = never observed) of owned ids [a, b) (a view)."""
        return self._val[a - self.lo:b - self.lo]

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids, loss, step, kind) of the observed ids of this rank's block, sorted by id (materialised:
        for tests and small ledgers; call exchange() first to include other ranks' observations)."""
        seen = np.flatnonzero(self._val)
        loss, step, kind = unpack_entries(self._val[seen])
        return seen.astype(np.int64) + self.lo, loss, step, kind

    def counts(self) -> tuple[int, int]:
        """(observed ids, ids with a finite loss) of this rank's block, counted in chunks."""
        n_obs = n_fin = 0
        lo_fin, hi_fin = NEG_INF_IMAGE, POS_INF_IMAGE  # finite losses lie strictly between the infinities
        for a in range(0, self._val.shape[0], EXCHANGE_CHUNK):
            v = self._val[a:a + EXCHANGE_CHUNK]
            n_obs += int(np.count_nonzero(v))
            low = (v & _LOW32).astype(np.uint32)
            n_fin += int(np.count_nonzero((low > lo_fin) & (low < hi_fin) & (v != 0)))
        return n_obs, n_fin

    def __len__(self) -> int:
        return int(np.count_nonzero(self._val))

    @property
    def nbytes(self) -> int:
        """Bytes held: the dense block plus pending observations."""
        prev = self._prev.nbytes if self._prev is not None else 0
        return int(self._val.nbytes + prev + sum(i.nbytes + v.nbytes for i, v in self._pending))

    def staleness(self, now: int) -> np.ndarray:
        """Age in steps (now - step, int64) of every observed id of this rank's block, by id."""
        return np.int64(now) - self.entries()[2].astype(np.int64)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """safetensors-ready tensors: the dense block (as int64) and the pending observations."""
        ids = [i for i, _ in self._pending]
        vals = [v for _, v in self._pending]
        out = {} if self._prev is None else {"prev": torch.from_numpy(self._prev.view(np.int64))}
        return {
            **out,
            "block": torch.from_numpy(self._val.view(np.int64)),
            "pending_ids": torch.from_numpy(np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)),
            "pending_val": torch.from_numpy(
                (np.concatenate(vals) if vals else np.zeros(0, dtype=np.uint64)).view(np.int64)),
            "shape": torch.tensor([self.num_ids, self.rank, self.world_size], dtype=torch.int64),
        }

    @classmethod
    def from_state_tensors(cls, state: dict[str, torch.Tensor]) -> Ledger:
        """Inverse of state_tensors."""
        num_ids, rank, world = (int(x) for x in state["shape"].reshape(-1).tolist())
        led = cls(num_ids, rank, world, history="prev" in state)
        block = state["block"].numpy().view(np.uint64)
        if block.shape != led._val.shape:
            raise ValueError(f"ledger block of {block.shape[0]} entries, expected {led._val.shape[0]}")
        np.copyto(led._val, block)  # a copy: the state may be a live ledger's view (state_tensors)
        if led._prev is not None:
            np.copyto(led._prev, state["prev"].numpy().view(np.uint64))
        ids = state["pending_ids"].numpy().astype(np.int64)
        if ids.size:
            led._pending = [(ids.copy(), state["pending_val"].numpy().view(np.uint64).copy())]
            led.pending = int(ids.shape[0])
        return led

    @classmethod
    def reblock(cls, num_ids: int, rank: int, world_size: int, old_world: int, old: dict[int, Any],
                pending_from: list[int]) -> Ledger:
        """This rank's ledger for `world_size` ranks from the state_tensors of a ledger blocked over
        `old_world` ranks: `old[r]` holds old rank r's tensors (a tensor or anything sliceable as
        `block[a:b]`, e.g. a lazy file handle) for every old rank whose block overlaps the new one, so a
        rank reads O(N / world_size) entries; the pending observations of the old ranks in `pending_from`
        become this rank's pending (the next exchange sends them to their owners)."""
        led = cls(num_ids, rank, world_size, history=any("prev" in state for state in old.values()))
        step = block_len(num_ids, old_world)
        for r in range(led.lo // step, -(-led.hi // step)) if led.hi > led.lo else ():
            a, b = max(led.lo, r * step), min(led.hi, (r + 1) * step)
            if a >= b:
                continue
            state = old[r]
            shape = [int(x) for x in _full(state["shape"]).reshape(-1).tolist()]
            if shape != [num_ids, r, old_world]:
                raise ValueError(f"ledger state of old rank {r} has shape {shape}, expected "
                                 f"{[num_ids, r, old_world]}")
            fields = [("block", led._val)] + ([("prev", led._prev)] if led._prev is not None else [])
            for name, dest in fields:
                part = state[name][a - r * step:b - r * step]
                dest[a - led.lo:b - led.lo] = np.asarray(part.numpy() if hasattr(part, "numpy") else part
                                                         ).view(np.uint64)
        for r in pending_from:
            ids = _full(old[r]["pending_ids"]).numpy().astype(np.int64)
            if ids.size:
                led._pending.append((ids.copy(), _full(old[r]["pending_val"]).numpy().view(np.uint64).copy()))
                led.pending += int(ids.shape[0])
        return led

    def save(self, path: str | Path) -> None:
        """Write the ledger as a safetensors file."""
        save_file(self.state_tensors(), str(path))

    @classmethod
    def load(cls, path: str | Path) -> Ledger:
        """Read a ledger written by save()."""
        return cls.from_state_tensors(load_file(str(path)))
