"""The end of a run is bounded: a rank made to stall in any phase after the last step (ATTENT_TEST_STALL_END)
ends the 2-rank job non-zero within train.end_timeout_seconds, with one line naming the phase and the
stalled rank, no PREEMPTED marker and no exit 75 (nothing requeues it). Real torchrun, 2 ranks, gloo."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from train_runner import run_train, tiny_run_config

from attent_scale.deadline import END_TIMEOUT_EXIT_CODE, STALL_ENV

pytestmark = pytest.mark.slow

END_TIMEOUT = 10  # seconds per phase; the phases take well under a second here
# every phase the trainer enters after its last step (train.py), and the rank made to stall in it
PHASES = [("last step", 1), ("final checks", 1), ("final eval", 0), ("checkpoint", 1), ("export", 1),
          ("summary", 1), ("close", 1), ("metrics linger", 0), ("final barrier", 1)]
LINE = re.compile(r"attent-scale: rank (\d+): end of run: phase '([^']+)' did not end within "
                  r"train\.end_timeout_seconds=(\S+); (.*)")


def end_config(run_dir: Path, shards: Path) -> dict:
    return tiny_run_config(run_dir, shards, "fsdp",
                           train={"max_steps": 4, "end_timeout_seconds": END_TIMEOUT},
                           data={"num_workers": 2},  # run-long DataLoader workers live until close
                           eval={"every_steps": 0},  # the final eval runs at the end
                           checkpoint={"every_steps": 1000, "export": True},  # a checkpoint at the end
                           metrics={"enabled": True, "port": 0, "linger_seconds": 0.5})


@pytest.mark.parametrize("phase,rank", PHASES, ids=[p.replace(" ", "_") for p, _ in PHASES])
def test_a_rank_stalled_in_an_end_phase_ends_the_job_with_one_line(tmp_path, tiny_shards, phase, rank):
    cfg = end_config(tmp_path / "run", tiny_shards)
    # without the deadline the other rank would wait for the process group's timeout (600 s): the run
    # must end well before this limit, or procs.run kills it and the test fails
    proc = run_train(cfg, nproc=2, env={STALL_ENV: f"{phase}:{rank}"}, timeout=240)
    out = proc.stdout + proc.stderr
    assert f"rank {rank}: {STALL_ENV}: stalling in phase '{phase}'" in out, out[-4000:]
    assert proc.returncode not in (0, 75), out[-4000:]
    assert not (tmp_path / "run" / "PREEMPTED").exists()
    lines = [m for m in map(LINE.match, out.splitlines()) if m]
    assert lines, out[-4000:]
    assert len({m.group(1) for m in lines}) == len(lines), "a rank wrote its line twice"
    for m in lines:
        assert m.group(3) == str(END_TIMEOUT) and f"; exiting {END_TIMEOUT_EXIT_CODE}" in m.group(4)
    # the stalled rank names itself in that phase, or another rank names it as the one it waited for
    itself = f"{rank}|{phase}|this rank is the one stalled"
    named = [m for m in lines if f"{m.group(1)}|{m.group(2)}|{m.group(4)}".startswith(itself)
             or f"waited for rank {rank} (in phase '{phase}', not in a collective" in m.group(4)]
    assert named, "\n".join(m.group(0) for m in lines)
    assert (tmp_path / "run" / f"end_stacks.rank{named[0].group(1)}.txt").exists()
    if phase in ("summary", "close", "metrics linger", "final barrier"):
        assert (tmp_path / "run" / "eval.jsonl").read_text()  # the phases before it ran
