"""`attent-scale bench`: arm parsing, time-to-target interpolation, and a real (tiny) bench run."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import procs
import pytest
import yaml
from train_runner import REPO, check, read_lines, run_train, tiny_run_config

from attent_scale.bench import _judge, interpolate_target, parse_arm, random_control
from attent_scale.data.builder import build_shards
from attent_scale.errors import UserError


def test_parse_arm_defaults_to_teacher_keys_and_cycle_mode():
    arm = parse_arm("soft-inc:strategy=soft,ratio_schedule=incremental,teacher.seed_offset=1")
    assert arm.name == "soft-inc"
    assert arm.overrides == {
        "teacher.strategy": "soft",
        "teacher.ratio_schedule": "incremental",
        "teacher.seed_offset": "1",
        "teacher.mode": "cycle",
    }
    with pytest.raises(UserError, match=r"train\.lr is not a teacher key"):  # its controls would not get it
        parse_arm("soft-inc:strategy=soft,train.lr=0.01")
    ctl = random_control(arm)
    assert ctl.overrides == {
        "teacher.ratio_schedule": "incremental",
        "teacher.mode": "cycle",
        "teacher.strategy": "random",
    }


def test_an_arm_whose_random_control_is_shared_is_judged_against_it():
    # excess and loss arms with one schedule get one random control, named after the first arm
    loss = parse_arm("hard:strategy=hard")
    excess = parse_arm("hard-excess:strategy=hard,score=excess,reference=R")
    assert random_control(loss).overrides == random_control(excess).overrides

    def arm(name: str, role: str, val: float, speedup: float | None = 1.5) -> dict:
        return {"name": name, "role": role, "final_val_loss": val, "steps": 100, "speedup": speedup,
                "speedup_charged": speedup}

    arms = [arm("uniform", "baseline", 5.0, 1.0), arm("hard", "attent", 4.9),
            arm("hard-excess", "attent", 4.95), arm("random-subset[hard]", "control", 4.92, None),
            arm("uniform-short[100]", "control", 5.1, None)]
    _judge(arms, {"hard": "random-subset[hard]", "hard-excess": "random-subset[hard]"})
    by = {a["name"]: a for a in arms}
    assert by["hard"]["wins"] and by["hard"]["random_control"] == "random-subset[hard]"
    assert by["hard"]["uniform_short"] == "uniform-short[100]"
    # 4.95 is above the shared random control's 4.92: no win, though it beats uniform-short
    assert not by["hard-excess"]["wins"] and by["hard-excess"]["random_control"] == "random-subset[hard]"


def test_random_control_of_a_prune_arm_keeps_as_many_with_the_same_weights_rule():
    from attent_scale.config import TeacherConfig

    arm = parse_arm("p:mode=ledger,strategy=prune,prune_ratio=0.6,prune_quantile=0.7,anneal_fraction=0.125")
    ctl = random_control(arm, TeacherConfig())
    assert ctl.overrides == {
        "teacher.mode": "ledger", "teacher.strategy": "random", "teacher.anneal_fraction": "0.125",
        "teacher.ratio_schedule": "constant", "teacher.initial_ratio": "0.58", "teacher.final_ratio": "0.58",
        "teacher.random_reweight": "true",
    }
    plain = random_control(parse_arm("q:strategy=prune,reweight=false"), TeacherConfig())
    assert plain.overrides["teacher.random_reweight"] == "false"
    assert plain.overrides["teacher.initial_ratio"] == "0.75"  # the defaults: 1 - 0.5 * 0.5


def test_an_excess_arm_whose_reference_cost_outweighs_its_speedup_does_not_win():
    arms = [{"name": "uniform", "role": "baseline", "final_val_loss": 5.0, "steps": 100, "speedup": 1.0,
             "speedup_charged": 1.0},
            # 1.5x faster on its own time, but 0.8x with the reference model's training and scoring charged
            {"name": "excess", "role": "attent", "final_val_loss": 4.9, "steps": 100, "speedup": 1.5,
             "speedup_charged": 0.8},
            {"name": "loss", "role": "attent", "final_val_loss": 4.9, "steps": 100, "speedup": 1.2,
             "speedup_charged": 1.2}]
    _judge(arms, {})
    assert not arms[1]["wins"] and arms[2]["wins"]


def test_bench_without_arms_runs_the_configs_own_teacher(tmp_path, monkeypatch):
    from attent_scale import bench
    from attent_scale.cli import build_parser

    planned = []

    def fake_run_arm(arm, seed, args, out_dir):  # record the plan; stop before anything trains
        planned.append(arm)
        if arm.role == "attent":
            raise KeyboardInterrupt
        return {}

    monkeypatch.setattr(bench, "run_arm", fake_run_arm)
    cfg = REPO / "configs" / "demo.yaml"
    for extra, mode, strategy in (([], "ledger", "signal"),
                                  (["--set", "teacher.mode=cycle", "--set", "teacher.strategy=soft"],
                                   "cycle", "soft")):
        planned.clear()
        args = build_parser().parse_args(["bench", "--data", str(tmp_path), "--config", str(cfg),
                                          "--out", str(tmp_path / "out"), *extra])
        with pytest.raises(KeyboardInterrupt):
            bench.run_bench(args)
        assert [a.role for a in planned] == ["baseline", "attent"]
        assert planned[1].name == "attent"
        assert planned[1].overrides == {"teacher.mode": mode, "teacher.strategy": strategy}
    args = build_parser().parse_args(["bench", "--data", str(tmp_path), "--config", str(cfg),
                                      "--out", str(tmp_path / "out"), "--set", "teacher.mode=none"])
    with pytest.raises(UserError, match="teacher.mode is none"):
        bench.run_bench(args)


def test_dry_run_checks_every_planned_config_and_writes_nothing(tmp_path, tiny_shards, capsys):
    from attent_scale import bench
    from attent_scale.cli import build_parser

    cfg = REPO / "configs" / "ablation.yaml"
    out = tmp_path / "out"

    def parse(*arms: str) -> argparse.Namespace:
        argv = ["bench", "--data", str(tiny_shards), "--config", str(cfg), "--out", str(out), "--seeds", "2",
                "--budget-epochs", "2", "--dry-run"]
        return build_parser().parse_args(argv + [x for a in arms for x in ("--arms", a)])

    plan = bench.run_bench(parse("h:strategy=hard", "s:mode=ledger,strategy=signal,ratio_schedule=constant"))
    lines = capsys.readouterr().out.splitlines()
    # uniform, two arms and their random controls (the signal arm's sized by what it keeps), 2 seeds each
    assert [(r["arm"], r["seed"]) for r in plan["planned"]] == [
        (a, s) for a in ("uniform", "h", "s", "random-subset[h]", "random-subset[s]") for s in (0, 1)]
    assert len(lines) == 11 and lines[-1].startswith("bench --dry-run: 10 runs planned")
    assert "teacher.initial_ratio=<kept>" in lines[8]  # random-subset[s] seed 0
    assert not out.exists()  # nothing trained, nothing written
    with pytest.raises(UserError, match="arm h: .*teacher.strategy.*'hardd'"):
        bench.run_bench(parse("h:strategy=hardd"))
    with pytest.raises(UserError, match="arm h: .*no_such_key"):
        bench.run_bench(parse("h:strategy=hard,no_such_key=1"))


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


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory, tiny_shards):
    """One real `attent-scale bench` (uniform, hard, its random subset, uniform-short): the process, its out
    dir (its tests share one xdist worker: tests/conftest.py groups a module fixture's tests)."""
    tmp_path = tmp_path_factory.mktemp("tiny_bench")
    cfg = tiny_run_config(tmp_path / "unused", tiny_shards, eval={"every_steps": 4, "max_batches": 2})
    cfg_path = tmp_path / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "bench"
    proc = procs.run(
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
            "--clock",
            "cpu",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "2"},  # --clock cpu must pin the arms to one thread itself
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, out


@pytest.mark.slow
def test_bench_runs_arms_with_controls_and_writes_report(tiny_bench):
    proc, out = tiny_bench
    report = json.loads((out / "bench.json").read_text())
    assert report["clock"] == "cpu" and report["threads"] == [1]
    assert all(seed["threads"] == 1 for arm in report["arms"] for seed in arm["seeds"])
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
    assert "| uniform |" in (out / "bench.md").read_text()
    assert (out / "val_loss.png").stat().st_size > 0 and (out / "selected_ratio.png").stat().st_size > 0
    assert "uniform" in proc.stdout and "speedup" in proc.stdout


@pytest.mark.slow
def test_tools_read_the_bench_json(tiny_bench, tmp_path):
    """The tools that read a bench.json read a real one: tools/benchmarks/bench_seeds.py's per-seed table,
    and tools/ablations/regime_targets.py holding the hard arm to a regime's targets (with the bench as
    the dup regime's)."""
    _, out = tiny_bench
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    seeds = subprocess.run([sys.executable, str(REPO / "tools/benchmarks/bench_seeds.py"),
                            str(out / "bench.json")], capture_output=True, text=True, env=env, timeout=120)
    assert seeds.returncode == 0, seeds.stderr
    rows = {line.split(" | ")[0].lstrip("| ") for line in seeds.stdout.splitlines()[2:]}
    names = {a["name"] for a in json.loads((out / "bench.json").read_text())["arms"]}
    assert rows == names and any(n.startswith("uniform-short[") for n in names)
    (tmp_path / "dup").mkdir()
    shutil.copy(out / "bench.json", tmp_path / "dup" / "bench.json")
    targets = subprocess.run([sys.executable, str(REPO / "tools/ablations/regime_targets.py"), str(tmp_path),
                              "--arm", "hard", "--raw", "hard"], capture_output=True, text=True, env=env,
                             timeout=120)
    assert targets.returncode == 0, targets.stderr
    lines = targets.stdout.splitlines()
    assert re.match(r"(held|MISSED) +dup +seed 0: uniform \d", lines[0]), lines
    assert lines[1:3] == [f"noise: no {tmp_path / 'noise' / 'bench.json'}, skipped",
                          f"clean: no {tmp_path / 'clean' / 'bench.json'}, skipped"]
    assert re.fullmatch(r"[01] of 1 seed targets held", lines[-1])


@pytest.mark.slow
def test_fine_tuning_regime_starts_every_arm_from_the_pretrained_export(tmp_path, tiny_shards):
    """Pretrain on one corpus, then LoRA-fine-tune on another text set that reuses the tokenizer."""
    pre = tiny_run_config(tmp_path / "pretrain", tiny_shards, teacher={"mode": "none"},
                          train={"max_steps": 8})
    check(run_train(pre))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = (stdlib / "json" / "decoder.py").read_text() + (stdlib / "statistics.py").read_text()
    other = tmp_path / "other"
    other.mkdir()
    for i in range(0, 24_000, 1000):
        (other / f"doc{i:06d}.txt").write_text(text[i : i + 1000])
    fine = tmp_path / "fine"
    build_shards([other], fine, seq_len=32, tokenizer=tiny_shards / "tokenizer.model", val_fraction=0.15,
                 progress=False)
    out = tmp_path / "bench"
    proc = procs.run(
        [sys.executable, "-m", "attent_scale", "bench", "--data", str(fine),
         "--config", str(tmp_path / "pretrain.yaml"), "--init-from", str(tmp_path / "pretrain"),
         "--arms", "ft:strategy=soft", "--budget-steps", "6", "--out", str(out),
         "--set", "model.lora.enabled=true", "--set", "model.lora.target_modules=[c_attn]",
         "--set", "checkpoint.export=false", "--set", "eval.every_steps=3"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    starts = []
    for arm in ("uniform", "ft", "random-subset[ft]"):
        run_cfg = yaml.safe_load((out / arm / "seed-0" / "config.yaml").read_text())
        assert run_cfg["model"]["init_from"] == str(tmp_path / "pretrain" / "export" / "model")
        assert run_cfg["model"]["lora"]["enabled"] is True
        starts.append(read_lines(out / arm / "seed-0" / "eval.jsonl")[0]["val_loss"])
    assert starts[0] == pytest.approx(starts[1]) == pytest.approx(starts[2])  # same pretrained start
    assert starts[0] < 6.2  # below ln(512): the pretrained weights, not a fresh init
