"""`attent-scale reference fit`: a reference model that never saw the samples it scores, and its cost.

From scratch (K-fold cross-fitting, `reference.folds` K = 2): the split's ids fall into K folds by a
counter-based hash of (reference.seed, id // reference.group) (teacher/folds.py); fold k's model trains
through the normal trainer on every id outside fold k (`data.holdout`), briefly (`reference.epochs`, its
LR decayed over them, `reference.model` a smaller model) and early-stopped on val, then scores fold k's ids
and the whole val split (`attent-scale score --folds`). The K fold files are merged into one scores file
the teacher reads (`teacher.reference`): the loss of id i is that of the model that did not train on it,
and `val_hist` holds each fold model's val-loss histogram, the distribution the `learn` strategy compares
against. Fine-tuning (`reference.adapter`): one LoRA adapter on the base (`model.init_from`), trained on
the held-out `ref` split (`shards build --ref-input/--ref-fraction`; the learner never trains on it),
scores the train and val splits; learner and reference share the frozen base.

Every fold's training and scoring runs as its own process (under `--nproc` ranks: the same scores as one
rank, `score`'s batches do not depend on the world size). Beside the scores, FILE.cost.json records the
seconds spent (each fold's training loop and evaluations, each scoring pass), which `bench` charges.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from attent_scale import launcher
from attent_scale.config import RunConfig, add_override_argument, load_config
from attent_scale.errors import UserError

SCORES_NAME = "scores-train.safetensors"
LOG_TAIL = 15  # lines of a failed child's log in the error


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("reference", help="a reference model that never saw the samples it scores")
    sub = p.add_subparsers(dest="reference_command", required=True)
    f = sub.add_parser("fit", help="cross-fit (or, fine-tuning, adapt) a reference and score the train split")
    f.add_argument("--config", required=True, help="the learner's run config (data, model, reference.*)")
    f.add_argument("--data", default=None, help="manifest directory (default: the config's data.dir)")
    f.add_argument("--out", default=None, help="output directory (default: reference.out, run_dir/reference)")
    f.add_argument("--nproc", type=int, default=1, help="ranks per fold run and scoring pass (torchrun)")
    f.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: every child runs on one thread (as `bench --clock cpu`), so the CPU seconds "
                        "charged compare with a CPU-clock bench")
    f.add_argument("--reuse", action="store_true",
                   help="keep a fold run already trained with the very same command")
    add_override_argument(f, "override applied to the fold runs and scoring (repeatable)")
    f.set_defaults(func=_run_cli)


def fold_sets(cfg: RunConfig, k: int) -> list[str]:
    """The `--set`s of fold k's training run: plain training (no teacher) on the ids outside fold k, the
    reference's model keys, LR and early stopping; nothing checkpointed or resumed, the weights exported."""
    r = cfg.reference
    sets = ["teacher.mode=none", "teacher.strategy=hard", "teacher.score=loss", "checkpoint.resume=false",
            "checkpoint.every_steps=0", "checkpoint.every_minutes=0", "checkpoint.export=true",
            "train.max_epochs=0", "train.max_seconds=0", f"eval.early_stop_patience={r.early_stop_patience}",
            f"eval.every_steps={r.eval_every_steps or cfg.eval.every_steps}"]
    if r.adapter:
        sets += ["model.lora.enabled=true", "model.lora.export_merged=true"]
    else:
        sets += [f"data.holdout.folds={r.folds}", f"data.holdout.fold={k}", f"data.holdout.seed={r.seed}",
                 f"data.holdout.group={r.group}", "data.holdout.train_on=rest"]
    if r.lr:
        sets.append(f"train.lr={r.lr}")
    for key, value in r.model.items():
        sets.append(f"model.config.{key}={json.dumps(value)}")
    return sets


def fold_steps(cfg: RunConfig, ids: int, world: int) -> int:
    """Optimizer steps of `reference.epochs` epochs over `ids` training ids on `world` ranks."""
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world
    return max(1, math.ceil(cfg.reference.epochs * ids / per_step))


def run_child(cmd: list[str], log: Path, what: str, env: dict[str, str]) -> float:
    """Run one child process (a fold's training or scoring), its output to `log`; returns its CPU seconds
    (this process's children, user + system). A failure is one error naming the log, with its tail."""
    before = os.times()
    with log.open("w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait()
        finally:  # interrupted (Ctrl-C, a test's timeout): the child (torchrun: its ranks) goes too
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    after = os.times()
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL:])
        raise UserError(f"reference fit: {what} exited with {code} (log: {log}):\n{tail}")
    return (after.children_user - before.children_user) + (after.children_system - before.children_system)


def merge_folds(out: Path, fold_files: list[Path], manifest: Any, split: str, cfg: RunConfig) -> int:
    """One scores file from the fold files: the loss of id i from fold_of(i)'s file (read in chunks: no
    N-sized array), `val_hist` the fold models' val histograms in fold order, metadata naming the folds,
    their seed and group and every fold model; returns the count of non-finite losses."""
    from attent_scale.score import write_scores_parts
    from attent_scale.teacher.reference import VAL_HIST_KEY, Reference, read_metadata, scores_metadata

    r = cfg.reference
    n = manifest.num_samples(split)
    refs = [Reference(f, manifest, split) for f in fold_files]
    hists = []
    for f, ref in zip(fold_files, refs, strict=True):
        h = ref.val_hist()
        if h is None:
            raise UserError(f"{f}: no val histogram (scored without --val-hist)")
        hists.append(h[0])
    shas = [str((read_metadata(f) or {}).get("model_sha256", "")) for f in fold_files]
    meta = scores_metadata(manifest, split, hashlib.sha256(",".join(shas).encode()).hexdigest())
    if r.adapter:
        meta.update(kind="adapter", model_sha256s=",".join(shas))
    else:
        meta.update(kind="cross-fit", folds=str(r.folds), fold_seed=str(r.seed), fold_group=str(r.group),
                    model_sha256s=",".join(shas))
    meta["val_hist"] = "1"

    def parts() -> Iterator[np.ndarray]:
        from attent_scale.teacher.folds import fold_of

        step = 1 << 20
        for a in range(0, n, step):
            ids = np.arange(a, min(n, a + step), dtype=np.int64)
            if r.adapter:
                yield refs[0].losses(ids)
                continue
            fold = fold_of(ids, r.folds, r.seed, r.group)
            loss = np.empty(ids.shape[0], dtype=np.float32)
            for k, ref in enumerate(refs):
                mine = fold == k
                if mine.any():
                    loss[mine] = ref.losses(ids[mine])
            yield loss

    return write_scores_parts(out, n, parts(), meta, {VAL_HIST_KEY: np.stack(hists)})


def fit(args: argparse.Namespace) -> dict[str, Any]:
    """Train the fold models (or the adapter), score, merge, write the cost; returns the cost record."""
    from attent_scale.data import Manifest, remote
    from attent_scale.runlog import read_jsonl

    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: must be at least 1")
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.dir={args.data}")
    cfg = load_config(args.config, overrides)
    r = cfg.reference
    if not cfg.data.dir:
        raise UserError("reference fit: no data (give --data or data.dir; a blend of data.sources is not "
                        "supported)")
    if r.adapter and not (cfg.model.init_from or cfg.model.pretrained):
        raise UserError("config key 'reference.adapter': true needs model.init_from (the base the adapter "
                        "trains on)")
    remote.configure(remote.from_config(cfg.data))
    manifest = Manifest.load(cfg.data.dir)
    split = cfg.data.train_split
    if r.adapter and "ref" not in manifest.splits:
        raise UserError(f"data.dir {cfg.data.dir}: no `ref` split for the reference adapter (build the "
                        "shards with --ref-input FILE or --ref-fraction F: the learner never trains on it)")
    out = Path(args.out or r.out or Path(cfg.run_dir) / "reference")
    out.mkdir(parents=True, exist_ok=True)
    n = manifest.num_samples(split)
    folds = 1 if r.adapter else r.folds
    config_args = ["--config", str(args.config)] + [a for s in overrides for a in ("--set", s)]
    cost: dict[str, Any] = {"kind": "adapter" if r.adapter else "cross-fit", "folds": [],
                            "world_size": args.nproc, "train_seconds": 0.0, "train_cpu_seconds": 0.0,
                            "score_seconds": 0.0, "score_cpu_seconds": 0.0, "process_cpu_seconds": 0.0}
    from attent_scale.bench import CPU_CLOCK_THREADS, THREAD_ENV

    env = dict(os.environ)
    if args.clock == "cpu":  # multi-threaded phases would count their CPU time once per thread
        env.update({name: str(CPU_CLOCK_THREADS) for name in THREAD_ENV})
    cost["clock"] = args.clock
    t0 = time.perf_counter()
    fold_files = []
    for k in range(folds):
        run_dir = out / (f"fold-{k}" if not r.adapter else "adapter")
        if r.adapter:
            ids = manifest.num_samples("ref")
            data_sets = ["data.train_split=ref"]
        else:
            from attent_scale.teacher.folds import fold_selection

            ids = fold_selection(n, r.folds, k, r.seed, train_on="rest", group=r.group).count
            data_sets = []
        if ids < cfg.train.micro_batch_size * cfg.train.grad_accum_steps * args.nproc:
            raise UserError(f"reference fit: fold {k} trains on {ids} ids, too few for {args.nproc} "
                            f"rank(s) x batch {cfg.train.micro_batch_size * cfg.train.grad_accum_steps}")
        steps = fold_steps(cfg, ids, args.nproc)
        sets = [f"run_dir={run_dir}", *data_sets, *fold_sets(cfg, k), f"train.max_steps={steps}"]
        train_cmd = [*launcher.command(nproc=args.nproc), *config_args]
        for s in sets:
            train_cmd += ["--set", s]
        stamp = run_dir / "reference-command.json"
        reuse = (args.reuse and (run_dir / "summary.json").exists() and stamp.exists()
                 and json.loads(stamp.read_text()) == train_cmd[1:])
        run_dir.mkdir(parents=True, exist_ok=True)
        cpu = 0.0
        if not reuse:
            print(f"reference fit: fold {k} of {folds}: training on {ids} ids, at most {steps} steps",
                  file=sys.stderr, flush=True)
            cpu += run_child(train_cmd, run_dir / "train.log", f"fold {k}'s training", env)
            stamp.write_text(json.dumps(train_cmd[1:]))
        summary = json.loads((run_dir / "summary.json").read_text())
        evals = read_jsonl(run_dir / "eval.jsonl") if (run_dir / "eval.jsonl").exists() else []
        fold_file = run_dir / SCORES_NAME
        score_cmd = [*launcher.command(("-m", "attent_scale", "score"), args.nproc), "--model",
                     str(run_dir / "export"), "--data", cfg.data.dir, "--split", split, "--out",
                     str(fold_file), "--batch-size", str(cfg.eval.batch_size), "--val-hist", *config_args]
        if not r.adapter:
            score_cmd += ["--folds", str(r.folds), "--fold", str(k), "--fold-seed", str(r.seed),
                          "--fold-group", str(r.group)]
        cpu += run_child(score_cmd, run_dir / "score.log", f"fold {k}'s scoring", env)
        scored = json.loads(Path(f"{fold_file}.cost.json").read_text())
        vals = [e["val_loss"] for e in evals]
        row = {"fold": k, "ids": ids, "planned_steps": steps, "steps": summary["steps"],
               "stopped_early": summary["steps"] < steps, "best_val_loss": min(vals) if vals else None,
               "final_val_loss": summary.get("final_val_loss"), "reused": reuse,
               "threads": summary.get("torch_threads"),
               # the early stopping's evaluations are part of the reference's cost
               "train_seconds": summary["train_seconds"] + summary.get("eval_seconds", 0.0),
               "train_cpu_seconds": summary["train_cpu_seconds"] + summary.get("eval_cpu_seconds", 0.0),
               "score_seconds": scored["score_seconds"], "score_cpu_seconds": scored["score_cpu_seconds"]}
        cost["folds"].append(row)
        for key in ("train_seconds", "train_cpu_seconds", "score_seconds", "score_cpu_seconds"):
            cost[key] += row[key]
        cost["process_cpu_seconds"] += cpu
        fold_files.append(fold_file)
    scores = out / SCORES_NAME
    bad = merge_folds(scores, fold_files, manifest, split, cfg)
    if bad:
        print(f"reference fit: warning: {bad} non-finite loss(es) in {scores}", file=sys.stderr)
    cost["wall_seconds"] = time.perf_counter() - t0
    cost["scores"] = str(scores)
    Path(f"{scores}.cost.json").write_text(json.dumps(cost, indent=1) + "\n")
    spent = cost["train_seconds"] + cost["score_seconds"]
    spent_cpu = cost["train_cpu_seconds"] + cost["score_cpu_seconds"]
    print(f"reference fit: wrote {scores} ({n} samples of split {split!r}, {folds} model(s)); cost "
          f"{spent:.1f} s ({spent_cpu:.1f} CPU s), in {scores}.cost.json")
    return cost


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _run_cli(args: argparse.Namespace) -> int:
    # SIGTERM (a scheduler, a timeout) stops the child running now within seconds (run_child's finally)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        fit(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
