"""srun as a launcher: one task per GPU, each told its place by SLURM_* variables instead of torchrun's.

``srun --ntasks=N python -m attent_scale train ...`` (how Lightning and NeMo launch) starts N tasks that
see SLURM_PROCID (rank), SLURM_STEP_NUM_TASKS (world size), SLURM_LOCALID (local rank), SLURM_NODEID,
SLURM_STEP_TASKS_PER_NODE and SLURM_STEP_NODELIST, not RANK / WORLD_SIZE / MASTER_ADDR. `launch_env`
turns them into the torchrun variables the rest of the code reads; the rendezvous is the first host of
the step's node list, on a port every task derives from the job id alone (no communication needed).

A task of a job step has SLURM_STEP_ID; the batch shell of an sbatch job does not (it has SLURM_PROCID 0
and the job's SLURM_NTASKS, but is one process): it stays a single process. A launcher's own variables
(torchrun, the deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK) always win, so srun starting one
torchrun per node keeps working.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from attent_scale.errors import UserError

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # set by torchrun and the deepspeed launcher
PORT_BASE, PORT_SPAN = 15000, 10000  # MASTER_PORT = 15000 + job id mod 10000 (below the ephemeral range)


def is_srun_task(env: Mapping[str, str]) -> bool:
    """A task srun started (not the batch shell), with no other launcher's variables."""
    return (bool(env.get("SLURM_STEP_ID")) and bool(env.get("SLURM_PROCID"))
            and not any(env.get(name) for name in LAUNCHER_VARS))


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed tasks-per-node list: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not m:
            raise ValueError(f"bad tasks-per-node list {spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def master_port(job_id: str) -> int:
    """The rendezvous port of a job: 15000 + job id mod 10000 (what Lightning derives too)."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def _int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"srun task: {name}={value!r} is not an integer") from None


def launch_env(env: Mapping[str, str]) -> dict[str, str]:
    """The torchrun variables for an srun task (empty: not an srun task, or a launcher set its own).

    MASTER_ADDR and MASTER_PORT already in `env` win (set them where the first host's name is not
    reachable from the others, or the derived port is taken)."""
    if not is_srun_task(env):
        return {}
    world = _int(env, "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS")
    rank, local = _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID") if env.get("SLURM_LOCALID") else 0
    out = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local)}
    if world <= 1:
        return out
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    node = _int(env, "SLURM_NODEID") if env.get("SLURM_NODEID") else 0
    try:
        per_node = tasks_per_node(spec) if spec else []
    except ValueError as exc:
        raise UserError(f"srun task: SLURM_STEP_TASKS_PER_NODE: {exc}") from None
    if node < len(per_node):
        out["LOCAL_WORLD_SIZE"] = str(per_node[node])
    if not env.get("MASTER_ADDR"):
        from attent_scale.hostlist import hostnames

        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        try:
            hosts = hostnames(nodelist) if nodelist else []
        except ValueError as exc:
            raise UserError(f"srun task: SLURM_STEP_NODELIST: {exc}") from None
        if not hosts:
            raise UserError("srun task: no SLURM_STEP_NODELIST or SLURM_JOB_NODELIST: no first host")
        out["MASTER_ADDR"] = hosts[0]
    if not env.get("MASTER_PORT"):
        out["MASTER_PORT"] = str(master_port(str(_int(env, "SLURM_JOB_ID"))))
    return out


def apply() -> dict[str, str]:
    """Put `launch_env` of this process into os.environ (DeepSpeed and our own code read it from there);
    returns what was set."""
    found = launch_env(os.environ)
    os.environ.update(found)
    return found
