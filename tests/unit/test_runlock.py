"""The run_dir lock: a live holder blocks with a line naming it; a dead or requeued one is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from attent_scale.errors import UserError
from attent_scale.runlock import LOCK_NAME, RunDirLock


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Tests must not depend on the machine: no SLURM_JOB_ID, and a PATH holding only our fake tools."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


def _holder(tmp_path: Path, **fields: object) -> None:
    base = {"host": socket.gethostname(), "pid": 1, "start": None, "slurm_job_id": None, "since": "x"}
    (tmp_path / LOCK_NAME).write_text(json.dumps({**base, **fields}))


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_second_holder_gets_one_line_naming_the_first(tmp_path: Path) -> None:
    first = RunDirLock(tmp_path).acquire()
    with pytest.raises(UserError) as err:
        RunDirLock(tmp_path).acquire()
    message = str(err.value)
    assert f"host {socket.gethostname()} pid {os.getpid()}" in message and "\n" not in message
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    RunDirLock(tmp_path).acquire().release()


def test_dead_pid_on_this_host_is_taken_over(tmp_path: Path) -> None:
    _holder(tmp_path, pid=_dead_pid())
    lock = RunDirLock(tmp_path).acquire()
    assert lock.taken_over and "is gone" in lock.taken_over
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_reused_pid_is_not_the_holder(tmp_path: Path) -> None:
    _holder(tmp_path, pid=os.getpid(), start=1)  # our pid, but a process that started at another time
    assert RunDirLock(tmp_path).acquire().taken_over


def test_same_slurm_job_takes_over_a_requeued_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _holder(tmp_path, host="node7", pid=os.getpid(), slurm_job_id="4242")  # restart 0 (no count recorded)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunDirLock(tmp_path).acquire()
    assert "requeued" in lock.taken_over and "restart 0" in lock.taken_over
    assert json.loads((tmp_path / LOCK_NAME).read_text())["slurm_restart_count"] == 1
    lock.release()
    # the second requeue takes over the first requeue's lock the same way
    _holder(tmp_path, host="node7", pid=123, slurm_job_id="4242", slurm_restart_count=1)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert "requeued" in RunDirLock(tmp_path).acquire().taken_over


@pytest.mark.parametrize("sibling", [{"slurm_step_id": "0", "slurm_procid": "0"},  # task 0, this is task 1
                                     {"slurm_step_id": "3", "slurm_procid": "1"},  # another step
                                     {"slurm_step_id": None, "slurm_procid": "0"}])  # the batch shell
def test_a_sibling_task_of_the_same_attempt_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sibling: dict
) -> None:
    # same job id, same restart count: every srun task of a job shares SLURM_JOB_ID; it is not a requeue
    _holder(tmp_path, host="node7", pid=123, slurm_job_id="4242", **sibling)
    for name, value in (("SLURM_JOB_ID", "4242"), ("SLURM_STEP_ID", "0"), ("SLURM_PROCID", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    with pytest.raises(UserError, match=r"in use by host node7 pid 123, Slurm job 4242.*another task of "
                       r"this Slurm job \(this is step 0 task 1\): one training per run_dir") as err:
        RunDirLock(tmp_path).acquire()
    assert "\n" not in str(err.value)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == 123  # left as it was


def test_a_dead_sibling_on_this_host_is_taken_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # an earlier step of this very attempt that died (kill -9) here: its pid is gone, nothing runs
    _holder(tmp_path, pid=_dead_pid(), slurm_job_id="4242", slurm_step_id="0", slurm_procid="0")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "1")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert "is gone" in RunDirLock(tmp_path).acquire().taken_over


def test_an_earlier_attempt_still_alive_on_this_host_is_not_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _holder(tmp_path, pid=os.getpid(), slurm_job_id="4242", slurm_restart_count=0)  # alive: this process
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(UserError, match="in use by"):
        RunDirLock(tmp_path).acquire()


def test_other_host_without_slurm_blocks(tmp_path: Path) -> None:
    _holder(tmp_path, host="elsewhere", pid=123)
    with pytest.raises(
        UserError, match=r"in use by host elsewhere pid 123.*remove .*LOCK if that job is dead"
    ):
        RunDirLock(tmp_path).acquire()


@pytest.mark.parametrize(
    ("scontrol", "stale"),
    [
        ('echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1', True),
        ('echo "JobId=99 JobName=x JobState=COMPLETED Reason=None"', True),
        ('echo "JobId=99 JobName=x JobState=RUNNING Reason=None"', False),
    ],
)
def test_other_host_slurm_job_asks_scontrol(
    tmp_path: Path, no_slurm: Path, scontrol: str, stale: bool
) -> None:
    fake = no_slurm / "scontrol"
    fake.write_text(f"#!/bin/sh\n{scontrol}\n")
    fake.chmod(0o755)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _holder(run_dir, host="elsewhere", pid=123, slurm_job_id="99")
    if stale:
        assert "no longer running" in RunDirLock(run_dir).acquire().taken_over
    else:
        with pytest.raises(UserError, match="Slurm job 99"):
            RunDirLock(run_dir).acquire()
