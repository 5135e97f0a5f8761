"""Tests that start processes clean up after themselves: procs.py kills a whole launch (ranks in sessions
of their own included) on a timeout or an error, and leftovers.py fails a test or a session that leaves
one running."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import procs
import pytest

HELPERS = Path(__file__).resolve().parents[1] / "helpers"

# a launcher like torchrun: its child runs in a session of its own, then it waits
LAUNCHER = ("import subprocess, sys, time; subprocess.Popen(['sleep', sys.argv[1]], start_new_session=True); "
            "time.sleep(600)")


def alive(cmdline: str) -> list[int]:
    """Pids of live processes whose command line is exactly `cmdline`."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if cmd == cmdline and state != "Z":
                out.append(int(entry.name))
    return out


def test_a_timed_out_run_kills_the_launcher_and_the_child_in_its_own_session():
    with pytest.raises(subprocess.TimeoutExpired):
        procs.run([sys.executable, "-c", LAUNCHER, "3001.5"], timeout=3, capture_output=True)
    assert alive("sleep 3001.5") == []
    assert procs.marked(procs.PROC, procs.issued[-1]) == []


def test_a_failing_block_kills_its_launch():
    with pytest.raises(AssertionError), procs.popen([sys.executable, "-c", LAUNCHER, "3002.5"]) as proc:
        deadline = time.monotonic() + 60
        while not alive("sleep 3002.5") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None
        raise AssertionError("the test failed while its launch ran")
    assert alive("sleep 3002.5") == []


INNER = '''
import subprocess, sys, time
import procs

def test_leaves_an_orphan():
    code = "import subprocess; subprocess.Popen(['sleep', '3003.5'], start_new_session=True)"
    with procs.popen([sys.executable, "-c", code]) as proc:
        proc.wait()

def test_leaves_a_plain_child():
    subprocess.Popen(["sleep", "3004.5"], start_new_session=True)

def test_fails_while_its_launch_runs():
    code = ("import subprocess, time; subprocess.Popen(['sleep', '3005.5'], start_new_session=True); "
            "time.sleep(600)")
    procs.start([sys.executable, "-c", code])
    time.sleep(1)
    assert False, "failed on purpose"
'''


def test_a_test_or_session_that_leaves_a_process_fails_and_the_process_is_killed(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")]))
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "leftovers", "-p", "no:cacheprovider", timeout=120)
    out = result.stdout.str()
    result.assert_outcomes(passed=2, failed=1, errors=1)  # the failed test's launch goes quietly
    assert "the test left 1 process(es) running (now killed): pid " in out and "sleep 3003.5" in out, out
    assert "1 process(es) started by this test session were still running at its end" in out, out
    assert "sleep 3004.5" in out, out
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert not [line for line in out.splitlines() if "pid " in line and "3005.5" in line], out
    assert alive("sleep 3003.5") == alive("sleep 3004.5") == alive("sleep 3005.5") == []
