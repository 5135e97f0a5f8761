"""The training loop, top to bottom: the teacher plans each epoch, the stream feeds the engine."""

from __future__ import annotations

import argparse
import itertools
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from attent_scale.config import RunConfig, add_override_argument, dump_config, load_config
from attent_scale.errors import UserError

PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: checkpoint written after SIGTERM/SIGUSR1; the Slurm script requeues
PREEMPTED_MARKER = "PREEMPTED"  # written to run_dir beside that checkpoint; removed when the run goes on
LOG_FILES = ("metrics.jsonl", "eval.jsonl", "selection.jsonl")
PHASES = ("score", "collective", "select", "share", "rebalance")


class NonFiniteLossError(UserError):
    """Too many non-finite training losses in a row."""

    exit_code = 1


class StopSignal:
    """Signal handlers only set a flag; ranks agree on it at the next step boundary."""

    def __init__(self) -> None:
        self.received: str | None = None
        # Tests and drills: behave exactly as if a signal arrived during this step.
        self.stop_after_step = int(os.environ.get("ATTENT_STOP_AFTER_STEP", "-1"))
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signal.Signals(signum).name


@dataclass
class Progress:
    """Everything the loop counts; saved in checkpoints so a resumed run continues the same totals."""

    step: int = 0
    epoch: int = 0
    samples_trained: int = 0  # this rank
    tokens_trained: int = 0  # this rank
    nonfinite_skipped: int = 0
    nonfinite_in_row: int = 0
    online_dropped_batches: int = 0  # online mode: short last candidate batches skipped (equal on all ranks)
    corrupt_samples: int = 0  # replaced by filler samples (stream faults): encounters
    corrupt_ids: list[int] = field(default_factory=list)  # distinct ids of those samples this rank met
    dropped_samples: int = 0  # dropped by rank equalisation (< world size per epoch)
    train_seconds: float = 0.0  # loop time excluding eval and checkpoints (selection included)
    train_cpu_seconds: float = 0.0  # the same span in this process's CPU time: robust to a shared machine
    eval_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    wall_offset: float = 0.0  # wall seconds of earlier attempts (resume)
    last_train_loss: float = float("nan")
    last_val_loss: float = float("nan")
    selected_ratio: float = 1.0  # fraction of the data the current epoch trains on
    selection_bits: Any = None  # current epoch's selection: packed bits, ceil(N/8) uint8 (None = full data)
    weight_bits: Any = None  # packed ids of the selection that carry loss weight `weight` (pruning)
    weight: float = 1.0
    stream_state: dict[str, Any] | None = None
    log_lines: dict[str, int] = field(default_factory=dict)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train with (or without) the AtteNT teacher")
    parser.add_argument("--config", required=True, help="run config YAML (see configs/)")
    add_override_argument(parser)
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="resume from the latest checkpoint in run_dir (default: checkpoint.resume)",
    )
    # the deepspeed launcher appends --local_rank=N to every worker's argv; LOCAL_RANK says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.resume is not None:
        cfg.checkpoint.resume = args.resume
    return train(cfg)


def planned_steps(teacher: Any, n_train: int, world: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps that `epochs` epochs take under the teacher's plan (subset sizes from the ratio)."""
    candidates = teacher.candidate_batch_size(batch_size)
    total = 0
    for epoch in range(epochs):
        n = teacher.planned_count(teacher.plan_epoch(epoch), n_train)
        per_rank = n // world
        # online mode drops a last partial candidate batch; other modes train it
        total += per_rank // candidates if teacher.mode == "online" else math.ceil(per_rank / candidates)
    return max(1, total)


def _all_reduce_max(value: float, group: Any) -> float:
    """Max over the ranks of `group`; any backend (a CUDA tensor on NCCL), any world size (1 included)."""
    from attent_scale.dist import collective_device

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) <= 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def train(cfg: RunConfig) -> int:
    """Run one training job (any engine, any teacher mode); returns the process exit code."""
    # Heavy imports here so `attent-scale --help` stays fast.
    from attent_scale import checkpoint as ckpt
    from attent_scale.data import Manifest, ShardStream
    from attent_scale.dist import init_distributed
    from attent_scale.engines import build_engine
    from attent_scale.metrics import Metrics
    from attent_scale.models import check_model_fits
    from attent_scale.runlock import lock_run_dir
    from attent_scale.runlog import JsonLines, count_lines, truncate_lines, write_json
    from attent_scale.teacher import Selection, Teacher
    from attent_scale.teacher.reference import open_reference

    wall_start = time.perf_counter()
    if os.environ.get("ATTENT_NUM_THREADS"):  # bench --clock cpu pins each arm to this many threads
        torch.set_num_threads(int(os.environ["ATTENT_NUM_THREADS"]))
    info = init_distributed()
    rank, world = info.rank, info.world_size
    is_main = rank == 0
    if not cfg.data.dir:
        raise UserError(
            "config key 'data.dir': required (a directory written by `attent-scale shards build`)"
        )
    manifest = Manifest.load(cfg.data.dir)
    batch_size = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    train_split = cfg.data.train_split
    n_train = manifest.num_samples(train_split)
    if n_train < world * batch_size:
        raise UserError(
            f"data.dir {cfg.data.dir}: {n_train} training samples is too few for "
            f"{world} ranks x batch {batch_size}"
        )
    if cfg.engine.name == "local" and world > 1:
        raise UserError(f"engine.name 'local' is one process, but this job has {world} ranks; "
                        "use engine.name=deepspeed or fsdp under torchrun")
    run_dir = Path(cfg.run_dir)
    lock_run_dir(run_dir, rank)  # one job per run_dir; released at exit
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")

    # Teacher and loop bookkeeping talk over CPU tensors: on NCCL jobs they get a gloo group of their own.
    group = dist.new_group(backend="gloo") if info.backend == "nccl" else None
    teacher = Teacher(
        cfg.teacher,
        num_samples=n_train,
        seed=cfg.seed,
        record_path=run_dir / "selection.jsonl" if is_main else None,
        group=group,
        reference=open_reference(cfg.teacher, manifest, train_split),
    )
    anneal = teacher.anneal_epoch(cfg.train.max_epochs)
    if anneal is not None:  # the budget's last epochs train all data: the plan (and the LR) knows it
        teacher.start_anneal(anneal)
    if cfg.train.max_epochs:  # an epoch budget: the LR schedule decays over the steps those epochs take
        cfg.train.max_steps = min(
            cfg.train.max_steps, planned_steps(teacher, n_train, world, batch_size, cfg.train.max_epochs)
        )
    check_model_fits(cfg.model, int(manifest.vocab_size), manifest.seq_len)
    engine = build_engine(cfg, manifest)
    progress = Progress()

    resume_from = ckpt.latest_checkpoint(run_dir) if cfg.checkpoint.resume else None
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, engine, rank=rank, world_size=world)
        teacher.load_state_dict(state["teacher"])
        ckpt.set_rng_state(state["rng"])
        progress = Progress(**state["progress"])
        if is_main:
            print(_resume_line(resume_from, progress, n_train, world), file=sys.stderr)
            for name in LOG_FILES:
                truncate_lines(run_dir / name, progress.log_lines.get(name, 0))
    elif is_main:
        for name in LOG_FILES:
            (run_dir / name).unlink(missing_ok=True)
    if is_main:
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
    # the teacher appends selection records itself; open our own files after truncation
    metrics_log = JsonLines(run_dir / "metrics.jsonl", is_main)
    eval_log = JsonLines(run_dir / "eval.jsonl", is_main)

    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    metrics = Metrics.create(cfg.metrics, rank=rank, local_rank=info.local_rank, node=node)
    stop = StopSignal()

    def totals() -> dict[str, Any]:
        stats = teacher.stats
        by_phase = {p: float(stats[f"seconds_{p}"]) for p in PHASES}
        selection_seconds = sum(by_phase.values())
        wall = progress.wall_offset + time.perf_counter() - wall_start
        return {
            "steps": progress.step,
            "samples_trained": progress.samples_trained,
            "tokens_trained": progress.tokens_trained,
            "samples_scored": int(stats.get("samples_scored", 0)),
            "selection_seconds": selection_seconds,
            "selection_seconds_by_phase": by_phase,
            "selection_fraction": selection_seconds / wall if wall > 0 else 0.0,
            "collective_bytes": int(stats["bytes_sent"]),
            "nonfinite_losses": int(stats["nonfinite"]),
            "nonfinite_skipped": progress.nonfinite_skipped,
            "corrupt_samples": progress.corrupt_samples,
            "corrupt_ids": len(progress.corrupt_ids),
            "dropped_samples": progress.dropped_samples,
            "train_seconds": progress.train_seconds,
            "train_cpu_seconds": progress.train_cpu_seconds,
            "eval_seconds": progress.eval_seconds,
            "checkpoint_seconds": progress.checkpoint_seconds,
            "wall_seconds": wall,
            "selected_ratio": progress.selected_ratio,
            "staleness_median": float(stats["last_staleness_median"] or 0),
            "train_loss": progress.last_train_loss,
            "val_loss": progress.last_val_loss,
        }

    val_cache: list[Any] = []

    def evaluate() -> float:
        t0 = time.perf_counter()
        loss = engine.evaluate(_val_batches(manifest.dir, cfg, rank, world, val_cache))
        progress.eval_seconds += time.perf_counter() - t0
        progress.last_val_loss = loss
        eval_log.write(
            {
                "step": progress.step,
                "val_loss": loss,
                "perplexity": math.exp(loss) if loss < 50 else float("inf"),
                "samples_trained": progress.samples_trained * world,
                "train_seconds": progress.train_seconds,
                "train_cpu_seconds": progress.train_cpu_seconds,
                "wall_seconds": progress.wall_offset + time.perf_counter() - wall_start,
            }
        )
        metrics.observe_eval(loss)
        return loss

    def save(stream: Any) -> None:
        t0 = time.perf_counter()
        progress.log_lines = {name: ckpt_count(name) for name in LOG_FILES}
        # the stream position goes into the checkpoint only: left in `progress`, it would make the next
        # epoch replay this one's stream instead of asking the teacher
        state = {
            "progress": {**_progress_state(progress, wall_start),
                         "stream_state": stream.state_dict() if stream is not None else None},
            "teacher": teacher.state_dict(),
            "rng": ckpt.rng_state(),
        }
        ckpt.save_checkpoint(
            run_dir,
            progress.step,
            engine,
            state,
            rank=rank,
            world_size=world,
            keep_last=cfg.checkpoint.keep_last,
        )
        seconds = time.perf_counter() - t0
        progress.checkpoint_seconds += seconds
        metrics.observe_checkpoint(seconds)

    def note_corrupt(stream: Any) -> None:
        """Keep corrupt samples out of every later selection and count the distinct ones."""
        bad = stream.take_bad_ids()
        if not bad:
            return
        teacher.exclude(bad, progress.step)
        new = sorted(set(bad).difference(progress.corrupt_ids))
        if new:
            progress.corrupt_ids = sorted(set(progress.corrupt_ids).union(new))
            print(f"attent-scale: rank {rank}: {len(new)} corrupt sample(s) excluded from selection "
                  f"(ids {', '.join(map(str, new[:8]))}{' ...' if len(new) > 8 else ''}); "
                  f"{len(progress.corrupt_ids)} distinct so far", file=sys.stderr)

    def ckpt_count(name: str) -> int:
        return count_lines(run_dir / name) if is_main else 0

    if resume_from is None and cfg.eval.every_steps:
        evaluate()  # the step-0 point of every val-loss curve
    bar = _progress_bar(cfg, progress.step) if is_main else None

    def train_stream(epoch: int, batch: int, selection: Any = None) -> Any:
        return ShardStream(manifest.dir, train_split, rank=rank, world_size=world, seed=cfg.seed, epoch=epoch,
                           batch_size=batch, selection=selection, shuffle_buffer=cfg.data.shuffle_buffer,
                           num_workers=cfg.data.num_workers)

    exit_code = 0
    empty_epochs = 0
    failed = False
    try:
        while progress.step < cfg.train.max_steps:
            loop_t0 = _clock()
            epoch = progress.epoch
            if progress.stream_state is None:  # a fresh epoch: the teacher decides what it trains on
                before = totals()["selection_seconds_by_phase"]
                plan = teacher.plan_epoch(epoch)
                if plan.score:
                    fresh = progress.selection_bits if cfg.teacher.rescore == "stale" else None
                    # this rank's part only; with rescore=stale, without what the last subset epoch trained
                    skip = None if fresh is None else Selection(fresh, n_train).complement()
                    scoring = train_stream(epoch, cfg.eval.batch_size, skip)
                    teacher.score_pass(scoring, engine.score, progress.step)
                    note_corrupt(scoring)
                    progress.corrupt_samples += scoring.faults
                selection = teacher.select(epoch, progress.step) if plan.subset else None
                progress.selection_bits = None if selection is None else selection.bits
                progress.weight_bits = None if selection is None else selection.upweight
                progress.weight = 1.0 if selection is None else selection.weight
                if selection is not None:
                    progress.selected_ratio = selection.count / n_train
                else:
                    progress.selected_ratio = cfg.teacher.online_ratio if teacher.mode == "online" else 1.0
                after = totals()["selection_seconds_by_phase"]
                if after != before:
                    metrics.observe_selection({p: after[p] - before[p] for p in PHASES})
            bits = progress.selection_bits
            selection = None if bits is None else Selection(bits, n_train, upweight=progress.weight_bits,
                                                            weight=progress.weight)
            stream = train_stream(epoch, teacher.candidate_batch_size(batch_size), selection)
            if progress.stream_state is not None:
                stream.load_state_dict(progress.stream_state)
                progress.stream_state = None
            else:
                progress.dropped_samples += stream.dropped
            _charge(progress, loop_t0)

            trained_this_epoch = 0
            cut = False  # a steps/seconds budget's anneal point ends a subset epoch early
            for batch in _timed(stream, progress):
                step_t0 = _clock()
                if teacher.mode == "online":
                    if len(batch["ids"]) < teacher.candidate_batch_size(batch_size):
                        progress.online_dropped_batches += 1  # same on every rank: equal counts
                        continue
                    t_score = time.perf_counter()
                    scores = engine.score(batch)
                    # the candidates' scoring forward is selection cost: book it in the teacher's score phase
                    teacher.stats["seconds_score"] += time.perf_counter() - t_score
                    batch = teacher.online_pick(batch, scores, batch_size, progress.step)
                result = engine.train_step(batch)
                real = batch["ids"] >= 0
                teacher.observe(batch["ids"][real], result.per_sample[real], progress.step)
                note_corrupt(stream)
                progress.step += 1
                teacher.exchange_due(progress.step)  # collective every few steps: ledger entries to owners
                trained_this_epoch += 1
                n_samples = int(real.sum())
                progress.samples_trained += n_samples
                progress.tokens_trained += int((batch["labels"] != -100).sum())
                if result.skipped:
                    progress.nonfinite_skipped += 1
                    progress.nonfinite_in_row += 1
                else:
                    progress.nonfinite_in_row = 0
                    progress.last_train_loss = result.loss
                step_seconds = _charge(progress, step_t0)
                tokens_per_s = int((batch["labels"] != -100).sum()) * world / max(step_seconds, 1e-9)

                tot = totals()
                if progress.step % cfg.train.log_every == 0 or progress.step == cfg.train.max_steps:
                    metrics_log.write(
                        {
                            "step": progress.step,
                            "epoch": epoch,
                            "loss": result.loss,
                            "lr": result.lr,
                            "grad_norm": result.grad_norm,
                            "tokens_per_second": tokens_per_s,
                            "samples_trained": progress.samples_trained * world,
                            "samples_scored": tot["samples_scored"],
                            "selection_seconds": tot["selection_seconds"],
                            "selected_ratio": tot["selected_ratio"],
                            "train_seconds": progress.train_seconds,
                            "wall_seconds": tot["wall_seconds"],
                        }
                    )
                metrics.observe_step(step_seconds, result.loss, tokens_per_s)
                metrics.update(tot)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{result.loss:.3f}", epoch=epoch)

                if progress.nonfinite_in_row >= cfg.train.max_nonfinite_in_row:
                    save(stream)
                    raise NonFiniteLossError(
                        f"{progress.nonfinite_in_row} non-finite training losses in a row at step "
                        f"{progress.step}; "
                        f"checkpoint written to {ckpt.checkpoint_root(run_dir)} (lower train.lr?)"
                    )
                if teacher.anneal_from is None and _anneal_due(cfg, progress, group):
                    teacher.start_anneal(epoch + 1)
                    cut = progress.selection_bits is not None
                if cfg.eval.every_steps and progress.step % cfg.eval.every_steps == 0:
                    evaluate()
                if progress.step == stop.stop_after_step:
                    stop.received = "ATTENT_STOP_AFTER_STEP"
                out_of_time = bool(cfg.train.max_seconds) and progress.train_seconds >= cfg.train.max_seconds
                # one collective every stop_check_every steps: any rank's signal or clock stops every rank
                # at the same boundary
                stop_code = 0.0
                if progress.step % cfg.train.stop_check_every == 0:
                    mine = 2.0 if stop.received else (1.0 if out_of_time else 0.0)
                    stop_code = _all_reduce_max(mine, group)
                stop_now = stop_code >= 2
                due = cfg.checkpoint.every_steps and progress.step % cfg.checkpoint.every_steps == 0
                if stop_now or (due and progress.step < cfg.train.max_steps):
                    if cut:  # saved as the end of this epoch, so a resume starts the anneal like we do
                        progress.epoch += 1
                        save(None)
                        progress.epoch -= 1
                    else:
                        save(stream)
                if stop_now:
                    if is_main:
                        # torchrun turns a worker's exit code into its own 1: the marker file is what a
                        # launcher script checks to tell "preempted, requeue me" from a failure
                        marker = {"step": progress.step, "signal": stop.received}
                        write_json(run_dir / PREEMPTED_MARKER, marker)
                        print(
                            f"attent-scale: {stop.received or 'stop signal'}: checkpoint at step "
                            f"{progress.step} written, exiting with {PREEMPT_EXIT_CODE} for requeue",
                            file=sys.stderr,
                        )
                    exit_code = PREEMPT_EXIT_CODE
                    return exit_code
                if progress.step >= cfg.train.max_steps or stop_code >= 1:
                    cut = False
                    break
                if cut:
                    break
            else:
                # the epoch ran out: next epoch
                progress.corrupt_samples += stream.faults
                progress.epoch += 1
                if cfg.train.max_epochs and progress.epoch >= cfg.train.max_epochs:
                    break
                empty_epochs = 0 if trained_this_epoch else empty_epochs + 1
                if empty_epochs >= 3:
                    raise UserError(
                        f"data.dir {cfg.data.dir}: three epochs in a row yielded no training batch "
                        f"(selection too small for {world} ranks x batch {batch_size}?)"
                    )
                continue
            progress.corrupt_samples += stream.faults
            if cut:
                progress.epoch += 1
                continue
            break

        if not cfg.eval.every_steps or progress.step % cfg.eval.every_steps != 0:
            evaluate()
        if cfg.checkpoint.every_steps:
            save(None)
        if cfg.checkpoint.export:
            engine.export(run_dir / "export")  # collective: sharded engines gather the weights
        summary = _summary(cfg, totals(), progress, teacher, group, world)
        if is_main:
            write_json(run_dir / "summary.json", summary)
        metrics.update(totals())
        return exit_code
    except BaseException:
        # a rank that raised must not enter a collective: its peers wait in another one and the job
        # would hang silently; exiting lets torchrun see the failure and stop the others
        failed = True
        raise
    finally:
        if bar is not None:
            bar.close()
        metrics_log.close()
        eval_log.close()
        metrics.close()
        if not failed and dist.is_available() and dist.is_initialized():
            if exit_code == 0:
                dist.barrier()
            dist.destroy_process_group()


def _anneal_due(cfg: RunConfig, progress: Progress, group: Any) -> bool:
    """Steps or seconds budgets: has the last `teacher.anneal_fraction` of the budget begun? (Epoch budgets
    anneal by plan.) The seconds clock differs per rank, so ranks agree on it with one all-reduce."""
    a = cfg.teacher.anneal_fraction
    if not a or cfg.train.max_epochs or cfg.teacher.mode not in ("cycle", "ledger"):
        return False
    if cfg.train.max_seconds:
        return _all_reduce_max(float(progress.train_seconds >= (1 - a) * cfg.train.max_seconds), group) >= 1
    return progress.step >= (1 - a) * cfg.train.max_steps


def _val_batches(data_dir: Any, cfg: RunConfig, rank: int, world: int, cache: list[Any]) -> Any:
    """This rank's val batches, read by a DataLoader worker (not on the training thread); a bounded
    val set (eval.max_batches) is read once and kept in memory for every later evaluation."""
    from attent_scale.data import ShardStream

    if cache:
        return cache
    val = ShardStream(data_dir, "val", rank=rank, world_size=world, seed=cfg.seed, epoch=0,
                      batch_size=cfg.eval.batch_size, num_workers=1)
    if not cfg.eval.max_batches:
        return val
    cache.extend(itertools.islice(val, cfg.eval.max_batches))
    return cache


def _resume_line(path: Path, progress: Progress, n_train: int, world: int) -> str:
    """One line saying what a resumed run continues from."""
    from attent_scale.teacher import Selection

    if progress.selection_bits is None:
        selection = f"full data (ratio {progress.selected_ratio:.3g})"
    else:
        sel = Selection(progress.selection_bits, n_train)
        selection = f"selection sha256 {sel.sha256} ({sel.count} ids, ratio {progress.selected_ratio:.3g})"
    where = "at its start"
    if progress.stream_state is not None:
        where = f"after {progress.stream_state['batches_consumed']} of its batches"
    samples = progress.samples_trained * world  # equal shares on every rank
    return (f"attent-scale: resumed from {path} (step {progress.step}, {samples} samples trained, "
            f"epoch {progress.epoch} {where}, {selection})")


def _all_union(ids: list[int], group: Any, world: int) -> set[int]:
    """The union of every rank's id list (once, at the end of a run)."""
    if not (dist.is_available() and dist.is_initialized()):
        return set(ids)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, ids, group=group)
    return set().union(*gathered)


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _charge(progress: Progress, start: tuple[float, float]) -> float:
    """Add the wall and CPU time since `start` to the training clocks; returns the wall seconds."""
    wall, cpu = _clock()
    progress.train_seconds += wall - start[0]
    progress.train_cpu_seconds += cpu - start[1]
    return wall - start[0]


def _timed(stream: Any, progress: Progress) -> Any:
    """Iterate the stream, charging the time spent waiting for data to the training clock."""
    it = iter(stream)
    while True:
        t0 = _clock()
        try:
            batch = next(it)
        except StopIteration:
            return
        _charge(progress, t0)
        yield batch


def _progress_state(progress: Progress, wall_start: float) -> dict[str, Any]:
    state = {k: v for k, v in progress.__dict__.items() if k in Progress.__dataclass_fields__}
    state["wall_offset"] = progress.wall_offset + time.perf_counter() - wall_start
    return state


def _progress_bar(cfg: RunConfig, start: int) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=cfg.train.max_steps,
        initial=start,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=not sys.stderr.isatty() and os.environ.get("ATTENT_PROGRESS") != "1",
    )


def _summary(
    cfg: RunConfig, tot: dict[str, Any], progress: Progress, teacher: Any, group: Any, world: int
) -> dict[str, Any]:
    """Run totals: global sums over ranks, plus every rank's own selection seconds."""
    per_rank = [tot["selection_seconds_by_phase"][p] for p in PHASES] + [
        tot["samples_trained"],
        tot["samples_scored"],
        tot["selection_seconds"],
    ]
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, per_rank, group=group)  # once, at the end: not a hot path
    else:
        gathered = [per_rank]
    corrupt_ids = _all_union(progress.corrupt_ids, group, world)
    from attent_scale.engines.base import all_reduce_sum

    summed = all_reduce_sum(
        [tot["samples_trained"], tot["tokens_trained"], tot["samples_scored"], tot["corrupt_samples"]],
        torch.device("cpu"),  # `group` is gloo (the default group, or our own on NCCL jobs)
        group,
    )
    return {
        "world_size": world,
        "torch_threads": torch.get_num_threads(),
        "engine": cfg.engine.name,
        "teacher_mode": cfg.teacher.mode,
        "strategy": cfg.teacher.strategy,
        "steps": progress.step,
        "epochs_started": progress.epoch + 1,
        "samples_trained": int(summed[0]),
        "tokens_trained": int(summed[1]),
        "samples_scored": int(summed[2]),
        "corrupt_samples": int(summed[3]),
        "corrupt_ids": len(corrupt_ids),  # distinct over all ranks
        "dropped_samples": tot["dropped_samples"],
        "nonfinite_skipped": progress.nonfinite_skipped,
        "nonfinite_losses": tot["nonfinite_losses"],
        "online_dropped_batches": progress.online_dropped_batches,
        "final_train_loss": progress.last_train_loss,
        "final_val_loss": progress.last_val_loss,
        "wall_seconds": tot["wall_seconds"],
        "train_seconds": tot["train_seconds"],
        "train_cpu_seconds": tot["train_cpu_seconds"],
        "eval_seconds": tot["eval_seconds"],
        "checkpoint_seconds": tot["checkpoint_seconds"],
        "selection_seconds": tot["selection_seconds"],
        "selection_seconds_by_phase": tot["selection_seconds_by_phase"],
        "selection_fraction": tot["selection_fraction"],
        "collective_bytes": tot["collective_bytes"],
        "last_selected_ratio": progress.selected_ratio,
        "per_rank": [
            {
                "rank": r,
                "selection_seconds_by_phase": dict(zip(PHASES, row[: len(PHASES)], strict=True)),
                "samples_trained": row[len(PHASES)],
                "samples_scored": row[len(PHASES) + 1],
                "selection_seconds": row[len(PHASES) + 2],
            }
            for r, row in enumerate(gathered)
        ],
    }
