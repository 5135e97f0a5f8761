"""attent_scale.cli.run / exit_process: the process's exit code, atexit handlers and output survive the
fast exit that a process which joined a process group takes (real child processes)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import procs
from train_runner import REPO

JOINED = """
import atexit, sys, torch
from attent_scale import dist
from attent_scale.cli import exit_process
dist.init_one_rank_group(torch.device("cpu"))
dist.destroy()
atexit.register(lambda: print("atexit ran", flush=True))
print("unflushed", end="")
sys.stderr.write("to stderr")
assert dist.joined_group()
exit_process({code})
print("never")
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return procs.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, capture_output=True,
                     text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})


def test_a_process_that_joined_a_group_keeps_its_code_atexit_handlers_and_output() -> None:
    for code in (0, 3):
        proc = _python(JOINED.format(code=code))
        assert proc.returncode == code, proc.stderr
        assert proc.stdout == "unflushedatexit ran\n"
        assert proc.stderr == "to stderr"


def test_run_exits_like_python_for_return_codes_usage_errors_and_escaped_exceptions() -> None:
    proc = _python("from attent_scale.cli import run; run(['--version'])")
    assert (proc.returncode, proc.stdout.split()[0]) == (0, "attent-scale")
    proc = _python("from attent_scale.cli import run; run(['no-such-command'])")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = _python("""
        import attent_scale.cli as cli
        def boom(argv):
            raise RuntimeError("escaped")
        cli.main = boom
        cli.run()
    """)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == "RuntimeError: escaped" and "Traceback" in proc.stderr


def test_python_dash_m_is_the_same_entry() -> None:
    proc = procs.run([sys.executable, "-m", "attent_scale", "train", "--config", "/nonexistent.yaml"],
                     cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "/nonexistent.yaml" in proc.stderr
