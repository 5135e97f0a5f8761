"""A pytest plugin (conftest.py loads it): no test, and no test session, leaves a process running.

Each pytest process marks its environment with a fresh ATTENT_TEST_SESSION id, so everything it starts
carries it (procs.py says why a marker and not a process group). After each test, the processes of the
launches it made through procs.run/popen/start/spawn must be gone within 10 s (DataLoader workers notice a
dead rank within 5 s): otherwise they are killed and the test fails naming them. At the end of the
session, anything still carrying the session's id is killed, listed, and the session fails. A test that
failed or timed out has its launches killed without a second error.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import procs
import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Mark everything this pytest process starts (a fresh id per process: xdist workers get their own)."""
    os.environ[procs.SESSION] = uuid.uuid4().hex


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = yield
    if report.failed:
        item.stash[_FAILED] = True
    return report


_FAILED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _no_process_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Run the test's procs.after_test callbacks; kill what its launches (procs.run/popen/start/spawn) left
    running; a test that passed and left something fails, naming it."""
    first, hooks = len(procs.issued), len(procs.at_test_end)
    yield
    for fn in procs.at_test_end[hooks:]:
        with contextlib.suppress(Exception):
            fn()
    del procs.at_test_end[hooks:]
    tags = procs.issued[first:]
    if request.node.stash.get(_FAILED, False):  # failed or timed out: its launches go, quietly
        for tag in tags:
            procs.kill(tag)
        return
    deadline = time.monotonic() + 10  # DataLoader workers notice their rank's exit within 5 s
    def still_running() -> list[tuple[int, str]]:
        return [(pid, cmd) for tag in tags for pid, cmd in procs.marked(procs.PROC, tag)
                if not _own_helper(pid, cmd)]

    left = still_running()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = still_running()
    if left:
        for tag in tags:
            procs.kill(tag)
        pytest.fail(f"the test left {len(left)} process(es) running (now killed): "
                    + "; ".join(f"pid {pid}: {cmd[:200]}" for pid, cmd in left), pytrace=False)


@pytest.hookimpl(trylast=True)  # after the fixtures' teardown (an interrupted session tears down here)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Whatever still carries this session's id (a rank, a server, a Slurm job step) is killed and
    reported, and the session fails. (An xdist controller runs no test: its workers check their own.)"""
    config = session.config
    if getattr(config.option, "dist", "no") != "no" and not hasattr(config, "workerinput"):
        return
    left = [(pid, cmd) for pid, cmd in procs.marked(procs.SESSION, os.environ.get(procs.SESSION, ""))
            if not _own_helper(pid, cmd)]
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if not left:
        return
    lines = [f"attent tests: {len(left)} process(es) started by this test session were still running at "
             "its end (now killed):", *(f"  pid {pid}: {cmd[:300]}" for pid, cmd in left)]
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    for line in lines:
        if reporter is not None:
            reporter.write_line(line, red=True)
        else:
            print(line, file=sys.stderr)
    if session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _own_helper(pid: int, cmd: str) -> bool:
    """multiprocessing's resource tracker or forkserver serving this pytest process: it ends with it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    ppid = int(stat[stat.rindex(")") + 2:].split()[1])
    helper = "multiprocessing.resource_tracker" in cmd or "multiprocessing.forkserver" in cmd
    return ppid == os.getpid() and helper
