"""Unbiased pruning (strategy `prune`) and annealing: what is dropped, the weights, plans, state, ranks."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import procs
import prune_dist_worker as w
import pytest
import torch

from attent_scale.config import TeacherConfig, load_config
from attent_scale.errors import UserError
from attent_scale.teacher import Teacher


def _teacher(**kw: object) -> Teacher:
    cfg = TeacherConfig(**{"mode": "ledger", "strategy": "prune", "warmup_epochs": 1, **kw})
    return Teacher(cfg, num_samples=w.N, seed=3)


def _observe_all(t: Teacher) -> None:
    ids = w.observed(0, 1)
    t.observe(torch.from_numpy(ids), torch.from_numpy(w.losses_of(ids)), step=0)


@pytest.mark.parametrize("quantile", [0.0, 0.7])
def test_prune_drops_only_low_loss_ids_and_weights_the_kept_ones(quantile: float) -> None:
    t = _teacher(prune_ratio=0.6, prune_quantile=quantile)
    _observe_all(t)
    sel = t.select(1, step=5)
    ids = np.arange(w.N)
    loss = w.losses_of(ids)
    seen = ids % 13 != 5
    fin = seen & np.isfinite(loss)
    if quantile:
        n_low = int(np.floor(quantile * fin.sum() + 0.5))
        order = np.lexsort((ids[fin], loss[fin]))  # by loss, ties to the smaller id
        low = np.zeros(w.N, dtype=bool)
        low[ids[fin][order[:n_low]]] = True
    else:
        low = fin & (loss < loss[fin].mean())
        n_low = int(low.sum())
    kept = sel.mask(ids)
    n_drop = int(np.floor(0.6 * n_low + 0.5))
    assert sel.count == w.N - n_drop
    assert kept[~low].all()  # high, non-finite and never-observed ids are always kept
    assert (~kept[low]).sum() == n_drop
    weights = sel.sample_weights(ids).numpy()
    assert sel.weight == pytest.approx(n_low / (n_low - n_drop))
    assert np.array_equal(weights != 1.0, kept & low)
    assert t.last_record["n_unseen"] == int((~seen).sum()) and t.last_record["n_nonfinite"] > 0
    # fresh noise each epoch: another subset of the low ids, same size
    other = t.select(2, step=6)
    assert other.count == sel.count and other.sha256 != sel.sha256


def test_keep_probability_times_weight_is_one() -> None:
    t = _teacher(prune_ratio=0.5, prune_quantile=0.5)
    _observe_all(t)
    total = np.zeros(w.N)
    epochs = 300
    for epoch in range(1, epochs + 1):
        sel = t.select(epoch, step=epoch)
        total += sel.mask(np.arange(w.N)) * sel.sample_weights(np.arange(w.N)).numpy()
    mean = total / epochs
    assert abs(mean.mean() - 1.0) < 0.01
    assert np.abs(mean - 1.0).max() < 0.35  # per id: binomial noise around 1 only


def test_prune_plans_no_scoring_pass_and_counts_its_steps() -> None:
    for mode in ("cycle", "ledger"):
        t = _teacher(mode=mode, prune_ratio=0.6, prune_quantile=0.7, full_epochs_per_cycle=0)
        plans = [t.plan_epoch(e) for e in range(5)]
        assert not any(p.score for p in plans) and all(p.subset for p in plans[1:])
        assert t.planned_count(plans[1], 1000) == 1000 - round(0.6 * 700)
        assert t.planned_count(plans[0], 1000) == 1000


def test_anneal_trains_the_last_epochs_on_all_data() -> None:
    t = _teacher(anneal_fraction=0.125)
    assert t.anneal_epoch(6) == 5 and t.anneal_epoch(8) == 7 and t.anneal_epoch(0) is None
    t.start_anneal(t.anneal_epoch(6))
    assert [t.plan_epoch(e).subset for e in range(7)] == [False, True, True, True, True, False, False]
    t.start_anneal(7)  # an earlier start is kept
    assert t.anneal_from == 5
    for strategy in ("hard", "soft", "random"):
        cfg = TeacherConfig(mode="cycle", strategy=strategy, anneal_fraction=0.25, full_epochs_per_cycle=0)
        ct = Teacher(cfg, num_samples=100, seed=0)
        ct.start_anneal(ct.anneal_epoch(8))
        assert [ct.plan_epoch(e).subset for e in range(8)] == [False] + [True] * 5 + [False, False]
    none = Teacher(TeacherConfig(mode="none", anneal_fraction=0.5), num_samples=10, seed=0)
    assert none.anneal_epoch(6) is None


def test_state_round_trip_keeps_weights_and_anneal() -> None:
    t = Teacher(TeacherConfig(mode="cycle", strategy="random", random_reweight=True, initial_ratio=0.5,
                              ratio_schedule="constant", interval_schedule="fixed", initial_interval=2,
                              max_interval=2, warmup_epochs=0), num_samples=100, seed=1)
    sel = t.select(0, step=0)
    assert sel.weighted and sel.weight == pytest.approx(2.0) and sel.count == 50
    assert np.array_equal(sel.sample_weights(np.arange(100)).numpy() == 2.0, sel.mask(np.arange(100)))
    t.start_anneal(9)
    other = Teacher(t.cfg, num_samples=100, seed=1)
    other.load_state_dict(t.state_dict())
    again = other.select(1, step=3)  # the cycle's cached selection, weights included
    assert again.sha256 == sel.sha256 and again.weight == sel.weight
    assert np.array_equal(again.upweight, sel.upweight) and other.anneal_from == 9


def test_prune_config_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="teacher.strategy.*online"):
        load_config(None, ["teacher.mode=online", "teacher.strategy=prune"])
    with pytest.raises(UserError, match="teacher.prune_ratio"):
        load_config(None, ["teacher.prune_ratio=1.0"])
    with pytest.raises(UserError, match="teacher.anneal_fraction"):
        load_config(None, ["teacher.anneal_fraction=-0.1"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_selection_and_weights_identical_on_one_and_two_ranks(tmp_path: Path) -> None:
    ref = w.scenarios(0, 1, None)
    procs.spawn(w.run, (2, _free_port(), str(tmp_path)), 2)  # killed if the test fails or times out
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert set(ref) == set(ranks[0]) == set(ranks[1])
    for key, want in ref.items():
        for got in ranks:
            assert got[key] == want, key
    # the cases are not degenerate: something dropped, something upweighted, epochs differ
    assert all(v["count"] < w.N and v["n_up"] > 0 and v["weight"] > 1 for v in ref.values())
    assert ref["0.7/gather/1"]["selected"] != ref["0.7/gather/2"]["selected"]
    assert ref["0.7/gather/1"] == ref["0.7/threshold/1"]


def test_below_the_mean_is_planned_as_what_it_keeps(tmp_path: Path, tiny_shards: Path) -> None:
    """prune_quantile 0 drops a data-given count: once a selection is made the plan (and the LR schedule)
    uses what it kept, so an epoch budget ends at min_lr on its last step (it planned the median's count)."""
    import json

    from train_runner import check, run_train, tiny_run_config

    teacher = {"mode": "ledger", "strategy": "prune", "warmup_epochs": 1, "prune_ratio": 0.9,
               "prune_quantile": 0.0}
    cfg = tiny_run_config(tmp_path / "run", tiny_shards, teacher=teacher,
                          train={"max_steps": 1000, "max_epochs": 3, "warmup_steps": 0, "min_lr_ratio": 0.1},
                          eval={"every_steps": 0, "max_batches": 1, "batch_size": 16})
    check(run_train(cfg))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "lr" in r]
    records = [json.loads(x) for x in (tmp_path / "run" / "selection.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["n_selected"] < r["n_scored"] for r in records)
    last = steps[-1]
    assert last["epoch"] == 2
    # the LR of the last step is the schedule's last one before min_lr: the plan ends where the run ends
    from attent_scale.engines.base import lr_lambda

    want = 3e-3 * lr_lambda(last["step"] - 1, warmup_steps=0, max_steps=last["step"], min_lr_ratio=0.1)
    assert last["lr"] == pytest.approx(want, rel=1e-6), [(r["step"], r["lr"]) for r in steps[-4:]]
    # the recorded config is the user's (max_steps 1000), not the plan: rerunning it re-plans from scratch
    import yaml

    recorded = (tmp_path / "run" / "config.yaml").read_text()
    assert yaml.safe_load(recorded)["train"]["max_steps"] == 1000
    # ... headed by the steps this run planned once its prune selections said how many ids they kept
    assert recorded.startswith(f"# planned steps: {last['step']} "), recorded.splitlines()[0]
