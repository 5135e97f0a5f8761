"""The epoch partition over a grid of counts, ranks, batches and workers: balance, coverage, resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from attent_scale.data.partition import FILLER, Partition, partition_epoch

# selected samples per shard: none, one empty shard, fewer samples than ranks, empty shards in between,
# and uneven shards
SHARDS = {"none": [], "empty": [0], "tiny": [2], "holes": [5, 0, 3, 0, 1], "uneven": [17, 4, 9, 1, 12, 6]}
WORLDS = [1, 2, 3, 4]
BATCHES = [1, 3, 8]
WORKERS = [0, 1, 2, 3]
BUFFERS = [0, 5]


def _parts(selected: list[int], world: int, pad: bool, **kw: int) -> list[Partition]:
    kw = {"seed": 7, "epoch": 2, "batch_size": 3, "workers": 2, "shuffle_buffer": 5, **kw}
    return [partition_epoch(selected, rank=r, world_size=world, pad=pad, **kw) for r in range(world)]


def _emitted(p: Partition) -> list[np.ndarray]:
    """Every batch the rank emits, worker by worker (FILLER rows included)."""
    return [b for w in range(p.workers) for b in p.batches(w)]


@pytest.mark.parametrize("pad", [False, True], ids=["drop", "pad"])
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("shards", SHARDS, ids=list(SHARDS))
def test_ranks_are_balanced_and_cover_every_selected_position_once(shards: str, world: int,
                                                                   pad: bool) -> None:
    selected = SHARDS[shards]
    total = sum(selected)
    for batch, workers, buffer in itertools.product(BATCHES, WORKERS, BUFFERS):
        parts = _parts(selected, world, pad, batch_size=batch, workers=workers, shuffle_buffer=buffer)
        # balance: every rank the same number of rows in the same number of batches, all of them full
        # except the rank's last one
        assert len({p.per for p in parts}) == 1 and len({p.num_batches for p in parts}) == 1
        per = parts[0].per
        for p in parts:
            sizes = [len(b) for b in _emitted(p)]
            assert len(sizes) == p.num_batches == -(-per // batch) and sum(sizes) == per
            last = p.worker_batches(p.workers - 1)
            assert all(s == batch for s in sizes[: last[1] - 1])  # the last worker holds the last batch
        rows = np.concatenate([b for p in parts for b in _emitted(p)]) if per else np.zeros(0, dtype=np.int64)
        real = rows[rows != FILLER]
        fillers = int((rows == FILLER).sum())
        if pad:  # nothing dropped; blocks of floor or ceil(total / world) ids, the short ones + one filler
            assert per == -(-total // world) and parts[0].dropped == 0
            assert sorted(real.tolist()) == list(range(total))
            assert fillers == per * world - total < world
            assert all(p.per - p.real in (0, 1) for p in parts)
        else:  # no filler; the last total mod world positions of the epoch sequence are dropped
            assert per == total // world and fillers == 0
            assert all(p.dropped == total % world for p in parts)
            assert sorted(real.tolist()) == list(range(total - total % world))
        # the set of a rank's positions depends on the world, never on batch size, workers or buffer
        same = _parts(selected, world, pad)
        assert [set(_emitted_set(p)) for p in parts] == [set(_emitted_set(p)) for p in same]


def _emitted_set(p: Partition) -> list[int]:
    return [int(x) for b in _emitted(p) for x in b if x != FILLER]


@pytest.mark.parametrize("pad", [False, True], ids=["drop", "pad"])
@pytest.mark.parametrize("world", [1, 3])
def test_runs_map_positions_to_each_selected_id_once(world: int, pad: bool) -> None:
    """Ids from synthetic per-shard selections (what the stream does with the shards' selection bits)."""
    rng = np.random.default_rng(0)
    counts = [30, 0, 11, 25, 7]
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    masks = [rng.random(c) < 0.6 for c in counts]
    chosen = [np.flatnonzero(m) + f for m, f in zip(masks, firsts, strict=True)]
    selected = [len(c) for c in chosen]
    got = []
    for p in _parts(selected, world, pad):
        for si, k0, k1 in p.runs(p.rank_start, p.rank_start + p.real):
            got += chosen[si][k0:k1].tolist()
        assert set(p.shards_in(p.rank_start, p.rank_start + p.real)) == {
            si for si, k0, k1 in p.runs(p.rank_start, p.rank_start + p.real)}
    # the epoch sequence: the chosen ids of the shards in the (seed, epoch) shard order
    sequence = np.concatenate([chosen[si] for si in _parts(selected, world, pad)[0].order]).tolist()
    total = len(sequence)
    assert got == sequence[: total if pad else total - total % world]
    assert len(set(got)) == len(got)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_order_is_one_per_epoch_and_the_same_on_every_rank(world: int) -> None:
    selected = SHARDS["uneven"]
    orders = {tuple(p.order.tolist()) for p in _parts(selected, world, False)}
    assert len(orders) == 1
    epochs = {tuple(partition_epoch(selected, seed=7, epoch=e, rank=0, world_size=world, batch_size=3,
                                    workers=2, shuffle_buffer=5).order.tolist()) for e in range(4)}
    assert len(epochs) > 1 and all(sorted(o) == list(range(len(selected))) for o in epochs)


@pytest.mark.parametrize("pad", [False, True], ids=["drop", "pad"])
@pytest.mark.parametrize(("world", "batch", "workers"),
                         [(1, 1, 0), (2, 3, 2), (3, 2, 3), (4, 8, 1), (2, 1, 3)])
def test_resume_at_every_batch_continues_the_delivery_exactly(world: int, batch: int, workers: int,
                                                            pad: bool) -> None:
    """A stream's position is (batches done per worker, next worker): resumed from the position after any
    number of delivered batches, the rest of the delivery is the uninterrupted one's tail, and consumed +
    remaining positions are the rank's block exactly once."""
    for p in _parts(SHARDS["uneven"], world, pad, batch_size=batch, workers=workers):
        whole = list(p.delivery([0] * p.workers, 0))
        assert len(whole) == p.num_batches
        assert sorted(whole) == [(w, j) for w in range(p.workers)
                                 for j in range(p.worker_batches(w)[1] - p.worker_batches(w)[0])]
        rows = {w: list(p.batches(w)) for w in range(p.workers)}
        for k in range(len(whole) + 1):
            done, next_worker = [0] * p.workers, 0
            for w, _ in whole[:k]:
                done[w] += 1
                next_worker = (w + 1) % p.workers
            assert list(p.delivery(done, next_worker)) == whole[k:]
            consumed = [x for w, j in whole[:k] for x in rows[w][j].tolist()]
            remaining = [x for w in range(p.workers) for x in p.worker_positions(w, done[w]).tolist()]
            for w in range(p.workers):  # a resumed worker emits exactly the tail of its run
                tail = [b.tolist() for b in p.batches(w, done[w])]
                assert tail == [b.tolist() for b in rows[w][done[w]:]]
            both = [x for x in consumed + remaining if x != FILLER]
            assert sorted(both) == list(range(p.rank_start, p.rank_start + p.real))


def test_emission_is_a_seeded_shuffle_of_the_workers_span() -> None:
    p = partition_epoch(SHARDS["uneven"], seed=7, epoch=0, rank=1, world_size=2, batch_size=4, workers=2,
                        shuffle_buffer=5)
    q = partition_epoch(SHARDS["uneven"], seed=8, epoch=0, rank=1, world_size=2, batch_size=4, workers=2,
                        shuffle_buffer=5)
    for w in range(p.workers):
        a, n, _ = p.worker_span(w)
        assert sorted(p.emission(w).tolist()) == list(range(n))
        assert sorted(p.worker_positions(w).tolist()) == list(range(p.rank_start + a, p.rank_start + a + n))
    assert any(p.emission(w).tolist() != q.emission(w).tolist() for w in range(p.workers))
    flat = partition_epoch(SHARDS["uneven"], seed=7, epoch=0, rank=1, world_size=2, batch_size=4, workers=2,
                           shuffle_buffer=0)
    assert all(flat.emission(w).tolist() == list(range(flat.worker_span(w)[1])) for w in range(2))
