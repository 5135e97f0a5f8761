"""The selection: a bitset over the N sample ids (plus optional loss weights) that a ShardStream yields."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from functools import cached_property

import numpy as np
import torch

CHUNK_BYTES = 1 << 20  # bytes of bitset per chunk in whole-set passes: no N-sized temporaries


def _last_byte_mask(num_ids: int) -> int:
    """Mask of the valid bits of the last byte (little bit order)."""
    r = num_ids % 8
    return 0xFF if r == 0 else (1 << r) - 1


class Selection:
    """Set of selected sample ids in [0, num_ids) stored as one packed bitset (ceil(num_ids / 8) bytes,
    little bit order: id i is bit i % 8 of byte i // 8; padding bits are zero). Nothing else of size N is
    kept or built: counts, hashes, slices and complements work on the bytes in chunks.

    A weighted selection (unbiased pruning) also holds a second bitset `upweight` and a scalar `weight`:
    ids in `upweight` carry loss weight `weight`, every other id weight 1."""

    def __init__(self, bits: np.ndarray, num_ids: int, *, upweight: np.ndarray | None = None,
                 weight: float = 1.0) -> None:
        if isinstance(bits, torch.Tensor):
            bits = bits.detach().cpu().numpy()
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
        """Bitset of `ids` (every id must lie in [0, num_ids); duplicates allowed)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= num_ids):
            raise ValueError(f"selected ids must lie in [0, {num_ids})")
        bits = np.zeros((num_ids + 7) // 8, dtype=np.uint8)
        np.bitwise_or.at(bits, ids >> 3, np.left_shift(1, ids & 7).astype(np.uint8))
        return cls(bits, num_ids)

    @classmethod
    def from_mask(cls, mask: torch.Tensor | np.ndarray) -> Selection:
        """Bitset of a bool mask over all ids (small sets and tests: the mask itself is N bytes)."""
        if isinstance(mask, torch.Tensor):
            mask = mask.detach().cpu().numpy()
        mask = np.asarray(mask, dtype=bool).reshape(-1)
        return cls(np.packbits(mask, bitorder="little"), mask.shape[0])

    @classmethod
    def full(cls, num_ids: int) -> Selection:
        """Every id selected."""
        bits = np.full((num_ids + 7) // 8, 0xFF, dtype=np.uint8)
        if bits.size:
            bits[-1] = _last_byte_mask(num_ids)
        return cls(bits, num_ids)

    def complement(self) -> Selection:
        """The ids this selection does not hold."""
        bits = np.bitwise_not(self.bits)
        if bits.size:
            bits[-1] &= _last_byte_mask(self.num_ids)
        return Selection(bits, self.num_ids)

    def mask(self, ids: torch.Tensor | np.ndarray) -> np.ndarray:
        """Bool array: which of `ids` are selected (ids outside [0, num_ids), e.g. -1 fillers, are not)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ok = (ids >= 0) & (ids < self.num_ids)
        safe = np.where(ok, ids, 0)
        hit = (self.bits[safe >> 3] >> (safe & 7).astype(np.uint8)) & 1
        return ok & hit.astype(bool)

    def slice_bits(self, lo: int, hi: int) -> np.ndarray:
        """Packed bits of ids [lo, hi), re-based so that id lo is bit 0 (a new array of ceil((hi-lo)/8)
        bytes, padding bits zero)."""
        if not 0 <= lo <= hi <= self.num_ids:
            raise ValueError(f"id range [{lo}, {hi}) outside [0, {self.num_ids})")
        n = hi - lo
        nb = (n + 7) // 8
        s = lo % 8
        b0 = lo // 8
        if s == 0:
            out = self.bits[b0:b0 + nb].copy()
        else:
            src = self.bits[b0:b0 + nb + 1].astype(np.uint16)
            if src.shape[0] < nb + 1:
                src = np.concatenate([src, np.zeros(nb + 1 - src.shape[0], dtype=np.uint16)])
            out = ((src[:-1] >> s) | (src[1:] << (8 - s))).astype(np.uint8)
        if nb:
            out[-1] &= _last_byte_mask(n)
        return out

    def count_range(self, lo: int, hi: int) -> int:
        """Number of selected ids in [lo, hi)."""
        return int(np.bitwise_count(self.slice_bits(lo, hi)).sum(dtype=np.int64))

    def iter_ids(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
        """Selected ids in ascending order, one int64 array per chunk of the bitset."""
        for b in range(0, self.bits.shape[0], chunk_bytes):
            part = np.unpackbits(self.bits[b:b + chunk_bytes], bitorder="little")
            yield np.flatnonzero(part).astype(np.int64) + 8 * b

    def ids(self) -> np.ndarray:
        """Selected ids, sorted ascending, int64 (count * 8 bytes: for tests and small sets)."""
        parts = list(self.iter_ids())
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    @cached_property
    def count(self) -> int:
        """Number of selected ids."""
        return sum(int(np.bitwise_count(self.bits[b:b + CHUNK_BYTES]).sum(dtype=np.int64))
                   for b in range(0, self.bits.shape[0], CHUNK_BYTES))

    @cached_property
    def sha256(self) -> str:
        """Hex sha256 of the packed bitset bytes (ceil(N / 8) bytes, little bit order)."""
        return hashlib.sha256(self.bits).hexdigest()

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"Selection(count={self.count}, num_ids={self.num_ids})"
