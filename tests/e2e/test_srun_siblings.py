"""Two tasks of one Slurm job never train in one run_dir: the second is refused in one line, not
"taking over a stale lock" as if it were a requeued attempt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from train_runner import REPO, tiny_run_config

LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _task(cfg_path: Path, **slurm: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **slurm)
    return subprocess.Popen([sys.executable, "-m", "attent_scale", "train", "--config", str(cfg_path)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_sibling_task_of_the_same_job_is_refused_and_the_first_trains_on(tiny_shards: Path,
                                                                           tmp_path: Path) -> None:
    # what the issue ran: SLURM_PROCID 0 and 1, SLURM_NTASKS 2, one job id, no torchrun (and here no job
    # step either, so each is one process: the batch shell's view); before, task 1 "took over a stale lock"
    cfg = tiny_run_config(tmp_path / "run", tiny_shards, train={"max_steps": 40},
                          checkpoint={"export": False})
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    job = {"SLURM_JOB_ID": "123", "SLURM_NTASKS": "2"}
    first = _task(cfg_path, SLURM_PROCID="0", **job)
    lock = tmp_path / "run" / "LOCK"
    deadline = time.monotonic() + 300
    while not lock.exists():
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "task 0 never took the lock"
        time.sleep(0.2)
    second = _task(cfg_path, SLURM_PROCID="1", **job)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "another task of this Slurm job" in lines[0], err
    assert "took over" not in err
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 1
    assert "took over" not in err
