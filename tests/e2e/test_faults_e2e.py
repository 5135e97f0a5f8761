"""Faults a user meets on purpose, end to end with real processes: checkpoints that must not change
training, one rank's error, preemption with DataLoader workers, a second run in the same run_dir."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import procs
import pytest
import yaml
from train_runner import REPO, check, run_train, selection_hashes, step_losses, tiny_run_config

from attent_scale import launcher

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("engine,nproc", [("local", 1), ("fsdp", 2)])
def test_periodic_checkpoints_do_not_change_training(tmp_path, tiny_shards, engine, nproc):
    # every 7 steps lands mid-epoch (a subset epoch is ~6 steps): a saved stream position must not leak
    # into the next epoch
    runs = {}
    for name, every in (("plain", 0), ("ckpt", 7)):
        cfg = tiny_run_config(
            tmp_path / name, tiny_shards, engine, train={"max_steps": 20}, checkpoint={"every_steps": every}
        )
        check(run_train(cfg, nproc=nproc))
        runs[name] = tmp_path / name
    assert (runs["ckpt"] / "checkpoints" / "step-00000014" / "COMPLETE").exists()
    assert selection_hashes(runs["ckpt"]) == selection_hashes(runs["plain"])
    assert len(selection_hashes(runs["plain"])) >= 3
    a, b = step_losses(runs["plain"]), step_losses(runs["ckpt"])
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step


def _launch(cfg: dict, nproc: int, env: dict[str, str], module: str = "attent_scale") -> subprocess.Popen:
    """torchrun, marked (procs.start: a failed or hung test's job is killed whole, ranks included);
    stdout+stderr to run_dir.log."""
    run_dir = Path(cfg["run_dir"])
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir.parent / f"{run_dir.name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    script = Path(__file__).parents[1].joinpath("helpers", module)  # a trainer script beside this file
    target = ["-m", module] if module == "attent_scale" else [str(script)]
    cmd = [*launcher.command((*target, "train"), nproc, torchrun=True), "--config", str(cfg_path)]
    log = (run_dir.parent / f"{run_dir.name}.log").open("w")
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **env}
    return procs.start(cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, timeout: float) -> float:
    """Wait for the job; on timeout kill all of it and fail. Returns the wall time it ended."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        procs.kill(proc.tag)  # torchrun starts each rank in a session of its own: killed by marker
        proc.wait()
        pytest.fail(f"job still running {timeout:.0f} s after the fault: killed")
    return time.time()


@pytest.mark.parametrize("kind,workers", [("raise", 0), ("kill_worker", 2)])
def test_one_rank_error_ends_the_job_with_its_traceback(tmp_path, tiny_shards, kind, workers):
    cfg = tiny_run_config(
        tmp_path / "run", tiny_shards, "fsdp", train={"max_steps": 200}, data={"num_workers": workers}
    )
    fault_file = tmp_path / "fault_time"
    proc = _launch(
        cfg,
        2,
        {"ATTENT_TEST_FAULT": f"{kind}:1:4", "ATTENT_TEST_FAULT_FILE": str(fault_file)},
        module="fault_worker.py",
    )
    deadline = time.time() + 240
    while not fault_file.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert fault_file.exists(), (tmp_path / "run.log").read_text()[-3000:]
    fault_at = float(fault_file.read_text())
    ended = _wait(proc, 90)
    seconds = ended - fault_at
    log = (tmp_path / "run.log").read_text()
    print(f"{kind}: fault to job end {seconds:.1f} s")
    assert proc.returncode != 0
    assert seconds < 60, f"{seconds:.0f} s from the fault to the job's end"
    if kind == "raise":
        assert "Traceback" in log and "RuntimeError: injected fault on rank 1 at step 4" in log, log[-3000:]
    else:
        assert "DataLoader worker" in log and "killed" in log, log[-3000:]


def test_sigterm_under_torchrun_with_dataloader_workers_writes_a_checkpoint(tmp_path, tiny_shards):
    cfg = tiny_run_config(
        tmp_path / "run", tiny_shards, "fsdp", train={"max_steps": 200}, data={"num_workers": 2}
    )
    proc = _launch(cfg, 2, {})
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)  # what Slurm / a user does to torchrun; it signals each rank's group
    seconds = _wait(proc, 90) - signalled
    print(f"SIGTERM with 2 DataLoader workers per rank: signal to job end {seconds:.1f} s")
    log = (tmp_path / "run.log").read_text()
    marker = tmp_path / "run" / "PREEMPTED"
    assert marker.exists(), log[-3000:]
    step = json.loads(marker.read_text())["step"]
    assert (tmp_path / "run" / "checkpoints" / f"step-{step:08d}" / "COMPLETE").exists()
    assert seconds < 60
    assert "DataLoader worker" not in log, log[-3000:]


def test_second_run_in_a_run_dir_fails_and_a_killed_runs_lock_is_taken_over(tmp_path, tiny_shards):
    cfg = tiny_run_config(tmp_path / "run", tiny_shards, train={"max_steps": 400})
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "attent_scale", "train", "--config", str(cfg_path)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("SLURM_JOB_ID", None)
    first = procs.start(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 180
        while (
            not (metrics.exists() and metrics.read_text()) and first.poll() is None and time.time() < deadline
        ):
            time.sleep(0.2)
        assert first.poll() is None
        second = procs.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and "in use by host" in lines[0], (
            second.stderr
        )
    finally:
        first.kill()  # SIGKILL: the lock stays behind, stale
        first.wait()
    assert (tmp_path / "run" / "LOCK").exists()
    third = procs.run(
        [*cmd, "--set", "train.max_steps=2", "--set", "eval.every_steps=0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    check(third)
    assert "took over a stale lock" in third.stderr and f"pid {first.pid}" in third.stderr
    assert not (tmp_path / "run" / "LOCK").exists()  # released at exit


def test_corrupt_sample_is_excluded_from_selection_and_counted(tmp_path, tiny_shards):
    import shutil

    from attent_scale.data import Manifest

    bad = tmp_path / "shards"
    shutil.copytree(tiny_shards, bad, ignore=shutil.ignore_patterns(".attent-verified*"))
    shard = Manifest.load(bad).splits["train"][1]
    data = bytearray((bad / shard.name).read_bytes())
    data[512:514] = b"\xff\xff"  # a token >= vocab: the shard's first sample does not decode
    (bad / shard.name).write_bytes(bytes(data))
    # ... and the manifest records the damaged bytes (a build that wrote it so): past the start-up
    # integrity check, the stream meets the sample
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][1]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(manifest))
    cfg = tiny_run_config(tmp_path / "run", bad, train={"max_steps": 20})
    proc = run_train(cfg)
    check(proc)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    records = selection_hashes(tmp_path / "run")
    assert len(records) >= 3
    # met once in every scoring pass, never in a subset epoch: the teacher no longer keeps it as unseen
    assert summary["corrupt_samples"] == len(records)
    assert summary["corrupt_ids"] == 1
    assert f"excluded from selection (ids {shard.first_id}); 1 distinct so far" in proc.stderr


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_sharded_engines_run_on_one_plain_process(tmp_path, tiny_shards, engine):
    # people debug that way: no torchrun, no WORLD_SIZE; the engine makes a one-rank group itself
    cfg = tiny_run_config(
        tmp_path / "one", tiny_shards, engine, train={"max_steps": 3}, eval={"every_steps": 0}
    )
    check(run_train(cfg, timeout=600))  # the first DeepSpeed run on a machine JIT-compiles its CPU comm op
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["world_size"] == 1 and summary["engine"] == engine
