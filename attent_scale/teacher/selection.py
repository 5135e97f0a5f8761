"""The selection: a bitset over the N sample ids (plus optional loss weights), identical on every rank."""

from __future__ import annotations

import hashlib
from functools import cached_property

import numpy as np
import torch


class Selection:
    """Set of selected sample ids in [0, num_ids) stored as a packed bitset (num_ids / 8 bytes).

    A weighted selection (unbiased pruning) also holds a second bitset `upweight` and a scalar `weight`:
    ids in `upweight` carry loss weight `weight`, every other id weight 1."""

    def __init__(self, bits: np.ndarray, num_ids: int, *, upweight: np.ndarray | None = None,
                 weight: float = 1.0) -> None:
        bits = np.ascontiguousarray(bits, dtype=np.uint8).reshape(-1)
        if bits.shape[0] != (num_ids + 7) // 8:
            raise ValueError(f"bitset of {bits.shape[0]} bytes does not cover {num_ids} ids")
        self.bits = bits
        self.num_ids = int(num_ids)
        if upweight is not None:
            upweight = np.ascontiguousarray(upweight, dtype=np.uint8).reshape(-1)
            if upweight.shape != bits.shape:
                raise ValueError(f"upweight bitset of {upweight.shape[0]} bytes does not cover {num_ids} ids")
        self.upweight = upweight
        self.weight = float(weight)

    @property
    def weighted(self) -> bool:
        """True when some ids carry a loss weight other than 1."""
        return self.upweight is not None and self.weight != 1.0

    def sample_weights(self, ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        """[B] float32 loss weights of `ids` (`weight` for upweighted ids, else 1; fillers get 1)."""
        if self.upweight is None:
            n = ids.shape[0] if hasattr(ids, "shape") else len(ids)
            return torch.ones(n, dtype=torch.float32)
        up = Selection(self.upweight, self.num_ids).mask(ids)
        return torch.from_numpy(np.where(up, self.weight, 1.0).astype(np.float32))

    @classmethod
    def from_ids(cls, ids: torch.Tensor | np.ndarray, num_ids: int) -> Selection:
        """Bitset of `ids` (every id must lie in [0, num_ids))."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= num_ids):
            raise ValueError(f"selected ids must lie in [0, {num_ids})")
        mask = np.zeros(num_ids, dtype=bool)
        mask[ids] = True
        return cls(np.packbits(mask, bitorder="little"), num_ids)

    @classmethod
    def full(cls, num_ids: int) -> Selection:
        """Every id selected."""
        return cls.from_ids(np.arange(num_ids, dtype=np.int64), num_ids)

    def mask(self, ids: torch.Tensor | np.ndarray) -> np.ndarray:
        """Bool array: which of `ids` are selected (ids outside [0, num_ids), e.g. -1 fillers, are not)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ok = (ids >= 0) & (ids < self.num_ids)
        safe = np.where(ok, ids, 0)
        hit = (self.bits[safe >> 3] >> (safe & 7).astype(np.uint8)) & 1
        return ok & hit.astype(bool)

    def ids(self) -> np.ndarray:
        """Selected ids, sorted ascending, int64."""
        return np.flatnonzero(np.unpackbits(self.bits, count=self.num_ids, bitorder="little")).astype(
            np.int64
        )

    @cached_property
    def count(self) -> int:
        """Number of selected ids."""
        return int(np.unpackbits(self.bits).sum(dtype=np.int64))  # padding bits are zero

    @cached_property
    def sha256(self) -> str:
        """Hex sha256 of the sorted selected ids as little-endian int64 bytes."""
        return hashlib.sha256(self.ids().astype("<i8").tobytes()).hexdigest()

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"Selection(count={self.count}, num_ids={self.num_ids})"
