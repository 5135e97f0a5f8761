"""Strategy signal: the signals and the threshold rule on fixed losses, the ledger's history, the
selection it makes, its record, resume and re-blocking, config errors, metrics and the bench sentence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import signal_dist_worker as w
import torch

from attent_scale.config import TeacherConfig, load_config, validate_teacher
from attent_scale.errors import UserError
from attent_scale.teacher.ledger import Ledger, unpack_entries
from attent_scale.teacher.signals import (
    KEEP,
    LEARNED,
    MEMORIZED,
    UNLEARNABLE,
    explain,
    histogram,
    memorized_cut,
    quantile,
    reasons,
    thresholds,
)


def _th(**kw: float) -> object:
    cfg = TeacherConfig(strategy="signal", **{"signal_tolerance": 0.0, "signal_gap_allowance": 0.0, **kw})
    train = np.concatenate([3.5 + w.uniform_noise(np.arange(900), seed=4, cycle=0), np.full(100, 1.0)])
    return thresholds(cfg, w.val_hist(), histogram(train))  # 10% far below every val loss


def test_memorized_is_the_excess_of_low_train_losses_beyond_the_sampling_allowance() -> None:
    val = w.val_hist()  # 500 over [3.5, 4.5)
    same = histogram(3.5 + w.uniform_noise(np.arange(2000), seed=5, cycle=0))  # generalizes: no excess
    cut, excess, allowance = memorized_cut(same, val, 1.36)
    assert cut == -np.inf and excess < allowance == pytest.approx(1.36 * np.sqrt(1 / 500 + 1 / 2000))
    copies = histogram(np.concatenate([3.5 + w.uniform_noise(np.arange(1000), seed=5, cycle=0),
                                       1.0 + 0.5 * w.uniform_noise(np.arange(1000), seed=6, cycle=0)]))
    cut, excess, allowance = memorized_cut(copies, val, 1.36)  # half the train losses below all of val
    assert excess == pytest.approx(0.5, abs=0.01)
    below = np.concatenate([3.5 + w.uniform_noise(np.arange(1000), seed=5, cycle=0),
                            1.0 + 0.5 * w.uniform_noise(np.arange(1000), seed=6, cycle=0)]) < cut
    assert below.sum() == pytest.approx((0.5 - allowance) * 2000, abs=20)  # the excess less the allowance
    assert cut <= 1.5  # only the far-low ones
    assert memorized_cut(copies, val, 1.36, 0.1)[2] == pytest.approx(allowance + 0.1)  # ordinary overfitting


def test_quantiles_of_the_histogram() -> None:
    h = histogram(np.array([1.0, 2.0, 3.0, np.nan, 4.0]))
    assert h.sum() == 4  # NaN not counted
    assert quantile(h, 0.25) == 1.0 and quantile(h, 0.5) == 2.0 and quantile(h, 1.0) == 4.0
    assert quantile(np.zeros_like(h), 0.5) is None


def test_rule_on_fixed_losses_memorized_learned_noise_dropped_clean_kept() -> None:
    th = _th(signal_learned_quantile=0.3, signal_min_fall=0.05)
    assert 1.0 < th.memorized <= 3.5
    assert th.unlearnable == pytest.approx(4.48, abs=0.02)
    # memorized (still falling: learn alone keeps it), learned, noise, clean falling, clean flat,
    # unseen, no history
    loss = np.array([1.0,       3.7,     7.0,   4.0,             4.0,          np.nan, 7.0])
    prev = np.array([2.5,       3.71,    7.0,   4.4,             4.01,         np.nan, np.nan])
    for signal, want in (("gap", [MEMORIZED, KEEP, KEEP, KEEP, KEEP, KEEP, KEEP]),
                         ("learn", [KEEP, LEARNED, UNLEARNABLE, KEEP, KEEP, KEEP, KEEP]),
                         ("gap+learn", [MEMORIZED, LEARNED, UNLEARNABLE, KEEP, KEEP, KEEP, KEEP])):
        code, strength = reasons(signal, th, loss, prev)
        assert code.tolist() == want, signal
        assert (strength[code > 0] > 0).all() and (strength[code == 0] == 0).all()
    # a clean sample that is still being learned is kept whatever its level; no val pass: nothing dropped
    assert reasons("gap+learn", None, loss, prev)[0].tolist() == [KEEP] * 7


def test_excess_rule_tells_the_reason_by_where_the_loss_sits() -> None:
    th = _th(signal_excess=0.1)
    loss = np.array([1.0, 4.0, 7.0, 4.0])
    excess = np.array([0.0, 0.05, 0.0, 1.0])  # learner at the reference (3 first) or well above it (last)
    code, _ = reasons("excess", th, loss, None, excess)
    assert code.tolist() == [MEMORIZED, LEARNED, UNLEARNABLE, KEEP]


def test_ledger_history_is_the_observation_before_the_last_in_any_order() -> None:
    ids = np.array([3, 3, 3, 5, 5], dtype=np.int64)
    obs = [(ids[i:i + 1], np.array([x], np.float32), s)
           for i, (x, s) in enumerate([(2.0, 1), (1.0, 7), (3.0, 4), (9.0, 2), (8.0, 2)])]
    results = []
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1], [1, 3, 4, 0, 2]):
        led = Ledger(8, history=True)
        for i in order:
            led.observe(*obs[i][:2], obs[i][2])
        results.append((led.block_entries(0, 8).copy(), led.block_prev(0, 8).copy()))
    for cur, prev in results[1:]:
        assert np.array_equal(cur, results[0][0]) and np.array_equal(prev, results[0][1])
    cur, prev = results[0]
    assert unpack_entries(cur[[3]])[0][0] == 1.0  # step 7 ...
    assert unpack_entries(prev[[3]])[0][0] == 3.0  # ... then step 4
    assert unpack_entries(cur[[5]])[0][0] == 9.0 and prev[5] == 0  # both at step 2: no earlier one
    # one observe call with repeated ids folds like separate calls
    led = Ledger(8, history=True)
    led.observe(ids, np.array([2.0, 1.0, 3.0, 9.0, 8.0], np.float32), 1)
    led.observe(np.array([3]), np.array([0.5], np.float32), 2)
    assert unpack_entries(led.block_prev(3, 4))[0][0] == 3.0  # the max at step 1
    # state round trip and re-blocking carry the history
    back = Ledger.from_state_tensors(led.state_tensors())
    assert np.array_equal(back.block_prev(0, 8), led.block_prev(0, 8))
    two = [Ledger(8, r, 2, history=True) for r in range(2)]
    for r in range(2):
        two[r].merge(np.arange(two[r].lo, two[r].hi), led.block_entries(two[r].lo, two[r].hi))
        two[r]._prev[:] = led.block_prev(two[r].lo, two[r].hi)
    one = Ledger.reblock(8, 0, 1, 2, {r: two[r].state_tensors() for r in range(2)}, [0, 1])
    assert np.array_equal(one.block_prev(0, 8), led.block_prev(0, 8))


def _one_rank(**kw: object) -> dict:
    return w.scenario(0, 1, None, **kw)


def test_teacher_drops_memorized_and_noise_keeps_clean_and_unseen() -> None:
    res = _one_rank()
    ids = np.arange(w.N)
    k = w.kind(ids)
    seen = ids % 17 != 4
    fin = seen & (ids % 97 != 0)
    first, second = (np.isin(ids, res["ids"][i]) for i in (0, 1))
    assert first[fin].all() and res["records"][0]["signal"]["dropped"] == 0  # epoch 1: none flat or far
    assert not second[fin & (k > 0)].any()  # memorized and noise dropped
    assert second[fin & (k == 0)].all() and second[~seen].all()  # clean still falling, and unseen: kept
    assert not second[seen & ~fin].any()  # non-finite: never chosen
    sig = res["records"][1]["signal"]
    assert sig["reasons"] == {"memorized": int((fin & (k == 1)).sum()), "learned": 0,
                              "unlearnable": int((fin & (k == 2)).sum())}
    assert sig["dropped_share"] == pytest.approx(sig["dropped"] / fin.sum(), abs=1e-6)
    assert sig["val"]["q50"] == pytest.approx(4.0, abs=0.05) and sig["val"]["n"] == 500
    assert sig["fall"]["q50"] == pytest.approx(0.3, abs=0.3)
    assert 2.5 < sig["thresholds"]["memorized"] <= 2.51 and sig["thresholds"]["gap_excess"] > 0.09


def test_the_ratio_is_a_cap_the_strongest_signals_go_first() -> None:
    res = _one_rank(initial_ratio=0.9)  # at most 10% of the finite ids dropped
    ids = np.arange(w.N)
    fin = (ids % 17 != 4) & (ids % 97 != 0)
    rec = res["records"][1]
    cap = int(fin.sum()) - int(np.floor(0.9 * fin.sum() + 0.5))
    assert rec["signal"]["dropped"] == cap and rec["signal"]["reasons"]["capped"] > 0
    dropped = ids[fin & ~np.isin(ids, res["ids"][1])]
    assert len(dropped) == cap and (w.kind(dropped) == 2).all()  # noise (7.0 vs 4.48) before memorized (2.5)


def test_planned_count_is_what_the_selection_kept() -> None:
    t = w.teacher(None)
    plan = t.plan_epoch(1)
    assert t.planned_count(plan, w.N) == w.N  # nothing dropped is planned before it selects
    ids = np.arange(w.N)
    for epoch in range(2):
        t.observe(torch.from_numpy(ids), torch.from_numpy(w.losses(ids, epoch)), step=epoch)
    t.observe_val(w.val_hist(), step=2)
    sel = t.select(1, step=3)
    assert t.planned_count(plan, w.N) == sel.count < w.N
    assert t.planned_count(t.plan_epoch(4), w.N) == sel.count  # later epochs: the latest kept count


def test_config_errors_are_one_line(tmp_path: Path) -> None:
    for kw, key in ((dict(signal_learned_quantile=1.5), "teacher.signal_learned_quantile"),
                    (dict(signal_tolerance=-1.0), "teacher.signal_tolerance"),
                    (dict(signal_margin=-1.0), "teacher.signal_margin"),
                    (dict(signal="excess"), "teacher.signal"),
                    (dict(mode="online"), "teacher.strategy"),
                    (dict(signal="nope"), "teacher.signal")):
        with pytest.raises(UserError) as exc:
            validate_teacher(TeacherConfig(**{"mode": "ledger", "strategy": "signal", **kw}))
        assert key in str(exc.value) and "\n" not in str(exc.value)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("teacher: {mode: ledger, strategy: signal}\neval: {every_steps: 0}\n")
    with pytest.raises(UserError, match="eval.every_steps"):
        load_config(cfg)


def test_explain_says_which_case_the_data_is_in() -> None:
    def rec(dropped: int, **reasons: int) -> dict:
        return {"n_scored": 1000, "n_nonfinite": 0,
                "signal": {"dropped": dropped, "dropped_share": dropped / 1000, "reasons": reasons}}

    assert explain([{"n_scored": 10, "signal": None}]) is None
    dup = explain([rec(300, memorized=250, learned=10, unlearnable=40), rec(320, memorized=300)])
    assert dup.startswith("the teacher dropped 31% of samples, mostly memorized samples (copies")
    assert "repeats to drop" in dup
    assert "noise" in explain([rec(150, unlearnable=150)])
    clean = explain([rec(5, memorized=5), rec(10, learned=10)])
    assert "kept 99%" in clean and "expect no speedup" in clean
    assert "little safe to drop" in explain([rec(40, memorized=40), rec(50, memorized=50)])


def test_metrics_expose_the_signal() -> None:
    from prometheus_client import generate_latest

    from attent_scale.metrics import Metrics

    m = Metrics(rank=0, node="n", slurm_job_id="j")
    m.observe_signal({"dropped_share": 0.25, "reasons": {"memorized": 3, "learned": 0, "unlearnable": 1},
                      "thresholds": {"memorized": 3.5}, "loss": {"q50": 4.0}, "val": {"n": 5, "q50": 4.2},
                      "fall": None})
    text = generate_latest(m.registry).decode()
    assert 'attent_signal_dropped_ratio{node="n",rank="0",slurm_job_id="j"} 0.25' in text
    assert 'attent_signal_dropped_samples{node="n",rank="0",reason="memorized",slurm_job_id="j"} 3.0' in text
    assert 'attent_signal_threshold_nats{node="n",rank="0",rule="memorized",slurm_job_id="j"} 3.5' in text
    assert 'attent_signal_loss_quantile_nats{node="n",of="val",q="q50",rank="0",slurm_job_id="j"} 4.2' in text


def test_bench_sizes_the_random_control_and_ends_with_the_sentence() -> None:
    from attent_scale.bench import data_sentence, kept_share, parse_arm, random_control

    arm = parse_arm("sig:mode=ledger,strategy=signal,ratio_schedule=constant,initial_ratio=0.2")
    ctl = random_control(arm)
    assert ctl.overrides["teacher.strategy"] == "random"
    assert ctl.overrides["teacher.initial_ratio"] == "<kept>"  # sized once the arm has run

    def rec(selected: int, dropped: int, memorized: int) -> dict:
        return {"n_selected": selected, "n_scored": selected + dropped, "n_nonfinite": 0,
                "signal": {"dropped": dropped, "dropped_share": dropped / (selected + dropped),
                           "reasons": {"memorized": memorized, "learned": 0,
                                       "unlearnable": dropped - memorized}}}

    runs = [{"selections": [rec(70, 30, 25), rec(60, 40, 30)]}]
    assert kept_share(runs) == pytest.approx(0.65)
    assert data_sentence("sig", runs) == ("sig: The teacher dropped 35% of samples, mostly memorized "
                                          "samples (copies, or seen more often than the model can use): this "
                                          "data has repeats to drop.")
    assert data_sentence("hard", [{"selections": [{"n_scored": 5, "signal": None}]}]) is None
