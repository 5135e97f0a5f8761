"""`attent-scale bench`: arm parsing, time-to-target interpolation, and a real (tiny) bench run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from train_runner import REPO, tiny_run_config

from attent_scale.bench import interpolate_target, parse_arm, random_control
from attent_scale.errors import UserError


def test_parse_arm_defaults_to_teacher_keys_and_cycle_mode():
    arm = parse_arm("soft-inc:strategy=soft,ratio_schedule=incremental,train.lr=0.01")
    assert arm.name == "soft-inc"
    assert arm.overrides == {
        "teacher.strategy": "soft",
        "teacher.ratio_schedule": "incremental",
        "train.lr": "0.01",
        "teacher.mode": "cycle",
    }
    ctl = random_control(arm)
    assert ctl.overrides == {
        "teacher.ratio_schedule": "incremental",
        "teacher.mode": "cycle",
        "teacher.strategy": "random",
    }


@pytest.mark.parametrize("text", ["uniform:mode=cycle", ":strategy=hard", "a:strategy", "x:mode=none"])
def test_parse_arm_rejects_bad_arms(text):
    with pytest.raises(UserError):
        parse_arm(text)


def test_interpolate_target_between_evaluations():
    curve = [(0.0, 0, 7.0), (10.0, 100, 5.0), (20.0, 200, 3.0)]
    assert interpolate_target(curve, 4.0) == (15.0, 150.0)
    assert interpolate_target(curve, 5.0) == (10.0, 100.0)
    assert interpolate_target(curve, 2.0) == (None, None)
    assert interpolate_target(curve, 8.0) == (0.0, 0)


@pytest.mark.slow
def test_bench_runs_arms_with_controls_and_writes_report(tmp_path, tiny_shards):
    cfg = tiny_run_config(tmp_path / "unused", tiny_shards, eval={"every_steps": 4, "max_batches": 2})
    cfg_path = tmp_path / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "attent_scale",
            "bench",
            "--data",
            str(tiny_shards),
            "--config",
            str(cfg_path),
            "--arms",
            "hard:strategy=hard",
            "--budget-epochs",
            "3",
            "--out",
            str(out),
            "--set",
            "checkpoint.export=false",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    names = [a["name"] for a in report["arms"]]
    assert names[0] == "uniform" and "hard" in names and "random-subset[hard]" in names
    assert any(n.startswith("uniform-short[") for n in names)
    by = {a["name"]: a for a in report["arms"]}
    assert report["target_val_loss"] == pytest.approx(by["uniform"]["final_val_loss"])
    for arm in report["arms"]:
        for key in (
            "final_val_loss",
            "time_to_target_seconds",
            "samples_to_target",
            "speedup",
            "selection_fraction",
            "wall_seconds",
        ):
            assert key in arm
    assert by["uniform"]["speedup"] == pytest.approx(1.0)
    # the epoch budget: subset epochs are shorter, so the AtteNT arm trains fewer steps than uniform,
    # and uniform-short trains exactly that many on all data
    assert by["hard"]["steps"] < by["uniform"]["steps"]
    short = next(a for a in report["arms"] if a["name"].startswith("uniform-short["))
    assert short["steps"] == round(by["hard"]["steps"])
    assert by["hard"]["selection_fraction"] > 0 and by["uniform"]["selection_fraction"] == 0
    assert (out / "val_loss.png").stat().st_size > 0 and (out / "selected_ratio.png").stat().st_size > 0
    assert "uniform" in proc.stdout and "speedup" in proc.stdout
