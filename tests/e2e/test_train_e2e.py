"""End to end: `attent-scale train` on real shards, one process and 2 ranks (DeepSpeed ZeRO-3, FSDP2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_runner import check, read_lines, run_train, selection_hashes, step_losses, tiny_run_config

pytestmark = pytest.mark.slow


def _assert_run_dir(run_dir: Path, steps: int, world: int, mode: str) -> dict:
    for name in ("config.yaml", "metrics.jsonl", "eval.jsonl", "summary.json"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["world_size"] == world
    assert summary["teacher_mode"] == mode
    assert summary["final_val_loss"] is not None and summary["final_val_loss"] < 7.0
    assert set(summary["selection_seconds_by_phase"]) == {
        "score",
        "collective",
        "select",
        "share",
        "rebalance",
    }
    assert len(summary["per_rank"]) == world
    metrics = read_lines(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    evals = read_lines(run_dir / "eval.jsonl")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == steps
    return summary


def test_local_cycle_run_selects_logs_and_rescores_only_stale_ids(tmp_path, tiny_shards):
    """One run: the run dir, the selections, and what each cycle scores (rescore stale, the default)."""
    from attent_scale.data import Manifest

    cfg = tiny_run_config(tmp_path / "local", tiny_shards, teacher={"rescore": "stale"})
    check(run_train(cfg))
    summary = _assert_run_dir(tmp_path / "local", 24, 1, "cycle")
    records = read_lines(tmp_path / "local" / "selection.jsonl")
    assert records[0]["ratio"] == pytest.approx(0.1) and records[0]["n_scored"] > 0
    assert summary["samples_scored"] > 0 and summary["selection_seconds"] > 0
    # a subset epoch trains only its selection: 10% of ~940 ids at batch 16 is 6 steps, then 20%, 30%
    assert summary["epochs_started"] >= 3 and len(records) >= 3
    # the first cycle scores every id; each later one only the ids the subset epoch before did not train
    n = Manifest.load(tiny_shards).num_samples("train")
    expected = n + sum(n - r["n_selected"] for r in records[:-1])
    assert summary["samples_scored"] == expected
    assert all(r["n_scored"] == n for r in records)  # the ledger still holds a loss for every id


def test_local_teacher_none_trains_all_data(tmp_path, tiny_shards):
    cfg = tiny_run_config(tmp_path / "none", tiny_shards, teacher={"mode": "none"})
    check(run_train(cfg))
    summary = _assert_run_dir(tmp_path / "none", 24, 1, "none")
    assert summary["samples_scored"] == 0 and summary["selection_seconds"] == 0
    assert not (tmp_path / "none" / "selection.jsonl").exists() or not read_lines(
        tmp_path / "none" / "selection.jsonl"
    )


def _assert_two_rank_run(run_dir: Path, steps: int, mode: str) -> None:
    """A 2-rank run's outputs: the run dir, rank 0's TensorBoard points, lockstep and equal shares."""
    summary = _assert_run_dir(run_dir, steps, 2, mode)
    # TensorBoard: rank 0 alone writes, one point per metrics.jsonl line and per evaluation (every 8)
    from test_tensorboard import scalar_steps

    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    points = scalar_steps(run_dir / "tb")
    assert points["train/loss"] == list(range(1, steps + 1))
    assert points["val/loss"] == sorted({*range(0, steps + 1, 8), steps})
    records = read_lines(run_dir / "selection.jsonl")
    assert records and all(r["world_size"] == 2 for r in records)
    per_rank = [r["samples_trained"] for r in summary["per_rank"]]
    assert (
        per_rank[0] == per_rank[1] and sum(per_rank) == summary["samples_trained"]
    )  # lockstep, equal shares
    # both ranks paid for selection and rank 1's numbers made it into the summary
    assert all(r["selection_seconds"] > 0 for r in summary["per_rank"])


# cycle mode on two ranks is checked on the resume test's uninterrupted runs (_assert_two_rank_run)
@pytest.mark.parametrize("engine", ["deepspeed", "fsdp"])
def test_two_rank_engines_run_online_mode(tmp_path, tiny_shards, engine):
    cfg = tiny_run_config(
        tmp_path / "run", tiny_shards, engine, teacher={"mode": "online"}, train={"max_steps": 16},
        metrics={"tensorboard_dir": "tb"},
    )
    check(run_train(cfg, nproc=2))
    _assert_two_rank_run(tmp_path / "run", 16, "online")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["samples_trained"] == 16 * 2 * 8  # every rank trains exactly B every step
    assert summary["selection_seconds_by_phase"]["score"] > 0  # candidates' scoring forwards count


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp"])
def test_one_process_sharded_engines_run_end_to_end(tmp_path, tiny_shards, engine):
    """deepspeed and fsdp on a single plain process (a one-rank group): train, stop checks, eval, export."""
    train = {"max_steps": 6, "stop_check_every": 2}
    cfg = tiny_run_config(tmp_path / "one", tiny_shards, engine, train=train,
                          eval={"every_steps": 3, "max_batches": 2, "batch_size": 16})
    check(run_train(cfg))
    summary = _assert_run_dir(tmp_path / "one", 6, 1, "cycle")
    assert summary["samples_trained"] == 6 * 8
    assert list((tmp_path / "one" / "export").rglob("*.safetensors"))


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp"])
def test_two_rank_lora_run_exports_adapters(tmp_path, tiny_shards, engine):
    lora = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["c_attn"]}
    cfg = tiny_run_config(
        tmp_path / "lora", tiny_shards, engine, model={"lora": lora}, train={"max_steps": 8}
    )
    check(run_train(cfg, nproc=2))
    _assert_run_dir(tmp_path / "lora", 8, 2, "cycle")
    adapters = list((tmp_path / "lora" / "export").rglob("adapter_model.safetensors"))
    assert adapters and adapters[0].stat().st_size > 1000


RESUME_ENGINES = [("local", 1), ("deepspeed", 2), ("fsdp", 2)]
# unbiased pruning from training losses: one full epoch of 8 steps, weighted subset epochs of 6, and the
# anneal (the last quarter of the 20-step budget) cutting a subset epoch at step 15; the stop at step 9
# falls inside a weighted subset epoch
PRUNE = {"mode": "ledger", "strategy": "prune", "warmup_epochs": 1, "prune_ratio": 0.5, "prune_quantile": 0.5,
         "anneal_fraction": 0.25}


# gradient accumulation with a short last batch: micro batch 1, accumulation 8 on one process and 3 per rank
# on two. The first (subset) epoch selects 94 of 941 ids: 94 % 8 = 6 rows on one process and 47 % 3 = 2 per
# rank on two, fewer than the accumulation steps, so its last step (12, 16) runs filler micro batches; the
# stop at step 9 lies before it
ACCUM = {1: 8, 2: 3}


def _resume_config(run_dir, shards, engine, nproc, variant):
    if variant == "accum":
        train = {"max_steps": 20, "micro_batch_size": 1, "grad_accum_steps": ACCUM[nproc]}
        return tiny_run_config(run_dir, shards, engine, train=train)
    if variant == "default":
        # the one-process run reads through 2 run-long DataLoader workers (StreamWorkers): its scoring
        # passes, its epochs and the epoch cut by the stop all share them; the others read in-process
        data = {"num_workers": 2} if engine == "local" else {}
        return tiny_run_config(run_dir, shards, engine, train={"max_steps": 20}, data=data)
    return tiny_run_config(run_dir, shards, engine, train={"max_steps": 20, "micro_batch_size": 128 // nproc},
                           teacher=PRUNE)


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("variant", ["default", "prune", "accum"])
@pytest.mark.parametrize("engine,nproc", RESUME_ENGINES)
def test_resume_selects_and_trains_like_an_uninterrupted_run(tmp_path, tiny_shards, engine, nproc, variant):
    straight = _resume_config(tmp_path / "straight", tiny_shards, engine, nproc, variant)
    straight["train"]["stop_check_every"] = 3
    two_rank_cycle = variant == "default" and nproc == 2
    if two_rank_cycle:  # also the plain 2-rank cycle-mode run of each sharded engine
        straight["metrics"] = {"tensorboard_dir": "tb"}
    timeout = 240 if variant == "default" else 600  # prune: batch 128, and the suite shares 2 cores
    check(run_train(straight, nproc=nproc, timeout=timeout))
    if two_rank_cycle:
        _assert_two_rank_run(tmp_path / "straight", 20, "cycle")

    broken = _resume_config(tmp_path / "broken", tiny_shards, engine, nproc, variant)
    broken["train"]["stop_check_every"] = 3
    # a signal during step 8 is acted on at the next stop check (step 9), by every rank at once
    stopped = run_train(broken, nproc=nproc, env={"ATTENT_STOP_AFTER_STEP": "8"}, timeout=timeout)
    # a plain process exits 75 itself; torchrun reports any worker failure as 1, hence the marker file
    assert stopped.returncode == (75 if nproc == 1 else 1), stopped.stderr[-3000:]
    assert json.loads((tmp_path / "broken" / "PREEMPTED").read_text())["step"] == 9
    assert (tmp_path / "broken" / "checkpoints" / "step-00000009" / "COMPLETE").exists()
    assert max(step_losses(tmp_path / "broken")) == 9
    resumed = run_train(broken, nproc=nproc, timeout=timeout)
    check(resumed)
    assert not (tmp_path / "broken" / "PREEMPTED").exists()
    # one line says what it resumed from: checkpoint, step, samples, epoch, the selection it trains on
    line = next(x for x in resumed.stderr.splitlines() if "attent-scale: resumed from" in x)
    logged = read_lines(tmp_path / "broken" / "metrics.jsonl")
    samples = next(r["samples_trained"] for r in logged if r["step"] == 9)
    assert f"step-00000009 (step 9, {samples} samples trained, epoch " in line, line
    last_sha = [sha for step, sha in selection_hashes(tmp_path / "broken") if step <= 9][-1]
    assert f"selection sha256 {last_sha} (" in line, line

    assert selection_hashes(tmp_path / "broken") == selection_hashes(tmp_path / "straight")
    assert len(selection_hashes(tmp_path / "straight")) >= (3 if variant == "default" else 2)
    a, b = step_losses(tmp_path / "straight"), step_losses(tmp_path / "broken")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step
    if variant == "accum":
        # rows trained per rank each step: full steps of ACCUM[nproc], and short last steps of an epoch with
        # fewer rows than accumulation steps (filler micro batches), whose losses still match
        logged = read_lines(tmp_path / "straight" / "metrics.jsonl")
        totals = [0] + [r["samples_trained"] for r in logged]
        rows = [(b - a) // nproc for a, b in zip(totals, totals[1:], strict=False)]
        accum = ACCUM[nproc]
        assert set(rows) - {accum} and all(0 < r < accum for r in rows if r != accum), rows
        assert rows.index(min(rows)) + 1 > 9  # the short step comes after the resume point
    if variant == "prune":
        records = read_lines(tmp_path / "straight" / "selection.jsonl")
        assert all(r["strategy"] == "prune" and r["n_selected"] < r["n_scored"] for r in records)
        ratio = {m["step"]: m["selected_ratio"] for m in read_lines(tmp_path / "straight" / "metrics.jsonl")}
        assert ratio[8] == 1.0 and ratio[9] < 1.0 and ratio[15] < 1.0 and ratio[16] == ratio[20] == 1.0
        summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
        assert summary["epochs_started"] == 4  # full, subset, subset cut by the anneal, full
