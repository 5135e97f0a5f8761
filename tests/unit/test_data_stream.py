"""ShardStream: coverage, exact rank balance, selection filter, determinism, resume, faults."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from attent_scale.data import Manifest, ShardStream, collate
from attent_scale.data.builder import build_shards
from attent_scale.data.workers import StreamWorkers
from attent_scale.errors import UserError

WORDS = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "omega", "sigma", "import", "while",
         "for", "in", "range", "print", "self", "lambda", "yield", "with", "as", "try", "except"]


def make_shards(root: Path, seq_len: int = 12, per_shard: int = 13, n_docs: int = 40) -> Path:
    rng = random.Random(7)
    src = root / "src"
    src.mkdir(parents=True)
    for i in range(n_docs):
        (src / f"d{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 90))))
    out = root / "shards"
    build_shards([src], out, seq_len=seq_len, vocab_size=300, val_fraction=0.1,
                 samples_per_shard=per_shard, progress=False)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("stream"))


def run(stream: ShardStream, limit: int | None = None) -> list[np.ndarray]:
    """Ids of the batches consumed; with `limit`, stop right after the limit-th batch (as a trainer would)."""
    out: list[np.ndarray] = []
    if limit == 0:
        return out
    for batch in stream:
        out.append(batch["ids"].numpy().copy())
        if len(out) == limit:
            break
    return out


def flat(batches: list[np.ndarray]) -> list[int]:
    return [int(x) for b in batches for x in b]


class EveryThird:
    def mask(self, ids: np.ndarray) -> np.ndarray:
        return ids % 3 == 0


def test_shards_fixture_shape(shards: Path) -> None:
    m = Manifest.load(shards)
    assert len(m.splits["train"]) >= 5 and m.num_samples("train") > 50


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_union_is_all_ids_minus_dropped_and_counts_equal(shards: Path, world: int) -> None:
    n = Manifest.load(shards).num_samples("train")
    per_rank = []
    for rank in range(world):
        s = ShardStream(shards, "train", rank=rank, world_size=world, seed=5, batch_size=4, shuffle_buffer=16)
        ids = flat(run(s))
        assert len(ids) == s.samples_per_rank == n // world
        assert len(run(s)) == len(s)  # iterating again replays the epoch from its start
        assert sorted(ids) == s.epoch_ids().tolist()
        per_rank.append(ids)
    assert s.dropped == n % world
    union = [i for ids in per_rank for i in ids]
    assert len(union) == len(set(union)) == n - s.dropped
    assert set(union) <= set(range(n))


def test_batches_are_well_formed(shards: Path) -> None:
    m = Manifest.load(shards)
    s = ShardStream(shards, "train", batch_size=5, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == -(-m.num_samples("train") // 5)
    for b in batches:
        assert set(b) == {"ids", "input_ids", "labels"}
        assert b["input_ids"].shape == b["labels"].shape == (len(b["ids"]), m.seq_len)
        assert str(b["input_ids"].dtype) == str(b["labels"].dtype) == str(b["ids"].dtype) == "torch.int64"
        valid = b["labels"] != -100
        # targets are the inputs shifted by one inside each valid window
        assert (b["labels"][:, :-1][valid[:, 1:]] == b["input_ids"][:, 1:][valid[:, 1:]]).all()
    padded = [b for b in batches if (b["labels"] == -100).any()]
    assert len(padded) == 1  # only the split's last window is partial
    assert (m.num_tokens("train") - m.num_samples("train")) == sum(int((b["labels"] != -100).sum())
                                                                   for b in batches)
    one = collate([{"id": 3, "input_ids": np.arange(4), "labels": np.arange(4)}])
    assert one["ids"].tolist() == [3] and one["input_ids"].shape == (1, 4)


def test_deterministic_and_epoch_dependent(shards: Path) -> None:
    def ids(**kw: int) -> list[int]:
        args = {"batch_size": 3, "shuffle_buffer": 10, **kw}
        return flat(run(ShardStream(shards, "train", **args)))

    a = ids(seed=1, epoch=0, rank=1, world_size=2)
    assert a == ids(seed=1, epoch=0, rank=1, world_size=2)
    assert a != ids(seed=1, epoch=1, rank=1, world_size=2)
    assert a != ids(seed=2, epoch=0, rank=1, world_size=2)
    unshuffled = ids(seed=1, epoch=0, shuffle_buffer=0)
    assert unshuffled != sorted(unshuffled)  # the shard order itself is shuffled per epoch


def test_workers_yield_the_same_ids_without_overlap(shards: Path) -> None:
    for rank in range(2):
        kw = dict(rank=rank, world_size=2, seed=3, batch_size=4, shuffle_buffer=8)
        w0 = flat(run(ShardStream(shards, "train", num_workers=0, **kw)))
        s2 = ShardStream(shards, "train", num_workers=2, **kw)
        w2 = run(s2)
        assert len(w2) == len(s2) and all(len(b) == 4 for b in w2[:-1])
        assert sorted(flat(w2)) == sorted(w0) and len(set(flat(w2))) == len(w0)
        assert flat(w2) == flat(run(ShardStream(shards, "train", num_workers=2, **kw)))


@pytest.mark.parametrize("kind", ["array", "object"])
def test_selection_filter_is_balanced(shards: Path, kind: str) -> None:
    n = Manifest.load(shards).num_samples("train")
    if kind == "array":
        sel = np.random.default_rng(0).random(n) < 0.4
        chosen = set(np.flatnonzero(sel).tolist())
    else:
        sel = EveryThird()
        chosen = {i for i in range(n) if i % 3 == 0}
    world = 3
    got = []
    for rank in range(world):
        s = ShardStream(shards, "train", rank=rank, world_size=world, batch_size=4, selection=sel)
        ids = flat(run(s))
        assert len(ids) == len(chosen) // world == s.samples_per_rank
        got += ids
    assert s.selected == len(chosen) and s.dropped == len(chosen) % world
    assert len(got) == len(set(got)) == len(chosen) - s.dropped and set(got) <= chosen


def test_empty_selection_and_bad_selection(shards: Path) -> None:
    n = Manifest.load(shards).num_samples("train")
    s = ShardStream(shards, "train", world_size=2, selection=np.zeros(n, dtype=bool))
    assert len(s) == 0 and list(s) == [] and s.dropped == 0
    as_tensor = torch.from_numpy(np.arange(n) % 2 == 0)
    assert len(flat(run(ShardStream(shards, "train", selection=as_tensor)))) == (n + 1) // 2
    with pytest.raises(UserError, match="shape"):
        ShardStream(shards, "train", selection=np.ones(n + 1, dtype=bool))
    with pytest.raises(UserError, match="split 'nope'"):
        ShardStream(shards, "nope")


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_process_matches_uninterrupted(shards: Path, workers: int) -> None:
    kw = dict(rank=1, world_size=2, seed=9, epoch=2, batch_size=3, shuffle_buffer=7, num_workers=workers)
    full = run(ShardStream(shards, "train", **kw))
    stops = range(len(full) + 1) if workers == 0 else [0, 1, 2, 3, len(full) // 2 + 1, len(full) - 1]
    for k in stops:
        a = ShardStream(shards, "train", **kw)
        head = run(a, limit=k)
        state = a.state_dict()
        assert state["samples_consumed"] == len(flat(head))
        b = ShardStream(shards, "train", **dict(kw, epoch=0))  # the state carries the epoch
        b.load_state_dict(state)
        tail = run(b)
        assert flat(head) + flat(tail) == flat(full), k
        assert [len(x) for x in head + tail] == [len(x) for x in full]
    c = ShardStream(shards, "train", **dict(kw, batch_size=4))
    with pytest.raises(UserError, match="batch_size"):
        c.load_state_dict(state)


def test_corrupt_shards_are_counted_and_still_balanced(tmp_path: Path, shards: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    m = Manifest.load(bad)
    first, second = m.splits["train"][0], m.splits["train"][1]
    truncated = bad / first.name
    truncated.write_bytes(truncated.read_bytes()[: 1024 * 4])  # 4 samples' worth of tar blocks
    flipped = bad / second.name
    data = bytearray(flipped.read_bytes())
    data[512:514] = b"\xff\xff"  # token 65535 >= vocab: the first sample does not decode
    flipped.write_bytes(bytes(data))
    n = m.num_samples("train")
    broken = set(range(first.first_id + 4, first.last_id)) | {second.first_id}
    served = set()
    for rank in range(2):
        served |= set(ShardStream(bad, "train", rank=rank, world_size=2).epoch_ids().tolist())
    for workers in (0, 2):
        counts, faults, fillers = [], 0, 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for rank in range(2):
                s = ShardStream(bad, "train", rank=rank, world_size=2, batch_size=4, num_workers=workers)
                batches = list(s)
                ids = np.concatenate([b["ids"].numpy() for b in batches])
                for b in batches:
                    filler = b["ids"] == -1
                    assert (b["labels"][filler] == -100).all()
                counts.append(len(ids))
                faults += s.faults
                fillers += int((ids == -1).sum())
        assert counts == [n // 2, n // 2]
        assert faults == fillers == len(broken & served) > 0
        if workers == 0:
            msgs = [str(w.message) for w in caught]
            assert any(first.name in msg for msg in msgs) and any(second.name in msg for msg in msgs)
            assert sum(first.name in msg for msg in msgs) == 1  # once per shard


def test_missing_shard_fails_at_construction(tmp_path: Path, shards: Path) -> None:
    gone = tmp_path / "gone"
    shutil.copytree(shards, gone)
    (gone / "train-000003.tar").unlink()
    with pytest.raises(UserError, match="train-000003.tar"):
        ShardStream(gone, "train")
    with pytest.raises(UserError, match="manifest.json"):
        ShardStream(tmp_path, "train")


@pytest.mark.parametrize("world", [1, 3])
def test_stream_and_workers_hold_only_their_shards_slice_of_the_selection(shards: Path, world: int) -> None:
    from attent_scale.data.stream import _EpochDataset
    from attent_scale.teacher import Selection

    m = Manifest.load(shards)
    n = m.num_samples("train")
    sel = Selection.from_mask(np.random.default_rng(2).random(n) < 0.5)
    firsts = {i: s.first_id for i, s in enumerate(m.shards("train"))}
    for rank in range(world):
        s = ShardStream(shards, "train", rank=rank, world_size=world, seed=4, epoch=1, batch_size=3,
                        shuffle_buffer=5, selection=sel, num_workers=2)
        plan = s._plan
        read = {int(np.searchsorted([s.first_id for s in m.shards("train")], i, side="right")) - 1
                for i in s.epoch_ids().tolist()}
        assert set(plan.bits) == read  # exactly the shards this rank reads, nothing of size N
        assert plan.selection_nbytes == sum((m.shards("train")[i].count + 7) // 8 for i in read)
        for si, bits in plan.bits.items():  # each slice is the selection re-based to its shard
            c = m.shards("train")[si].count
            np.testing.assert_array_equal(bits, sel.slice_bits(firsts[si], firsts[si] + c))
        whole = []
        for w in range(2):
            sub = plan.restrict(w)
            assert set(sub.bits) <= set(plan.bits)
            full_run = [b["packed"][:, 0].tolist() for b in _EpochDataset(plan, [0, 0], 0)._worker(w)]
            own_run = [b["packed"][:, 0].tolist() for b in _EpochDataset(sub, [0, 0], 0)._worker(w)]
            assert own_run == full_run  # a worker needs nothing but its own slice
            whole += [i for b in own_run for i in b]
            if world == 3:
                assert sub.selection_nbytes < plan.selection_nbytes
        assert sorted(whole) == s.epoch_ids().tolist()
        assert set(s.epoch_ids().tolist()) <= set(sel.ids().tolist())
        # real DataLoader workers (each restricts its plan) yield what one process yields
        assert sorted(flat(run(s))) == s.epoch_ids().tolist()


def test_corrupt_sample_ids_are_reported_once_each(tmp_path: Path, shards: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    shard = Manifest.load(bad).splits["train"][1]
    data = bytearray((bad / shard.name).read_bytes())
    data[512:514] = b"\xff\xff"  # token 65535 >= vocab: the shard's first sample does not decode
    (bad / shard.name).write_bytes(bytes(data))
    with StreamWorkers(2) as pool:
        for workers, shared in ((0, None), (2, None), (2, pool)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = ShardStream(bad, "train", batch_size=4, num_workers=workers, workers=shared)
                taken = []
                for _ in s:
                    taken += s.take_bad_ids()
            assert taken == [shard.first_id] and s.faults == 1 and s.take_bad_ids() == []


def _batches(stream: ShardStream, limit: int | None = None) -> list[tuple[list[int], list[list[int]]]]:
    """(ids, input_ids) of every batch consumed, to compare streams exactly."""
    out = []
    for batch in stream:
        out.append((batch["ids"].tolist(), batch["input_ids"].tolist()))
        if len(out) == limit:
            break
    return out


@pytest.fixture
def pid_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file each shared worker appends its pid to whenever it starts an iteration (the patched dataset
    reaches the workers through fork)."""
    from attent_scale.data import workers as workers_mod

    log = tmp_path / "pids"
    real = workers_mod._PublishedPlan.__iter__

    def logged(self):  # type: ignore[no-untyped-def]
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        yield from real(self)

    monkeypatch.setattr(workers_mod._PublishedPlan, "__iter__", logged)
    return log


def test_shared_workers_serve_epochs_and_scoring_passes_exactly_with_the_same_processes(
    shards: Path, pid_log: Path
) -> None:
    from attent_scale.teacher import Selection

    n = Manifest.load(shards).num_samples("train")
    sel = Selection.from_mask(np.random.default_rng(5).random(n) < 0.6)
    kw = dict(rank=1, world_size=2, seed=6, shuffle_buffer=5, num_workers=2)
    # a run's sequence: train epochs over a selection (batch 4), a scoring pass over all data (batch 7)
    passes = [dict(epoch=0, batch_size=4, selection=sel), dict(epoch=1, batch_size=7),
              dict(epoch=1, batch_size=4, selection=sel), dict(epoch=2, batch_size=7),
              dict(epoch=2, batch_size=4)]
    with StreamWorkers(2) as pool:
        for i, p in enumerate(passes):
            s = ShardStream(shards, "train", **kw, **p, workers=pool)
            got = _batches(s)
            assert got == _batches(ShardStream(shards, "train", **kw, **p)), p
            assert len(got) == len(s) and s.batches_consumed == len(s)
            if i == 0:
                pids = pool.pids()
                assert len(set(pids)) == 2
                for physical in range(2):  # a worker's plan file holds only its own shards' bits
                    with open(os.path.join(pool._dir, f"worker{physical}.pkl"), "rb") as f:
                        plan, _, w = pickle.load(f)
                    assert set(plan.bits) == set(s._plan.restrict(w).bits)
                    assert plan.selection_nbytes < s._plan.selection_nbytes
            assert pool.pids() == pids
        directory = pool._dir
    logged = [int(x) for x in pid_log.read_text().split()]
    # every pass ran in the same two processes: restarted workers would bring new pids
    assert set(logged) == set(pids) and len(logged) >= 2 * len(passes)
    assert not os.path.exists(directory)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), "a worker outlived close()"


@pytest.mark.parametrize("k", [1, 3, 6])
def test_shared_workers_drop_an_abandoned_iteration(shards: Path, k: int) -> None:
    kw = dict(rank=0, world_size=2, seed=2, batch_size=3, shuffle_buffer=7, num_workers=2)
    full0 = _batches(ShardStream(shards, "train", **kw, epoch=0))
    full1 = _batches(ShardStream(shards, "train", **kw, epoch=1))
    with StreamWorkers(2) as pool:
        a = ShardStream(shards, "train", **kw, epoch=0, workers=pool)
        it = iter(a)
        head = [(b["ids"].tolist(), b["input_ids"].tolist()) for _, b in zip(range(k), it, strict=False)]
        assert head == full0[:k]
        state = a.state_dict()
        # the next epoch (an anneal cut), then the stopped one continued from its checkpointed position
        assert _batches(ShardStream(shards, "train", **kw, epoch=1, workers=pool)) == full1
        with pytest.raises(RuntimeError, match="ended by a later one"):
            next(it)  # the abandoned iterator yields nothing of another iteration
        b = ShardStream(shards, "train", **kw, epoch=1, workers=pool)
        b.load_state_dict(state)
        assert head + _batches(b) == full0
        # the same object, iterated again after a stop, continues where it stopped
        c = ShardStream(shards, "train", **kw, epoch=0, workers=pool)
        first = _batches(c, limit=k)
        assert first + _batches(c) == full0
    with pytest.raises(UserError, match="num_workers"):
        ShardStream(shards, "train", **dict(kw, num_workers=3), workers=pool)
