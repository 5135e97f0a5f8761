"""Strategy signal in the real trainer: each evaluation's val histogram reaches the teacher, each selection
record says what it dropped, and the epoch budget is planned as what the selections kept."""

from __future__ import annotations

import json
from pathlib import Path

from train_runner import check, read_lines, run_train, tiny_run_config

from attent_scale.teacher.signals import explain


def test_signal_run_records_what_it_dropped_from_the_val_distribution(tmp_path: Path,
                                                                     tiny_shards: Path) -> None:
    teacher = {"mode": "ledger", "strategy": "signal", "warmup_epochs": 1, "ratio_schedule": "constant",
               "initial_ratio": 0.2, "signal_tolerance": 0.0, "signal_gap_allowance": 0.0}
    cfg = tiny_run_config(tmp_path / "run", tiny_shards, teacher=teacher,
                          train={"max_steps": 1000, "max_epochs": 3, "warmup_steps": 0},
                          eval={"every_steps": 8, "max_batches": 2, "batch_size": 16})
    check(run_train(cfg))
    run = tmp_path / "run"
    records = read_lines(run / "selection.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        sig = r["signal"]
        assert sig["val"]["n"] == 32 and sig["val"]["step"] > 0  # the trainer's eval: 2 val batches of 16
        assert r["n_selected"] + sig["dropped"] == r["n_scored"] - r["n_nonfinite"] + r["n_unseen"]
        assert sum(v for k, v in sig["reasons"].items() if k != "capped") >= sig["dropped"]
        assert sig["loss"]["q05"] <= sig["loss"]["q95"] and sig["thresholds"]["gap_tolerance"] == 0.0
    assert records[1]["signal"]["fall"] is not None  # two observations per id by then
    assert explain(records).startswith("the teacher ")
    summary = json.loads((run / "summary.json").read_text())
    n = records[0]["n_scored"]
    assert summary["samples_trained"] == n + sum(r["n_selected"] for r in records)  # the whole budget
