"""The distributed selection at any world size, simulated in one process (ranks as threads over a fake
group, the gloo code path): equal to a plain sort reference, empty owner blocks, N < W, N % 8 != 0."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attent_scale.teacher import Selection, key_image, strategy_keys, uniform_noise
from attent_scale.teacher.ledger import block_range
from attent_scale.teacher.simulate import SimulationError, run_ranks, simulate_selection
from attent_scale.teacher.topk import select_block_bits, select_global

SEED = 4


def sort_topk(keys: np.ndarray, k: int) -> np.ndarray:
    """Plain sort: largest key first, NaN after every other key, ties to the smaller id."""
    ids = np.arange(keys.shape[0])
    nan = np.isnan(keys)
    order = np.lexsort((ids, np.where(nan, 0.0, -(keys + 0.0)), nan))
    return np.sort(order[: max(0, min(k, keys.shape[0]))])


def expected(loss: np.ndarray, strategy: str, ratio: float, *, ref: np.ndarray | None = None,
             quantile: float = 0.5, prune_ratio: float = 0.5) -> np.ndarray:
    """What a one-rank teacher should select at epoch 1 (-1 marks a never observed id)."""
    n = loss.shape[0]
    ids = np.arange(n)
    seen = loss != -1.0
    score = loss.astype(np.float32) - (ref if ref is not None else np.float32(0))
    score = np.where(seen, score, np.nan).astype(np.float32)
    if strategy == "random":
        keys = strategy_keys("random", np.zeros(n), ids, seed=SEED, cycle=1).numpy()
        return sort_topk(keys, math.floor(ratio * n + 0.5))
    if strategy == "prune":
        fin = np.isfinite(score)
        if quantile:
            n_low = math.floor(quantile * fin.sum() + 0.5)
            order = np.lexsort((ids[fin], score[fin]))
            low = np.zeros(n, dtype=bool)
            low[ids[fin][order[:n_low]]] = True
        else:
            fixed = np.round(np.minimum(score[fin].astype(np.float64), 1e4) * 2.0**20)
            low = np.zeros(n, dtype=bool)
            low[ids[fin]] = fixed < (fixed.sum() / fin.sum() if fin.any() else 0.0)
            n_low = int(low.sum())
        keys = np.full(n, np.inf)
        keys[low] = uniform_noise(ids[low], seed=SEED, cycle=1)
        return sort_topk(keys, n - math.floor(prune_ratio * n_low + 0.5))
    keys = strategy_keys(strategy, score, ids, seed=SEED, cycle=1).numpy()
    keys[~seen] = np.inf
    n_fin = int((seen & np.isfinite(loss)).sum())
    return sort_topk(keys, n - int(seen.sum()) + math.floor(ratio * n_fin + 0.5))


class ArrayReference:
    """A stand-in for teacher.reference.Reference: reference losses held in memory."""

    def __init__(self, loss: np.ndarray) -> None:
        self.loss = loss.astype(np.float32)

    def losses(self, ids: np.ndarray) -> np.ndarray:
        return self.loss[np.asarray(ids, dtype=np.int64)]


def make_losses(n: int, seed: int, unseen: float, nan: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    loss = rng.choice(np.array([0.5, 1.0, 1.5, 2.0, 3.0], dtype=np.float32), n)  # many ties
    loss += rng.random(n).astype(np.float32) * (rng.random(n) < 0.5)
    loss[rng.random(n) < nan] = np.nan
    loss[rng.random(n) < 0.01] = np.inf
    loss[rng.random(n) < unseen] = -1.0
    return loss


def test_empty_trailing_owner_blocks_select() -> None:
    """N = 20,001 over 64 ranks: rank 63 owns the empty block [20001, 20001), lo not 8-aligned (it raised)."""
    assert block_range(63, 20_001, 64) == (20_001, 20_001)
    keys = key_image(np.random.default_rng(0).random(20_001))

    def rank_fn(rank: int, group: object) -> np.ndarray:
        lo, hi = block_range(rank, 20_001, 64)
        return select_block_bits(lambda: iter([keys[lo:hi]]), lo, hi, 20_001, 7_000, group=group)

    bits = run_ranks(64, rank_fn)
    assert all(np.array_equal(b, bits[0]) for b in bits)
    assert Selection(bits[0], 20_001).ids().tolist() == sort_topk(keys.astype(np.float64), 7_000).tolist()
    out = simulate_selection(20_001, 64, strategy="hard", method="threshold", seed=SEED)
    assert Selection(out["bits"], 20_001).count > 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 300), world=st.sampled_from([1, 2, 3, 5, 8, 13, 40, 77]),
       strategy=st.sampled_from(["hard", "soft", "random", "prune"]),
       method=st.sampled_from(["gather", "threshold"]), ratio=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
       quantile=st.sampled_from([0.0, 0.4]), excess=st.booleans(), unseen=st.sampled_from([0.0, 0.2]),
       nan=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 3))
def test_simulated_selection_equals_sort_reference(n: int, world: int, strategy: str, method: str,
                                                   ratio: float, quantile: float, excess: bool,
                                                   unseen: float, nan: float, seed: int) -> None:
    loss = make_losses(n, seed, unseen, nan)
    ref = np.random.default_rng(seed + 9).uniform(0.0, 2.0, n).astype(np.float32) if excess else None
    out = simulate_selection(n, world, strategy=strategy, method=method, ratio=ratio,
                             prune_quantile=quantile, losses=loss, seed=SEED,
                             reference=ArrayReference(ref) if excess else None,
                             extra={"prune_ratio": 0.5})
    got = Selection(out["bits"], n).ids()
    want = expected(loss, strategy, ratio, ref=ref, quantile=quantile)
    assert got.tolist() == want.tolist()
    assert {r["world_size"] for r in out["records"]} == {world}


@pytest.mark.parametrize("method", ["gather", "threshold"])
def test_select_global_on_many_ranks_with_empty_ones(method: str) -> None:
    """select_global with N < W (most ranks hold nothing), unsorted ids across ranks, NaN keys."""
    n, world = 50, 97
    rng = np.random.default_rng(1)
    keys = rng.choice([0.0, 1.0, 2.0, np.nan], n)
    owner = rng.integers(0, world, n)

    def rank_fn(rank: int, group: object) -> np.ndarray:
        mine = np.flatnonzero(owner == rank)
        return select_global(keys[mine], mine, 21, method=method, group=group).numpy()

    got = run_ranks(world, rank_fn)
    assert all(g.tolist() == got[0].tolist() for g in got)
    assert got[0].tolist() == sort_topk(keys, 21).tolist()


def test_1024_ranks_fewer_ids_than_ranks() -> None:
    """W = 1,024 and N = 1,001: 898 ranks own an empty block, the last non-empty one is not 8-aligned."""
    loss = make_losses(1_001, 0, 0.1, 0.05)
    out = simulate_selection(1_001, 1_024, strategy="hard", method="threshold", ratio=0.3, losses=loss,
                             seed=SEED)
    assert Selection(out["bits"], 1_001).ids().tolist() == expected(loss, "hard", 0.3).tolist()


def test_a_failing_rank_releases_the_others() -> None:
    def rank_fn(rank: int, group: object) -> None:
        if rank == 2:
            raise KeyError("boom")
        select_global(np.ones(1), np.array([rank]), 1, group=group)

    with pytest.raises(KeyError, match="boom"):
        run_ranks(4, rank_fn)

    def diverge(rank: int, group: object) -> None:
        if rank == 0:
            select_global(np.ones(1), np.array([rank]), 1, group=group)
        else:
            simulate_bits = select_block_bits(lambda: iter([]), 0, 0, 0, 0, group=group)
            del simulate_bits

    with pytest.raises(SimulationError, match="different collectives"):
        run_ranks(3, diverge)


def test_prune_keeps_its_block_not_the_global_low_id_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank finds the low-loss ids of its own block (one N-bit set); before, select_global handed
    every rank all n_low low ids (8 bytes each, plus an N-byte unpack)."""
    from attent_scale.teacher import teacher as teacher_module

    sizes: list[int] = []
    real = teacher_module.select_global

    def spy(*args: object, **kw: object) -> object:
        out = real(*args, **kw)
        sizes.append(int(out.numel()))
        return out

    monkeypatch.setattr(teacher_module, "select_global", spy)
    loss = make_losses(4_000, 0, 0.05, 0.02)
    out = simulate_selection(4_000, 8, strategy="prune", method="threshold", prune_quantile=0.5, losses=loss,
                             seed=SEED)
    assert sizes == []
    assert Selection(out["bits"], 4_000).ids().tolist() == expected(loss, "prune", 0.5).tolist()
    assert all(s.weighted for s in out["selections"])


def test_simulate_command_prints_time_and_bytes_per_rank(capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from attent_scale.cli import main

    assert main(["simulate", "--samples", "20001", "--ranks", "64", "--strategy", "prune"]) == 0
    out = capsys.readouterr().out
    assert "N=20001 W=64 strategy=prune method=threshold" in out and "selection wall time" in out
    assert "bytes sent per rank (ring model): max" in out and "share: max" in out
    for bad in (["--ranks", "0"], ["--ratio", "2"], ["--samples", "-1"]):
        args = {"--samples": "10", "--ranks": "2", **dict(zip(bad[::2], bad[1::2], strict=True))}
        assert main(["simulate", *[x for kv in args.items() for x in kv]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and bad[0] in err[0], err
    assert "attent_scale.teacher.simulate" in sys.modules  # imported when run, not by the parser


@pytest.mark.parametrize("quantile", [0.0, 0.5])
def test_prune_ranks_by_excess_loss(quantile: float) -> None:
    """teacher.score=excess with prune: the low ids are those of low learner - reference loss (it used the
    raw loss)."""
    loss = make_losses(400, 2, 0.05, 0.02)
    ref = np.random.default_rng(7).uniform(0.0, 3.0, 400).astype(np.float32)
    got = {}
    for name, r in (("excess", ArrayReference(ref)), ("loss", None)):
        out = simulate_selection(400, 3, strategy="prune", prune_quantile=quantile, losses=loss, reference=r,
                                 seed=SEED)
        got[name] = Selection(out["bits"], 400).ids().tolist()
    assert got["excess"] == expected(loss, "prune", 0.5, ref=ref, quantile=quantile).tolist()
    assert got["loss"] == expected(loss, "prune", 0.5, quantile=quantile).tolist()
    assert got["excess"] != got["loss"]
