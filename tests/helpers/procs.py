"""Processes the tests start, found and killed by a marker in their environment, not by process tree.

torchrun starts every rank in a session of its own (so killing the launcher's process group misses
them), and a rank whose torchrun was killed is re-parented to init, so neither a process group nor the
process tree reaches every process of a job. Environment variables do: every process inherits them.

- ATTENT_TEST_SESSION=<uuid>: set by conftest.py in each pytest process, inherited by everything a test
  session starts (servers, Slurm jobs, ranks); whatever still carries it when the session finishes is a
  leftover (`leftovers`, conftest's session check).
- ATTENT_TEST_PROC=<uuid>: one per launch through `run`, `popen`, `start` or `spawn` here; `kill(tag)`
  ends every process of that launch. `run` and `spawn` kill theirs when the test fails or times out
  (pytest-timeout raises in the test), `popen` is a context manager that does the same; after each test
  leftovers.py kills what its launches left (and fails a test that passed but left something).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

SESSION = "ATTENT_TEST_SESSION"
PROC = "ATTENT_TEST_PROC"
issued: list[str] = []  # every ATTENT_TEST_PROC tag this pytest process handed out, in order
at_test_end: list[Callable[[], Any]] = []  # run (and cleared) after the test that registered them


def after_test(fn: Callable[[], Any]) -> None:
    """Run `fn` when the current test ends, however it ends (e.g. scancel of the Slurm jobs it submitted:
    slurmstepd, not the test, is their parent)."""
    at_test_end.append(fn)


def new_tag() -> str:
    tag = uuid.uuid4().hex
    issued.append(tag)
    return tag


def marked(name: str, value: str) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes whose environment holds name=value (not this one)."""
    want = f"{name}={value}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if want not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
            if stat[stat.rindex(")") + 2:].split()[0] == "Z":  # exited, not reaped yet
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError):
            continue
        out.append((int(entry.name), cmd))
    return sorted(out)


def kill_marked(name: str, value: str, wait: float = 10.0) -> list[tuple[int, str]]:
    """SIGKILL every process marked name=value until none is left (at most `wait` s); returns those
    found at first."""
    found = marked(name, value)
    end = time.monotonic() + wait
    left = found
    while left and time.monotonic() < end:
        for pid, _ in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
        left = marked(name, value)
    return found


def kill(tag: str) -> list[tuple[int, str]]:
    """End every process of one launch (its launcher, the ranks torchrun put in their own sessions, their
    DataLoader workers)."""
    return kill_marked(PROC, tag)


def _env(env: dict[str, str] | None, tag: str) -> dict[str, str]:
    return {**(os.environ if env is None else env), PROC: tag, SESSION: os.environ.get(SESSION, "")}


def start(cmd: Sequence[str], *, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen:
    """subprocess.Popen in a session of its own, marked (`proc.tag`), for a test that holds it across its
    body: if the test fails or times out, leftovers.py kills every process of it at teardown."""
    tag = new_tag()
    proc = subprocess.Popen(list(cmd), env=_env(env, tag), start_new_session=True, **kwargs)
    proc.tag = tag  # type: ignore[attr-defined]
    return proc


@contextlib.contextmanager
def popen(cmd: Sequence[str], *, env: dict[str, str] | None = None, **kwargs: Any
          ) -> Iterator[subprocess.Popen]:
    """subprocess.Popen in a session of its own, marked (`proc.tag`). Leaving the block kills every
    process of it when the block raised (a failed assertion, pytest-timeout) or the launcher still runs;
    after a launcher that exited, what it left running is for conftest's check to report."""
    proc = start(cmd, env=env, **kwargs)
    tag = proc.tag  # type: ignore[attr-defined]
    try:
        yield proc
    except BaseException:
        kill(tag)
        raise
    finally:
        if proc.poll() is None:
            kill(tag)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        proc.wait()


def run(cmd: Sequence[str], *, timeout: float, env: dict[str, str] | None = None, input: Any = None,
        capture_output: bool = False, check: bool = False, **kwargs: Any) -> subprocess.CompletedProcess:
    """subprocess.run for commands that start ranks (torchrun, launch scripts, the trainer): marked, in
    a session of its own; on a timeout or any error every process of it is killed, not just the launcher."""
    if capture_output:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with popen(cmd, env=env, **kwargs) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(proc.tag)  # type: ignore[attr-defined]
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(proc.args, timeout, out, err) from None
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        result.check_returncode()
    return result


def spawn(fn: Callable[..., Any], args: tuple, nprocs: int) -> None:
    """torch.multiprocessing.spawn (join), its children marked; they are killed if the join fails or is
    interrupted (pytest-timeout)."""
    import torch.multiprocessing as mp

    tag = new_tag()
    old = os.environ.get(PROC)
    os.environ[PROC] = tag  # spawned children copy this process's environment
    try:
        context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    finally:
        if old is None:
            os.environ.pop(PROC, None)
        else:
            os.environ[PROC] = old
    try:
        while not context.join():
            pass
    except BaseException:
        kill(tag)
        raise
