"""Multi-process (gloo) teacher tests: world-size independence, online rebalance, mismatch detection."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import procs
import pytest
import teacher_dist_worker as w
import torch

from attent_scale.teacher import key_image, read_records
from attent_scale.teacher.records import RECORD_KEYS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference_topk(keys: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Sort-based reference: largest key first (NaN last), ties to the smaller id."""
    u = key_image(keys)
    order = sorted(range(len(ids)), key=lambda i: (-int(u[i]), int(ids[i])))
    return np.sort(ids[order[: max(0, min(k, len(ids)))]]).astype(np.int64)


def _spawn(world: int, tmp: Path) -> tuple[list[dict[str, Any]], float]:
    t0 = time.perf_counter()
    procs.spawn(w.run, (world, _free_port(), str(tmp)), world)  # killed if the test fails or times out
    return [
        torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)
    ], time.perf_counter() - t0


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    tmp1 = tmp_path_factory.mktemp("w1")
    ref = w.teacher_scenarios(0, 1, None, tmp1)
    ref.update(w.online_scenario(0, 1, None))
    ref.update(w.small_scenarios(0, 1, None))
    ref.update(w.checkpoint_scenario(0, 1, None, tmp1))
    ref.update(w.stop_scenario(0, 1, None))
    out[1] = [ref]
    for world in (2, 4):
        tmp = tmp_path_factory.mktemp(f"w{world}")
        res, secs = _spawn(world, tmp)
        print(f"{world}-rank spawn: {secs:.1f} s")  # a number to read, not a timed assertion
        for r in res:
            r["_dir"] = tmp
        out[world] = res
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_topk_same_on_every_rank_and_equal_to_reference(
    runs: dict[int, list[dict[str, Any]]], world: int
) -> None:
    all_ids = np.arange(w.N, dtype=np.int64)
    loss_all = w.losses_of(all_ids)
    res = runs[world]
    checked = 0
    for strategy in w.STRATEGIES:
        keys = w.strategy_keys(
            strategy, torch.from_numpy(loss_all), torch.from_numpy(all_ids), seed=11, cycle=2, temperature=0.5
        ).numpy()
        for k in w.KS:
            ref = _reference_topk(keys, all_ids, k)
            for scheme in ("shuffled", "contiguous"):
                for method in w.METHODS:
                    key = f"topk/{scheme}/{strategy}/{method}/{k}"
                    for r in range(world):
                        got = res[r][key]
                        assert got.dtype == np.int64
                        np.testing.assert_array_equal(got, ref, err_msg=f"{key} rank {r}")
                        checked += 1
    assert checked == 3 * len(w.KS) * 2 * 2 * world


@pytest.mark.parametrize("world", [2, 4])
def test_all_equal_keys_ties_to_smaller_id(runs: dict[int, list[dict[str, Any]]], world: int) -> None:
    for scheme in ("shuffled", "contiguous"):
        for method in w.METHODS:
            for k in (0, 1, 333, 1000):
                for r in range(world):
                    np.testing.assert_array_equal(
                        runs[world][r][f"equal/{scheme}/{method}/{k}"], np.arange(k)
                    )


@pytest.mark.parametrize("world", [2, 4])
def test_threshold_reports_bytes_and_phases(runs: dict[int, list[dict[str, Any]]], world: int) -> None:
    for scheme in ("shuffled", "contiguous"):
        rep = runs[world][0][f"report/threshold/{scheme}"]
        assert rep["method"] == "threshold" and rep["world_size"] == world and rep["k"] == 400
        assert rep["bytes_total"] > 0 and set(rep["bytes_sent"]) >= {"control", "collective", "share"}
        assert set(rep["seconds"]) == {"collective", "select", "share", "total"}


@pytest.mark.parametrize("world", [2, 4])
def test_hash_mismatch_raises_on_every_rank(runs: dict[int, list[dict[str, Any]]], world: int) -> None:
    for r in range(world):
        msg = runs[world][r]["mismatch"]
        assert msg is not None and "rank 0 hash" in msg and "!= rank 1 hash" in msg


@pytest.mark.parametrize("world", [2, 4])
def test_teacher_selection_independent_of_world_size(
    runs: dict[int, list[dict[str, Any]]], world: int
) -> None:
    ref = runs[1][0]
    for mode in ("cycle", "ledger"):
        for strategy in w.STRATEGIES:
            for method in w.METHODS:
                key = f"teacher/{mode}/{strategy}/{method}"
                mine = runs[world][0][key]
                assert mine["shas"] == ref[key]["shas"], key
                for r in range(world):
                    np.testing.assert_array_equal(runs[world][r][key]["ids1"], ref[key]["ids1"])
                    np.testing.assert_array_equal(runs[world][r][key]["ids2"], ref[key]["ids2"])
                    assert runs[world][r][key]["resumed_same"], key
                other = runs[world][0][f"teacher/{mode}/{strategy}/gather"]  # both methods: one answer
                np.testing.assert_array_equal(mine["ids1"], other["ids1"])
                np.testing.assert_array_equal(mine["ids2"], other["ids2"])
                rec = mine["record"]
                assert tuple(rec) == RECORD_KEYS and rec["world_size"] == world
                assert rec["sha256"] == mine["shas"][-1]
                if strategy != "random":
                    # every id % 97 == 0 / 1 has a non-finite loss (never scored ids % 3 == 0 keep the
                    # shifted training loss, also non-finite)
                    assert rec["n_nonfinite"] == sum(1 for i in range(w.N) if i % 97 in (0, 1))
                    sel = runs[world][0][key]["ids1"]
                    assert not np.isin(sel, [i for i in range(w.N) if i % 97 in (0, 1)]).any()


def test_teacher_records_written_by_rank0(runs: dict[int, list[dict[str, Any]]]) -> None:
    recs = read_records(runs[2][0]["_dir"] / "sel-cycle-soft-threshold.jsonl")
    assert len(recs) == 2 and [r["epoch"] for r in recs] == [1, 2]
    assert all(tuple(r) == RECORD_KEYS and r["method"] == "threshold" for r in recs)
    st = recs[0]["staleness"]
    assert st["n"] == 1000 and 0 <= st["median"] <= st["max"] <= 40


@pytest.mark.parametrize("world", [1, 2, 4])
def test_online_rebalance_exactly_b_per_rank(runs: dict[int, list[dict[str, Any]]], world: int) -> None:
    B = 5
    for strategy in w.STRATEGIES:
        for method in w.METHODS:
            key = f"online/{strategy}/{method}"
            per_rank = [runs[world][r][key] for r in range(world)]
            assert all(len(p["ids"]) == B and p["rows_ok"] for p in per_rank), key
            union = np.concatenate([p["ids"] for p in per_rank])
            assert len(np.unique(union)) == len(union) == B * world, key
            # the chosen set is the global top B*world of all candidates' keys (filler -1 never chosen)
            c = per_rank[0]["c"]
            cand = np.concatenate([np.arange(r * 100, r * 100 + c) for r in range(world)])
            cand_ids = cand.copy()
            cand_ids[0] = -1
            keys = w.strategy_keys(
                strategy,
                torch.from_numpy(w.losses_of(cand).astype(np.float32)),
                torch.from_numpy(cand),
                seed=1,
                cycle=7,
            ).numpy()
            keys[0] = np.nan
            slots = np.arange(len(cand))
            chosen = _reference_topk(keys, slots, B * world)
            np.testing.assert_array_equal(np.sort(union), np.sort(cand_ids[chosen]), err_msg=key)
            # deterministic dealing: the sorted chosen slots are dealt to ranks in runs of B
            for r in range(world):
                np.testing.assert_array_equal(per_rank[r]["ids"], cand_ids[chosen[r * B : (r + 1) * B]])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_checkpoint_holds_selection_once_as_bits_and_is_bounded(
    runs: dict[int, list[dict[str, Any]]], world: int
) -> None:
    n = w.N_CKPT
    nbits = (n + 7) // 8
    block = 8 * -(-nbits // world)  # ids per owner block (8-aligned)
    for r, res in enumerate(runs[world]):
        # the periodic exchange bounds what a rank holds of other ranks' observations
        assert res["ckpt/pending_max"] <= res["ckpt/every"] * (res["ckpt/per_step"] + 1)
        # the selection: one uint8 tensor of ceil(N/8) bytes (the trainer's and the teacher's cache are
        # the same array), the ledger: one int64 entry per owned id
        bit_tensors = [k for k, shape in res["ckpt/shapes"].items() if shape == (nbits,)]
        assert len(bit_tensors) == 1, res["ckpt/shapes"]
        assert res["ckpt/shapes"]["/teacher/ledger/block"] == (min(n, (r + 1) * block) - min(n, r * block),)
        assert res["ckpt/size"] <= 8 * block + nbits + 16 * 1024  # O(N / world + N / 8)
        assert res["ckpt/bits_back"] == res["ckpt/sha"] == res["ckpt/cached_back"]
        np.testing.assert_array_equal(res["ckpt/ids"], runs[1][0]["ckpt/ids"])  # world-size independent


@pytest.mark.parametrize("world", [2, 4])
def test_empty_owner_blocks_select_like_one_rank(runs: dict[int, list[dict[str, Any]]], world: int) -> None:
    """N = 9 and 3 on 4 ranks: ranks 2-3 own an empty, unaligned block [N, N); the selection is as on one."""
    keys = [key for key in runs[1][0] if key.startswith("small/")]
    assert len(keys) == 16
    for key in keys:
        for r in runs[world]:
            assert r[key].tolist() == runs[1][0][key].tolist(), key



@pytest.mark.parametrize("world", [1, 2, 4])
def test_stop_flag_on_one_rank_ends_the_scoring_pass_on_every_rank(
    runs: dict[int, list[dict[str, Any]]], world: int
) -> None:
    """A stop flag on the last rank only (after its 7th batch; polls every 3): every rank raises
    ScoringStopped after the same agreed round (9 batches: the third poll), also a rank with no batches;
    the full pass after it selects as a pass that was never stopped does."""
    res = runs[world]
    for r in range(world):
        assert res[r]["stop/none/raised"] is None
        seen = res[r]["stop/late/raised"]
        assert seen is not None, f"rank {r} went on scoring"
        n_batches = -(-len(w.split(np.arange(w.N), r, world, "shuffled")) // 20)
        assert seen == min(9, n_batches), (r, seen, n_batches)
        np.testing.assert_array_equal(res[r]["stop/late/ids"], res[r]["stop/none/ids"])
        np.testing.assert_array_equal(res[r]["stop/none/ids"], runs[1][0]["stop/none/ids"])
