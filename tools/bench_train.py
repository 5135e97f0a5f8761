"""Steps/s, tokens/s and selection overhead of the demo config per engine and teacher mode (prints a table).

Usage: python tools/bench_train.py [--engines local,deepspeed,fsdp] [--modes none,cycle,ledger,online]
                                   [--epochs 2] [--out runs/bench_train]
Each run: the demo model on the demo shards, warm-up epoch then cycles (cycle/ledger), 16 samples per
step in all (16 on one process; 8 per rank on two). Numbers come from each run's summary.json:
steps / training seconds, trained tokens / training seconds, selection seconds / wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(engine: str, mode: str, shards: Path, out: Path, epochs: int) -> dict:
    run_dir = out / f"{engine}-{mode}"
    sets = [
        f"run_dir={run_dir}",
        f"data.dir={shards}",
        f"teacher.mode={mode}",
        f"train.max_epochs={epochs}",
        "train.max_steps=1000000",
        "eval.every_steps=0",
        "eval.max_batches=2",
        "checkpoint.export=false",
        "checkpoint.resume=false",
        f"engine.name={engine}",
    ]
    if engine == "local":
        cmd = [sys.executable, "-m", "attent_scale", "train"]
    else:
        sets.append("train.micro_batch_size=8")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "attent_scale",
            "train",
        ]
    if engine == "deepspeed":
        sets.append(f"engine.deepspeed_config={REPO / 'configs' / 'deepspeed_zero3.json'}")
    cmd += ["--config", str(REPO / "configs" / "demo.yaml")]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{engine}/{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", default="local,deepspeed,fsdp")
    parser.add_argument("--modes", default="none,cycle,ledger,online")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default="runs/bench_train")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from attent_scale.demo import ensure_demo_shards

    shards = ensure_demo_shards(REPO / "runs" / "demo" / "shards", progress=False)
    out = Path(args.out)
    print(
        f"{'engine':10} {'mode':7} {'ranks':>5} {'steps':>6} {'steps/s':>8} {'tokens/s':>9} {'select %':>8} "
        f"{'score s':>8}"
    )
    for engine in args.engines.split(","):
        for mode in args.modes.split(","):
            s = run(engine, mode, shards, out, args.epochs)
            secs = s["train_seconds"]
            print(
                f"{engine:10} {mode:7} {s['world_size']:>5} {s['steps']:>6} {s['steps'] / secs:>8.2f} "
                f"{s['tokens_trained'] / secs:>9.0f} {100 * s['selection_fraction']:>8.1f} "
                f"{s['selection_seconds_by_phase']['score']:>8.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
