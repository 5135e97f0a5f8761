"""Stand-in trainer for launch-script tests: same CLI, signal contract and exit code 75, no torch."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import yaml

PREEMPT_EXIT_CODE = 75


def main(argv: list[str]) -> int:
    """``python -m fake_attent train --config F [--set k=v ...]``: count steps in run_dir, resumable."""
    assert argv[0] == "train", argv
    config = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())
    sets = dict(a.split("=", 1) for i, a in enumerate(argv) if i and argv[i - 1] == "--set")
    run_dir = Path(sets.get("run_dir", config["run_dir"]))
    steps = int(sets.get("train.max_steps", config["train"]["max_steps"]))
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    stop: list[str] = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: stop.append(signal.Signals(s).name))
    ckpt = run_dir / f"ckpt-rank{rank}.json"
    state = json.loads(ckpt.read_text()) if ckpt.exists() else {"step": 0, "starts": 0}
    state["starts"] += 1
    with (run_dir / f"events-rank{rank}.jsonl").open("a") as log:
        log.write(json.dumps({"event": "start", "step": state["step"], "world": world, "pid": os.getpid(),
                              "sets": sets, "restart": os.environ.get("SLURM_RESTART_COUNT")}) + "\n")
        log.flush()
        while state["step"] < steps:
            time.sleep(0.2)
            state["step"] += 1
            if stop:
                ckpt.write_text(json.dumps(state))
                log.write(json.dumps({"event": "preempted", "signal": stop[0], "step": state["step"]}) + "\n")
                return PREEMPT_EXIT_CODE
        ckpt.write_text(json.dumps(state))
        log.write(json.dumps({"event": "done", "step": state["step"], "starts": state["starts"]}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
