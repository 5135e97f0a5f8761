"""`python -m fault_trainer train ...`: the trainer with one injected fault (ATTENT_MODULE in tests).

The rank on host ATTENT_FAULT_HOST with LOCAL_RANK ATTENT_FAULT_LOCAL_RANK, right after training step
ATTENT_FAULT_STEP, writes ATTENT_FAULT_FILE ({"pid", "host", "rank", "step", "time"}) and then, by
ATTENT_FAULT: ``raise`` raises a RuntimeError; ``hang`` sleeps, for the test to kill it from outside.
Every other rank runs the real trainer unchanged.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from attent_scale.cli import run
from attent_scale.teacher import Teacher


def _is_target() -> bool:
    return (socket.gethostname() == os.environ.get("ATTENT_FAULT_HOST")
            and os.environ.get("LOCAL_RANK") == os.environ.get("ATTENT_FAULT_LOCAL_RANK"))


def _inject() -> None:
    kind, step = os.environ["ATTENT_FAULT"], int(os.environ["ATTENT_FAULT_STEP"])
    observe = Teacher.observe

    def faulty_observe(self: Teacher, ids: Any, losses: Any, at_step: int) -> Any:
        out = observe(self, ids, losses, at_step)
        if at_step + 1 == step:  # the trainer observes step s+1's losses with the pre-increment step s
            info = {"pid": os.getpid(), "host": socket.gethostname(), "rank": int(os.environ["RANK"]),
                    "step": step, "time": time.time()}
            path = Path(os.environ["ATTENT_FAULT_FILE"])
            path.with_suffix(".tmp").write_text(json.dumps(info))
            path.with_suffix(".tmp").rename(path)
            if kind == "raise":
                raise RuntimeError(f"injected fault on rank {info['rank']} at step {step}")
            time.sleep(600)  # "hang": the test kills this process
        return out

    Teacher.observe = faulty_observe  # type: ignore[method-assign]


if __name__ == "__main__":
    if os.environ.get("ATTENT_FAULT") and _is_target():
        _inject()
    run()
