"""The run_dir lock: one job per run directory, held by rank 0, taken over when its holder is dead.

The lock is a file `run_dir/LOCK` created with O_EXCL, holding JSON {host, pid, start, slurm_job_id,
slurm_restart_count, slurm_step_id, slurm_procid, since}. It works on a shared filesystem across hosts
because it never relies on the holder's process being visible: a holder is stale when it is a process on
*this* host that no longer exists (pid gone, or the pid now belongs to a process that started later),
when it is an earlier attempt of our own Slurm job on another host (the same job id with a smaller
SLURM_RESTART_COUNT: Slurm ended that attempt before it requeued the job), or when `scontrol` says its
Slurm job is no longer running. The same job id with the same restart count on another host (or a live
process on this one) is a sibling: another task or step of this very attempt, never stale (all srun
tasks of a job share its id: "same job id" alone does not mean "requeued"). A holder on another host
outside Slurm cannot be checked: the user is told to remove the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from attent_scale.errors import UserError

LOCK_NAME = "LOCK"
_ACTIVE_SLURM_STATES = {
    "RUNNING",
    "COMPLETING",
    "CONFIGURING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
    "RESIZING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
}


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (guards against a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _env_count(name: str) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else 0


def _me() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": _start_ticks(os.getpid()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID") or None,
        "slurm_restart_count": _env_count("SLURM_RESTART_COUNT"),  # unset until the job is requeued
        "slurm_step_id": os.environ.get("SLURM_STEP_ID") or None,  # None: the batch shell, or no Slurm
        "slurm_procid": os.environ.get("SLURM_PROCID") or None,
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _pid_alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return start is None or _start_ticks(pid) in (None, start)


def _slurm_job_active(job_id: str) -> bool | None:
    """True/False from `scontrol show job`; None when Slurm cannot be asked."""
    if shutil.which("scontrol") is None:
        return None
    try:
        proc = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return False if "Invalid job id" in proc.stderr else None
    for field in proc.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1] in _ACTIVE_SLURM_STATES
    return None


def stale_reason(holder: dict[str, Any], me: dict[str, Any]) -> str | None:
    """Why `holder` no longer holds the lock, or None when it may still be running."""
    job = holder.get("slurm_job_id")
    same_host = holder.get("host") == me["host"] and isinstance(holder.get("pid"), int)
    if same_host and not _pid_alive(holder["pid"], holder.get("start")):
        return f"pid {holder['pid']} on {holder['host']} is gone"
    if job and job == me["slurm_job_id"]:
        theirs, mine = holder.get("slurm_restart_count") or 0, me.get("slurm_restart_count") or 0
        if same_host or not isinstance(theirs, int) or theirs >= mine:
            return None  # alive here, or a sibling task or step of this attempt elsewhere: running
        return f"an earlier attempt of Slurm job {job} (restart {theirs}; this is restart {mine}: requeued)"
    if same_host:
        if not _pid_alive(holder["pid"], holder.get("start")):
            return f"pid {holder['pid']} on {holder['host']} is gone"
        return None
    if job and _slurm_job_active(str(job)) is False:
        return f"Slurm job {job} is no longer running"
    return None


def describe(holder: dict[str, Any]) -> str:
    job = ""
    if holder.get("slurm_job_id"):
        job = f", Slurm job {holder['slurm_job_id']}"
        if holder.get("slurm_step_id") is not None:
            job += f" step {holder['slurm_step_id']} task {holder.get('slurm_procid')}"
        if holder.get("slurm_restart_count"):
            job += f" restart {holder['slurm_restart_count']}"
    return f"host {holder.get('host')} pid {holder.get('pid')}{job}, since {holder.get('since')}"


def _sibling(holder: dict[str, Any], me: dict[str, Any]) -> bool:
    """`holder` is another task or step of this very Slurm job attempt."""
    return bool(me.get("slurm_job_id")) and holder.get("slurm_job_id") == me["slurm_job_id"] and (
        (holder.get("slurm_restart_count") or 0) == (me.get("slurm_restart_count") or 0))


class RunDirLock:
    """Hold `run_dir/LOCK` for this process; `release` removes it if it is still ours."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.me = _me()
        self.taken_over: str | None = None  # why an earlier holder's lock was taken over, if it was
        self._held = False

    def acquire(self) -> RunDirLock:
        text = json.dumps(self.me)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:  # being written right now, or unreadable: look again
                    time.sleep(0.2)
                    holder = self._read() or {}
                reason = stale_reason(holder, self.me)
                if reason is None and _sibling(holder, self.me):
                    where = (f"step {self.me['slurm_step_id']} task {self.me['slurm_procid']}"
                             if self.me.get("slurm_step_id") is not None else "its batch shell")
                    raise UserError(
                        f"run_dir {self.path.parent}: in use by {describe(holder)}, another task of this "
                        f"Slurm job (this is {where}): one training per run_dir"
                    ) from None
                if reason is None:
                    raise UserError(
                        f"run_dir {self.path.parent}: in use by {describe(holder)}; use another run_dir, "
                        f"or remove {self.path} if that job is dead"
                    ) from None
                # replace atomically, then check that no other taker won the race
                tmp = self.path.with_name(f"{LOCK_NAME}.{self.me['host']}.{self.me['pid']}")
                tmp.write_text(text)
                tmp.replace(self.path)
                if self._read() == self.me:
                    self.taken_over = reason
                    self._held = True
                    return self
                continue
            with os.fdopen(fd, "w") as f:
                f.write(text)
            self._held = True
            return self
        raise UserError(f"run_dir {self.path.parent}: another job keeps taking {self.path}")

    def _read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def release(self) -> None:
        if self._held and self._read() == self.me:
            with contextlib.suppress(OSError):
                self.path.unlink()
        self._held = False


def lock_run_dir(run_dir: str | Path, rank: int) -> RunDirLock | None:
    """Collective: rank 0 takes the lock (released at exit); every rank fails together when it cannot."""
    import atexit
    import sys

    from attent_scale.dist import all_reduce_flag

    lock, error = None, None
    if rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        try:
            lock = RunDirLock(run_dir).acquire()
        except UserError as exc:
            error = exc
    ok = all_reduce_flag(error is None, "min")
    if error is not None:
        raise error
    if not ok:
        raise UserError(f"run_dir {run_dir}: in use by another job (rank 0 names it)")
    if lock is not None:
        atexit.register(lock.release)
        if lock.taken_over:
            print(
                f"attent-scale: run_dir {run_dir}: took over a stale lock ({lock.taken_over})",
                file=sys.stderr,
            )
    return lock
