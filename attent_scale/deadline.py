"""End-of-run deadline: each phase after the last step ends in train.end_timeout_seconds, else the rank exits.

A rank whose phase outlives it writes one line naming the phase and the rank(s) it waited for and exits
with END_TIMEOUT_EXIT_CODE.

After its last step a run still runs collectives (the last selection exchange and stop check, the final
checks, eval, checkpoint, export, summary, the final barrier) and waits on local work (the val stream's
DataLoader worker, the exporter's linger). A rank that stalls there holds every other rank in its next
collective until the process group's timeout, if ever; on a cluster the job keeps its GPUs until the time
limit. `EndDeadline.enter(phase)` starts a phase and (re)arms a watchdog thread; a phase that outlives
the deadline ends the process:

- every rank whose deadline passes publishes where it stands (its phase, its trainer thread's innermost
  frame, and whether that thread waits in a collective: a torch.distributed or deepspeed frame below our
  innermost one) in the process group's store, and reads the others' for a few seconds;
- it writes one line: the phase, and the ranks it waited for (those not in a collective, in another phase,
  or silent), or that it is itself the one stalled; every thread's stack goes to run_dir/end_stacks.rankN.txt;
- it kills its own child processes (DataLoader workers: a stuck one would never see its rank go) and
  leaves with os._exit(END_TIMEOUT_EXIT_CODE): the trainer thread may be blocked in C++ and cannot be
  interrupted. Not 75 and no PREEMPTED marker, so no launcher requeues the job.

Tests make one rank stall when it enters a phase with ATTENT_TEST_STALL_END="PHASE:RANK" (`_test_stall`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

END_TIMEOUT_EXIT_CODE = 124  # like coreutils' timeout: not the 75 a launcher requeues on
STALL_ENV = "ATTENT_TEST_STALL_END"  # tests only: "PHASE:RANK" sleeps forever on entering PHASE
STORE_PREFIX = "attent_end_deadline/"
_OURS = f"attent_scale{os.sep}"
_COLLECTIVE_PATHS = (f"{os.sep}torch{os.sep}distributed{os.sep}", f"{os.sep}deepspeed{os.sep}")


class EndDeadline:
    """The watchdog of one rank's end of run: `enter(phase)` arms it, `close()` disarms it."""

    def __init__(self, seconds: float, *, rank: int, world: int, run_dir: Path | None = None,
                 grace: float = 10.0, exit: Callable[[int], Any] = os._exit) -> None:
        self.seconds, self.rank, self.world, self.run_dir = float(seconds), rank, world, run_dir
        self.grace = min(grace, max(1.0, self.seconds / 2))  # how long the others' reports are awaited
        self._exit = exit
        self.phase: str | None = None
        self._due: float | None = None
        self._owner: int | None = None  # the trainer's thread: its stack says where this rank stands
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def enter(self, phase: str, extra_seconds: float = 0.0) -> None:
        """Start `phase` (ending the one before): it must end within the deadline (+ `extra_seconds`, for a
        phase that sleeps on purpose, like the metrics linger). No-op once closed or with seconds 0."""
        if self.seconds <= 0 or self._closed:
            return
        with self._cond:
            self.phase, self._due = phase, time.monotonic() + self.seconds + extra_seconds
            self._owner = threading.get_ident()
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="attent-end-deadline", daemon=True)
                self._thread.start()
            self._cond.notify()
        _test_stall(phase, self.rank)

    def close(self) -> None:
        """Disarm: the run has ended (or is leaving after an error). Idempotent."""
        with self._cond:
            self._closed, self._due = True, None
            self._cond.notify()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def __enter__(self) -> EndDeadline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the watchdog thread
    def _watch(self) -> None:
        with self._cond:
            while True:
                if self._closed:
                    return
                left = None if self._due is None else self._due - time.monotonic()
                if left is not None and left <= 0:
                    phase = self.phase
                    break
                self._cond.wait(left)
        self._expire(phase or "?")

    def _expire(self, phase: str) -> None:
        mine = {"rank": self.rank, "phase": phase, **self._where()}
        # a rank stalled outside a collective names itself: it publishes for the others and goes
        others = self._exchange(mine, wait=mine["collective"]) if self.world > 1 else {}
        stacks = self._dump_stacks()
        line = describe(mine, others, self.seconds)
        if stacks is not None:
            line += f" (stacks: {stacks})"
        with contextlib.suppress(OSError, ValueError):
            print(f"attent-scale: {line}", file=sys.stderr, flush=True)
            sys.stdout.flush()
        _kill_children()  # a stuck DataLoader worker would never notice its rank is gone
        self._exit(END_TIMEOUT_EXIT_CODE)

    def _where(self) -> dict[str, Any]:
        """The trainer thread's innermost frame (and its innermost frame of ours), and whether it waits in a
        collective: a frame of torch.distributed or deepspeed between the innermost and ours."""
        frame = sys._current_frames().get(self._owner) if self._owner is not None else None
        if frame is None:
            return {"collective": False, "where": "?"}
        top, collective = _frame_name(frame), False
        while frame is not None and _OURS not in frame.f_code.co_filename:
            collective = collective or any(p in frame.f_code.co_filename for p in _COLLECTIVE_PATHS)
            frame = frame.f_back
        ours = _frame_name(frame) if frame is not None else None
        return {"collective": collective, "where": top if ours in (None, top) else f"{top} in {ours}"}

    def _exchange(self, mine: dict[str, Any], wait: bool) -> dict[int, dict[str, Any] | None]:
        """Publish `mine` in the process group's store and, with `wait`, read the other ranks' (None: no
        report within the grace period). Runs in a thread of its own so a dead store costs at most the
        grace period."""
        out: dict[int, dict[str, Any] | None] = dict.fromkeys(r for r in range(self.world) if r != self.rank)

        def talk() -> None:
            import torch.distributed as dist

            store = dist.distributed_c10d._get_default_store()
            store.set(f"{STORE_PREFIX}{self.rank}", json.dumps(mine))
            end = time.monotonic() + (self.grace if wait else 0)
            while time.monotonic() < end and any(v is None for v in out.values()):
                for r in [r for r, v in out.items() if v is None]:
                    if store.check([f"{STORE_PREFIX}{r}"]):
                        out[r] = json.loads(store.get(f"{STORE_PREFIX}{r}"))
                time.sleep(0.2)

        t = threading.Thread(target=_quiet(talk), name="attent-end-report", daemon=True)
        t.start()
        t.join(timeout=self.grace + 2)
        return dict(out)

    def _dump_stacks(self) -> str | None:
        """Every thread's stack into run_dir/end_stacks.rankN.txt; the path, or None."""
        if self.run_dir is None:
            return None
        path = Path(self.run_dir) / f"end_stacks.rank{self.rank}.txt"
        try:
            with open(path, "w") as f:
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError:
            return None
        return str(path)


def describe(mine: dict[str, Any], others: dict[int, dict[str, Any] | None], seconds: float) -> str:
    """The one line: this rank, its phase, and whom it waited for (or that it is the one stalled)."""
    rank, phase = mine["rank"], mine["phase"]
    head = (f"rank {rank}: end of run: phase '{phase}' did not end within train.end_timeout_seconds="
            f"{seconds:g}")

    def who(r: int, rec: dict[str, Any] | None) -> str:
        if rec is None:
            return f"rank {r} (no report: dead, or stuck holding the interpreter)"
        state = "waiting in a collective" if rec["collective"] else "not in a collective"
        return f"rank {r} (in phase '{rec['phase']}', {state} at {rec['where']})"

    if not mine["collective"]:
        return (f"{head}; this rank is the one stalled, not in a collective, at {mine['where']}; "
                f"exiting {END_TIMEOUT_EXIT_CODE}")
    stalled = [r for r, rec in others.items() if rec is None or not rec["collective"]]
    if not stalled:  # every rank waits in a collective: name those in another phase (a mismatch)
        stalled = [r for r, rec in others.items() if rec is not None and rec["phase"] != phase]
    if stalled:
        names = ", ".join(who(r, others[r]) for r in sorted(stalled))
        return f"{head}; waited for {names}; exiting {END_TIMEOUT_EXIT_CODE}"
    return (f"{head}; every rank waits in a collective of this phase (lost peer or mismatched collectives) "
            f"at {mine['where']}; exiting {END_TIMEOUT_EXIT_CODE}")


def _frame_name(frame: Any) -> str:
    """'file:line function', the file relative to attent_scale/ when it is ours, else its name."""
    path = frame.f_code.co_filename
    short = path.split(_OURS, 1)[1] if _OURS in path else Path(path).name
    return f"{short}:{frame.f_lineno} {frame.f_code.co_name}"


def _quiet(fn: Callable[[], None]) -> Callable[[], None]:
    """`fn` whose errors are swallowed: a report that cannot be exchanged is simply missing."""
    def run() -> None:
        with contextlib.suppress(Exception):
            fn()
    return run


def _kill_children() -> None:
    """SIGKILL this process's child processes (DataLoader workers), as listed by /proc."""
    import signal

    for task in Path("/proc/self/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            for pid in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)


def _test_stall(phase: str, rank: int) -> None:
    """Tests only: with ATTENT_TEST_STALL_END="PHASE:RANK", that rank sleeps forever entering PHASE."""
    spec = os.environ.get(STALL_ENV)
    if spec and spec.rpartition(":")[::2] == (phase, str(rank)):
        print(f"attent-scale: rank {rank}: {STALL_ENV}: stalling in phase '{phase}'", file=sys.stderr,
              flush=True)
        threading.Event().wait()
