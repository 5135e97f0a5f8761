"""Two hosts for real: both sbatch scripts across two namespace hosts, Prometheus, preemption, faults."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cluster import IFNAME, Cluster
from dashboard import dashboard_exprs, fill
from servers import free_port, prometheus_server
from test_ops_servers import last_step, selection_records, wait_until
from train_runner import check, read_lines, run_train, tiny_run_config

from attent_scale.checkpoint import list_checkpoints

pytestmark = [pytest.mark.servers, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent
STEPS = 12  # epochs of 3, 6 and 9 steps on 4 ranks: selections at steps 0, 3 and 9
NPROC = 2  # processes per host
RANKS = {str(r) for r in range(2 * NPROC)}
# Each host resolves its own name to 127.0.1.1 (Debian's hosts file), where gloo would listen: name the
# interface (the same on every host here, as on most clusters).
GLOO_ENV = {"GLOO_SOCKET_IFNAME": IFNAME}
FAULT_END_LIMIT = 60.0  # seconds from a fault to the end of the job


@pytest.fixture(scope="module")
def cluster(slurm_hosts: Cluster) -> Cluster:
    """The session's two-host cluster (conftest.py)."""
    return slurm_hosts


def mh_config(tmp: Path, shards: Path, engine: str, name: str, **checkpoint: Any) -> tuple[dict, Path]:
    """The tiny run every test here trains (1 layer, STEPS steps, no export); returns (config, its YAML)."""
    cfg = tiny_run_config(tmp / name, shards, engine=engine, train={"max_steps": STEPS},
                          eval={"every_steps": 0, "max_batches": 1},
                          checkpoint={"export": False, "every_steps": 0, **checkpoint})
    cfg["model"]["config"]["n_layer"] = 1
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return cfg, path


def one_host_run(cfg: dict) -> Path:
    """The same config as one host with 4 processes (torchrun --standalone): the reference."""
    check(run_train(cfg, nproc=2 * NPROC, timeout=300))
    return Path(cfg["run_dir"])


def submit(cluster: Cluster, script: str, config: Path, out: Path, *train_args: str,
           env: dict[str, str] | None = None, name_ifname: bool = True, tasks_per_node: int = 1) -> int:
    """sbatch a launch script on both hosts, NPROC CPU processes each: one task per node that starts
    them (torchrun, the deepspeed launcher), or `tasks_per_node` tasks of one CPU each (srun).

    name_ifname=False leaves GLOO_SOCKET_IFNAME unset: the trainer must find the interface itself.
    """
    env = {"ATTENT_VENV": str(VENV), "ATTENT_NPROC_PER_NODE": str(NPROC),
           "ATTENT_RDZV_PORT": str(free_port()), "ATTENT_MASTER_PORT": str(free_port()),
           "ATTENT_METRICS_PORT": str(free_port()), "ATTENT_HOSTFILE": str(out.with_suffix(".hostfile")),
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           **(GLOO_ENV if name_ifname else {}), **(env or {})}
    assert name_ifname or not any(k in cluster.env for k in GLOO_ENV), "GLOO_SOCKET_IFNAME inherited"
    return cluster.sbatch(f"--partition={cluster.partition}", f"--nodes={len(cluster.hosts)}",
                          f"--ntasks-per-node={tasks_per_node}", "--gpus-per-node=0",
                          f"--cpus-per-task={NPROC // tasks_per_node}", "--time=30",
                          f"--output={out}", str(ROOT / "launch" / script), str(config), *train_args,
                          cwd=ROOT, env=env)


def job_nodes(cluster: Cluster, job: int) -> set[str]:
    out = cluster.run("scontrol", "show", "hostnames", cluster.job(job)["NodeList"]).stdout
    return set(out.split())


# ------------------------------------------------------------------ FSDP2 + Prometheus, the reference run
@dataclass
class TwoHostRun:
    run_dir: Path
    log: str
    state: str
    nodes: set[str]
    up: set[str]  # scrape targets Prometheus saw up
    node_rank: set[tuple[str, str]]  # (node, rank) label pairs of attent_train_loss_nats
    dashboard: dict[str, int]  # dashboard query -> most distinct ranks (or series) in one result
    metrics_port: int


def watch_dashboard(prom: Any, job: str, done: Any) -> tuple[set[str], dict[str, int]]:
    """Evaluate every dashboard query (and `up`) while the job runs; keep the widest result of each."""
    exprs = [fill(e, "attent", slurm_job_id=job) for e in dashboard_exprs()]
    widest = dict.fromkeys(exprs, 0)
    up: set[str] = set()
    while not done():
        for s in prom.query(f'up{{job="attent", slurm_job_id="{job}"}} == 1'):
            up.add(s["metric"]["instance"])
        for e in exprs:
            res = prom.query(e)
            width = len({s["metric"].get("rank") for s in res}) if any("rank" in s["metric"] for s in res) \
                else len(res)
            widest[e] = max(widest[e], width)
        time.sleep(0.5)
    return up, widest


@pytest.fixture(scope="module")
def fsdp_two_host(cluster: Cluster, tiny_shards: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> TwoHostRun:
    """slurm_torchrun.sbatch -N 2 with FSDP2, Prometheus scraping it through write_targets.py."""
    tmp = tmp_path_factory.mktemp("fsdp2h")
    _, config = mh_config(tmp, tiny_shards, "fsdp", "run")
    out = tmp / "slurm.out"
    port = free_port()
    with prometheus_server() as prom:
        job = submit(cluster, "slurm_torchrun.sbatch", config, out, "--set", "metrics.linger_seconds=4",
                     env={"ATTENT_TARGETS_DIR": str(prom.targets_dir), "ATTENT_METRICS_PORT": str(port)})
        finished = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
        deadline = time.monotonic() + 300
        up, widest = watch_dashboard(prom, str(job), lambda: cluster.job(job).get("JobState") in finished
                                     or time.monotonic() > deadline)
        state = cluster.wait_job(job, 10)
        loss = f'attent_train_loss_nats{{slurm_job_id="{job}"}}'
        pairs = prom.query(f"sum by (node, rank) (last_over_time({loss}[10m]))")
    return TwoHostRun(run_dir=tmp / "run", log=out.read_text(), state=state, nodes=job_nodes(cluster, job),
                      up=up, node_rank={(s["metric"]["node"], s["metric"]["rank"]) for s in pairs},
                      dashboard=widest, metrics_port=port)


def test_two_host_fsdp_sbatch_selects_like_one_host(cluster: Cluster, fsdp_two_host: TwoHostRun,
                                                    tiny_shards: Path, tmp_path: Path) -> None:
    run = fsdp_two_host
    assert run.state == "COMPLETED", run.log
    assert run.nodes == {h.name for h in cluster.hosts}
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 * NPROC and summary["steps"] == STEPS and summary["engine"] == "fsdp"
    cfg, _ = mh_config(tmp_path, tiny_shards, "fsdp", "one-host")
    ref = one_host_run(cfg)
    got, want = selection_records(run.run_dir), selection_records(ref)
    assert len(want) >= 3 and got == want


def test_prometheus_scrapes_all_four_exporters_across_hosts(cluster: Cluster,
                                                            fsdp_two_host: TwoHostRun) -> None:
    run = fsdp_two_host
    assert run.state == "COMPLETED", run.log
    hosts = [h.name for h in cluster.hosts]
    assert run.up == {f"{h}:{run.metrics_port + r}" for h in hosts for r in range(NPROC)}
    # the exporters' own node label (SLURMD_NODENAME) on both hosts, NPROC ranks each
    assert {n for n, _ in run.node_rank} == set(hosts) and {r for _, r in run.node_rank} == RANKS
    assert len(run.node_rank) == 2 * NPROC
    for expr, width in run.dashboard.items():
        by = re.search(r"by \(([^)]*)\)", expr)
        labels = {x.strip() for x in by.group(1).split(",")} if by else {"rank"}
        if "rank" in labels:  # a series per rank: every rank of both hosts is scraped
            assert width == 2 * NPROC, f"{expr}: {width} ranks"
        elif labels == {"slurm_job_id"}:  # the throughput panels sum over ranks
            assert width == 1, f"{expr}: {width} series"
        else:  # one series per source / reason / rule (max over the ranks, who agree): data is there
            assert width >= 1, f"{expr}: no series"


# ------------------------------------------------------------------ srun alone: one task per process
def test_two_host_srun_sbatch_runs_one_task_per_rank_and_selects_like_torchrun(
        cluster: Cluster, fsdp_two_host: TwoHostRun, tiny_shards: Path, tmp_path: Path) -> None:
    # no torchrun: srun starts 2 tasks on each host; each finds its rank in SLURM_PROCID, the world in
    # SLURM_STEP_NUM_TASKS, and meets the others on the first host at the port its job id gives
    # (ATTENT_MASTER_PORT empty: the derived one)
    _, config = mh_config(tmp_path, tiny_shards, "fsdp", "run")
    out = tmp_path / "slurm.out"
    job = submit(cluster, "slurm_srun.sbatch", config, out, tasks_per_node=NPROC,
                 env={"ATTENT_MASTER_PORT": ""})
    state = cluster.wait_job(job, 300)
    log = out.read_text()
    assert state == "COMPLETED", log
    assert job_nodes(cluster, job) == {h.name for h in cluster.hosts}
    assert f"({len(cluster.hosts)} x {NPROC})" in log and "torchrun" not in log, log
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 * NPROC and summary["steps"] == STEPS and summary["engine"] == "fsdp"
    # the same selections as the torchrun launch of the same config on the same hosts
    got, want = selection_records(tmp_path / "run"), selection_records(fsdp_two_host.run_dir)
    assert len(want) >= 3 and got == want


# ------------------------------------------------------------------ ZeRO-3 through the deepspeed launcher
def test_two_host_zero3_sbatch_selects_like_one_host(cluster: Cluster, tiny_shards: Path,
                                                     tmp_path: Path) -> None:
    cfg, config = mh_config(tmp_path, tiny_shards, "deepspeed", "run")
    out = tmp_path / "slurm.out"
    # no GLOO_SOCKET_IFNAME: the deepspeed launcher's LOCAL_SIZE must reveal the second host to dist.py,
    # or gloo advertises 127.0.1.1 and the ranks never connect
    job = submit(cluster, "slurm_deepspeed.sbatch", config, out, name_ifname=False)
    state = cluster.wait_job(job, 300)
    assert state == "COMPLETED", out.read_text()
    assert job_nodes(cluster, job) == {h.name for h in cluster.hosts}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 * NPROC and summary["steps"] == STEPS
    assert summary["engine"] == "deepspeed"
    ref_cfg, _ = mh_config(tmp_path, tiny_shards, "deepspeed", "one-host")
    ref = one_host_run(ref_cfg)
    got, want = selection_records(tmp_path / "run"), selection_records(ref)
    assert len(want) >= 3 and got == want


# ------------------------------------------------------------------ preemption and faults
def test_two_host_usr1_preemption_checkpoints_every_rank_requeues_and_selects_the_same(
        cluster: Cluster, fsdp_two_host: TwoHostRun, tiny_shards: Path, tmp_path: Path) -> None:
    _, config = mh_config(tmp_path, tiny_shards, "fsdp", "run")
    run_dir, out = tmp_path / "run", tmp_path / "slurm.out"
    job = submit(cluster, "slurm_torchrun.sbatch", config, out)
    wait_until(lambda: last_step(run_dir) >= 2, 240, f"step 2 in {run_dir}/metrics.jsonl")
    cluster.run("scancel", "--batch", "--signal=USR1", str(job))  # what --signal=B:USR1@N sends
    state = cluster.wait_job(job, 300)
    log = out.read_text()
    assert state == "COMPLETED" and cluster.job(job)["Restarts"] == "1", log
    preempt = re.search(r"checkpoint at step (\d+) written, exiting with 75", log)
    assert preempt and 2 <= int(preempt.group(1)) < STEPS, log
    step = int(preempt.group(1))
    ckpts = list_checkpoints(run_dir)
    assert [s for s, _ in ckpts] == [step], ckpts
    path = ckpts[0][1]
    assert json.loads((path / "COMPLETE").read_text()) == {"step": step, "world_size": 2 * NPROC}
    for rank in range(2 * NPROC):  # every rank wrote its own state at that same step
        state_json = json.loads((path / f"rank-{rank:05d}.json").read_text())
        assert state_json["progress"]["step"] == step, rank
        # mid-epoch, the stream's position is saved; a signal that landed in the teacher's scoring pass
        # checkpoints at the epoch's start, where there is no stream yet
        between = "stopped the teacher's scoring pass" in log
        assert (state_json["stream"] is None) == between, (rank, log)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    assert selection_records(run_dir) == selection_records(fsdp_two_host.run_dir)


def wait_fault_end(cluster: Cluster, job: int, fault_time: Any, log: Path) -> tuple[str, float]:
    """Wait for the job to end; returns its state and the seconds from the fault (a wall time) to its end."""
    state = cluster.wait_job(job, 240)
    end = time.time()
    t = fault_time()
    assert t is not None, f"the fault never fired\n{log.read_text()[-5000:]}"
    return state, end - t


def test_two_host_faults_end_the_job_in_60s_and_reruns_resume_exactly(
        cluster: Cluster, fsdp_two_host: TwoHostRun, tiny_shards: Path, tmp_path: Path) -> None:
    _, config = mh_config(tmp_path, tiny_shards, "fsdp", "run", every_steps=4)
    run_dir = tmp_path / "run"
    first, second = cluster.hosts[0].name, cluster.hosts[1].name
    fault = {"ATTENT_MODULE": "fault_trainer", "ATTENT_FAULT_LOCAL_RANK": "1",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests" / "helpers"), str(ROOT),
                                                         os.environ.get("PYTHONPATH")]))}
    timings = {}

    # 1. an exception on one rank (first host) after step 6: checkpoint at 4 stays the latest
    out = tmp_path / "raise.out"
    info = tmp_path / "raise.json"
    job = submit(cluster, "slurm_torchrun.sbatch", config, out, env={
        **fault, "ATTENT_FAULT": "raise", "ATTENT_FAULT_HOST": first, "ATTENT_FAULT_STEP": "6",
        "ATTENT_FAULT_FILE": str(info)})
    state, timings["exception"] = wait_fault_end(
        cluster, job, lambda: json.loads(info.read_text())["time"] if info.exists() else None, out)
    log = out.read_text()
    assert state == "FAILED", log
    assert "Traceback" in log and "RuntimeError: injected fault on rank" in log, log
    assert [s for s, _ in list_checkpoints(run_dir)] == [4]

    # 2. rerun; kill -9 of a rank on the second host after step 10: checkpoint at 8 is the latest
    out = tmp_path / "kill.out"
    info = tmp_path / "kill.json"
    job = submit(cluster, "slurm_torchrun.sbatch", config, out, env={
        **fault, "ATTENT_FAULT": "hang", "ATTENT_FAULT_HOST": second, "ATTENT_FAULT_STEP": "10",
        "ATTENT_FAULT_FILE": str(info)})
    wait_until(info.exists, 240, f"the rank to hang ({out})")
    victim = json.loads(info.read_text())
    assert victim["host"] == second and victim["pid"] in cluster.hosts[1].pids()
    os.kill(victim["pid"], signal.SIGKILL)
    killed = time.time()
    state, timings["kill -9"] = wait_fault_end(cluster, job, lambda: killed, out)
    log = out.read_text()
    assert state == "FAILED", log
    assert "Traceback" in log and "SIGKILL" in log and str(victim["pid"]) in log, log
    assert [s for s, _ in list_checkpoints(run_dir)] == [4, 8]

    # 3. rerun: resumes at step 8, ends where the uninterrupted run did
    out = tmp_path / "rerun.out"
    job = submit(cluster, "slurm_torchrun.sbatch", config, out)
    assert cluster.wait_job(job, 300) == "COMPLETED", out.read_text()
    assert [r["step"] for r in read_lines(run_dir / "metrics.jsonl")] == list(range(1, STEPS + 1))
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    assert selection_records(run_dir) == selection_records(fsdp_two_host.run_dir)
    print(f"\nfault -> job end: {', '.join(f'{k} {v:.1f} s' for k, v in timings.items())}")
    for kind, seconds in timings.items():
        assert seconds <= FAULT_END_LIMIT, f"{kind}: the job took {seconds:.0f}s to end"
