"""Launch `attent-scale train` as real processes (one, or torchrun with N ranks) and read its run dir."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import procs
import yaml

from attent_scale import launcher

REPO = Path(__file__).resolve().parents[2]

TINY_MODEL = {
    "model_type": "gpt2",
    "n_layer": 2,
    "n_embd": 32,
    "n_head": 2,
    "n_positions": 32,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}


def tiny_run_config(run_dir: Path, shards: Path, engine: str = "local", **sections: dict[str, Any]) -> dict:
    """A config small enough for 2 CPU ranks: tiny GPT-2, 16 samples per step, a selection every few steps."""
    cfg: dict[str, Any] = {
        "run_dir": str(run_dir),
        "seed": 0,
        "data": {"dir": str(shards), "shuffle_buffer": 64},
        "model": {"config": dict(TINY_MODEL)},
        "engine": {"name": engine},
        "teacher": {
            "mode": "cycle",
            "strategy": "soft",
            "warmup_epochs": 0,
            "total_cycles": 3,
            "initial_ratio": 0.1,
            "final_ratio": 0.3,
            "interval_schedule": "fixed",
            "initial_interval": 1,
            "max_interval": 1,
            "full_epochs_per_cycle": 0,
        },
        # 16 samples per step in all: 16 on one process, 8 per rank on two
        "train": {
            "max_steps": 24,
            "micro_batch_size": 16 if engine == "local" else 8,
            "lr": 3e-3,
            "warmup_steps": 2,
            "log_every": 1,
        },
        "eval": {"every_steps": 8, "max_batches": 2, "batch_size": 16},
        "checkpoint": {"every_steps": 0, "keep_last": 2},
    }
    if engine == "deepspeed":
        cfg["engine"]["deepspeed_config"] = str(REPO / "configs" / "deepspeed_zero3.json")
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def run_train(
    cfg: dict,
    *,
    nproc: int = 1,
    env: dict[str, str] | None = None,
    timeout: float = 240,
    extra: list[str] | None = None,
) -> subprocess.CompletedProcess:
    """Write the config next to its run dir and run the trainer; returns the finished process."""
    run_dir = Path(cfg["run_dir"])
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir.parent / f"{run_dir.name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [*launcher.command(nproc=nproc), "--config", str(cfg_path), *(extra or [])]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    # every process of the job (torchrun's ranks too) is killed on a timeout or error
    return procs.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def selection_hashes(run_dir: Path) -> list[tuple[int, str]]:
    return [(r["step"], r["sha256"]) for r in read_lines(run_dir / "selection.jsonl")]


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_lines(run_dir / "metrics.jsonl")}


def check(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, (
        f"exit {proc.returncode} (wanted {code})\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
