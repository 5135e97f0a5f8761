"""The epoch partition: which positions each rank's workers emit in which batch, computed from counts alone.

A pure function of plain values, no shard or selection read: the selected-sample count of every shard, the
seed, epoch, rank, world size, batch size, worker count, shuffle buffer and `pad`. Shards are visited in a
seeded permutation (the same on every rank); the selected samples of the shards, in that order, form the
epoch sequence of M positions. Rank r takes the contiguous block [r * (M // W), (r + 1) * (M // W)); the last
M mod W positions are dropped. With `pad` nothing is dropped: blocks of floor or ceil M / W positions, the
shorter ones padded by one filler row. The rank's block is cut into ceil(per / B) batches; logical worker w
takes a contiguous run of whole batches and emits its positions in the order of a seeded shuffle buffer.
A position maps back to a sample through `runs`: (shard, k0, k1) = the k0-th to k1-th selected samples of
that shard. `delivery` is the order a DataLoader returns the workers' batches in (round-robin).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

FILLER = -1  # a position in `batches` that holds no sample (a padded stream's shorter block)


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


def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shard visiting order: a permutation seeded by (seed, epoch), the same on every rank."""
    if num_shards == 0:
        return np.zeros(0, dtype=np.int64)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_shards)


@dataclass(frozen=True)
class Partition:
    """One (epoch, rank)'s share of the epoch sequence; positions are indices into that sequence."""

    order: np.ndarray  # shard indices in visiting order
    starts: np.ndarray  # starts[k]: the first position of shard order[k]'s samples; starts[-1] = total
    seed: int
    epoch: int
    rank: int
    world_size: int
    batch_size: int
    workers: int  # logical workers (at least 1)
    shuffle_buffer: int
    pad: bool
    per: int  # positions of the rank's block, filler rows included
    real: int  # positions of the rank's block that hold samples (per, or per - 1 for a padded short block)
    rank_start: int  # the block's first position in the epoch sequence
    dropped: int  # positions of the epoch no rank emits

    @property
    def total(self) -> int:
        """Positions in the epoch sequence (selected samples of all shards)."""
        return int(self.starts[-1])

    @property
    def num_batches(self) -> int:
        """The rank's batches in the epoch (the last one may be short)."""
        return -(-self.per // self.batch_size)

    def worker_batches(self, w: int) -> tuple[int, int]:
        """Batch range [b0, b1) of the rank's batches that logical worker w produces."""
        nb, lw = self.num_batches, self.workers
        return w * nb // lw, (w + 1) * nb // lw

    def worker_span(self, w: int) -> tuple[int, int, int]:
        """(a, n, real) for worker w: its positions are a .. a+n-1 of the rank's block, the first `real`
        of them hold samples and the rest are filler rows."""
        b0, b1 = self.worker_batches(w)
        a = b0 * self.batch_size
        n = max(0, min(b1 * self.batch_size, self.per) - a)
        return a, n, max(0, min(n, self.real - a))

    def emission(self, w: int) -> np.ndarray:
        """Worker w's local positions (0 .. n-1 of its span) in the order it emits them."""
        _, n, _ = self.worker_span(w)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, w, 0xB0F])
        return buffer_order(n, self.shuffle_buffer, rng)

    def worker_positions(self, w: int, done_batches: int = 0) -> np.ndarray:
        """Epoch-sequence positions worker w still emits after `done_batches` batches, in emission order;
        FILLER for filler rows."""
        a, _, real = self.worker_span(w)
        rest = self.emission(w)[done_batches * self.batch_size:]
        return np.where(rest < real, self.rank_start + a + rest, FILLER)

    def batches(self, w: int, done_batches: int = 0) -> Iterator[np.ndarray]:
        """Worker w's remaining batches, each the epoch-sequence positions of its rows (FILLER: filler)."""
        pos = self.worker_positions(w, done_batches)
        for t in range(0, len(pos), self.batch_size):
            yield pos[t:t + self.batch_size]

    def delivery(self, done_batches: Sequence[int], next_worker: int) -> Iterator[tuple[int, int]]:
        """(worker, batch index within the worker's run) in the order a DataLoader returns the remaining
        batches: round-robin from `next_worker`, a worker that has run out is skipped."""
        left = [self.worker_batches(w)[1] - self.worker_batches(w)[0] for w in range(self.workers)]
        done = list(done_batches)
        w = next_worker
        while any(done[v] < left[v] for v in range(self.workers)):
            if done[w] < left[w]:
                yield w, done[w]
                done[w] += 1
            w = (w + 1) % self.workers

    def shards_in(self, a: int, b: int) -> list[int]:
        """Indices of the shards holding positions [a, b) of the epoch sequence."""
        if a >= b:
            return []
        k0 = int(np.searchsorted(self.starts, a, side="right")) - 1
        k1 = int(np.searchsorted(self.starts, b, side="left"))
        return [int(si) for k, si in enumerate(self.order[k0:k1], k0) if self.starts[k] < self.starts[k + 1]]

    def runs(self, a: int, b: int) -> list[tuple[int, int, int]]:
        """(shard index, k0, k1) runs covering positions [a, b) in order: the k0-th .. (k1-1)-th selected
        samples of that shard."""
        out = []
        for k, si in enumerate(self.order):
            s0, s1 = int(self.starts[k]), int(self.starts[k + 1])
            lo, hi = max(a, s0), min(b, s1)
            if lo < hi:
                out.append((int(si), lo - s0, hi - s0))
        return out


def rank_block(total: int, rank: int, world_size: int, pad: bool) -> tuple[int, int, int]:
    """(first position, real positions, positions) of rank `rank`'s contiguous block of an epoch sequence
    of `total` positions: M // W each, the last M mod W dropped; with `pad` none dropped, blocks of
    floor or ceil(M / W) real positions, each `ceil(M / W)` long (the shorter ones end in one filler)."""
    w = world_size
    if pad:
        start = rank * total // w
        return start, (rank + 1) * total // w - start, -(-total // w)
    per = total // w
    return rank * per, per, per


def partition_epoch(
    selected: Sequence[int] | np.ndarray,
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    batch_size: int,
    workers: int,
    shuffle_buffer: int,
    pad: bool = False,
) -> Partition:
    """The partition of one epoch for one rank; `selected[i]` is shard i's count of selected samples and
    `workers` the DataLoader worker count (0: the rank's own process, one logical worker)."""
    counts = np.asarray(selected, dtype=np.int64).reshape(-1)
    order = shard_order(len(counts), seed, epoch)
    starts = np.concatenate([[0], np.cumsum(counts[order])]).astype(np.int64)
    total = int(starts[-1])
    rank_start, real, per = rank_block(total, rank, world_size, pad)
    dropped = 0 if pad else total - per * world_size
    return Partition(order=order, starts=starts, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                     batch_size=batch_size, workers=max(1, workers), shuffle_buffer=shuffle_buffer, pad=pad,
                     per=per, real=real, rank_start=rank_start, dropped=dropped)
