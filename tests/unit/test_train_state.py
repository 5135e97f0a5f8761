"""The trainer's parts on their own: typed state entries, old checkpoints re-cut, run totals and their views,
when a stop, a checkpoint or an evaluation is due."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from test_metrics import cfg as metrics_cfg
from test_metrics import scrape, value

from attent_scale.checkpoint import Checkpointer, load_state, save_state
from attent_scale.config import RunConfig
from attent_scale.metrics import COUNTER_KEYS, GAUGE_KEYS, Metrics
from attent_scale.stop import END_EPOCH, PREEMPT, STOP, Poll, StopCheck, decide
from attent_scale.totals import PHASES, RunTotals, teacher_totals
from attent_scale.train_state import Clocks, Progress, SelectionState, upgrade_state
from attent_scale.validate import Validator


def _legacy_progress(bits: np.ndarray) -> dict:
    """A rank's "progress" entry as checkpoints wrote it before the split: everything in one flat dict."""
    return {"step": 12, "epoch": 1, "samples_trained": 192, "tokens_trained": 6144, "nonfinite_skipped": 1,
            "nonfinite_in_row": 0, "online_dropped_batches": 0, "corrupt_samples": 2, "corrupt_ids": [5, 9],
            "dropped_samples": 3, "train_seconds": 4.5, "train_cpu_seconds": 4.0, "eval_seconds": 0.5,
            "checkpoint_seconds": 0.25, "wall_offset": 6.0, "last_train_loss": 2.5, "last_val_loss": 2.75,
            "selected_ratio": 0.3, "selection_bits": bits, "weight_bits": None, "weight": 1.0,
            "stream_state": {"epoch": 1, "batches_consumed": 4}, "remainder_bits": None,
            "remainder_epoch": -1, "log_lines": {"metrics.jsonl": 12, "eval.jsonl": 3, "selection.jsonl": 2}}


def test_an_old_checkpoints_one_progress_entry_is_recut_into_each_parts_own(tmp_path) -> None:
    bits = np.packbits(np.arange(40) % 3 == 0)
    save_state(tmp_path / "rank-00000", {"progress": _legacy_progress(bits), "teacher": {"x": 1}, "rng": {}})
    state = upgrade_state(load_state(tmp_path / "rank-00000"))
    assert set(state) == {"progress", "clock", "selection", "stream", "eval", "logs", "teacher", "rng"}
    progress = Progress.from_state(state["progress"])
    assert (progress.step, progress.epoch, progress.corrupt_ids) == (12, 1, [5, 9])
    assert progress.last_train_loss == 2.5
    clock = Clocks.from_state(state["clock"])
    assert (clock.train_seconds, clock.wall_offset, clock.checkpoint_seconds) == (4.5, 6.0, 0.25)
    selection = SelectionState.from_state(state["selection"])
    assert selection.ratio == 0.3 and np.array_equal(selection.bits, bits) and not selection.remainder_due(1)
    assert state["stream"] == {"epoch": 1, "batches_consumed": 4}
    assert state["eval"] == {"last_loss": 2.75} and state["logs"]["metrics.jsonl"] == 12
    assert upgrade_state(state) is state  # today's layout passes through


def test_each_part_saves_only_its_own_fields_and_the_clock_folds_this_attempt_into_the_offset() -> None:
    clock = Clocks(train_seconds=1.0, wall_offset=10.0)
    clock.wall_start -= 2.0  # this attempt has run 2 s
    saved = clock.state_dict()
    assert "wall_start" not in saved and saved["wall_offset"] == pytest.approx(12.0, abs=0.5)
    bits = np.zeros(4, dtype=np.uint8)
    sel = SelectionState(bits=bits)
    assert sel.state_dict()["bits"] is bits  # not a copy: a checkpoint stores an array the teacher holds once
    sel = SelectionState(remainder_bits=bits, remainder_epoch=2)
    assert sel.remainder_due(2) and not sel.remainder_due(3)
    sel.drop_remainder_before(2)
    assert sel.remainder_bits is not None
    sel.drop_remainder_before(3)
    assert sel.remainder_bits is None and sel.remainder_epoch == -1


def _totals() -> RunTotals:
    stats = {"samples_scored": 70, "bytes_sent": 4096, "nonfinite": 2, "last_staleness_median": 3,
             **{f"seconds_{p}": 0.25 * (i + 1) for i, p in enumerate(PHASES)}}
    return RunTotals(**teacher_totals(stats, steps=8, epoch=1, samples_trained=40, tokens_trained=1280,
                                      nonfinite_skipped=1, corrupt_samples=2, corrupt_ids=1,
                                      dropped_samples=3, train_seconds=7.0, wall_seconds=10.0,
                                      selected_ratio=0.6, train_loss=2.5, val_loss=2.75))


def test_metrics_jsonl_prometheus_and_summary_are_views_of_the_same_totals() -> None:
    tot = _totals()
    assert tot.selection_seconds == pytest.approx(0.25 * 15)
    assert tot.selection_fraction == pytest.approx(0.375)
    row = tot.metrics_row(world=2, loss=2.4, lr=1e-3, grad_norm=0.5, tokens_per_second=100.0)
    assert (row["step"], row["epoch"], row["samples_trained"], row["samples_scored"]) == (8, 1, 80, 70)
    assert row["selection_seconds"] == tot.selection_seconds and row["selected_ratio"] == 0.6
    summed = {"samples_trained": 80, "tokens_trained": 2560, "samples_scored": 140, "corrupt_samples": 4}
    summary = tot.summary(job={"world_size": 2}, summed=summed, corrupt_ids=1,
                          per_rank=[RunTotals.rank_entry(0, tot.rank_row())])
    assert list(summary)[:3] == ["world_size", "steps", "epochs_started"] and summary["epochs_started"] == 2
    assert summary["samples_trained"] == 80 and summary["nonfinite_losses"] == 2
    assert summary["selection_seconds_by_phase"] == tot.selection_seconds_by_phase
    assert summary["per_rank"][0]["selection_seconds"] == tot.selection_seconds
    assert summary["final_val_loss"] == 2.75 and summary["last_selected_ratio"] == 0.6
    m = Metrics.create(metrics_cfg(), rank=0, local_rank=0, node="n")
    try:
        m.update(tot)
        s = scrape(m.port)
    finally:
        m.close()
    assert value(s, "attent_samples_trained_total") == tot.samples_trained
    assert value(s, "attent_collective_sent_bytes_total") == tot.collective_bytes
    assert value(s, "attent_corrupt_sample_ids_total") == tot.corrupt_ids
    for phase in PHASES:
        assert value(s, "attent_selection_seconds_sum", phase=phase) == tot.selection_seconds_by_phase[phase]
    assert value(s, "attent_selection_overhead_ratio") == pytest.approx(tot.selection_fraction)
    assert value(s, "attent_score_staleness_steps") == 3 and value(s, "attent_val_loss_nats") == 2.75
    # every Prometheus series the totals feed is declared on a RunTotals field
    assert set(COUNTER_KEYS) | set(GAUGE_KEYS) <= set(tot.as_dict())


def test_teacher_totals_names_only_run_totals_fields() -> None:
    assert teacher_totals({}, samples_trained=3)["samples_trained"] == 3
    with pytest.raises(TypeError, match="samples_traned"):
        teacher_totals({}, samples_traned=3)


def test_the_stop_poll_runs_on_poll_steps_only_and_the_decision_follows_it(monkeypatch) -> None:
    import attent_scale.stop as stop_mod

    calls: list[list[float]] = []
    monkeypatch.setattr(stop_mod, "all_reduce_values",
                        lambda values, op, group: calls.append(values) or values)
    flag = SimpleNamespace(received=None, stop_after_step=6)
    check = StopCheck(every=3, max_seconds=5.0, group=None, signal_flag=flag)
    assert check.poll(4, train_seconds=9.0, save_late=True) == Poll() and not calls
    assert check.poll(3, train_seconds=9.0, save_late=True) == Poll(out_of_time=True, save_late=True)
    assert check.poll(6, train_seconds=0.0, save_late=False).preempt  # ATTENT_STOP_AFTER_STEP
    assert calls == [[1.0, 1.0], [2.0, 0.0]]
    assert decide(Poll(preempt=True), step=1, last_step=10, cut=True) == PREEMPT
    assert decide(Poll(out_of_time=True), step=1, last_step=10, cut=True) == STOP
    assert decide(Poll(), step=10, last_step=10, cut=True) == STOP
    assert decide(Poll(), step=4, last_step=10, cut=True) == END_EPOCH
    assert decide(Poll(), step=4, last_step=10, cut=False) is None


def test_checkpoints_and_evaluations_say_when_they_are_due(tmp_path) -> None:
    saver = Checkpointer(tmp_path, every_steps=4, every_minutes=0, keep_last=1, rank=0, world_size=1)
    assert [s for s in range(1, 13) if saver.should_save(s, last_step=12)] == [4, 8]  # the end saves itself
    assert saver.should_save(5, last_step=12, late=True) and not saver.late()
    timed = Checkpointer(tmp_path, every_steps=0, every_minutes=1e-9, keep_last=1, rank=0, world_size=1)
    assert timed.late() and not timed.enabled
    cfg = RunConfig()
    cfg.eval.every_steps = 5
    val = Validator(cfg, rank=0, world=1)
    assert [s for s in range(11) if val.should_validate(s)] == [0, 5, 10]
    assert math.isnan(val.state_dict()["last_loss"])
    cfg.eval.every_steps = 0
    assert not Validator(cfg, rank=0, world=1).should_validate(0)
