"""Steps/s, tokens/s and selection overhead of the demo config per engine and teacher mode (prints a table).

Usage: python tools/benchmarks/bench_train.py [--engines local,deepspeed,fsdp]
           [--modes none,cycle,ledger,online] [--epochs 2] [--out runs/bench_train] [--data SHARDS]
       python tools/benchmarks/bench_train.py --step-bench [--engines local|deepspeed|fsdp]
           [--grad-accum 4] [--steps 8] [--repeats 3] [--model demo|gpt2-small] [--seq 128] [--micro 4]
           [--json FILE] [--layers N --width N --heads N --vocab N] [--deepspeed-config F]
       torchrun --nproc-per-node 2 tools/benchmarks/bench_train.py --step-bench --engines fsdp|deepspeed ...
Each run: the demo model on the demo shards, warm-up epoch then cycles (cycle/ledger), 16 samples per
step in all (16 on one process; 8 per rank on two). Numbers come from each run's summary.json:
steps / training seconds, trained tokens / training seconds, selection seconds / wall seconds.

--step-bench times `engine.train_step` and `engine.score` alone on random token batches (one process;
deepspeed and fsdp run on a one-rank group): seconds per step on the process CPU clock and the wall
clock (`repeats` repeats after one warm-up step; mean and min-max spread), host syncs per step
(`torch.cuda.set_sync_debug_mode` on CUDA, which sees every sync including the libraries'; on CPU the
engine's own counter of its device-to-host copies, 'n/a' for code without one), tokens/s, the scoring
forward's cost per sample relative to a training step's, and on CUDA the MFU (6N + 12LHQT flops per
token against the device's dense bf16 peak; ATTENT_PEAK_TFLOPS overrides). Run it with PYTHONPATH at
another checkout to compare code versions on the same machine. Under torchrun the engine spans every rank
(rank 0 prints; tokens/s counts all ranks), which is how docs/training.md's engine table is measured
(`--model demo --layers 4 --vocab 4096 --micro 16 --grad-accum 1 --repeats 1`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from attent_scale import launcher

REPO = Path(__file__).resolve().parents[2]


def run(engine: str, mode: str, shards: Path, out: Path, epochs: int) -> dict:
    run_dir = out / f"{engine}-{mode}"
    sets = [
        f"run_dir={run_dir}",
        f"data.dir={shards}",
        f"teacher.mode={mode}",
        f"train.max_epochs={epochs}",
        "train.max_steps=1000000",
        "eval.every_steps=1000000",  # no periodic eval (strategy signal refuses 0; it then drops nothing)
        "eval.max_batches=2",
        "checkpoint.export=false",
        "checkpoint.resume=false",
        f"engine.name={engine}",
    ]
    if mode == "online":  # the demo's strategy (signal) is for cycle/ledger; online picks by raw loss
        sets.append("teacher.strategy=hard")
    if engine != "local":
        sets.append("train.micro_batch_size=8")
    cmd = launcher.command(nproc=1 if engine == "local" else 2)
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


MODELS = {
    "demo": {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 8000},
    "gpt2-small": {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257},
}
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def _peak_tflops(name: str) -> float | None:
    if os.environ.get("ATTENT_PEAK_TFLOPS"):
        return float(os.environ["ATTENT_PEAK_TFLOPS"])
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class SyncCounter:
    """Host syncs inside a block: `count` from CUDA's sync debug mode on a GPU (every implicit sync, the
    libraries' included), `own` from the engine's counter of its explicit device-to-host copies (None for
    code without one); on CPU `count` is `own`."""

    def __init__(self, engine: object) -> None:
        import torch

        self.engine, self.cuda = engine, torch.cuda.is_available()
        self.count: int | None = None
        self.own: int | None = None

    def __enter__(self) -> SyncCounter:
        import warnings

        import torch

        self._start = getattr(self.engine, "host_syncs", None)
        if self.cuda:
            self._catch = warnings.catch_warnings(record=True)
            self._records = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self._start is not None:
            self.own = self.engine.host_syncs - self._start
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(*exc)
            self.count = sum("synchroniz" in str(w.message) for w in self._records)
        else:
            self.count = self.own


def _spread(xs: list[float]) -> str:
    import statistics

    return f"{statistics.mean(xs):.4f} [{min(xs):.4f}-{max(xs):.4f}]"


def step_bench(args: argparse.Namespace) -> list[dict]:
    """Time train_step / score per engine on random batches; see the module docstring."""
    import statistics
    import time

    import torch

    import attent_scale
    from attent_scale.config import config_from_dict
    from attent_scale.engines import build_engine

    print(f"code: {Path(attent_scale.__file__).parent}", flush=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = dict(MODELS[args.model], n_positions=args.seq)
    for key, value in (("n_layer", args.layers), ("n_embd", args.width), ("n_head", args.heads),
                       ("vocab_size", args.vocab)):
        if value is not None:
            model[key] = value
    vocab = model.pop("vocab_size")
    rows = args.micro * args.grad_accum
    g = torch.Generator()
    rank = 0
    results = []
    for name in args.engines.split(","):
        raw = {"seed": 0, "model": {"config": model}, "engine": {"name": name,
               "mixed_precision": args.mixed_precision},
               "train": {"micro_batch_size": args.micro, "grad_accum_steps": args.grad_accum,
                         "warmup_steps": 0, "max_steps": 1000000, "lr": 1e-4}}
        if name == "deepspeed":
            raw["engine"]["deepspeed_config"] = args.deepspeed_config
        engine = build_engine(config_from_dict(raw), vocab_size=vocab)
        g.manual_seed(engine.rank)  # under torchrun: another batch per rank
        toks = torch.randint(0, vocab, (rows, args.seq + 1), generator=g)
        batch = {"ids": torch.arange(rows), "input_ids": toks[:, :-1].contiguous(),
                 "labels": toks[:, 1:].contiguous()}
        cuda = engine.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)

        engine.train_step(batch)  # warm-up: allocations, lazy init, kernel selection
        engine.score(batch)
        cpu, wall, syncs, own = [], [], [], []
        for _ in range(args.repeats):
            sync()
            c0, w0 = time.process_time(), time.perf_counter()
            with SyncCounter(engine) as counter:
                for _ in range(args.steps):
                    engine.train_step(batch)
                sync()
            cpu.append((time.process_time() - c0) / args.steps)
            wall.append((time.perf_counter() - w0) / args.steps)
            syncs.append(None if counter.count is None else counter.count / args.steps)
            own.append(None if counter.own is None else counter.own / args.steps)
        score_wall = []
        for _ in range(args.repeats):
            sync()
            w0 = time.perf_counter()
            for _ in range(args.steps):
                engine.score(batch)
            sync()
            score_wall.append((time.perf_counter() - w0) / args.steps)
        tokens = rows * args.seq * engine.world_size  # one step, all ranks
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.model.parameters())
        flops_per_token = 6 * n_params + 12 * model["n_layer"] * model["n_embd"] * args.seq
        tps = tokens / statistics.mean(wall)
        peak = _peak_tflops(torch.cuda.get_device_name()) if cuda else None
        res = {
            "engine": name, "world_size": engine.world_size, "threads": torch.get_num_threads(),
            "steps_per_s": 1 / statistics.mean(wall),
            "device": torch.cuda.get_device_name() if cuda else "cpu", "model": args.model,
            "params": n_params, "seq": args.seq, "micro": args.micro, "grad_accum": args.grad_accum,
            "dtype": str(getattr(engine, "dtype", "n/a")), "cpu_s_per_step": cpu, "wall_s_per_step": wall,
            "host_syncs_per_step": syncs[-1], "engine_host_copies_per_step": own[-1], "tokens_per_s": tps,
            "score_to_train_per_sample": statistics.mean(score_wall) / statistics.mean(wall),
            "mfu": tps * flops_per_token / (peak * 1e12) if peak else None,
        }
        results.append(res)
        rank = engine.rank
        n_syncs = "n/a" if syncs[-1] is None else f"{syncs[-1]:g}"
        if cuda:
            n_syncs += f" (engine's own copies {'n/a' if own[-1] is None else f'{own[-1]:g}'})"
        mfu = "n/a" if res["mfu"] is None else f"{100 * res['mfu']:.1f}%"
        ratio = res["score_to_train_per_sample"]
        if rank == 0:
            print(f"{name:10} ranks {engine.world_size} cpu s/step {_spread(cpu)}  "
                  f"wall s/step {_spread(wall)}  "
                  f"steps/s {res['steps_per_s']:.3f}  host syncs/step {n_syncs:>4}  tokens/s {tps:9.0f}  "
                  f"score/train per sample {ratio:.2f}  MFU {mfu}", flush=True)
        del engine
        if name != "local":
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
                os.environ.pop("MASTER_PORT", None)  # the next engine's one-rank group takes a fresh port
    if args.json and rank == 0:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", default="local,deepspeed,fsdp")
    parser.add_argument("--modes", default="none,cycle,ledger,online")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default="runs/bench_train")
    parser.add_argument("--data", default=None,
                        help="shards to train on (default: the demo shards, built once in runs/demo)")
    parser.add_argument("--step-bench", action="store_true", help="time train_step/score alone (see above)")
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mixed-precision", default="auto")
    parser.add_argument("--json", default=None, help="also write the step-bench results here")
    for flag, what in (("--layers", "n_layer"), ("--width", "n_embd"), ("--heads", "n_head"),
                       ("--vocab", "vocab_size")):
        parser.add_argument(flag, type=int, default=None,
                            help=f"step-bench: the model's {what} (default: --model's)")
    parser.add_argument("--deepspeed-config", default=str(REPO / "configs" / "deepspeed_zero3.json"),
                        help="step-bench: the DeepSpeed config (e.g. configs/deepspeed_zero2.json)")
    args = parser.parse_args()
    sys.path.append(str(REPO))  # after PYTHONPATH: --step-bench can time another checkout
    if args.step_bench:
        if len({"deepspeed", "fsdp"} & set(args.engines.split(","))) > 1:
            parser.error("--step-bench: run deepspeed and fsdp in separate processes (a group each)")
        step_bench(args)
        return
    if args.data:
        shards = Path(args.data).resolve()
    else:
        from attent_scale.demo import ensure_demo_shards

        shards = ensure_demo_shards(REPO / "runs" / "demo" / "shards", progress=False)
    out = Path(args.out).resolve()  # the runs start in REPO: a relative --out is this directory's
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
