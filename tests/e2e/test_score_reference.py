"""`attent-scale score` and excess loss: a reference trained on the ref split, scores equal on 1 and 2 ranks,
no-op reruns, excess keys, and one-line exit-2 errors for a mismatched reference."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import procs
import pytest
import yaml
from conftest import write_text_corpus
from train_runner import REPO, check, run_train, tiny_run_config

from attent_scale import launcher
from attent_scale.cli import main
from attent_scale.config import TeacherConfig, config_from_dict
from attent_scale.data import Manifest
from attent_scale.data.builder import build_shards
from attent_scale.errors import UserError
from attent_scale.score import write_scores
from attent_scale.teacher import Teacher
from attent_scale.teacher.reference import Reference, read_metadata, scores_metadata

NO_LOSS_GATHER = """import torch
import torch.distributed as dist

_all_gather = dist.all_gather


def _guard(out, t, *args, **kw):  # the scores go to one writer: no rank may receive every rank's losses
    if t.dtype == torch.float32:
        raise RuntimeError("attent-scale score all-gathered the losses to every rank")
    return _all_gather(out, t, *args, **kw)


dist.all_gather = _guard
"""


def run_score(*args: str, nproc: int = 1, guard: Path | None = None) -> subprocess.CompletedProcess:
    """`attent-scale score` in a subprocess; `guard`: a directory whose sitecustomize.py every process of
    the run imports first."""
    launch = launcher.command((), nproc)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    if guard is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(guard), env.get("PYTHONPATH", str(REPO))])
    return procs.run([*launch, "-m", "attent_scale", "score", *args], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Shards with a held-out ref split, and a tiny reference model trained on that split only."""
    tmp = tmp_path_factory.mktemp("reference")
    shards = tmp / "shards"
    build_shards([write_text_corpus(tmp / "corpus")], shards, seq_len=32, vocab_size=512, val_fraction=0.15,
                 ref_fraction=0.25, samples_per_shard=100, progress=False, workers=1)
    run_dir = tmp / "refrun"
    cfg = tiny_run_config(run_dir, shards, data={"dir": str(shards), "train_split": "ref"},
                          teacher={"mode": "none"}, train={"max_steps": 4, "log_every": 1},
                          eval={"every_steps": 0, "max_batches": 1, "batch_size": 16})
    check(run_train(cfg))
    return shards, run_dir


def test_reference_trains_on_ref_and_scores_match_on_1_and_2_ranks(reference: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    shards, run_dir = reference
    m = Manifest.load(shards)
    assert 16 <= m.num_samples("ref") < m.num_samples("train")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["samples_trained"] == 64
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["train_split"] == "ref"
    one, two = run_dir / "export" / "model" / "scores-train.safetensors", tmp_path / "two.safetensors"
    check(run_score("--model", str(run_dir / "export"), "--data", str(shards), "--batch-size", "7"))
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NO_LOSS_GATHER)
    check(run_score("--model", str(run_dir / "export"), "--data", str(shards), "--out", str(two),
                    "--batch-size", "7", nproc=2, guard=guard))
    assert one.read_bytes() == two.read_bytes()
    meta = read_metadata(one)
    assert meta["split"] == "train" and meta["num_samples"] == str(m.num_samples("train"))
    loss = Reference(one, m, "train").losses(np.arange(m.num_samples("train")))
    assert np.isfinite(loss).all() and 4.0 < float(loss.mean()) < 7.5
    cost = json.loads(Path(f"{one}.cost.json").read_text())
    assert cost["score_seconds"] > 0 and cost["run_dir"] == str(run_dir) and "train_cpu_seconds" in cost
    # the same inputs again: nothing is recomputed, and it says so in one line
    before = one.stat().st_mtime_ns
    again = run_score("--model", str(run_dir / "export" / "model"), "--data", str(shards))
    check(again)
    assert again.stdout.strip().count("\n") == 0 and "up to date" in again.stdout
    assert one.stat().st_mtime_ns == before


def test_truncated_model_is_a_one_line_error(reference: tuple[Path, Path], tmp_path: Path) -> None:
    shards, run_dir = reference
    model = tmp_path / "model"
    model.mkdir()
    for f in (run_dir / "export" / "model").iterdir():
        if f.suffix in (".json", ".safetensors") and not f.name.startswith("scores-"):
            data = f.read_bytes()
            (model / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    proc = run_score("--model", str(model), "--data", str(shards))
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert "model.safetensors" in err[0] and "unreadable safetensors weights" in err[0], err


@pytest.mark.parametrize("n,batch_size,world", [(100, 16, 4), (300, 7, 2), (5, 1, 8), (0, 4, 3), (17, 3, 5)])
def test_score_spans_cover_the_split_within_the_planned_forwards(n: int, batch_size: int, world: int) -> None:
    """Every id once, in rank order, no rank with more batches than the forwards all ranks run (8-aligned
    ledger blocks of batches gave rank 0 seven batches of 100 ids on 4 ranks, planned two)."""
    from attent_scale.score import score_spans

    spans, most = score_spans(n, batch_size, world)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(spans[r][1] == spans[r + 1][0] for r in range(world - 1))
    assert all(-(-(hi - lo) // batch_size) <= most for lo, hi in spans)
    assert all(lo % batch_size == 0 for lo, _ in spans)


def test_scores_written_in_slices_equal_one_write(tmp_path: Path) -> None:
    from attent_scale.score import write_scores_parts

    loss = np.arange(11, dtype=np.float32)
    loss[4] = np.nan
    write_scores(tmp_path / "one.safetensors", loss, {"format": "x"})
    parts = [loss[:3], loss[3:3], loss[3:]]
    bad = write_scores_parts(tmp_path / "parts.safetensors", 11, parts, {"format": "x"})
    assert bad == 1
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "parts.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="wrote 3 of 11"):
        write_scores_parts(tmp_path / "short.safetensors", 11, [loss[:3]], {"format": "x"})
    assert not list(tmp_path.glob("*short*")) and not list(tmp_path.glob(".*tmp*"))


def _scores(path: Path, m: Manifest, loss: np.ndarray, split: str = "train", **meta: str) -> Path:
    write_scores(path, loss.astype(np.float32), {**scores_metadata(m, split, "0" * 64), **meta})
    return path


def test_excess_keys_rank_by_learner_minus_reference(reference: tuple[Path, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from attent_scale.teacher import reference as reference_module

    shards, _ = reference
    m = Manifest.load(shards)
    n = m.num_samples("train")
    rng = np.random.default_rng(0)
    learner = rng.uniform(2.0, 6.0, n).astype(np.float32)
    ref_loss = (learner - rng.uniform(0.0, 1.0, n)).astype(np.float32)  # excess: a ranking unlike the loss
    ref = Reference(_scores(tmp_path / "r.safetensors", m, ref_loss), m, "train")
    cfg = TeacherConfig(mode="ledger", strategy="hard", warmup_epochs=0, ratio_schedule="constant",
                        initial_ratio=0.25, final_ratio=0.25, score="excess", reference="r")
    chosen = {}
    for name, r in (("loss", None), ("excess", ref)):
        t = Teacher(cfg, num_samples=n, seed=0, reference=r)
        t.ledger.observe(np.arange(n), learner, 1)
        chosen[name] = set(t.select(0, 1).ids().tolist())
    k = int(np.floor(0.25 * n + 0.5))  # the teacher rounds half up
    excess = learner - ref_loss
    assert chosen["excess"] == set(np.argsort(-excess.astype(np.float64), kind="stable")[:k].tolist())
    assert chosen["loss"] == set(np.argsort(-learner.astype(np.float64), kind="stable")[:k].tolist())
    assert chosen["excess"] != chosen["loss"]
    # a rank reads only the ids it asks for: a block in chunks reads each slice once (it re-read a growing
    # prefix per chunk), scattered online ids only around themselves (it loaded their whole span)
    part = Reference(tmp_path / "r.safetensors", m, "train")
    np.testing.assert_array_equal(part.losses(np.arange(10, 20)), ref_loss[10:20])
    for a in range(20, n, 16):
        np.testing.assert_array_equal(part.losses(np.arange(a, min(n, a + 16))), ref_loss[a:a + 16])
    assert part.bytes_read == 4 * (n - 10)
    monkeypatch.setattr(reference_module, "READ_GAP", 2)  # this file is small: ids 3 apart count as far
    online = Reference(tmp_path / "r.safetensors", m, "train")
    scattered = np.array([n - 1, 3, n - 1, 0, 4], dtype=np.int64)
    np.testing.assert_array_equal(online.losses(scattered), ref_loss[scattered])
    assert online.bytes_read == 4 * (1 + 2 + 1)  # [0], [3, 4], [n - 1]


def test_mismatched_reference_is_a_one_line_exit_2(reference: tuple[Path, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    shards, _ = reference
    m = Manifest.load(shards)
    n = m.num_samples("train")
    ok = np.ones(n, dtype=np.float32)
    cases = {
        "other-split": (_scores(tmp_path / "a.safetensors", m, ok[: m.num_samples("ref")], "ref"), "split"),
        "other-data": (_scores(tmp_path / "b.safetensors", m, ok, manifest_sha256="f" * 64), "shard set"),
        "other-vocab": (_scores(tmp_path / "c.safetensors", m, ok, vocab_size="1000"), "vocabulary"),
        "missing-ids": (_scores(tmp_path / "d.safetensors", m, ok[:-3]), "miss ids"),
        "no-file": (tmp_path / "nope.safetensors", "not found"),
    }
    for name, (path, needle) in cases.items():
        cfg = tiny_run_config(tmp_path / name, shards, teacher={"mode": "ledger", "score": "excess",
                                                                "reference": str(path)})
        cfg_path = tmp_path / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        capsys.readouterr()
        assert main(["train", "--config", str(cfg_path)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0] and needle in err[0], (name, err)
    with pytest.raises(UserError, match="teacher.reference"):
        config_from_dict({"teacher": {"score": "excess"}})


def test_bench_shows_and_charges_the_reference_cost(tmp_path: Path) -> None:
    from attent_scale.bench import format_markdown, format_table, reference_seconds, score_arm

    ref = tmp_path / "ref.safetensors"
    Path(f"{ref}.cost.json").write_text(json.dumps({"score_seconds": 3.0, "score_cpu_seconds": 2.0,
                                                    "train_seconds": 40.0, "train_cpu_seconds": 30.0}))
    arm_dir, base_dir = tmp_path / "arm", tmp_path / "base"
    for d, teacher in ((arm_dir, {"score": "excess", "reference": str(ref)}), (base_dir, {"mode": "none"})):
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump({"teacher": teacher}))
    assert reference_seconds(arm_dir, "cpu") == 32.0 and reference_seconds(arm_dir, "wall") == 43.0
    assert reference_seconds(base_dir, "cpu") == 0.0

    def run(curve: list[tuple[float, float, float]], ref_s: float) -> dict:
        summary = {"final_val_loss": curve[-1][2], "selection_seconds": 1.0, "train_seconds": curve[-1][0],
                   "wall_seconds": curve[-1][0], "samples_trained": 10, "steps": 5}
        return {"seed": 0, "summary": summary, "curve": curve, "clock_seconds": curve[-1][0],
                "reference_seconds": ref_s}

    base = run([(0.0, 0, 5.0), (100.0, 10, 4.0)], 0.0)
    arm = score_arm("excess", "attent", [run([(0.0, 0, 5.0), (50.0, 5, 4.0), (60.0, 6, 3.9)],
                                             reference_seconds(arm_dir, "cpu"))], {0: base})
    assert arm["speedup"] == pytest.approx(2.0)  # amortized: the reference left out
    assert arm["speedup_charged"] == pytest.approx(100.0 / (50.0 + 32.0))  # charged in full
    assert arm["reference_seconds"] == 32.0
    assert "ref s" in format_table([arm]) and "charged" in format_table([arm])
    assert "| 32.0 | 1.22 |" in format_markdown([arm], "cpu")


def test_train_with_excess_scores_selects(reference: tuple[Path, Path], tmp_path: Path) -> None:
    shards, run_dir = reference
    check(run_score("--model", str(run_dir / "export"), "--data", str(shards)))  # no-op after test 1
    scores = run_dir / "export" / "model" / "scores-train.safetensors"
    cfg = tiny_run_config(tmp_path / "excess", shards, teacher={"strategy": "hard", "score": "excess",
                                                                "reference": str(scores)},
                          train={"max_steps": 10, "log_every": 1})
    check(run_train(cfg))
    records = [json.loads(x) for x in (tmp_path / "excess" / "selection.jsonl").read_text().splitlines()]
    assert records and records[0]["n_scored"] == Manifest.load(shards).num_samples("train")
    assert records[0]["n_selected"] == records[0]["k"] > 0
