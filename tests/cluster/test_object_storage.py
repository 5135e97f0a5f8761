"""Shards in object storage, with real servers (moto's S3 API, python's http.server) and real ranks
(torchrun, gloo, FSDP on CPU): 2 ranks train from s3:// exactly the ids they train from the same shards on
disk, across a checkpoint resume with the shards only in the bucket and a server restart mid-epoch; a
server gone for good ends the job on every rank with one line naming the shard URL; http:// trains."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import procs
import pytest
import yaml
from conftest import write_text_corpus
from servers import S3Server, http_server, s3_server
from train_runner import REPO, read_lines, tiny_run_config

from attent_scale import launcher
from attent_scale.data.builder import build_shards
from attent_scale.train import PREEMPT_EXIT_CODE

pytestmark = pytest.mark.slow

STEPS = 14
STOP_AT = 6  # the first launch checkpoints after this step; the second resumes from it
TEACHER = {"mode": "cycle", "strategy": "soft", "warmup_epochs": 0, "total_cycles": 3, "initial_ratio": 0.1,
           "final_ratio": 0.3, "interval_schedule": "fixed", "initial_interval": 1, "max_interval": 1,
           "full_epochs_per_cycle": 0}


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~940 windows of 33 tokens in 38 shards of 25 (a rank opens a new shard every few steps)."""
    tmp = tmp_path_factory.mktemp("objstore")
    corpus = write_text_corpus(tmp / "corpus")
    tok = build_shards([corpus], tmp / "tok", seq_len=32, vocab_size=512, val_fraction=0.15,
                       samples_per_shard=100, progress=False, workers=1)
    build_shards([corpus], tmp / "shards", seq_len=32, tokenizer=tok.tokenizer_path, val_fraction=0.15,
                 samples_per_shard=25, progress=False, workers=1)
    return tmp / "shards"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, small_shards: Path):
    """A moto S3 server holding small_shards at s3://attent/small."""
    with s3_server() as server:
        server.upload(small_shards, "s3://attent/small")
        yield server


def _config(run_dir: Path, data: str, cache: Path, **data_keys) -> dict:
    return tiny_run_config(run_dir, data, "fsdp", teacher=TEACHER,
                           data={"cache_dir": str(cache), **data_keys},
                           train={"max_steps": STEPS, "stop_check_every": 2, "log_every": 1},
                           eval={"every_steps": 0, "max_batches": 1},
                           checkpoint={"every_steps": 0, "keep_last": 1})


def _launch(cfg: dict, ids_dir: Path, env: dict[str, str], nproc: int = 2) -> subprocess.Popen:
    """torchrun `nproc` ranks of tests/helpers/ids_trainer.py (the trainer, recording each step's ids);
    procs.start: a failed or timed-out test's job is killed whole at its teardown. Output goes to
    run_dir.log, never to a pipe nobody reads while the test waits (a full pipe blocks the ranks)."""
    run_dir = Path(cfg["run_dir"])
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    ids_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir.parent / f"{run_dir.name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    trainer = REPO / "tests" / "helpers" / "ids_trainer.py"
    cmd = [*launcher.command((str(trainer), "train"), nproc, torchrun=True), "--config", str(cfg_path)]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                "ATTENT_IDS_DIR": str(ids_dir), **env}
    log = run_dir.parent / f"{run_dir.name}.log"
    with log.open("w") as out:
        proc = procs.start(cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    """Exit code and output; the output's attent-scale lines come first in a failure's message."""
    proc.wait(timeout=timeout)
    log = proc.log.read_text(errors="replace")  # type: ignore[attr-defined]
    ours = "\n".join(line for line in log.splitlines() if line.startswith("attent-scale: "))
    return proc.returncode, f"{ours}\n----\n{log}"


def _trained(ids_dir: Path) -> dict[tuple[int, int], list[int]]:
    """(rank, step) -> the ids that rank trained at that step, over every launch into `ids_dir`."""
    rows = [r for f in sorted(ids_dir.glob("ids-*.jsonl")) for r in read_lines(f)]
    return {(r["rank"], r["step"]): r["ids"] for r in rows}


def _selections(run_dir: Path) -> list[tuple[int, str]]:
    return [(r["step"], r["sha256"]) for r in read_lines(run_dir / "selection.jsonl")]


def _when_step(run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and any(r["step"] >= step for r in read_lines(path)):
            return
        time.sleep(0.2)
    raise AssertionError(f"{path}: step {step} not reached in {timeout:.0f}s")


@pytest.fixture(scope="module")
def disk_run(tmp_path_factory: pytest.TempPathFactory, small_shards: Path) -> Path:
    """The reference: 2 ranks, uninterrupted, from the shards on local disk."""
    tmp = tmp_path_factory.mktemp("disk")
    code, log = _finish(_launch(_config(tmp / "run", str(small_shards), tmp / "cache"), tmp / "ids", {}))
    assert code == 0, log[-4000:]
    return tmp


def test_two_ranks_train_from_s3_like_disk_across_a_resume_and_a_server_restart(
        tmp_path: Path, store: S3Server, disk_run: Path) -> None:
    """From s3:// with a cache too small to keep the shards (every few steps a download): the first
    launch stops at a checkpoint; the resume (the shards only in the bucket) loses the server for a few
    seconds mid-epoch. Every (rank, step) trains the ids the disk run trained, every selection has the
    same hash, the losses agree, and the retries were counted."""
    cfg = _config(tmp_path / "run", "s3://attent/small", tmp_path / "cache", cache_max_bytes=100_000,
                  retries=8, backoff=0.25, backoff_max=4.0, timeout=10.0)
    env = {**store.env, "ATTENT_STOP_AFTER_STEP": str(STOP_AT)}
    code, log = _finish(_launch(cfg, tmp_path / "ids", env))
    assert code != 0 and f"exitcode  : {PREEMPT_EXIT_CODE}" in log, log[-4000:]  # torchrun says 1
    assert (Path(cfg["run_dir"]) / "PREEMPTED").exists()

    proc = _launch(cfg, tmp_path / "ids", store.env)
    outage: dict[str, float] = {}

    def stop_and_restart() -> None:
        _when_step(Path(cfg["run_dir"]), STOP_AT + 2)
        outage["stopped"] = time.monotonic()
        store.stop()
        time.sleep(3)
        store.start()
        outage["back"] = time.monotonic()

    chaos = threading.Thread(target=stop_and_restart, daemon=True)
    chaos.start()
    code, log = _finish(proc)
    chaos.join(timeout=120)
    assert code == 0, log[-4000:]
    assert "back" in outage, "the server was not restarted during the run"

    want = _trained(disk_run / "ids")
    got = _trained(tmp_path / "ids")
    assert sorted(want) == [(r, s) for r in (0, 1) for s in range(1, STEPS + 1)]
    assert got == want
    assert _selections(Path(cfg["run_dir"])) == _selections(disk_run / "run")
    disk_loss = {r["step"]: r["loss"] for r in read_lines(disk_run / "run" / "metrics.jsonl")}
    s3_loss = {r["step"]: r["loss"] for r in read_lines(Path(cfg["run_dir"]) / "metrics.jsonl")}
    assert s3_loss == pytest.approx(disk_loss, rel=1e-5)
    summary = json.loads((Path(cfg["run_dir"]) / "summary.json").read_text())
    assert summary["remote_retries"] >= 1, summary  # the outage met a download, which was retried
    assert summary["remote_unreachable"] == 0
    assert summary["corrupt_samples"] == 0
    assert re.search(r"s3://attent/small/\S+\.tar: download failed \(.*\); retry 1/8", log)


def test_a_server_gone_for_good_stops_every_rank_with_one_line(tmp_path: Path, small_shards: Path) -> None:
    """The server stops mid-epoch and never comes back: both ranks exit non-zero within a bounded time,
    each with the same one-line error naming the shard URL; nothing hangs in a collective."""
    with s3_server() as server:
        server.upload(small_shards, "s3://gone/small")
        cfg = _config(tmp_path / "run", "s3://gone/small", tmp_path / "cache", cache_max_bytes=100_000,
                      retries=2, backoff=0.2, timeout=5.0)
        proc = _launch(cfg, tmp_path / "ids", server.env)
        _when_step(Path(cfg["run_dir"]), 1)
        server.stop()
        stopped = time.monotonic()
        code, log = _finish(proc, timeout=180)
        took = time.monotonic() - stopped
    assert code != 0, log[-4000:]
    assert took < 120, f"{took:.0f}s from the outage to the exit"
    line = r"^attent-scale: error: (s3://gone/small/\S+\.tar: unreachable after \d+ attempt\(s\).*)$"
    errors = re.findall(line, log.split("\n----\n", 1)[0], re.M)  # the attent-scale lines, once
    assert len(errors) == 2, log[-4000:]  # one line from each rank, the same line
    assert errors[0] == errors[1] and "data.skip_unreachable: true" in errors[0]
    assert not list((Path(cfg["run_dir"])).glob("summary.json"))


def test_an_http_data_dir_trains(tmp_path: Path, small_shards: Path) -> None:
    """data.dir at http:// (python's http.server over the shard directory) trains on one process; what
    it trained was downloaded into the cache and counted."""
    from train_runner import check, run_train

    with http_server(small_shards.parent, tmp_path) as base:
        cfg = tiny_run_config(tmp_path / "run", f"{base}/{small_shards.name}", "local",
                              data={"cache_dir": str(tmp_path / "cache"), "retries": 1, "backoff": 0.1},
                              train={"max_steps": 3}, eval={"every_steps": 0, "max_batches": 1},
                              teacher={"mode": "none"})
        check(run_train(cfg))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["remote_downloaded_bytes"] > 0
    cached = list((tmp_path / "cache" / "shards").glob("*.tar"))
    assert cached and all(p.stat().st_size > 0 for p in cached)
