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

from attent_scale.bench import (
    _judge,
    add_best_val,
    check_oracle_data,
    data_sentence,
    interpolate_target,
    oracle_gap,
    parse_arm,
    random_control,
    score_arm,
    verdict,
)
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
                "speedup_charged": speedup, "speedup_best_charged": speedup, "final_delta": val - 5.0,
                "best_delta": val - 5.0, "time_to_best_seconds": 1.0, "time_to_best_charged": 1.0,
                "uniform_train_seconds": 2.0}

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


def _run(curve: list[tuple[float, float, float]], seed: int = 0, ref_s: float = 0.0) -> dict:
    """One arm-run as run_arm returns it, from its val curve (seconds, samples, loss)."""
    summary = {"final_val_loss": curve[-1][2], "selection_seconds": 0.0, "train_seconds": curve[-1][0],
               "wall_seconds": curve[-1][0], "samples_trained": curve[-1][1], "steps": int(curve[-1][1])}
    return {"seed": seed, "summary": summary, "curve": curve, "clock_seconds": curve[-1][0],
            "reference_seconds": ref_s, "selections": [], "ratio": [(0, 1.0)]}


def _scored(name: str, role: str, runs: list[dict], base: dict[int, dict]) -> dict:
    return add_best_val(score_arm(name, role, runs, base), runs, base)


def test_an_excess_arm_whose_reference_cost_outweighs_its_speedup_does_not_win():
    # uniform improves to the end: its best is its final, at 100 s
    base = {0: _run([(0.0, 0, 6.0), (50.0, 50, 5.2), (100.0, 100, 5.0)])}
    curve = [(0.0, 0, 6.0), (40.0, 40, 5.0), (80.0, 80, 4.9)]
    excess = _scored("excess", "attent", [_run(curve, ref_s=80.0)], base)  # 2.5x alone, 0.83x charged
    loss = _scored("loss", "attent", [_run(curve)], base)
    assert excess["speedup"] == pytest.approx(2.5)
    assert excess["speedup_best_charged"] == pytest.approx(100 / 120)
    _judge([_scored("uniform", "baseline", [base[0]], base), excess, loss], {})
    assert not excess["wins"] and excess["verdict"].startswith("no: reaches uniform's best val at 1.20x")
    assert loss["wins"] and loss["verdict"].startswith("wins (faster and better)")


def test_the_verdict_follows_uniforms_best_val_not_only_its_last():
    """Issue 29 item 6: uniform overfits (best 3.80 at 20 s of 72, final 3.95); an arm that ends 0.19 below
    uniform's final reaches uniform's final 'late' (speedup < 1 to it) but ends below uniform's best, below
    both controls, within uniform's time: it wins. An arm that reaches uniform's final sooner but never its
    best does not."""
    base = {0: _run([(0.0, 0, 6.0), (10.0, 10, 4.2), (20.0, 20, 3.80), (40.0, 40, 3.90), (72.0, 72, 3.95)])}
    uniform = _scored("uniform", "baseline", [base[0]], base)
    good = _scored("good", "attent", [_run([(0.0, 0, 6.0), (25.0, 20, 4.1), (50.0, 40, 3.85),
                                            (70.0, 60, 3.76)])], base)
    early = _scored("early", "attent", [_run([(0.0, 0, 6.0), (10.0, 10, 3.94), (50.0, 50, 3.9)])], base)
    rnd = _scored("random-subset[good]", "control", [_run([(0.0, 0, 6.0), (70.0, 60, 3.93)])], base)
    short = _scored("uniform-short[60]", "control", [_run([(0.0, 0, 6.0), (60.0, 60, 3.92)])], base)
    assert uniform["uniform_best_val_loss"] == 3.80 and uniform["uniform_best_seconds"] == 20.0
    assert good["speedup"] < 1.0  # the old rule: 'wins: no'
    assert good["final_delta"] == pytest.approx(-0.19) and good["best_delta"] == pytest.approx(-0.04)
    assert good["time_to_best_charged"] == pytest.approx(50.0 + 20.0 * 0.05 / 0.09)
    assert early["speedup"] > 1.0 and early["time_to_best_seconds"] is None
    arms = [uniform, good, early, rnd, short]
    _judge(arms, {"good": "random-subset[good]", "early": "random-subset[good]"})
    assert good["wins"] and good["verdict"].startswith("wins (better)")
    assert "below random-subset[good] (-0.1700)" in good["verdict"]
    assert not early["wins"] and early["verdict"].startswith("no: never reaches uniform's best val")
    # above a control: no win whatever the clock says
    wins, why = verdict(good, [{"name": "random-subset[good]", "final_val_loss": 3.70}])
    assert not wins and "above random-subset[good] (+0.0600)" in why


def test_oracle_gap_and_the_share_each_arm_recovers():
    bases = {s: _run([(0.0, 0, 6.0), (10.0, 10, u)], seed=s) for s, u in ((0, 4.00), (1, 4.02), (2, 3.98))}
    uniform = _scored("uniform", "baseline", list(bases.values()), bases)
    oracle = _scored("oracle", "oracle", [_run([(0.0, 0, 6.0), (8.0, 8, u - 0.2)], seed=s)
                                          for s, u in ((0, 4.00), (1, 4.02), (2, 3.98))], bases)
    arm = _scored("learn", "attent", [_run([(0.0, 0, 6.0), (9.0, 9, u - g)], seed=s) for s, u, g in
                                      ((0, 4.00, 0.1), (1, 4.02, 0.15), (2, 3.98, 0.2))], bases)
    gap = oracle_gap([uniform, oracle, arm])
    assert gap["final"] == pytest.approx(0.2) and gap["final_std"] == pytest.approx(0.0, abs=1e-12)
    assert gap["uniform_spread"] == pytest.approx(0.02) and gap["ratio"] == pytest.approx(10.0)
    assert gap["judges"]
    assert [p["gap_recovered"] for p in arm["seeds"]] == pytest.approx([0.5, 0.75, 1.0])
    assert arm["gap_recovered"] == pytest.approx(0.75) and arm["gap_recovered_min"] == pytest.approx(0.5)
    assert oracle["gap_recovered"] == pytest.approx(1.0) and uniform["gap_recovered"] == 0.0
    # a gap inside the seed noise cannot judge a teacher
    weak = _scored("oracle", "oracle", [_run([(0.0, 0, 6.0), (8.0, 8, u - 0.03)], seed=s)
                                        for s, u in ((0, 4.00), (1, 4.02), (2, 3.98))], bases)
    assert not oracle_gap([uniform, weak])["judges"]
    assert oracle_gap([uniform, arm]) is None  # no oracle arm: no gap


def test_the_oracle_needs_the_same_val_split_and_tokenizer(tmp_path, tiny_shards):
    """--oracle-data: a clean twin built with --data's tokenizer and val input passes; another val split or
    another tokenizer is refused with one line naming the flag."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = (stdlib / "json" / "decoder.py").read_text()
    docs = [text[i:i + 600] for i in range(0, 12_000, 600)]
    splits = (("train", docs[:14]), ("clean", docs[:10]), ("val", docs[14:17]), ("val2", docs[17:]))
    for name, lines in splits:
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in lines))
    tok = tiny_shards / "tokenizer.model"

    def build(train: str, val: str, out: str, tokenizer: Path | None = tok) -> str:
        kw = {"tokenizer": tokenizer} if tokenizer else {"vocab_size": 400}
        build_shards([tmp_path / f"{train}.jsonl"], tmp_path / out, seq_len=32, progress=False,
                     val_input=[tmp_path / f"{val}.jsonl"], **kw)
        return str(tmp_path / out)

    data = build("train", "val", "data")
    check_oracle_data(data, build("clean", "val", "twin"))
    with pytest.raises(UserError, match="--oracle-data .*val split"):
        check_oracle_data(data, build("clean", "val2", "other-val"))
    with pytest.raises(UserError, match="--oracle-data .*tokenizer"):
        check_oracle_data(data, build("clean", "val", "other-tok", tokenizer=None))


def test_a_token_arm_gets_a_random_mask_control_of_its_kept_share(tmp_path, monkeypatch):
    """teacher.unit token (issue 29 item 3): bench plans `random-mask[ARM]` with the arm's
    schedule, strategy random and teacher.token_ratio = the share of tokens the arm kept (its summary's
    kept_token_share, mean over seeds), instead of a random subset; the oracle runs right after uniform."""
    from attent_scale import bench
    from attent_scale.cli import build_parser

    planned = []

    def fake_run_arm(arm, seed, args, out_dir):
        planned.append((arm.name, dict(arm.overrides)))
        if arm.name.startswith("random-mask"):
            raise KeyboardInterrupt
        return {"kept_token_share": 0.6 + 0.1 * seed, "selections": [], "summary": {"steps": 10}}

    monkeypatch.setattr(bench, "run_arm", fake_run_arm)
    monkeypatch.setattr(bench, "check_oracle_data", lambda data, oracle: None)
    args = build_parser().parse_args([
        "bench", "--data", str(tmp_path), "--config", str(REPO / "configs" / "demo.yaml"), "--seeds", "2",
        "--out", str(tmp_path / "out"), "--oracle-data", str(tmp_path / "twin"),
        "--arms", f"tok:mode=ledger,unit=token,strategy=hard,ratio_schedule=constant,"
                  f"token_reference={tmp_path / 'ref'}"])
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(args)
    names = [n for n, _ in planned]
    assert names == ["uniform", "uniform", "oracle", "oracle", "tok", "tok", "random-mask[tok]"]
    assert planned[2][1]["data.dir"] == str(tmp_path / "twin")
    assert planned[-1][1] == {"teacher.mode": "ledger", "teacher.ratio_schedule": "constant",
                              "teacher.unit": "token", "teacher.strategy": "random",
                              "teacher.token_ratio": "0.65"}
    for bad in ("oracle", "random-mask[x]"):
        args = build_parser().parse_args(["bench", "--data", str(tmp_path), "--config",
                                          str(REPO / "configs" / "demo.yaml"), "--arms",
                                          f"{bad}:strategy=hard"])
        with pytest.raises(UserError, match="reserved"):
            bench.run_bench(args)


def test_gap_only_runs_uniform_and_the_oracle_and_reports_the_gap(tmp_path, monkeypatch, capsys):
    from attent_scale import bench
    from attent_scale.cli import build_parser

    planned = []

    def fake_run_arm(arm, seed, args, out_dir):
        planned.append((arm.name, dict(arm.overrides)))
        final = {"uniform": 4.0, "oracle": 3.8}[arm.name] + 0.01 * seed
        return _run([(0.0, 0, 6.0), (10.0, 100, final)], seed=seed)

    monkeypatch.setattr(bench, "run_arm", fake_run_arm)
    monkeypatch.setattr(bench, "check_oracle_data", lambda data, oracle: None)
    argv = ["bench", "--data", str(tmp_path), "--config", str(REPO / "configs" / "ablation.yaml"),
            "--seeds", "2", "--out", str(tmp_path / "out"), "--oracle-data", str(tmp_path / "twin"),
            "--gap-only"]
    report = bench.run_bench(build_parser().parse_args(argv))
    assert [n for n, _ in planned] == ["uniform", "uniform", "oracle", "oracle"]
    assert planned[2][1]["train.max_steps"] == "100"  # uniform's step count, LR decayed over it
    assert [a["name"] for a in report["arms"]] == ["uniform", "oracle"] and report["verdicts"] == []
    assert report["oracle_gap"]["final_per_seed"] == pytest.approx([0.2, 0.2])
    assert capsys.readouterr().out.startswith("oracle gap (uniform − oracle, final val): +0.2000")
    with pytest.raises(UserError, match="--gap-only: needs --oracle-data"):
        bench.run_bench(build_parser().parse_args(argv[:-3] + ["--gap-only"]))


def test_the_bench_sentence_never_names_a_case_the_runs_numbers_contradict():
    def rec(selected: int, dropped: int, memorized: int) -> dict:
        return {"n_selected": selected, "n_scored": selected + dropped, "n_nonfinite": 0,
                "signal": {"dropped": dropped, "dropped_share": dropped / (selected + dropped),
                           "reasons": {"memorized": memorized, "learned": 0,
                                       "unlearnable": dropped - memorized}}}

    dropped = [{"selections": [rec(82, 18, 17)]}]
    said = data_sentence("signal", dropped, paid=False, numbers="it ended +0.032 against uniform's final val")
    assert said == ("signal: The teacher dropped 18% of samples, mostly memorized samples (copies, or seen "
                    "more often than the model can use): on this run that did not pay off (it ended +0.032 "
                    "against uniform's final val).")
    assert "repeats to drop" in data_sentence("signal", dropped, paid=True)
    assert "repeats to drop" in data_sentence("signal", dropped)  # nothing known: the teacher's own words
    kept = [{"selections": [rec(99, 1, 1)]}]
    assert data_sentence("signal", kept, paid=False).endswith("expect no speedup.")
    assert data_sentence("signal", kept, paid=True, numbers="x").endswith("yet it paid off on this run (x).")


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
    # the oracle (here the shards themselves as their own twin) trains uniform's step count, known later
    argv = ["bench", "--data", str(tiny_shards), "--config", str(cfg), "--out", str(out), "--budget-epochs",
            "2", "--dry-run", "--oracle-data", str(tiny_shards), "--gap-only"]
    plan = bench.run_bench(build_parser().parse_args(argv))
    assert [r["arm"] for r in plan["planned"]] == ["uniform", "oracle"]
    assert "train.max_steps=<uniform-steps>" in capsys.readouterr().out.splitlines()[1]
    # a bad arm is refused before anything is planned (bench.check_arm_configs), as without --dry-run
    with pytest.raises(UserError, match="--arms 'h:strategy=hardd': .*teacher.strategy.*'hardd'"):
        bench.run_bench(parse("h:strategy=hardd"))
    with pytest.raises(UserError, match="--arms 'h:strategy=hard,no_such_key=1': .*no_such_key"):
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


@pytest.mark.slow
@pytest.mark.timeout(1800)  # five arm runs; ~1 minute on an idle machine, far more on a shared one
def test_bench_with_an_oracle_twin_opens_with_the_gap_and_ends_with_verdicts(tmp_path, tiny_shards):
    """A real bench with --oracle-data: the oracle trains uniform's step count on the twin, bench.md opens
    with the oracle gap and uniform's best val, and every AtteNT arm gets a verdict line."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = (stdlib / "json" / "decoder.py").read_text() + (stdlib / "statistics.py").read_text()
    docs = [text[i:i + 800] for i in range(0, 24_000, 800)]
    for name, lines in (("train", docs[:24]), ("twin", docs[:18]), ("val", docs[24:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in lines))
    shards = {}
    for name in ("train", "twin"):
        shards[name] = tmp_path / f"{name}-shards"
        build_shards([tmp_path / f"{name}.jsonl"], shards[name], seq_len=32, progress=False,
                     tokenizer=tiny_shards / "tokenizer.model", val_input=[tmp_path / "val.jsonl"])
    cfg = tiny_run_config(tmp_path / "unused", shards["train"], eval={"every_steps": 2, "max_batches": 0})
    cfg_path = tmp_path / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "attent_scale", "bench", "--data", str(shards["train"]), "--config",
         str(cfg_path), "--arms", "hard:strategy=hard", "--budget-steps", "6", "--out", str(out),
         "--oracle-data", str(shards["twin"]), "--set", "checkpoint.export=false", "--clock", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=1700)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    by = {a["name"]: a for a in report["arms"]}
    assert by["oracle"]["role"] == "oracle" and by["oracle"]["steps"] == by["uniform"]["steps"]
    oracle_cfg = yaml.safe_load((out / "oracle" / "seed-0" / "config.yaml").read_text())
    assert oracle_cfg["data"]["dir"] == str(shards["twin"])
    gap = report["oracle_gap"]
    uni = by["uniform"]
    assert gap["final_per_seed"] == [pytest.approx(uni["final_val_loss"] - by["oracle"]["final_val_loss"])]
    assert uni["best_val_loss"] == report["uniform_best_val_loss"] <= uni["final_val_loss"]
    md = (out / "bench.md").read_text().splitlines()
    assert md[0].startswith("oracle gap (uniform − oracle, final val)")
    assert md[1].startswith("uniform's best val")
    assert report["verdicts"] and report["verdicts"][0].startswith("hard: ")
    assert by["hard"]["verdict"].split(":")[0] in ("no", "wins (faster)", "wins (better)",
                                                   "wins (faster and better)")
    assert proc.stdout.splitlines()[0].startswith("oracle gap") and "hard: " in proc.stdout
