"""`attent-scale` with a fault injected into one rank (tests only): ATTENT_TEST_FAULT=kind:rank:step.

kinds: `raise` (RuntimeError in that rank's train step), `kill_worker` (SIGKILL one of that rank's
DataLoader workers before the step). The wall time of the fault goes to ATTENT_TEST_FAULT_FILE.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import attent_scale.engines as engines
from attent_scale.cli import run


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        out += [int(c) for c in children]
    return out


def _install(kind: str, rank: int, step: int) -> None:
    build = engines.build_engine

    def build_faulty(*args, **kwargs):
        engine = build(*args, **kwargs)
        if int(os.environ.get("RANK", "0")) != rank:
            return engine
        train_step = engine.train_step
        calls = [0]

        def faulty_step(batch, **kwargs):  # kwargs: train_step's tokens= (teacher.unit token)
            calls[0] += 1
            if calls[0] == step:
                Path(os.environ["ATTENT_TEST_FAULT_FILE"]).write_text(repr(time.time()))
                if kind == "raise":
                    raise RuntimeError(f"injected fault on rank {rank} at step {step}")
                workers = _children(os.getpid())
                assert workers, "no DataLoader worker to kill"
                os.kill(workers[0], signal.SIGKILL)
            return train_step(batch, **kwargs)

        engine.train_step = faulty_step
        return engine

    engines.build_engine = build_faulty


if __name__ == "__main__":
    kind, rank, step = os.environ["ATTENT_TEST_FAULT"].split(":")
    _install(kind, int(rank), int(step))
    run(sys.argv[1:])
