"""The training step's overhead: `attent-scale train` against a hand-written PyTorch loop (prints ratios).

Usage: python tools/benchmarks/bench_step.py [--steps 200] [--seeds 0,1,2] [--batch 16] [--seq-len 64]
                                              [--modes none,ledger] [--out runs/bench_step] [--no-hand-malloc]

The same model (configs/demo.yaml's GPT, the demo tokenizer's vocabulary) and the same batches (the demo
corpus built into shards of --seq-len tokens; the hand loop reads the first --steps batches of the
stream from one in-memory tensor) on one thread. Arms, run in turn for each seed as child processes:
  hand    AdamW, grad clip, warmup + cosine LR, HF's own loss (`model(..., labels=...).loss`), the loss
          read back every log_every steps: the loop one would write by hand
  hand-malloc  the same loop after attent_scale.malloc.tune_malloc(), the glibc thresholds every
          `attent-scale train` process fixes: the yardstick for the framework's own overhead (the
          difference between the two hand arms is the allocator's share)
  none    `attent-scale train` with teacher.mode=none (eval and export off, no checkpoints)
  ledger  `attent-scale train` with the demo's default teacher (ledger, strategy signal: observes every
          step's losses and keeps the previous one)
Clock: CPU seconds (user + system) of each whole child process as the OS reports it (wait4), start-up
included, and the CPU seconds of the step loop alone (train_cpu_seconds in summary.json; the hand loop's
own process_time around its loop). Printed: each arm's median, and per seed the ratios of each mode to
each hand arm and ledger/none, as median with min-max spread. --code DIR runs the attent-scale arms
from another checkout (e.g. the commit before a change) against the same hand loop and batches. CPU
time on one thread is roughly robust to other load on the machine; a final figure should come from a
quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "demo.yaml"
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "ATTENT_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}


def ensure_shards(out: Path, seq_len: int) -> Path:
    """The demo corpus as shards of `seq_len` tokens under `out` (built once)."""
    from attent_scale.data.builder import build_shards
    from attent_scale.data.manifest import Manifest
    from attent_scale.demo import DEMO_SETTINGS
    from attent_scale.errors import UserError

    shards = out / f"shards-{seq_len}"
    try:
        if Manifest.load(shards).seq_len == seq_len:
            return shards
    except UserError:
        pass
    build_shards([], shards, overwrite=True, progress=False, **{**DEMO_SETTINGS, "seq_len": seq_len})
    return shards


def dump_batches(shards: Path, out: Path, steps: int, batch: int, seed: int) -> Path:
    """The first `steps` training batches (epoch after epoch) as one [steps, B, T] tensor file."""
    import torch

    from attent_scale.data import ShardStream

    path = out / f"batches-b{batch}-s{seed}-n{steps}.pt"
    if path.exists():
        return path
    inputs, labels, epoch = [], [], 0
    while len(inputs) < steps:
        stream = ShardStream(shards, "train", rank=0, world_size=1, seed=seed, epoch=epoch, batch_size=batch,
                             shuffle_buffer=1000, num_workers=0)
        for b in stream:
            if len(b["ids"]) == batch and len(inputs) < steps:
                inputs.append(b["input_ids"])
                labels.append(b["labels"])
        epoch += 1
    torch.save({"input_ids": torch.stack(inputs), "labels": torch.stack(labels)}, path)
    return path


def hand_loop(args: argparse.Namespace) -> None:
    """The child process of the `hand` arm: the loop one would write by hand (prints its loop CPU time)."""
    import math

    import torch
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(1)
    if args.malloc:
        sys.path.insert(0, str(REPO))
        from attent_scale.malloc import tune_malloc

        state = tune_malloc()
        if state != "fixed":
            raise SystemExit(f"hand-malloc: glibc malloc could not be tuned here ({state})")
    cfg = yaml.safe_load(CONFIG.read_text())
    t = cfg["train"]
    data = torch.load(args.hand_loop, weights_only=True)
    raw = dict(cfg["model"]["config"])
    config = AutoConfig.for_model(raw.pop("model_type"), vocab_size=args.vocab, bos_token_id=None,
                                  eos_token_id=None, use_cache=False, **raw)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t["lr"])
    warmup, steps, floor = t["warmup_steps"], args.steps, t["min_lr_ratio"]

    def lr_at(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        p = min(1.0, (s - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0 = time.process_time()
    for step in range(steps):
        input_ids = data["input_ids"][step]
        # the shards' labels are the inputs shifted by one: HF shifts inside its loss, so give it the inputs
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % t["log_every"] == 0 or step + 1 == steps:  # as the trainer logs its last step
            last = loss.item()
    print(json.dumps({"loop_cpu_seconds": time.process_time() - t0, "last_loss": last}))


def run_child(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> tuple[float, str]:
    """Run `cmd`; returns its CPU seconds (user + system, children it waited for included) and stdout."""
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        out = proc.stdout.read() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); see {log}")
    return usage.ru_utime + usage.ru_stime, out


def run_arm(arm: str, seed: int, args: argparse.Namespace, shards: Path, batches: Path, vocab: int,
            out: Path) -> dict[str, float]:
    env = {**os.environ, **THREAD_ENV}
    log = out / f"{arm}-s{seed}.log"
    if arm in ("hand", "hand-malloc"):
        cmd = [sys.executable, __file__, "--hand-loop", str(batches), "--seed", str(seed),
               "--steps", str(args.steps), "--vocab", str(vocab), *(["--malloc"] if arm != "hand" else [])]
        cpu, stdout = run_child(cmd, env, log)
        return {"process": cpu, "loop": json.loads(stdout.strip().splitlines()[-1])["loop_cpu_seconds"]}
    run_dir = out / f"{arm}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [f"run_dir={run_dir}", f"data.dir={shards}", f"seed={seed}", f"teacher.mode={arm}",
            f"train.max_steps={args.steps}", f"train.micro_batch_size={args.batch}",
            "train.grad_accum_steps=1",
            # one val pass at the end (the default teacher, strategy signal, needs periodic eval; its
            # seconds are not the loop's)
            f"eval.every_steps={args.steps}", "eval.max_batches=1", "checkpoint.export=false",
            "checkpoint.every_steps=0", "checkpoint.resume=false"]
    code = Path(args.code).resolve() if args.code else REPO
    env["PYTHONPATH"] = str(code)
    cmd = [sys.executable, "-m", "attent_scale", "train", "--config", str(CONFIG)]
    for s in sets:
        cmd += ["--set", s]
    cpu, _ = run_child(cmd, env, log, cwd=code)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"process": cpu, "loop": summary["train_cpu_seconds"]}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}x ({min(values):.3f}-{max(values):.3f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--modes", default="none,ledger", help="attent-scale arms (teacher.mode values)")
    p.add_argument("--out", default="runs/bench_step")
    p.add_argument("--code", default=None,
                   help="run the attent-scale arms from this checkout (code versions on the same batches)")
    p.add_argument("--json", default=None, help="also write every measurement to this file")
    p.add_argument("--no-hand-malloc", action="store_true", help="leave out the hand-malloc arm")
    p.add_argument("--malloc", action="store_true", help=argparse.SUPPRESS)  # hand arm: tune malloc first
    p.add_argument("--hand-loop", default=None, help=argparse.SUPPRESS)  # the hand arm's child process
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hand_loop:
        hand_loop(args)
        return 0
    sys.path.insert(0, str(REPO))
    from attent_scale.data.manifest import Manifest

    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shards = ensure_shards(out, args.seq_len)
    vocab = int(Manifest.load(shards).vocab_size)
    seeds = [int(s) for s in args.seeds.split(",")]
    hands = ["hand"] if args.no_hand_malloc else ["hand", "hand-malloc"]
    modes = [m for m in args.modes.split(",") if m]
    arms = [*hands, *modes]
    results: dict[str, list[dict[str, float]]] = {a: [] for a in arms}
    for seed in seeds:
        batches = dump_batches(shards, out, args.steps, args.batch, seed)
        for arm in arms:  # in turn, seed by seed: a ratio pairs runs close in time
            r = run_arm(arm, seed, args, shards, batches, vocab, out)
            results[arm].append(r)
            print(f"seed {seed} {arm:>11}: process {r['process']:.2f} s cpu, step loop {r['loop']:.2f} s cpu",
                  flush=True)
    print(f"\n{args.steps} steps, batch {args.batch} x {args.seq_len}, one thread, CPU seconds, "
          f"{len(seeds)} seed(s): median (min-max)")
    for arm in arms:
        for key in ("process", "loop"):
            vals = [r[key] for r in results[arm]]
            print(f"  {arm:>11} {key:>7}: {statistics.median(vals):7.2f} s ({min(vals):.2f}-{max(vals):.2f})")
    pairs = [(m, h) for h in hands for m in modes]
    if "none" in modes:
        pairs += [(m, "none") for m in modes if m != "none"]
    for key in ("process", "loop"):
        for a, b in pairs:
            ratios = [ra[key] / rb[key] for ra, rb in zip(results[a], results[b], strict=True)]
            print(f"  {key:>7} {a}/{b}: {spread(ratios)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
