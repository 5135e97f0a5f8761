"""The end-of-run deadline in one process: it fires once a phase outlives it, not while phases move on,
never after close; and the line names whom a rank waited for."""

from __future__ import annotations

import threading
import time

import pytest

from attent_scale.deadline import END_TIMEOUT_EXIT_CODE, EndDeadline, describe


class Exit:
    """Stands in for os._exit: records the code and lets the test wait for it."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.called = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.called.set()


def test_a_phase_that_outlives_the_deadline_writes_one_line_and_exits_124(tmp_path, capfd):
    exit = Exit()
    end = EndDeadline(0.3, rank=0, world=1, run_dir=tmp_path, exit=exit)
    end.enter("final eval")
    assert exit.called.wait(30)
    end.close()
    assert exit.codes == [END_TIMEOUT_EXIT_CODE]
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln]
    assert len(lines) == 1, lines
    assert lines[0].startswith("attent-scale: rank 0: end of run: phase 'final eval' did not end within "
                               "train.end_timeout_seconds=0.3; this rank is the one stalled")
    # where the trainer thread stood: this test, waiting on the event
    assert "test_deadline.py" in lines[0] or "threading.py" in lines[0]
    stacks = tmp_path / "end_stacks.rank0.txt"
    assert stacks.exists() and "most recent call first" in stacks.read_text()
    assert str(stacks) in lines[0]


def test_phases_that_move_on_and_a_closed_deadline_never_fire(tmp_path):
    exit = Exit()
    end = EndDeadline(1.0, rank=0, world=1, run_dir=tmp_path, exit=exit)
    for phase in ("final eval", "checkpoint", "export", "summary", "close"):
        end.enter(phase)
        time.sleep(0.3)  # each phase well inside the deadline, the whole end well past it
    end.enter("metrics linger", extra_seconds=2.0)
    time.sleep(1.5)  # past the plain deadline, inside the linger's extra seconds
    end.close()
    end.enter("final barrier")  # closed: nothing is armed again
    assert not exit.called.wait(2.0)
    assert exit.codes == []


def test_seconds_zero_is_no_deadline(tmp_path):
    exit = Exit()
    end = EndDeadline(0, rank=0, world=1, run_dir=tmp_path, exit=exit)
    end.enter("final eval")
    assert end._thread is None
    end.close()


def rec(phase: str, collective: bool, where: str = "x.py:1 f") -> dict:
    return {"phase": phase, "collective": collective, "where": where}


@pytest.mark.parametrize("others,expect", [
    # the peer stalled outside a collective: named, with its phase and frame
    ({1: rec("close", False, "metrics.py:9 close")},
     "waited for rank 1 (in phase 'close', not in a collective at metrics.py:9 close)"),
    # no report from the peer: dead, or holding the interpreter
    ({1: None, 2: rec("export", True)}, "waited for rank 1 (no report"),
    # every peer waits in a collective, one in another phase: that one is named (mismatched collectives)
    ({1: rec("export", True), 2: rec("summary", True)}, "waited for rank 2 (in phase 'summary', waiting in"),
    # every rank in a collective of the same phase: said so
    ({1: rec("export", True)}, "every rank waits in a collective of this phase"),
])
def test_the_line_names_the_ranks_waited_for(others, expect):
    mine = {"rank": 0, "phase": "export", "collective": True, "where": "distributed_c10d.py:1 barrier"}
    line = describe(mine, others, 300)
    assert line.startswith("rank 0: end of run: phase 'export' did not end within "
                           "train.end_timeout_seconds=300")
    assert expect in line, line
    assert line.endswith(f"exiting {END_TIMEOUT_EXIT_CODE}")
    assert "\n" not in line


def test_a_rank_stalled_outside_a_collective_names_itself():
    mine = {"rank": 1, "phase": "final eval", "collective": False,
            "where": "queues.py:1 get in validate.py:40"}
    line = describe(mine, {0: rec("final eval", True)}, 60)
    assert "this rank is the one stalled, not in a collective, at queues.py:1 get in validate.py:40" in line
