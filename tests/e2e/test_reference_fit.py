"""`attent-scale reference fit`: K-fold cross-fitting through the trainer on 1 and 2 ranks, the merged scores
file the learn strategy reads, its cost record, and scores that do not depend on the number of ranks."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from train_runner import REPO, tiny_run_config

from attent_scale import launcher
from attent_scale.data import Manifest
from attent_scale.teacher.folds import fold_of
from attent_scale.teacher.reference import Reference, read_metadata

REF = {"folds": 2, "seed": 4, "group": 8, "epochs": 1.0, "eval_every_steps": 4, "early_stop_patience": 1}


def _run(args: list[str], nproc: int = 1, target: tuple[str, ...] = ("-m", "attent_scale")
         ) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [*launcher.command(target, nproc), *args] if nproc > 1 else [*launcher.command(target), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=2000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _config(tmp: Path, shards: Path, engine: str) -> Path:
    cfg = tiny_run_config(tmp / "run", shards, engine, teacher={"mode": "none"},
                          eval={"every_steps": 4, "max_batches": 0, "batch_size": 16})
    cfg["reference"] = dict(REF)
    path = tmp / f"{engine}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def one_rank(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fit1")
    _run(["reference", "fit", "--config", str(_config(tmp, tiny_shards, "local")), "--out", str(tmp / "ref")])
    return tmp / "ref"


def test_fit_writes_cross_fitted_scores_and_their_cost(one_rank: Path, tiny_shards: Path) -> None:
    m = Manifest.load(tiny_shards)
    n = m.num_samples("train")
    scores = one_rank / "scores-train.safetensors"
    meta = read_metadata(scores)
    got = (meta["kind"], meta["folds"], meta["fold_seed"], meta["fold_group"])
    assert got == ("cross-fit", "2", "4", "8")
    ref = Reference(scores, m, "train")
    ids = np.arange(n)
    loss = ref.losses(ids)
    assert np.isfinite(loss).all() and 4.0 < float(loss.mean()) < 7.0
    hist = ref.val_hist()
    assert hist.shape[0] == 2 and (hist.sum(axis=1) == m.num_samples("val")).all()
    # the loss of id i is the one of the fold model that never trained on it
    fold = fold_of(ids, 2, 4, 8)
    for k in range(2):
        own = Reference(one_rank / f"fold-{k}" / "scores-train.safetensors", m, "train").losses(ids)
        assert np.array_equal(own[fold == k], loss[fold == k]) and np.isnan(own[fold != k]).all()
        run = yaml.safe_load((one_rank / f"fold-{k}" / "config.yaml").read_text())
        assert run["data"]["holdout"] == {"folds": 2, "fold": k, "seed": 4, "group": 8, "train_on": "rest"}
        assert run["teacher"]["mode"] == "none" and run["eval"]["early_stop_patience"] == 1
    cost = json.loads(Path(f"{scores}.cost.json").read_text())
    assert cost["train_cpu_seconds"] > 0 and cost["score_cpu_seconds"] > 0 and len(cost["folds"]) == 2
    assert all(f["steps"] <= f["planned_steps"] for f in cost["folds"])
    assert sum(f["ids"] for f in cost["folds"]) == n  # each fold model trains on the other fold's ids


@pytest.mark.slow
@pytest.mark.timeout(2400)  # four FSDP processes' starts, two fold trainings and four scoring runs
def test_two_ranks_fit_the_same_folds_and_score_like_one_rank(one_rank: Path, tiny_shards: Path,
                                                              tmp_path: Path) -> None:
    m = Manifest.load(tiny_shards)
    n = m.num_samples("train")
    two = tmp_path / "ref2"
    _run(["reference", "fit", "--config", str(_config(tmp_path, tiny_shards, "fsdp")), "--out", str(two),
          "--nproc", "2"])
    a = Reference(one_rank / "scores-train.safetensors", m, "train").losses(np.arange(n))
    b = Reference(two / "scores-train.safetensors", m, "train").losses(np.arange(n))
    meta_a = read_metadata(one_rank / "scores-train.safetensors")
    meta_b = read_metadata(two / "scores-train.safetensors")
    assert all(meta_a[k] == meta_b[k] for k in ("folds", "fold_seed", "fold_group", "manifest_sha256"))
    cost = json.loads(Path(f"{two}/scores-train.safetensors.cost.json").read_text())
    cost_one = json.loads(Path(f"{one_rank}/scores-train.safetensors.cost.json").read_text())
    assert cost["world_size"] == 2
    assert [f["ids"] for f in cost["folds"]] == [f["ids"] for f in cost_one["folds"]]
    # the same ids train each fold model on 2 ranks, in another order: the same scores up to that
    assert np.isfinite(b).all() and np.corrcoef(a, b)[0, 1] > 0.9 and abs(float(a.mean() - b.mean())) < 0.2
    # scoring is exact: the 1-rank fold models scored on 2 ranks give the very same bytes
    for k in range(2):
        out = tmp_path / f"fold-{k}.safetensors"
        _run(["score", "--model", str(one_rank / f"fold-{k}" / "export"), "--data", str(tiny_shards),
              "--out", str(out), "--folds", "2", "--fold", str(k), "--fold-seed", "4", "--fold-group", "8",
              "--val-hist", "--batch-size", "16"], nproc=2)
        assert out.read_bytes() == (one_rank / f"fold-{k}" / "scores-train.safetensors").read_bytes()


def test_a_reference_adapter_trains_on_the_ref_split_and_scores_train(tmp_path: Path) -> None:
    """Fine-tuning: LoRA on the base, trained on the held-out `ref` split only, scoring train and val."""
    from conftest import write_text_corpus
    from train_runner import check, run_train

    from attent_scale.data.builder import build_shards

    shards = tmp_path / "shards"
    build_shards([write_text_corpus(tmp_path / "corpus")], shards, seq_len=32, vocab_size=512,
                 val_fraction=0.15, ref_fraction=0.25, samples_per_shard=100, progress=False, workers=1)
    base = tmp_path / "base"
    check(run_train(tiny_run_config(base, shards, teacher={"mode": "none"}, train={"max_steps": 4},
                                    eval={"every_steps": 0, "max_batches": 1})))
    cfg = tiny_run_config(tmp_path / "run", shards, teacher={"mode": "none"},
                          eval={"every_steps": 4, "max_batches": 0, "batch_size": 16})
    cfg["model"] = {"init_from": str(base / "export" / "model"), "lora": {"enabled": True, "r": 4}}
    cfg["reference"] = {"adapter": True, "epochs": 1.0, "eval_every_steps": 4}
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _run(["reference", "fit", "--config", str(path), "--out", str(tmp_path / "ref"), "--clock", "cpu"])
    m = Manifest.load(shards)
    scores = tmp_path / "ref" / "scores-train.safetensors"
    assert read_metadata(scores)["kind"] == "adapter"
    ref = Reference(scores, m, "train")
    assert np.isfinite(ref.losses(np.arange(m.num_samples("train")))).all()
    assert ref.val_hist().shape[0] == 1 and int(ref.val_hist().sum()) == m.num_samples("val")
    run = yaml.safe_load((tmp_path / "ref" / "adapter" / "config.yaml").read_text())
    assert run["data"]["train_split"] == "ref" and run["model"]["lora"]["export_merged"] is True
    cost = json.loads(Path(f"{scores}.cost.json").read_text())
    assert cost["kind"] == "adapter" and cost["folds"][0]["ids"] == m.num_samples("ref")
    assert cost["folds"][0]["threads"] == 1


def _processes_naming(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def test_sigterm_stops_the_fit_and_its_child_within_seconds(tiny_shards: Path, tmp_path: Path) -> None:
    import signal
    import time

    out = tmp_path / "ref"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [*launcher.command(("-m", "attent_scale")), "reference", "fit", "--config",
           str(_config(tmp_path, tiny_shards, "local")), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "fold-0" / "train.log"
    deadline = time.monotonic() + 300
    while not (log.exists() and "attent-scale" in log.read_text(errors="replace")):
        assert proc.poll() is None and time.monotonic() < deadline, "the fold's training never started"
        time.sleep(0.5)
    assert _processes_naming(str(out / "fold-0"))  # the fold's trainer is running
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    assert time.monotonic() - t0 < 45 and code != 0
    time.sleep(1)
    assert not _processes_naming(str(out / "fold-0"))  # no trainer left behind
