"""W&B in the native trainer (metrics.wandb), offline: no account, no network; read back from the run's
own .wandb record file (W&B's LevelDB-style log of protobuf records)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from train_runner import REPO, check, read_lines, run_train, tiny_run_config

pytest.importorskip("wandb")
pytestmark = pytest.mark.slow
# offline, and nowhere to log in even if something tried: a closed loopback port
OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_BASE_URL": "http://127.0.0.1:9",
           "WANDB_API_KEY": "", "WANDB_DISABLE_CODE": "true"}
BLOCK = 32768


def wandb_records(path: Path) -> list:
    """The protobuf Records of one .wandb file (a 7-byte header, then 32 KiB blocks of chunks with a
    7-byte header each: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, out, part = path.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        if kind in (1, 4):
            out.append(part + chunk)
            part = b""
        elif kind in (2, 3):
            part += chunk
    records = []
    for raw in out:
        rec = pb.Record()
        rec.ParseFromString(raw)
        records.append(rec)
    return records


def history(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value)]} of the W&B run's history rows."""
    import json

    out: dict[str, list[tuple[int, float]]] = {}
    for rec in wandb_records(path):
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
        for key, value in row.items():
            if not key.startswith("_"):
                out.setdefault(key, []).append((int(row["_step"]), float(value)))
    return out


def _config(tmp_path: Path, shards: Path, **checkpoint: object) -> dict:
    return tiny_run_config(tmp_path / "run", shards, train={"max_steps": 6, "log_every": 2},
                           eval={"every_steps": 3, "max_batches": 1},
                           checkpoint={"export": False, **checkpoint},
                           metrics={"wandb": {"enabled": True, "mode": "offline", "project": "t"}})


def test_offline_wandb_logs_the_steps_and_evals_and_a_resume_goes_on_in_the_same_run(
        tmp_path: Path, tiny_shards: Path) -> None:
    cfg = _config(tmp_path, tiny_shards, every_steps=4, resume=True)
    check(run_train(cfg, env=OFFLINE, timeout=600))
    run_dir = tmp_path / "run"
    (first,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    run_id = (run_dir / "wandb-run-id").read_text().strip()
    assert first.name == f"run-{run_id}.wandb"
    got = history(first)
    jsonl = {r["step"]: r for r in read_lines(run_dir / "metrics.jsonl")}
    assert [s for s, _ in got["train/loss"]] == [2, 4, 6]
    for step, loss in got["train/loss"]:
        assert loss == pytest.approx(jsonl[step]["loss"], rel=1e-6)
    evals = {r["step"]: r["val_loss"] for r in read_lines(run_dir / "eval.jsonl")}
    assert dict(got["val/loss"]) == pytest.approx(evals)
    assert {"train/lr", "selection/ratio", "selection/seconds/score"} <= got.keys()
    # resumed with a longer budget: the same W&B run id goes on from the checkpoint
    cfg["train"]["max_steps"] = 8
    check(run_train(cfg, env=OFFLINE, timeout=600))
    assert (run_dir / "wandb-run-id").read_text().strip() == run_id
    runs = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert {p.name for p in runs} == {f"run-{run_id}.wandb"} and len(runs) == 2
    later = history(max(runs, key=lambda p: p.stat().st_mtime))
    assert [s for s, _ in later["train/loss"]] == [8]  # from the final checkpoint at step 6: steps 7, 8


def test_without_the_wandb_package_one_line_names_the_extra(tmp_path: Path, tiny_shards: Path) -> None:
    import yaml

    cfg = _config(tmp_path, tiny_shards)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = ("import sys; sys.modules['wandb'] = None; sys.argv = ['attent-scale', 'train', '--config', "
            f"{str(path)!r}]; from attent_scale.cli import run; run()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **OFFLINE, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if "error" in x]
    assert "metrics.wandb.enabled" in line and "attent-scale[wandb]" in line, line
