"""`attent-scale train` with teacher.unit token (Rho-1): the loss keeps the top token_ratio of each micro
batch's target tokens by learner − reference token loss; the kept share is reported in metrics.jsonl,
summary.json and TensorBoard, and a run interrupted and resumed trains exactly like one that was not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_tensorboard import scalar_steps
from train_runner import TINY_MODEL, check, read_lines, run_train, step_losses, tiny_run_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def token_ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny frozen reference for tiny_shards (vocab 512), other weights than the learner's."""
    from attent_scale.config import ModelConfig
    from attent_scale.models import build_model

    out = tmp_path_factory.mktemp("tokref") / "ref"
    build_model(ModelConfig(config=dict(TINY_MODEL)), 512, seed=3).save_pretrained(out)
    return out


def _config(run_dir: Path, shards: Path, ref: Path) -> dict:
    teacher = {"mode": "ledger", "unit": "token", "strategy": "hard", "token_ratio": 0.6,
               "token_reference": str(ref)}
    return tiny_run_config(run_dir, shards, teacher=teacher, metrics={"tensorboard_dir": "tb"},
                           train={"max_steps": 12, "stop_check_every": 3, "grad_accum_steps": 2,
                                  "micro_batch_size": 8},
                           eval={"every_steps": 6, "max_batches": 2, "batch_size": 16})


def test_token_unit_reports_the_kept_share_and_resumes_exactly(tmp_path, tiny_shards, token_ref):
    straight = _config(tmp_path / "straight", tiny_shards, token_ref)
    check(run_train(straight))
    run = tmp_path / "straight"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["teacher_mode"] == "ledger"
    share = summary["kept_token_share"]
    assert share == pytest.approx(0.6, abs=0.01)  # round(0.6 * valid) per micro batch
    assert summary["samples_trained"] == 12 * 16  # every sample trains: the unit is the token
    rows = read_lines(run / "metrics.jsonl")
    assert all(r["kept_token_share"] == pytest.approx(0.6, abs=0.02) for r in rows)
    assert all(r["step_kept_token_share"] == pytest.approx(0.6, abs=0.02) for r in rows)
    assert rows[-1]["kept_token_share"] == share
    assert not (run / "selection.jsonl").exists() or not read_lines(run / "selection.jsonl")
    tb = scalar_steps(run / "tb")
    assert tb["selection/kept_token_share"] == list(range(1, 13))

    broken = _config(tmp_path / "broken", tiny_shards, token_ref)
    stopped = run_train(broken, env={"ATTENT_STOP_AFTER_STEP": "4"})
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert max(step_losses(tmp_path / "broken")) == 6
    check(run_train(broken))
    a, b = step_losses(run), step_losses(tmp_path / "broken")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    resumed = json.loads((tmp_path / "broken" / "summary.json").read_text())
    assert resumed["kept_token_share"] == share  # the counts are in the checkpoint
    assert resumed["final_val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)


def test_token_unit_strategy_hard_without_a_reference_is_one_line(tmp_path, tiny_shards):
    cfg = tiny_run_config(tmp_path / "noref", tiny_shards, teacher={"unit": "token", "strategy": "hard"})
    proc = run_train(cfg)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("attent-scale: error: config key 'teacher.token_reference': required"), lines
