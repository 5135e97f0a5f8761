"""srun as a launcher: an srun task's SLURM_* -> the torchrun variables; the batch shell stays one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from attent_scale import srun
from attent_scale.errors import UserError

# what srun gives task 3 of `srun --nodes=2 --ntasks-per-node=2` in job 123456 (checked against slurm-wlm)
TASK = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NODELIST": "gpu[07-08]", "PATH": "/nonexistent"}
# the batch shell of the same job: SLURM_PROCID 0 and the job's SLURM_NTASKS, but no job step
BATCH = {**{k: v for k, v in TASK.items() if not k.startswith("SLURM_STEP")}, "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0"}


def test_an_srun_task_gets_rank_world_local_rank_and_the_first_host_as_rendezvous() -> None:
    assert srun.launch_env(TASK) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                     "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu07",
                                     "MASTER_PORT": str(15000 + 123456 % 10000)}


def test_every_task_of_a_job_derives_the_same_port_and_other_jobs_another() -> None:
    ports = {srun.launch_env({**TASK, "SLURM_PROCID": str(r)})["MASTER_PORT"] for r in range(4)}
    assert len(ports) == 1
    assert srun.launch_env({**TASK, "SLURM_JOB_ID": "123457"})["MASTER_PORT"] != ports.pop()


def test_the_users_master_addr_and_port_win() -> None:
    got = srun.launch_env({**TASK, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4000"})
    assert "MASTER_ADDR" not in got and "MASTER_PORT" not in got


@pytest.mark.parametrize("launcher", ["RANK", "WORLD_SIZE", "LOCAL_RANK"])
def test_a_launchers_own_variables_win(launcher: str) -> None:
    # srun starting one torchrun (or deepspeed launcher) per node: the workers carry both
    assert srun.launch_env({**TASK, launcher: "0"}) == {}


def test_the_batch_shell_and_a_plain_process_stay_one_process() -> None:
    assert srun.launch_env(BATCH) == {}
    assert srun.launch_env({"PATH": "/nonexistent"}) == {}
    one = srun.launch_env({**TASK, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})
    assert one == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


@pytest.mark.parametrize(("spec", "counts"), [("2(x2)", [2, 2]), ("4", [4]), ("3(x2),1", [3, 3, 1]),
                                              ("1,2,3", [1, 2, 3])])
def test_tasks_per_node(spec: str, counts: list[int]) -> None:
    assert srun.tasks_per_node(spec) == counts


@pytest.mark.parametrize(("key", "value", "named"), [
    ("SLURM_PROCID", "x", "SLURM_PROCID"),
    ("SLURM_STEP_TASKS_PER_NODE", "2(y3)", "SLURM_STEP_TASKS_PER_NODE"),
    ("SLURM_STEP_NODELIST", "gpu[1-", "SLURM_STEP_NODELIST"), ("SLURM_JOB_ID", "abc", "SLURM_JOB_ID")])
def test_bad_slurm_variables_are_one_line_naming_them(key: str, value: str, named: str) -> None:
    with pytest.raises(UserError, match=named) as err:
        srun.launch_env({**TASK, key: value})
    assert "\n" not in str(err.value)


def _clean_env() -> dict[str, str]:
    """This environment without any launcher's or Slurm's variables."""
    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in launch}


def test_without_a_launcher_or_srun_a_process_is_world_size_one() -> None:
    # a plain `attent-scale train` (also in an sbatch batch shell) initialises no process group
    env = _clean_env()
    code = ("from attent_scale.dist import init_distributed; i = init_distributed(); "
            "print(i.rank, i.world_size, i.backend)")
    for extra in ({}, BATCH):
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra, "PATH": env["PATH"]},
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and out.stdout.split() == ["0", "1", "None"], out.stderr


def test_two_srun_tasks_join_one_gloo_group(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # what srun sets, without Slurm: two processes that know only their SLURM_* variables
    env = _clean_env()
    code = ("import torch, torch.distributed as dist; from attent_scale.dist import init_distributed; "
            "i = init_distributed(); t = torch.tensor([i.rank + 1]); dist.all_reduce(t); "
            "print(i.rank, i.world_size, i.local_rank, int(t)); dist.destroy_process_group()")
    job = str(20000 + os.getpid() % 9000)  # a port nobody else derives now
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**env, **TASK, "SLURM_JOB_ID": job, "SLURM_PROCID": str(r),
                                              "SLURM_LOCALID": str(r), "SLURM_NODEID": "0",
                                              "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2",
                                              "SLURM_STEP_NODELIST": "localhost"})
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(o.split() for o, _ in outs) == [["0", "2", "0", "3"], ["1", "2", "1", "3"]]
