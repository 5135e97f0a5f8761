"""The sbatch scripts' own logic, run by bash against stand-ins for srun/scontrol/scancel/squeue (no Slurm).

What is checked: a job is requeued only when the trainer left run_dir/PREEMPTED in this job (not after any
failure that follows a USR1, not for an earlier job's marker), the exporters bind the cluster interface
unless 0.0.0.0 is asked for, and the default USR1 margin.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["slurm_torchrun.sbatch", "slurm_srun.sbatch", "slurm_deepspeed.sbatch"]

# srun stand-in: records its argv, waits for the USR1 forward when asked to, then plays the trainer
SRUN = """#!/usr/bin/env bash
args="$*"
printf 'srun %s\\n' "${args//$'\\n'/ }" >> "$FAKE_DIR/calls"
if [[ $FAKE_WAIT_USR1 == 1 ]]; then
    touch "$FAKE_DIR/started"
    while [[ ! -f $FAKE_DIR/forwarded ]]; do sleep 0.05; done
fi
eval "$FAKE_TRAINER"
"""
SCANCEL = """#!/usr/bin/env bash
printf 'scancel %s\\n' "$*" >> "$FAKE_DIR/calls"
touch "$FAKE_DIR/forwarded"
"""
SCONTROL = """#!/usr/bin/env bash
printf 'scontrol %s\\n' "$*" >> "$FAKE_DIR/calls"
if [[ $1 == show && $2 == hostnames ]]; then tr ',' '\\n' <<< "$3"; fi
"""
SQUEUE = """#!/usr/bin/env bash
echo 9:58
"""


def run_script(tmp: Path, script: str, trainer: str, *, usr1: bool, env: dict[str, str] | None = None,
               ) -> tuple[int, str, list[str]]:
    """Run `script` as Slurm would (batch shell on the first node); returns (exit code, output, calls)."""
    fake = tmp / "fake"
    bin_dir = fake / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", SRUN), ("scancel", SCANCEL), ("scontrol", SCONTROL), ("squeue", SQUEUE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    config = tmp / "run.yaml"
    config.write_text(f"run_dir: {tmp / 'run'}\n")
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(fake),
                "FAKE_TRAINER": trainer, "FAKE_WAIT_USR1": "1" if usr1 else "0",
                "PYTHONPATH": str(ROOT), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "n1,n2",
                "SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_DIR": str(ROOT),
                "ATTENT_HOSTFILE": str(tmp / "hostfile"), **(env or {})}
    for name in ("ATTENT_REPO", "ATTENT_TARGETS_DIR", "ATTENT_METRICS_ADDRESS", "ATTENT_VENV"):
        if env is None or name not in env:
            full_env.pop(name, None)
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / script), str(config)], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if usr1:
        deadline = time.monotonic() + 60
        while not (fake / "started").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@N sends to the batch shell
    out = proc.communicate(timeout=60)[0]
    calls = (fake / "calls").read_text().splitlines()
    return proc.returncode, out, calls


def requeued(calls: list[str]) -> bool:
    return "scontrol requeue 4242" in calls


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_trainer_that_checkpointed_for_preemption_is_requeued(tmp_path: Path, script: str) -> None:
    # the workers exit 75 after writing the marker; torchrun reports that as 1
    trainer = 'mkdir -p "$RUN" && echo \'{"step": 7}\' > "$RUN/PREEMPTED"; exit 1'
    code, out, calls = run_script(tmp_path, script, trainer, usr1=True, env={"RUN": str(tmp_path / "run")})
    assert code == 0 and requeued(calls), out
    assert "scancel --signal=USR1 4242" in calls
    assert re.search(r"the trainer stopped \d+ s after USR1 \(time left then: 9:58\)", out), out


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_failure_after_usr1_without_the_marker_is_not_requeued(tmp_path: Path, script: str) -> None:
    code, out, calls = run_script(tmp_path, script, "exit 1", usr1=True)
    assert code == 1 and not requeued(calls), out
    assert "without writing" in out and "not requeueing" in out, out


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_earlier_jobs_marker_does_not_requeue_a_failed_job(tmp_path: Path, script: str) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "PREEMPTED").write_text('{"step": 3}')  # left by the job before this one
    code, out, calls = run_script(tmp_path, script, "exit 75", usr1=False)
    assert code == 75 and not requeued(calls), out


@pytest.mark.parametrize("script", SCRIPTS)
def test_exporters_bind_the_cluster_interface_unless_every_interface_is_asked_for(
        tmp_path: Path, script: str) -> None:
    _, out, calls = run_script(tmp_path, script, "exit 0", usr1=False)
    srun = next(c for c in calls if c.startswith("srun "))
    assert "metrics.address=auto" in srun and "0.0.0.0" not in srun, srun
    _, out, calls = run_script(tmp_path / "any", script, "exit 0", usr1=False,
                               env={"ATTENT_METRICS_ADDRESS": "0.0.0.0"})
    srun = next(c for c in calls if c.startswith("srun "))
    assert "metrics.address=0.0.0.0" in srun, srun


@pytest.mark.parametrize("script", SCRIPTS)
def test_default_usr1_margin_covers_stop_checks_plus_a_zero3_save(script: str) -> None:
    # stop_check_every (10) steps of up to ~20 s plus a ZeRO-3 save of a multi-billion-parameter model
    # (~100 GB of fp32 states and Adam moments) to a shared file system: minutes, not 120 s
    text = (ROOT / "launch" / script).read_text()
    margin = int(re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", text, re.M).group(1))  # type: ignore[union-attr]
    assert margin >= 600
