"""Per-rank sparse ledger of the last observed loss and step per sample id; consolidation to owners."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from attent_scale.teacher.topk import _Comm, _resolve_group, key_image

TRAIN = 0  # observation kinds: a training forward ...
SCORE = 1  # ... and a scoring pass (at the same step a scoring pass is the more recent one)


def block_owner(ids: np.ndarray, num_ids: int, world_size: int) -> np.ndarray:
    """Owner rank of each id: contiguous blocks, rank r owns [ceil(r*N/W), ceil((r+1)*N/W))."""
    return (np.asarray(ids, dtype=np.int64) * world_size) // max(1, num_ids)


def block_range(rank: int, num_ids: int, world_size: int) -> tuple[int, int]:
    """The [lo, hi) id range owned by `rank`."""
    return -(-rank * num_ids // world_size), -(-(rank + 1) * num_ids // world_size)


def _latest(ids: np.ndarray, loss: np.ndarray, step: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """Index of the winning observation per id, sorted by id: the most recent (larger step, then a
    scoring pass over a training forward); remaining ties go to the larger loss (NaN lowest), a rule that
    does not depend on which rank or how many ranks made the observations."""
    if ids.size == 0:
        return np.empty(0, dtype=np.int64)
    order = np.lexsort((key_image(loss.astype(np.float64)), kind, step, ids))
    sid = ids[order]
    last = np.ones(sid.shape[0], dtype=bool)
    last[:-1] = sid[1:] != sid[:-1]
    return order[last]


class Ledger:
    """What this rank knows: for each id it observed, the last loss (float32), the step (int32) and the
    kind (train/score). Memory is proportional to the number of distinct ids held, not to N."""

    def __init__(self, num_ids: int) -> None:
        self.num_ids = int(num_ids)
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._ids = np.empty(0, dtype=np.int64)
        self._loss = np.empty(0, dtype=np.float32)
        self._step = np.empty(0, dtype=np.int32)
        self._kind = np.empty(0, dtype=np.int8)
        self._pending = 0

    def observe(self, ids: torch.Tensor | np.ndarray, losses: torch.Tensor | np.ndarray, step: int,
                *, kind: int = TRAIN) -> int:
        """Record losses of `ids` at `step`; ids outside [0, N) (e.g. -1 fillers) are ignored.
        Returns the number of non-finite losses among the recorded ones."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        if isinstance(losses, torch.Tensor):
            losses = losses.detach().float().cpu().numpy()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        loss = np.asarray(losses, dtype=np.float32).reshape(-1)
        if ids.shape != loss.shape:
            raise ValueError(f"ids and losses differ in length: {ids.shape[0]} vs {loss.shape[0]}")
        ok = (ids >= 0) & (ids < self.num_ids)
        ids, loss = ids[ok], loss[ok]
        n = ids.shape[0]
        self._chunks.append((ids.copy(), loss.copy(), np.full(n, step, dtype=np.int32),
                             np.full(n, kind, dtype=np.int8)))
        self._pending += n
        if self._pending > max(1 << 16, self._ids.shape[0]):
            self.compact()
        return int(np.count_nonzero(~np.isfinite(loss)))

    def _merge(self, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> None:
        ids = np.concatenate([p[0] for p in parts])
        loss = np.concatenate([p[1] for p in parts])
        step = np.concatenate([p[2] for p in parts])
        kind = np.concatenate([p[3] for p in parts])
        keep = _latest(ids, loss, step, kind)
        self._ids, self._loss, self._step, self._kind = ids[keep], loss[keep], step[keep], kind[keep]

    def compact(self) -> None:
        """Fold pending observations in: one entry per id, sorted by id."""
        if self._chunks:
            self._merge([(self._ids, self._loss, self._step, self._kind), *self._chunks])
            self._chunks = []
            self._pending = 0

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids, loss, step, kind) arrays, one entry per id, sorted by id."""
        self.compact()
        return self._ids, self._loss, self._step, self._kind

    def __len__(self) -> int:
        self.compact()
        return int(self._ids.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the entries (after compaction)."""
        self.compact()
        return int(self._ids.nbytes + self._loss.nbytes + self._step.nbytes + self._kind.nbytes)

    def consolidate(self, group: Any = None, comm: _Comm | None = None) -> None:
        """Collective: send every entry to its owner rank (contiguous id blocks), keep the most recent
        observation per id. Afterwards each rank holds exactly the observed ids of its own block, and
        the union over ranks does not depend on which rank observed what."""
        self.compact()
        if comm is None:
            pg = _resolve_group(group)
            comm = _Comm(pg) if pg is not None else None
        if comm is None:
            return
        owner = block_owner(self._ids, self.num_ids, comm.world)
        order = np.argsort(owner, kind="stable")
        counts = np.bincount(owner, minlength=comm.world).tolist()
        packed = np.empty((self._ids.shape[0], 3), dtype=np.int64)
        packed[:, 0] = self._ids
        packed[:, 1] = self._loss.view(np.int32).astype(np.int64)
        packed[:, 2] = self._step.astype(np.int64) * 2 + self._kind
        got = comm.all_to_all(torch.from_numpy(packed[order]), counts, "consolidate").numpy()
        loss = got[:, 1].astype(np.int32).view(np.float32)
        self._ids = np.empty(0, dtype=np.int64)
        self._loss = np.empty(0, dtype=np.float32)
        self._step = np.empty(0, dtype=np.int32)
        self._kind = np.empty(0, dtype=np.int8)
        self._merge([(got[:, 0].copy(), loss, (got[:, 2] // 2).astype(np.int32),
                      (got[:, 2] % 2).astype(np.int8))])

    def staleness(self, now: int) -> np.ndarray:
        """Age in steps (now - step, int64) of every entry."""
        self.compact()
        return np.int64(now) - self._step.astype(np.int64)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """safetensors-ready tensors of the compacted ledger."""
        ids, loss, step, kind = self.entries()
        return {
            "ids": torch.from_numpy(ids.copy()),
            "loss": torch.from_numpy(loss.copy()),
            "step": torch.from_numpy(step.copy()),
            "kind": torch.from_numpy(kind.copy()),
            "num_ids": torch.tensor([self.num_ids], dtype=torch.int64),
        }

    @classmethod
    def from_state_tensors(cls, state: dict[str, torch.Tensor]) -> Ledger:
        """Inverse of state_tensors."""
        led = cls(int(state["num_ids"].reshape(-1)[0]))
        led._ids = state["ids"].numpy().astype(np.int64)
        led._loss = state["loss"].numpy().astype(np.float32)
        led._step = state["step"].numpy().astype(np.int32)
        led._kind = state["kind"].numpy().astype(np.int8)
        return led

    def save(self, path: str | Path) -> None:
        """Write the ledger as a safetensors file."""
        save_file(self.state_tensors(), str(path))

    @classmethod
    def load(cls, path: str | Path) -> Ledger:
        """Read a ledger written by save()."""
        return cls.from_state_tensors(load_file(str(path)))
