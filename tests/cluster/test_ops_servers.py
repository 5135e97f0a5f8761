"""Real servers: Prometheus scraping exporters and running the dashboard; Slurm running our launch scripts."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dashboard import dashboard_exprs, fill
from servers import Prometheus, Slurm, free_port, prometheus_server

from attent_scale.config import MetricsConfig
from attent_scale.metrics import PHASES, Metrics

pytestmark = pytest.mark.servers
ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent


@pytest.fixture(scope="module")
def prom() -> Iterator[Prometheus]:
    with prometheus_server() as server:
        yield server


@pytest.fixture(scope="module")
def slurm(slurm_hosts: Slurm) -> Slurm:
    """The session's Slurm cluster (conftest.py); jobs here ask for one node of it."""
    return slurm_hosts


def populated(m: Metrics, scale: float) -> None:
    m.observe_step(0.05, train_loss=3.0 * scale)
    m.observe_eval(3.1 * scale)
    m.observe_checkpoint(0.5)
    m.observe_selection({"score": 0.2 * scale}, selected_ratio=0.3, staleness_median=4)
    m.observe_sources([{"name": src, "samples": 100, "selected": 30, "dropped": 70, "floor_added": 5,
                        "mean_loss": 3.0 * scale} for src in ("code", "prose")])
    m.observe_signal({"dropped_share": 0.1 * scale,
                      "reasons": {"memorized": 3, "learned": 1, "unlearnable": 2},
                      "thresholds": {"memorized": 2.5, "learned": 2.5, "unlearnable": 6.0},
                      "loss": {"q50": 4.0}, "val": {"q50": 4.2}, "fall": {"q50": 0.1}})
    m.update({"samples_trained": 64, "tokens_trained": 2048, "samples_scored": 128,
              "collective_bytes": 1024, "corrupt_samples": 1,
              "nonfinite_skipped": 0, "wall_seconds": 10.0,
              "selection_seconds_by_phase": dict.fromkeys(PHASES, 0.1 * scale)})


def test_prometheus_scrapes_two_exporters_and_every_dashboard_query_returns_data(prom: Prometheus) -> None:
    # the shipped scrape config: `job` is its job_name, never the exporter's; Slurm's id is its own label
    cfg = MetricsConfig(enabled=True, port=free_port(), port_fallback=True)
    ranks = [Metrics.create(cfg, rank=r, local_rank=r, node="n0", slurm_job_id="dash") for r in range(2)]
    try:
        for r, m in enumerate(ranks):
            populated(m, 1.0 + r)  # type: ignore[arg-type]
        prom.add_targets("dash", [f"127.0.0.1:{m.port}" for m in ranks],
                         {"slurm_job_id": "dash", "node": "n0"})
        prom.wait_for('count_over_time(attent_samples_trained_total{slurm_job_id="dash"}[1m]) >= 3',
                      lambda res: len(res) == 2)
        # `up` of the scrape job carries the same job and slurm_job_id as the series the dashboard reads
        up = prom.query('up{job="attent", slurm_job_id="dash"} == 1')
        assert {s["metric"]["instance"] for s in up} == {f"127.0.0.1:{m.port}" for m in ranks}
        for r, m in enumerate(ranks):  # advance so rate() windows see a change
            m.observe_step(0.07)
            m.update({"samples_trained": 96, "tokens_trained": 3072,
                      "selection_seconds_by_phase": dict.fromkeys(PHASES, 0.3 * (1 + r))})
        prom.wait_for('attent_samples_trained_total{slurm_job_id="dash"} == 96', lambda res: len(res) == 2)
        got = prom.query('attent_selection_seconds_sum{slurm_job_id="dash"}')
        assert {(s["metric"]["rank"], s["metric"]["phase"]) for s in got} == {
            (str(r), p) for r in range(2) for p in PHASES}
        for s in got:
            assert float(s["value"][1]) == pytest.approx(0.3 * (1 + int(s["metric"]["rank"])))
            assert s["metric"]["node"] == "n0" and s["metric"]["job"] == "attent"
        for expr in dashboard_exprs():
            result = prom.query(fill(expr, "attent", slurm_job_id="dash"))
            assert result, f"dashboard query returned no data: {fill(expr, 'attent', slurm_job_id='dash')}"
    finally:
        for m in ranks:
            m.close()


def test_slurm_runs_a_trivial_job(slurm: Slurm, tmp_path: Path) -> None:
    out = tmp_path / "trivial.out"
    job = slurm.sbatch(f"--output={out}", "--wrap=echo hello from $SLURM_JOB_ID on $(hostname)")
    assert slurm.wait_job(job, 60) == "COMPLETED", slurm.job(job)
    assert out.read_text().startswith(f"hello from {job} on ")


# ------------------------------------------------------------------ launch scripts under Slurm
def sbatch_script(slurm: Slurm, script: str, config: Path, out: Path, *train_args: str,
                  env: dict[str, str] | None = None) -> int:
    """Submit a launch script sized for this machine: one node, 2 CPU processes, no GPUs (srun: 2 tasks
    of one CPU share; the others: one task that starts both)."""
    env = {"ATTENT_VENV": str(VENV), "ATTENT_NPROC_PER_NODE": "2", "ATTENT_RDZV_PORT": str(free_port()),
           "ATTENT_MASTER_PORT": str(free_port()), "ATTENT_METRICS_PORT": str(free_port()),
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    cpus = os.cpu_count() or 1
    shape = (["--ntasks-per-node=2", f"--cpus-per-task={max(1, cpus // 2)}"] if script == "slurm_srun.sbatch"
             else [f"--cpus-per-task={cpus}"])
    return slurm.sbatch(f"--partition={slurm.partition}", "--gpus-per-node=0", *shape, "--time=30",
                        f"--output={out}", str(ROOT / "launch" / script), str(config), *train_args, cwd=ROOT,
                        env=env)


def wait_until(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------ end to end with the real trainer
TINY_CONFIG = """\
run_dir: {run_dir}
seed: 0
data: {{dir: {data}, num_workers: 0, shuffle_buffer: 64}}
model:
  config: {{model_type: gpt2, n_layer: 1, n_embd: 32, n_head: 2, n_positions: 32,
            resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}}
engine: {{name: fsdp}}                # several ranks: fsdp or deepspeed (local is one process)
teacher: {{mode: cycle, strategy: soft, total_cycles: 4, warmup_epochs: 1, initial_interval: 1,
          max_interval: 2, full_epochs_per_cycle: 1}}
train: {{max_steps: {steps}, micro_batch_size: 8, lr: 0.002, warmup_steps: 5, log_every: 1}}
eval: {{every_steps: 0, max_batches: 2, batch_size: 16}}
checkpoint: {{every_steps: 0, keep_last: 2, resume: true}}
metrics: {{enabled: true, linger_seconds: 3}}
"""


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "tiny"
    subprocess_run([str(VENV / "bin" / "attent-scale"), "shards", "build", "-o", str(out), "--seq-len", "32",
                    "--vocab-size", "400", "--max-bytes", "36000", "--samples-per-shard", "64",
                    "--val-fraction", "0.2", "--no-progress"])
    return out


def subprocess_run(cmd: list[str]) -> None:
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def tiny_config(tmp_path: Path, data: Path, steps: int, name: str = "run") -> tuple[Path, Path]:
    run_dir = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    config.write_text(TINY_CONFIG.format(run_dir=run_dir, data=data, steps=steps))
    return config, run_dir


def selection_hashes(run_dir: Path) -> list[str]:
    lines = (run_dir / "selection.jsonl").read_text().splitlines()
    return [json.loads(line)["sha256"] for line in lines]


def selection_records(run_dir: Path) -> list[tuple[int, str]]:
    """(step, sha256) of every selection record, in order."""
    lines = (run_dir / "selection.jsonl").read_text().splitlines()
    return [(int(r["step"]), r["sha256"]) for r in map(json.loads, lines)]


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    try:
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (ValueError, KeyError):  # a line being written
        return 0


@pytest.mark.slow
def test_e2e_prometheus_scrapes_a_two_rank_run_and_agrees_with_summary(
        prom: Prometheus, tiny_data: Path, tmp_path: Path) -> None:
    import subprocess

    config, run_dir = tiny_config(tmp_path, tiny_data, 400)
    port = free_port()
    env = {**os.environ, "ATTENT_NPROC": "2", "ATTENT_METRICS_PORT": str(port),
           "ATTENT_TARGETS_DIR": str(prom.targets_dir), "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen([str(ROOT / "launch" / "local.sh"), str(config)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    env.pop("SLURM_JOB_ID", None)
    pending = {fill(e, "attent") for e in dashboard_exprs()}
    try:
        while proc.poll() is None:  # run every dashboard query while the job is live
            for expr in sorted(pending):
                if prom.query(expr):
                    pending.discard(expr)
            time.sleep(0.5)
        output = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert not pending, f"dashboard queries without data during the run: {pending}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    sel = f'job="attent", instance=~"127.0.0.1:({port}|{port + 1})"'
    for row in summary["per_rank"]:
        for phase in PHASES:
            got = prom.query(f'last_over_time(attent_selection_seconds_sum{{{sel}, rank="{row["rank"]}", '
                             f'phase="{phase}"}}[10m])')
            assert len(got) == 1, (row["rank"], phase, got)
            assert float(got[0]["value"][1]) == pytest.approx(row["selection_seconds_by_phase"][phase],
                                                              rel=1e-6, abs=1e-9), (row["rank"], phase)
    assert summary["selection_seconds_by_phase"]["score"] > 0
    for metric, key in (("attent_samples_trained_total", "samples_trained"),
                        ("attent_samples_scored_total", "samples_scored"),
                        ("attent_tokens_trained_total", "tokens_trained")):
        got = prom.query(f"sum(last_over_time({metric}{{{sel}}}[10m]))")
        assert float(got[0]["value"][1]) == summary[key], metric
    ranks = prom.query(f"count by (rank) (last_over_time(attent_train_loss_nats{{{sel}}}[10m]))")
    assert {r["metric"]["rank"] for r in ranks} == {"0", "1"}


@pytest.fixture(scope="module")
def reference_run(slurm: Slurm, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-process run through slurm_torchrun.sbatch."""
    tmp = tmp_path_factory.mktemp("reference")
    config, run_dir = tiny_config(tmp, tiny_data, PREEMPT_STEPS)
    out = tmp / "slurm.out"
    job = sbatch_script(slurm, "slurm_torchrun.sbatch", config, out)
    assert slurm.wait_job(job, 300) == "COMPLETED", out.read_text()
    return run_dir


PREEMPT_STEPS = 800


@pytest.mark.slow
def test_e2e_slurm_torchrun_and_deepspeed_scripts_train(slurm: Slurm, reference_run: Path, tiny_data: Path,
                                                        tmp_path: Path) -> None:
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == PREEMPT_STEPS
    assert selection_hashes(reference_run)
    config, run_dir = tiny_config(tmp_path, tiny_data, 40, "ds")
    out = tmp_path / "slurm.out"
    targets = tmp_path / "targets"
    job = sbatch_script(slurm, "slurm_deepspeed.sbatch", config, out, "--set", "engine.name=deepspeed",
                        "--set", f"engine.deepspeed_config={ROOT / 'configs' / 'deepspeed_zero2.json'}",
                        env={"ATTENT_TARGETS_DIR": str(targets)})
    assert slurm.wait_job(job, 300) == "COMPLETED", out.read_text()
    assert targets.is_dir() and not list(targets.glob("*.json"))  # targets written, then removed at the end
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["engine"] == "deepspeed" and summary["steps"] == 40
    for name in ("config.yaml", "metrics.jsonl", "selection.jsonl", "eval.jsonl"):
        assert (run_dir / name).exists(), name


@pytest.mark.slow
def test_e2e_slurm_preemption_checkpoints_requeues_and_selects_the_same(
        slurm: Slurm, reference_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    config, run_dir = tiny_config(tmp_path, tiny_data, PREEMPT_STEPS)
    out = tmp_path / "slurm.out"
    job = sbatch_script(slurm, "slurm_torchrun.sbatch", config, out)
    wait_until(lambda: last_step(run_dir) >= 60, 180, f"step 60 in {run_dir}/metrics.jsonl")
    slurm.run("scancel", "--batch", "--signal=USR1", str(job))  # what --signal=B:USR1@N sends
    state = slurm.wait_job(job, 300)
    log = out.read_text()
    assert state == "COMPLETED", log
    assert slurm.job(job)["Restarts"] == "1", log
    assert "requeueing job" in log and "restart 1" in log, log
    preempt = re.search(r"checkpoint at step (\d+) written, exiting with 75", log)
    assert preempt and 60 <= int(preempt.group(1)) < PREEMPT_STEPS, log
    assert (run_dir / "checkpoints").is_dir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == PREEMPT_STEPS
    got, ref = selection_records(run_dir), selection_records(reference_run)
    first = next((i for i, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b), None)
    assert got == ref, (f"selections differ from the uninterrupted run from record {first} "
                        f"(step {got[first][0] if first is not None else '?'}; checkpoint at step "
                        f"{preempt.group(1)}): resume is not exact")


@pytest.mark.slow
def test_e2e_srun_tasks_preempt_requeue_take_the_lock_over_and_select_the_same(
        slurm: Slurm, reference_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    # slurm_srun.sbatch: 2 srun tasks are the 2 ranks (no torchrun). USR1 reaches them, they checkpoint
    # and exit 75, the job is requeued (SLURM_RESTART_COUNT 1), the new attempt takes the run_dir lock
    # again and ends with the uninterrupted torchrun run's selections.
    config, run_dir = tiny_config(tmp_path, tiny_data, PREEMPT_STEPS)
    out = tmp_path / "slurm.out"
    job = sbatch_script(slurm, "slurm_srun.sbatch", config, out, env={"ATTENT_MASTER_PORT": ""})
    wait_until(lambda: last_step(run_dir) >= 60, 240, f"step 60 in {run_dir}/metrics.jsonl")
    lock = json.loads((run_dir / "LOCK").read_text())
    assert lock["slurm_job_id"] == str(job) and lock["slurm_step_id"] == "0" and lock["slurm_procid"] == "0"
    assert lock["slurm_restart_count"] == 0
    slurm.run("scancel", "--batch", "--signal=USR1", str(job))  # what --signal=B:USR1@N sends
    state = slurm.wait_job(job, 600)  # the stop, the requeue delay and ~700 more steps on a shared machine
    log = out.read_text()
    assert state == "COMPLETED" and slurm.job(job)["Restarts"] == "1", log
    assert "requeueing job" in log and "restart 1" in log and "torchrun" not in log, log
    # the first attempt released its lock on the way out (exit 75); the second took it as a new holder,
    # not as a sibling of its own job (that would have been a one-line error)
    assert "in use by" not in log and "took over" not in log, log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == PREEMPT_STEPS and summary["world_size"] == 2
    assert selection_records(run_dir) == selection_records(reference_run)
