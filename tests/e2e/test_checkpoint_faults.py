"""Checkpoints under faults, end to end on one local process: periodic saves by minutes, a damaged newest
checkpoint, a refused resume, a full disk, a bad run_dir, a tampered engine.pt.

Its one-line bad-input cases are rows of tests/e2e/test_bad_input_table.py."""

from __future__ import annotations

import errno
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import procs
import pytest
import yaml
from engine_worker import VOCAB, tiny_config
from train_runner import REPO, check, tiny_run_config

from attent_scale import checkpoint as ckpt
from attent_scale.config import CheckpointConfig, config_from_dict
from attent_scale.engines import build_engine
from attent_scale.errors import UserError

pytestmark = pytest.mark.slow

def _cfg(run_dir: Path, shards: Path, steps: int = 4, **checkpoint: Any) -> dict:
    return tiny_run_config(run_dir, shards, train={"max_steps": steps}, eval={"every_steps": 0},
                           checkpoint={"every_steps": 2, "keep_last": 3, **checkpoint})

def _train(cfg: dict, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    """`attent-scale train` on one process; with `limit_bytes`, no file it writes may grow past that size
    (RLIMIT_FSIZE: a write past it fails as on a full disk; Python ignores SIGXFSZ)."""
    run_dir = Path(cfg["run_dir"])
    cfg_path = run_dir.parent / f"{run_dir.name}.yaml"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(cfg))

    def limit() -> None:
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return procs.run([sys.executable, "-m", "attent_scale", "train", "--config", str(cfg_path)],
                     cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                     text=True, timeout=240, preexec_fn=limit)

def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line; no traceback anywhere."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("attent-scale: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]

@pytest.fixture(scope="module")
def four_steps(tmp_path_factory: pytest.TempPathFactory, tiny_shards: Path) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (copied by each test that changes it)."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    check(_train(_cfg(run_dir, tiny_shards)))
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2, 4]
    return run_dir

def _copy(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("LOCK"))
    return dest

# ---- item 18: periodic checkpoints by minutes ------------------------------------------------------

def test_default_checkpoint_every_30_minutes_and_by_minutes_at_the_stop_check(tmp_path, tiny_shards):
    assert CheckpointConfig().every_minutes == 30
    cfg = _cfg(tmp_path / "run", tiny_shards, steps=3, every_steps=0, every_minutes=1e-6, keep_last=5)
    cfg["train"]["stop_check_every"] = 1
    check(_train(cfg))
    # a checkpoint at every stop check once the minutes have passed (none at the end without every_steps)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [1, 2]

# ---- item 19: a damaged newest checkpoint ----------------------------------------------------------

@pytest.mark.parametrize("victim", ["engine/engine.pt", "rank-00000.safetensors", "rank-00000.json"])
def test_damaged_newest_checkpoint_falls_back_with_one_warning(tmp_path, tiny_shards, four_steps, victim):
    run_dir = _copy(four_steps, tmp_path / "run")
    file = run_dir / "checkpoints" / "step-00000004" / victim
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    cfg = _cfg(run_dir, tiny_shards, steps=6)
    proc = _train(cfg)
    check(proc)
    warnings = [x for x in proc.stderr.splitlines() if "warning" in x]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert "step-00000004" in warnings[0] and Path(victim).name in warnings[0], warnings[0]
    assert "resuming from step-00000002" in warnings[0]
    assert "resumed from" in proc.stderr and "(step 2," in proc.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6

def test_every_checkpoint_damaged_is_one_line(tmp_path, tiny_shards, four_steps):
    run_dir = _copy(four_steps, tmp_path / "run")
    for _, path in ckpt.list_checkpoints(run_dir):
        (path / "rank-00000.json").write_text("{")
    proc = _train(_cfg(run_dir, tiny_shards, steps=6))
    assert proc.returncode == 2
    assert "no undamaged checkpoint to resume from" in _error_line(proc)

# ---- item 20: a refused resume ----------------------------------------------------------------------

@pytest.mark.parametrize("section,change,key", [
    ("model", {"config": {"n_embd": 64}}, "model.config.n_embd: 32 -> 64"),
    ("teacher", {"mode": "ledger"}, "teacher.mode: 'cycle' -> 'ledger'"),
])
def test_refused_resume_is_one_line_and_keeps_config_yaml(tmp_path, tiny_shards, four_steps, section, change,
                                                         key):
    run_dir = _copy(four_steps, tmp_path / "run")
    recorded = (run_dir / "config.yaml").read_bytes()
    cfg = _cfg(run_dir, tiny_shards, steps=6)
    for k, v in change.items():
        cfg[section][k] = {**cfg[section][k], **v} if isinstance(v, dict) else v
    proc = _train(cfg)
    assert proc.returncode == 2
    line = _error_line(proc)
    assert "resume refused" in line and key in line, line
    assert (run_dir / "config.yaml").read_bytes() == recorded

# ---- issue 30: a fresh run in a run_dir with an earlier run's checkpoints ----------------------------

def test_no_resume_moves_the_earlier_runs_checkpoints_aside(tmp_path, tiny_shards, four_steps):
    """checkpoint.resume=false where an earlier run left checkpoints 2 and 4: they move, whole, to
    checkpoints.before-<time> (one line says so), the fresh run writes its own, and the next plain run
    resumes the fresh run's newest step (3), not the earlier run's newer one (4)."""
    run_dir = _copy(four_steps, tmp_path / "run")
    before = {p.relative_to(run_dir / "checkpoints"): p.read_bytes()
              for p in (run_dir / "checkpoints").rglob("*") if p.is_file()}
    fresh = _train(_cfg(run_dir, tiny_shards, steps=3, resume=False))
    check(fresh)
    aside = sorted(run_dir.glob("checkpoints.before-*"))
    assert len(aside) == 1, sorted(run_dir.iterdir())
    line = next(x for x in fresh.stderr.splitlines() if "checkpoint.resume=false" in x)
    assert line == (f"attent-scale: checkpoint.resume=false: {run_dir / 'checkpoints'} held an earlier run's "
                    f"checkpoints (newest: step-00000004); moved to {aside[0]} so that no later resume mixes "
                    "the two runs (remove it when you no longer need it)"), line
    assert {p.relative_to(aside[0]): p.read_bytes() for p in aside[0].rglob("*") if p.is_file()} == before
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2, 3]
    again = _train(_cfg(run_dir, tiny_shards, steps=5))
    check(again)
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000003'} (step 3," in again.stderr, again.stderr
    assert len(list(run_dir.glob("checkpoints.before-*"))) == 1  # a resume moves nothing

def test_signal_before_the_last_step_preempts_there(tmp_path, tiny_shards, monkeypatch):
    """A signal during step 3 of 4 with train.stop_check_every=10: the last step has a stop check too, so the
    run preempts at step 4 (checkpoint, PREEMPTED, 75) instead of going on into the final eval and export;
    the requeued run resumes there and only finishes."""
    cfg = _cfg(tmp_path / "run", tiny_shards, steps=4, every_steps=0)
    cfg["train"]["stop_check_every"] = 10
    monkeypatch.setenv("ATTENT_STOP_AFTER_STEP", "3")
    stopped = _train(cfg)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "PREEMPTED").read_text())["step"] == 4
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [4]
    assert not (tmp_path / "run" / "export").exists()
    monkeypatch.delenv("ATTENT_STOP_AFTER_STEP")
    again = _train(cfg)
    check(again)
    assert "(step 4, 64 samples trained, epoch 0 after 4 of its batches" in again.stderr, again.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4
    assert (tmp_path / "run" / "export").is_dir()

# ---- item 23: a full disk during a checkpoint write -------------------------------------------------

def test_disk_full_during_checkpoint_write_is_one_line_and_leaves_no_tmp(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    proc = _train(_cfg(run_dir, tiny_shards), limit_bytes=64 * 1024)  # engine.pt is ~0.5 MB
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _error_line(proc)
    assert "checkpoint" in line and "write failed" in line and "disk full" in line, line
    assert not list((run_dir / "checkpoints").glob("*.tmp"))

class _FullDiskEngine:
    """Writes half a file, then the disk is full."""

    def save(self, ckpt_dir: Path, tag: str) -> None:
        (Path(ckpt_dir) / tag).mkdir(parents=True)
        (Path(ckpt_dir) / tag / "engine.pt").write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

class _OkEngine:
    def save(self, ckpt_dir: Path, tag: str) -> None:
        (Path(ckpt_dir) / tag).mkdir(parents=True)
        (Path(ckpt_dir) / tag / "engine.pt").write_bytes(b"ok")

def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    ckpt.save_checkpoint(tmp_path, 2, _OkEngine(), {"a": 1}, rank=0, world_size=1, keep_last=2)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    full = r"step-00000004: write failed on rank 0: disk full .*step-00000002 kept"
    with pytest.raises(UserError, match=full):
        ckpt.save_checkpoint(tmp_path, 4, _FullDiskEngine(), {"a": 1}, rank=0, world_size=1, keep_last=2)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert ckpt.load_state(tmp_path / "checkpoints" / "step-00000002" / "rank-00000") == {"a": 1}

# ---- item 24: a run_dir that is a file or read-only -------------------------------------------------

def _bad_run_dir(tmp_path: Path, kind: str) -> Path:
    (tmp_path / "afile").write_text("x")
    if kind == "file":
        return tmp_path / "afile"
    if kind == "under a file":
        return tmp_path / "afile" / "run"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return ro / "run"

@pytest.mark.parametrize("kind,message", [
    ("file", "exists and is not a directory"),
    ("under a file", "not writable"),
    pytest.param("read-only", "not writable", marks=pytest.mark.skipif(
        os.geteuid() == 0, reason="root writes into read-only directories")),
])
def test_bad_run_dir_is_one_line(tmp_path, tiny_shards, kind, message):
    run_dir = _bad_run_dir(tmp_path, kind)
    cfg = _cfg(tmp_path / "x", tiny_shards)
    cfg["run_dir"] = str(run_dir)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = procs.run([sys.executable, "-m", "attent_scale", "train", "--config", str(cfg_path)],
                     cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    line = _error_line(proc)
    assert f"run_dir {run_dir}: {message}" in line, line

# ---- item 8: engine.pt loads with weights_only=True -------------------------------------------------

class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.write_text, (self.marker, "ran"))

def test_local_engine_checkpoint_cannot_run_code(tmp_path):
    engine = build_engine(config_from_dict(tiny_config("local")), vocab_size=VOCAB)
    engine.save(tmp_path, "engine")
    engine.load(tmp_path, "engine")  # what the engine wrote loads with weights_only=True
    marker = tmp_path / "ran"
    import torch

    torch.save({"model": _Payload(marker)}, tmp_path / "engine" / "engine.pt",
               pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(UserError, match="engine.pt: not a checkpoint this engine wrote"):
        engine.load(tmp_path, "engine")
    assert not marker.exists()

def test_one_ranks_due_periodic_save_does_not_hide_another_ranks_stop_signal(monkeypatch) -> None:
    """The stop check reduces [signal or clock, minutes-save due] element-wise: a peer whose
    checkpoint.every_minutes has passed must not turn this rank's stop signal into 'go on'."""
    from types import SimpleNamespace

    import attent_scale.stop as stop_mod
    import attent_scale.train as train_mod
    from attent_scale.checkpoint import Checkpointer

    peer = [0.0, 1.0]  # the other rank: no signal, its periodic save is due
    monkeypatch.setattr(stop_mod, "all_reduce_values",
                        lambda values, op, group: [max(a, b) for a, b in zip(values, peer, strict=True)])
    check = stop_mod.StopCheck(every=1, max_seconds=0, group=None,
                               signal_flag=SimpleNamespace(received="SIGUSR1", stop_after_step=-1))
    poll = check.poll(5, train_seconds=0.0, save_late=False)
    assert poll.preempt and poll.save_late
    me = SimpleNamespace(progress=train_mod.Progress(step=5), total_steps=100,
                         checkpointer=Checkpointer(".", every_steps=0, every_minutes=0, keep_last=1, rank=0,
                                                   world_size=1))
    assert train_mod.Trainer.checkpoint_due(me, poll)
    assert stop_mod.decide(poll, step=5, last_step=100, cut=False) == train_mod.PREEMPT
