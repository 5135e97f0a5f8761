"""A stop signal in a long phase other than training steps, sent from outside as a scheduler sends it: the
teacher's scoring pass stops within seconds on every rank together (checkpoint, PREEMPTED, exit 75), and a
resume goes on from there as if nothing had happened."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sysconfig
import time
from pathlib import Path

import procs
import pytest
import yaml
from train_runner import REPO, check, read_lines, run_train, selection_hashes, step_losses, tiny_run_config

from attent_scale import launcher
from attent_scale.data.builder import build_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def long_scoring_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~47k windows of 33 tokens from 3 MB of stdlib source: one scoring pass of the tiny model over them
    takes 10+ s on a 2-core machine, several seconds on any (built in ~5 s)."""
    tmp = tmp_path_factory.mktemp("long")
    corpus = tmp / "corpus"
    corpus.mkdir()
    total = 0
    for n, src in enumerate(sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))):
        text = src.read_text(errors="replace")
        (corpus / f"d{n:04d}.txt").write_text(text)
        total += len(text)
        if total > 3_000_000:
            break
    out = tmp / "shards"
    build_shards([corpus], out, seq_len=32, vocab_size=512, val_fraction=0.05, progress=False)
    return out


def _config(run: Path, shards: Path, engine: str) -> dict:
    # cycle mode: epoch 0 scores all ~47k ids and trains ~0.2 % of them (6 steps of 16), then epoch 1
    # scores all of them again at step 6: the pass the signal lands in
    return tiny_run_config(run, shards, engine, train={"max_steps": 12},
                           teacher={"initial_ratio": 0.002, "final_ratio": 0.003},
                           eval={"every_steps": 0, "max_batches": 2, "batch_size": 16})


def _epoch0_steps(run: Path, nproc: int) -> int | None:
    """Steps of epoch 0 once its selection is recorded (per rank: its share of the selection, batch 16 in
    all); None before."""
    path = run / "selection.jsonl"
    records = read_lines(path) if path.exists() else []
    if not records:
        return None
    return math.ceil((records[0]["n_selected"] // nproc) / (16 // nproc))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("engine,nproc", [("local", 1), ("fsdp", 2)])
def test_sigterm_during_the_scoring_pass_preempts_within_seconds(tmp_path, long_scoring_shards, engine,
                                                                 nproc):
    run = tmp_path / "run"
    cfg = _config(run, long_scoring_shards, engine)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    log_path = tmp_path / "run.log"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [*launcher.command(nproc=nproc), "--config", str(cfg_path)]  # one plain process, or torchrun
    with log_path.open("w") as log, procs.popen(cmd, cwd=REPO, env=env, stdout=log,
                                                stderr=subprocess.STDOUT) as proc:
        deadline, steps = time.monotonic() + 600, None
        metrics = run / "metrics.jsonl"
        while True:  # the row of epoch 0's last step: epoch 1's scoring pass starts right after it
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            steps = steps or _epoch0_steps(run, nproc)
            if steps and metrics.exists() and any(r["step"] == steps for r in read_lines(metrics)):
                break
            time.sleep(0.2)
        time.sleep(1.0)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # to the process, or to torchrun (it signals every rank)
        proc.wait(timeout=120)
        seconds = time.monotonic() - signalled
    text = log_path.read_text()
    print(f"{nproc} rank(s): SIGTERM during the scoring pass to exit: {seconds:.1f} s")
    # a plain process exits 75 itself; torchrun reports a worker's 75 as 1, hence the marker file
    assert proc.returncode == (75 if nproc == 1 else 1), text[-3000:]
    assert json.loads((run / "PREEMPTED").read_text()) == {"step": steps, "signal": "SIGTERM"}
    assert (f"SIGTERM: stopped the teacher's scoring pass for epoch 1 at step {steps}; checkpoint at step "
            f"{steps} written, exiting with 75 for requeue") in text, text[-3000:]
    assert (run / "checkpoints" / f"step-{steps:08d}" / "COMPLETE").exists()
    assert max(step_losses(run)) == steps and len(selection_hashes(run)) == 1  # nothing trained or selected
    assert seconds < 60, f"{seconds:.0f} s from SIGTERM to the end"  # a hang guard, not a speed target

    resumed = run_train(cfg, nproc=nproc, timeout=600)
    check(resumed)
    assert f"(step {steps}, " in resumed.stderr and "epoch 1 at its start" in resumed.stderr, resumed.stderr
    assert not (run / "PREEMPTED").exists()
    assert sorted(step_losses(run)) == list(range(1, 13))
    assert [s for s, _ in selection_hashes(run)] == [0, steps]  # epoch 1 scored and selected once, at resume
    if nproc == 1:  # the same run without the signal: same selections, same losses
        straight = _config(tmp_path / "straight", long_scoring_shards, engine)
        check(run_train(straight, nproc=nproc, timeout=600))
        assert selection_hashes(run) == selection_hashes(tmp_path / "straight")
        a, b = step_losses(tmp_path / "straight"), step_losses(run)
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step


@pytest.mark.timeout(300)
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_during_reference_scoring_ends_it_within_seconds(tmp_path, long_scoring_shards, nproc):
    """`attent-scale score` (one process, or torchrun) over ~47k samples one at a time (a minute or more):
    SIGTERM a few seconds in ends it within seconds, with no scores file and no temp file left."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = tmp_path / "model"
    config = GPT2Config(vocab_size=512, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(model)
    out = tmp_path / "scores" / "s.safetensors"
    out.parent.mkdir()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [*launcher.command(("-m", "attent_scale", "score"), nproc), "--model", str(model), "--data",
           str(long_scoring_shards), "--out", str(out), "--batch-size", "1"]
    if nproc > 1:
        cfg = tmp_path / "engine.yaml"
        cfg.write_text(yaml.safe_dump({"engine": {"name": "fsdp"}}))
        cmd += ["--config", str(cfg)]
    with procs.popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                     text=True) as proc:
        time.sleep(10)
        assert proc.poll() is None, proc.stdout.read()[-3000:]  # still scoring
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        seconds = time.monotonic() - signalled
    print(f"score on {nproc} rank(s): SIGTERM to exit {seconds:.1f} s")
    assert proc.returncode != 0
    assert seconds < 30, f"{seconds:.0f} s from SIGTERM to the end"  # a hang guard, not a speed target
    assert list(out.parent.iterdir()) == []
