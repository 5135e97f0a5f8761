"""The trainer: `Trainer` builds the parts, then runs plan → score → select → stream → step → observe."""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
from attent_scale.dist import all_gather_objects, all_reduce_values, initialized, side_group
from attent_scale.errors import UserError

PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: checkpoint written after SIGTERM/SIGUSR1; the Slurm script requeues
PREEMPTED_MARKER = "PREEMPTED"  # written to run_dir beside that checkpoint; removed when the run goes on
LOG_FILES = ("metrics.jsonl", "eval.jsonl", "selection.jsonl")
# config keys a checkpoint must agree on to be resumed (dotted prefixes)
RESUME_KEYS = ("seed", "model", "engine.name", "teacher.mode", "data.train_split")
PHASES = ("score", "collective", "select", "share", "rebalance")
# What `Trainer.check_stop` decides after a step (None: go on).
PREEMPT = "preempt"  # a stop signal on some rank: checkpoint written, exit for requeue
STOP = "stop"  # a steps or seconds budget is spent: finish the run
END_EPOCH = "end_epoch"  # the anneal point ends this subset epoch early: the next one trains all data


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
    # after a resume on another world size: the ids epoch `remainder_epoch` still owes (packed bits), trained
    # once over the new ranks instead of that epoch's selection
    remainder_bits: Any = None
    remainder_epoch: int = -1
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


def planned_steps(teacher: Any, n_train: int, world: int, batch_size: int, epochs: int,
                  first_epoch: int = 0) -> int:
    """Optimizer steps that epochs `first_epoch`..`epochs - 1` take under the teacher's plan (subset sizes
    from the ratio); at least 1 for a whole budget."""
    from attent_scale.teacher.epoch import planned_steps as plan_total

    total = plan_total(teacher, n_train, _steps_for(teacher, world, batch_size), epochs, first_epoch)
    return max(1, total) if first_epoch == 0 else total


def _steps_for(teacher: Any, world: int, batch_size: int) -> Any:
    """Steps per rank of an epoch of n ids (online mode drops a last partial candidate batch)."""
    candidates = teacher.candidate_batch_size(batch_size)
    if teacher.mode == "online":
        return lambda n: (n // world) // candidates
    return lambda n: math.ceil((n // world) / candidates)


def _all_reduce_max(value: float, group: Any) -> float:
    """Max over the ranks of `group`; any backend (a CUDA tensor on NCCL), any world size (1 included)."""
    return _all_reduce_max_each([value], group)[0]


def _all_reduce_max_each(values: list[float], group: Any) -> list[float]:
    """Element-wise max of a few numbers over the ranks of `group`, in one collective."""
    return all_reduce_values([float(v) for v in values], "max", group)


def train(cfg: RunConfig) -> int:
    """Run one training job (any engine, any teacher mode); returns the process exit code."""
    trainer = Trainer(copy.deepcopy(cfg))  # the trainer plans train.max_steps: the caller keeps its cfg
    exit_code, failed = 0, False
    try:
        exit_code = trainer.train()
        return exit_code
    except BaseException:
        # a rank that raised must not enter a collective: its peers wait in another one and the job
        # would hang silently; exiting lets torchrun see the failure and stop the others
        failed = True
        raise
    finally:
        trainer.close(failed, exit_code)



class Trainer:
    """One training job: `__init__` builds the parts in order, `train()` is the loop over the phases
    (epoch_stream → train_step → check_stop, then finish); counters live in `self.progress`."""

    def __init__(self, cfg: RunConfig) -> None:
        # Heavy imports here so `attent-scale --help` stays fast.
        from attent_scale.data import Manifest
        from attent_scale.data.integrity import check_shards
        from attent_scale.data.workers import StreamWorkers
        from attent_scale.dist import init_distributed
        from attent_scale.engines import build_engine
        from attent_scale.metrics import Metrics
        from attent_scale.models import check_model_fits
        from attent_scale.runlock import lock_run_dir
        from attent_scale.runlog import JsonLines
        from attent_scale.tensorboard import open_board

        self.cfg = cfg
        self.wall_start = time.perf_counter()
        self.last_save = self.wall_start  # checkpoint.every_minutes counts from here or the last checkpoint
        if os.environ.get("ATTENT_NUM_THREADS"):  # bench --clock cpu pins each arm to this many threads
            torch.set_num_threads(int(os.environ["ATTENT_NUM_THREADS"]))
        # distributed init
        self.info = init_distributed()
        self.rank, self.world = self.info.rank, self.info.world_size
        self.is_main = self.rank == 0
        # the data and the job must fit each other
        if not cfg.data.dir:
            raise UserError(
                "config key 'data.dir': required (a directory written by `attent-scale shards build`)"
            )
        self.manifest = Manifest.load(cfg.data.dir)
        self.batch_size = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
        self.n_train = self.manifest.num_samples(cfg.data.train_split)
        if self.n_train < self.world * self.batch_size:
            raise UserError(
                f"data.dir {cfg.data.dir}: {self.n_train} training samples is too few for "
                f"{self.world} ranks x batch {self.batch_size}"
            )
        if cfg.engine.name == "local" and self.world > 1:
            raise UserError(f"engine.name 'local' is one process, but this job has {self.world} ranks; "
                            "use engine.name=deepspeed or fsdp under torchrun")
        # the run directory: one job per run_dir (the lock is released at exit)
        self.run_dir = Path(cfg.run_dir)
        _check_run_dir(self.run_dir, self.rank)
        self.run_lock = lock_run_dir(self.run_dir, self.rank)  # released in close (and at exit)
        # Teacher and loop bookkeeping talk over CPU tensors: on NCCL jobs they get a gloo group of their own.
        self.group = side_group()
        check_shards(self.manifest, self.run_dir, rank=self.rank, world=self.world, group=self.group)
        self.teacher = self._build_teacher()
        check_model_fits(cfg.model, int(self.manifest.vocab_size), self.manifest.seq_len)
        self.engine = build_engine(cfg, self.manifest)
        self.progress = Progress()
        self.resumed_from = self._resume()
        if self.is_main:  # after the resume check: a refused resume leaves the recorded config as it was
            # the user's train.max_steps, not the epoch budget's plan (re-planned at every start)
            dump_config(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                           max_steps=self.max_steps_cap)),
                        self.run_dir / "config.yaml")
        # the teacher appends selection records itself; open our own files after truncation
        self.metrics_log = JsonLines(self.run_dir / "metrics.jsonl", self.is_main)
        self.eval_log = JsonLines(self.run_dir / "eval.jsonl", self.is_main)
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        self.metrics = Metrics.create(cfg.metrics, rank=self.rank, local_rank=self.info.local_rank, node=node)
        self.board = open_board(cfg.metrics.tensorboard_dir, self.run_dir, is_main=self.is_main,
                                resumed_step=None if self.resumed_from is None else self.progress.step)
        self.stop = StopSignal()
        self.val_cache: list[Any] = []
        # one set of DataLoader workers for every epoch and scoring pass (started on first use)
        self.stream_workers = StreamWorkers(cfg.data.num_workers) if cfg.data.num_workers > 0 else None
        self.empty_epochs = 0  # epochs in a row whose stream ran out without a training batch
        if self.resumed_from is None and cfg.eval.every_steps:
            self.evaluate()  # the step-0 point of every val-loss curve
        self.bar = _progress_bar(cfg, self.progress.step) if self.is_main else None

    def _build_teacher(self) -> Any:
        """The teacher; an epoch budget also caps train.max_steps at the steps the teacher's plan takes."""
        from attent_scale.teacher import Teacher
        from attent_scale.teacher.reference import open_reference

        cfg = self.cfg
        teacher = Teacher(
            cfg.teacher,
            num_samples=self.n_train,
            seed=cfg.seed,
            record_path=self.run_dir / "selection.jsonl" if self.is_main else None,
            group=self.group,
            reference=open_reference(cfg.teacher, self.manifest, cfg.data.train_split),
        )
        anneal = teacher.anneal_epoch(cfg.train.max_epochs)
        if anneal is not None:  # the budget's last epochs train all data: the plan (and the LR) knows it
            teacher.start_anneal(anneal)
        self.max_steps_cap = cfg.train.max_steps
        self.teacher = teacher
        self.plan_steps()
        return teacher

    def plan_steps(self) -> None:
        """An epoch budget: the LR schedule decays over the steps those epochs take (re-planned once a
        prune selection says how many ids it really kept: below the mean is a count only the data gives,
        and after a resume: steps done plus what is left at this world size, which an elastic resume
        changes)."""
        from attent_scale.teacher import Selection

        cfg, teacher = self.cfg, self.teacher
        if not cfg.train.max_epochs:
            return
        p = getattr(self, "progress", None) or Progress()
        epochs = cfg.train.max_epochs
        if p.remainder_bits is not None and p.remainder_epoch == p.epoch:
            # elastic resume: the interrupted epoch's owed ids over this world, in padded equal blocks
            owed = Selection(p.remainder_bits, self.n_train).count
            per_rank = math.ceil(owed / self.world)
            current = math.ceil(per_rank / teacher.candidate_batch_size(self.batch_size))
        elif p.stream_state is not None:  # mid-epoch: this epoch's planned steps, less those it took
            current = planned_steps(teacher, self.n_train, self.world, self.batch_size, p.epoch + 1, p.epoch)
        else:  # at an epoch's start: it is planned with the later ones
            current = 0
        consumed = int(p.stream_state["batches_consumed"]) if p.stream_state is not None else 0
        later = planned_steps(teacher, self.n_train, self.world, self.batch_size, epochs,
                              p.epoch + (1 if current or consumed else 0))
        cfg.train.max_steps = min(self.max_steps_cap, max(1, p.step + max(0, current - consumed) + later))

    def _resume(self) -> Path | None:
        """With checkpoint.resume, load the newest undamaged checkpoint (engine, teacher, RNG, progress),
        on this world size or another, and cut the run's logs back to it; a fresh run starts them empty.
        Returns the checkpoint resumed from."""
        from attent_scale import checkpoint as ckpt
        from attent_scale.runlog import truncate_lines

        run_dir = self.run_dir
        resume_from, skipped = None, []
        if self.cfg.checkpoint.resume:
            resume_from, skipped = ckpt.find_checkpoint(run_dir, self._verify_checkpoint, rank=self.rank,
                                                        group=self.group)
        if skipped and self.is_main and resume_from is not None:
            print(f"attent-scale: warning: skipped damaged checkpoint(s) {'; '.join(skipped)}; "
                  f"resuming from {resume_from.name}", file=sys.stderr)
        if resume_from is not None:
            self._check_resumable(resume_from)
            old_world = ckpt.saved_world(resume_from)
            try:
                if old_world == self.world:
                    state = ckpt.load_checkpoint(resume_from, self.engine, rank=self.rank,
                                                 world_size=self.world)
                    self.teacher.load_state_dict(state["teacher"])
                else:
                    from attent_scale.elastic import load_elastic

                    state = load_elastic(resume_from, engine=self.engine, teacher=self.teacher,
                                         rank=self.rank, world=self.world, group=self.group,
                                         data_dir=self.manifest.dir, split=self.cfg.data.train_split,
                                         num_ids=self.n_train)
            except UserError:
                raise
            except ValueError as exc:  # a state that does not fit this run (teacher, stream)
                raise UserError(f"checkpoint {resume_from}: {exc}") from None
            ckpt.set_rng_state(state["rng"])
            self.progress = Progress(**state["progress"])
            self.plan_steps()
            if self.is_main:
                print(_resume_line(resume_from, self.progress, self.n_train, self.world, old_world),
                      file=sys.stderr)
                for name in LOG_FILES:
                    truncate_lines(run_dir / name, self.progress.log_lines.get(name, 0))
        elif self.is_main:
            for name in LOG_FILES:
                (run_dir / name).unlink(missing_ok=True)
        if self.is_main:
            (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        return resume_from

    def _verify_checkpoint(self, path: Path) -> str | None:
        """The first problem with the files of checkpoint `path` this rank reads (None: they look whole)."""
        from attent_scale import checkpoint as ckpt
        from attent_scale.elastic import ranks_read

        try:
            old_world = ckpt.saved_world(path)
        except (OSError, ValueError, KeyError):
            return "COMPLETE unreadable"
        ranks = [self.rank] if old_world == self.world else ranks_read(self.rank, self.world, old_world,
                                                                         self.n_train)
        return ckpt.check_rank_files(path, ranks) or self.engine.verify(path, "engine")

    def _check_resumable(self, path: Path) -> None:
        """A checkpoint written under another model, engine, teacher mode, seed or split: one line naming
        the changed keys (every rank reads the same file, so every rank raises together)."""
        from attent_scale import checkpoint as ckpt
        from attent_scale.config import config_to_dict

        saved = ckpt.saved_config(path)
        if saved is None:
            return
        changed = ckpt.changed_keys(saved, config_to_dict(self.cfg), RESUME_KEYS)
        if changed:
            raise UserError(f"checkpoint {path}: resume refused, changed since it was written: "
                            f"{'; '.join(changed)} (use another run_dir, or checkpoint.resume=false)")

    # ---- the loop ---------------------------------------------------------------------------------

    def train(self) -> int:
        """Epoch after epoch (plan, stream, steps) until a budget, the data or a stop signal ends the run;
        returns the exit code."""
        cfg, progress = self.cfg, self.progress
        while progress.step < cfg.train.max_steps:
            stream = self.epoch_stream()
            self.check_corrupt_budget(now=True)  # the epoch's scoring pass may have met corrupt samples
            trained, decision = 0, None
            for batch in _timed(stream, progress):
                if not self.train_step(batch, stream):
                    continue  # online mode skipped a short last candidate batch
                trained += 1
                self.check_corrupt_budget()
                cut = self.anneal_cut()
                if cfg.eval.every_steps and progress.step % cfg.eval.every_steps == 0:
                    self.evaluate()
                decision = self.check_stop(stream, cut)
                if decision is not None:
                    break
            if decision == PREEMPT:
                return self.preempt()
            progress.corrupt_samples += stream.faults
            if decision == STOP:
                break
            progress.epoch += 1  # the stream ran out, or the anneal point ended this epoch early
            if progress.remainder_epoch < progress.epoch:  # an elastic resume's owed ids are trained
                progress.remainder_bits, progress.remainder_epoch = None, -1
            if decision is None and self.epoch_budget_spent(trained):
                break
        self.check_corrupt_budget(final=True)  # before the export: a run that trained nothing exports nothing
        self.finish()
        return 0

    # ---- plan → score → select, once per fresh epoch ----------------------------------------------

    def plan_epoch(self) -> None:
        """The epoch start every trainer shares (`teacher.epoch.begin_epoch`): plan, score this rank's part
        of the data when the plan says so, select; the selection lands in `progress`."""
        from attent_scale.teacher import Selection
        from attent_scale.teacher.epoch import begin_epoch

        progress, bits = self.progress, self.progress.selection_bits
        trained = None if bits is None else Selection(bits, self.n_train)
        start = begin_epoch(self.teacher, progress.epoch, progress.step, self.score_pass, trained=trained,
                            steps_for=_steps_for(self.teacher, self.world, self.batch_size))
        self.select(start)
        if any(start.phase_seconds.values()):
            self.metrics.observe_selection(start.phase_seconds)

    def score_pass(self, skip: Any, step: int) -> None:
        """A sharded forward over this rank's part of the data except `skip`; the losses go into the
        teacher's ledger."""
        progress = self.progress
        scoring = self._shard_stream(progress.epoch, self.cfg.eval.batch_size,
                                     None if skip is None else skip.complement())
        self.teacher.score_pass(scoring, self.engine.score, step)
        self.note_corrupt(scoring)
        progress.corrupt_samples += scoring.faults

    def select(self, start: Any) -> None:
        """The epoch's selection (`start.selection`, None = full data) into `progress`; a prune selection
        re-plans the epoch budget's steps."""
        progress, selection = self.progress, start.selection
        if start.replan:
            self.plan_steps()
        progress.selection_bits = None if selection is None else selection.bits
        progress.weight_bits = None if selection is None else selection.upweight
        progress.weight = 1.0 if selection is None else selection.weight
        if selection is not None:
            progress.selected_ratio = start.ratio
        else:
            progress.selected_ratio = self.cfg.teacher.online_ratio if self.teacher.mode == "online" else 1.0

    def epoch_stream(self) -> Any:
        """This epoch's `ShardStream` over its selection: a fresh epoch asks the teacher first (plan_epoch),
        a resumed one continues from the checkpointed stream position."""
        from attent_scale.teacher import Selection

        loop_t0 = _clock()
        progress = self.progress
        remainder = progress.remainder_bits is not None and progress.remainder_epoch == progress.epoch
        if progress.stream_state is None and not remainder:
            self.plan_epoch()
        bits = progress.remainder_bits if remainder else progress.selection_bits
        selection = None if bits is None else Selection(bits, self.n_train, upweight=progress.weight_bits,
                                                        weight=progress.weight)
        stream = self._shard_stream(progress.epoch, self.teacher.candidate_batch_size(self.batch_size),
                                    selection, pad=remainder)
        if progress.stream_state is not None:
            stream.load_state_dict(progress.stream_state)
            progress.stream_state = None
        else:
            progress.dropped_samples += stream.dropped
        _charge(progress, loop_t0)
        return stream

    def _shard_stream(self, epoch: int, batch: int, selection: Any = None, pad: bool = False) -> Any:
        from attent_scale.data import ShardStream

        cfg = self.cfg
        return ShardStream(self.manifest.dir, cfg.data.train_split, rank=self.rank, world_size=self.world,
                           seed=cfg.seed, epoch=epoch, batch_size=batch, selection=selection,
                           shuffle_buffer=cfg.data.shuffle_buffer, num_workers=cfg.data.num_workers,
                           workers=self.stream_workers, pad=pad)

    # ---- one step ---------------------------------------------------------------------------------

    def train_step(self, batch: dict[str, Any], stream: Any) -> bool:
        """Online pick, engine step, observe, bookkeeping, logs and metrics; False when online mode skips
        a short last candidate batch (no step taken)."""
        step_t0 = _clock()
        progress, teacher = self.progress, self.teacher
        if teacher.mode == "online":
            if len(batch["ids"]) < teacher.candidate_batch_size(self.batch_size):
                progress.online_dropped_batches += 1  # same on every rank: equal counts
                return False
            batch = self.online_pick(batch)
        result = self.engine.train_step(batch)
        real = batch["ids"] >= 0
        teacher.observe(batch["ids"][real], result.per_sample[real], progress.step)
        self.note_corrupt(stream)
        progress.step += 1
        teacher.exchange_due(progress.step)  # collective every few steps: ledger entries to owners
        progress.samples_trained += int(real.sum())
        progress.tokens_trained += int((batch["labels"] != -100).sum())
        if result.skipped:
            progress.nonfinite_skipped += 1
            progress.nonfinite_in_row += 1
        else:
            progress.nonfinite_in_row = 0
            progress.last_train_loss = result.loss
        step_seconds = _charge(progress, step_t0)
        self.log_step(batch, result, step_seconds)
        self.check_nonfinite(stream)
        return True

    def online_pick(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Online mode: score the candidates and let the teacher pick this step's batch across ranks."""
        t_score = time.perf_counter()
        scores = self.engine.score(batch)
        # the candidates' scoring forward is selection cost: book it in the teacher's score phase
        self.teacher.stats["seconds_score"] += time.perf_counter() - t_score
        return self.teacher.online_pick(batch, scores, self.batch_size, self.progress.step)

    def log_step(self, batch: dict[str, Any], result: Any, step_seconds: float) -> None:
        """metrics.jsonl every log_every steps, Prometheus and the progress bar every step."""
        progress, world = self.progress, self.world
        tokens_per_s = int((batch["labels"] != -100).sum()) * world / max(step_seconds, 1e-9)
        tot = self.totals()
        if progress.step % self.cfg.train.log_every == 0 or progress.step == self.cfg.train.max_steps:
            self.metrics_log.write(
                {
                    "step": progress.step,
                    "epoch": progress.epoch,
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
            self.board.log_step(progress.step, loss=result.loss, lr=result.lr, tokens_per_second=tokens_per_s,
                                selected_ratio=tot["selected_ratio"],
                                selection_seconds_by_phase=tot["selection_seconds_by_phase"])
        self.metrics.observe_step(step_seconds, result.loss, tokens_per_s)
        self.metrics.update(tot)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{result.loss:.3f}", epoch=progress.epoch)

    def check_nonfinite(self, stream: Any) -> None:
        """Too many non-finite losses in a row: checkpoint, then stop with a one-line error."""
        from attent_scale import checkpoint as ckpt

        progress = self.progress
        if progress.nonfinite_in_row >= self.cfg.train.max_nonfinite_in_row:
            self.save(stream)
            raise NonFiniteLossError(
                f"{progress.nonfinite_in_row} non-finite training losses in a row at step "
                f"{progress.step}; "
                f"checkpoint written to {ckpt.checkpoint_root(self.run_dir)} (lower train.lr?)"
            )

    def note_corrupt(self, stream: Any) -> None:
        """Keep corrupt samples out of every later selection and count the distinct ones."""
        progress = self.progress
        bad = stream.take_bad_ids()
        if not bad:
            return
        self.teacher.exclude(bad, progress.step)
        new = sorted(set(bad).difference(progress.corrupt_ids))
        if new:
            progress.corrupt_ids = sorted(set(progress.corrupt_ids).union(new))
            print(f"attent-scale: rank {self.rank}: {len(new)} corrupt sample(s) excluded from selection "
                  f"(ids {', '.join(map(str, new[:8]))}{' ...' if len(new) > 8 else ''}); "
                  f"{len(progress.corrupt_ids)} distinct so far", file=sys.stderr)

    def check_corrupt_budget(self, now: bool = False, final: bool = False) -> None:
        """Stop every rank together (one collective every stop_check_every steps, and at the end) once the
        distinct corrupt samples pass data.max_corrupt_fraction of the training set; at the end, also when
        no real sample was trained at all."""
        cfg, progress = self.cfg, self.progress
        if not (now or final) and progress.step % cfg.train.stop_check_every != 0:
            return
        seen, trained = all_reduce_values([len(progress.corrupt_ids), progress.samples_trained], "sum",
                                          self.group)
        budget = cfg.data.max_corrupt_fraction * self.n_train
        corrupt = int(seen)
        if seen > budget and self.world > 1:  # a sum over ranks counts an id two ranks met twice
            corrupt = len(set().union(*all_gather_objects(progress.corrupt_ids, self.group)))
        if corrupt > budget and cfg.data.max_corrupt_fraction < 1.0:
            raise UserError(
                f"data.dir {cfg.data.dir}: {corrupt} of {self.n_train} training samples are corrupt "
                f"({corrupt / self.n_train:.1%}) at step {progress.step}, over data.max_corrupt_fraction "
                f"{cfg.data.max_corrupt_fraction} (1.0 disables; the warnings above name the shards)"
            )
        if final and trained == 0:
            raise UserError(
                f"data.dir {cfg.data.dir}: no sample trained in {progress.step} steps ({corrupt} corrupt "
                f"samples met); nothing exported"
            )

    # ---- after a step: anneal, stop, checkpoint ----------------------------------------------------

    def anneal_cut(self) -> bool:
        """Steps or seconds budgets: start the anneal once its point is reached; True when that ends the
        current subset epoch early (the next epoch trains all data)."""
        if self.teacher.anneal_from is None and _anneal_due(self.cfg, self.progress, self.group):
            self.teacher.start_anneal(self.progress.epoch + 1)
            return self.progress.selection_bits is not None
        return False

    def check_stop(self, stream: Any, cut: bool) -> str | None:
        """Does the run stop after this step, and is a checkpoint due? Every rank decides the same: one
        collective every stop_check_every steps carries any rank's signal or clock. Returns PREEMPT, STOP,
        END_EPOCH (`cut`) or None (go on)."""
        cfg, progress, stop = self.cfg, self.progress, self.stop
        if progress.step == stop.stop_after_step:
            stop.received = "ATTENT_STOP_AFTER_STEP"
        out_of_time = bool(cfg.train.max_seconds) and progress.train_seconds >= cfg.train.max_seconds
        stop_code, minutes_due = 0.0, False
        if progress.step % cfg.train.stop_check_every == 0:
            mine = 2.0 if stop.received else (1.0 if out_of_time else 0.0)
            # clocks differ per rank: any rank whose checkpoint.every_minutes has passed makes the save due;
            # a separate element, so one rank's due save cannot hide another rank's signal
            every = cfg.checkpoint.every_minutes * 60
            late = bool(every) and time.perf_counter() - self.last_save >= every
            stop_code, late_any = _all_reduce_max_each([mine, 1.0 if late else 0.0], self.group)
            minutes_due = late_any >= 1
        stop_now = stop_code >= 2
        due = minutes_due or (cfg.checkpoint.every_steps and progress.step % cfg.checkpoint.every_steps == 0)
        if stop_now or (due and progress.step < cfg.train.max_steps):
            if cut:  # saved as the end of this epoch, so a resume starts the anneal like we do
                progress.epoch += 1
                self.save(None)
                progress.epoch -= 1
            else:
                self.save(stream)
        if stop_now:
            return PREEMPT
        if progress.step >= cfg.train.max_steps or stop_code >= 1:
            return STOP
        return END_EPOCH if cut else None

    def preempt(self) -> int:
        """After a stop signal's checkpoint: leave the marker a launcher script checks, and the exit code."""
        from attent_scale.runlog import write_json

        if self.is_main:
            # torchrun turns a worker's exit code into its own 1: the marker file is what a
            # launcher script checks to tell "preempted, requeue me" from a failure
            marker = {"step": self.progress.step, "signal": self.stop.received}
            write_json(self.run_dir / PREEMPTED_MARKER, marker)
            print(
                f"attent-scale: {self.stop.received or 'stop signal'}: checkpoint at step "
                f"{self.progress.step} written, exiting with {PREEMPT_EXIT_CODE} for requeue",
                file=sys.stderr,
            )
        return PREEMPT_EXIT_CODE

    def epoch_budget_spent(self, trained: int) -> bool:
        """After an epoch whose stream ran out (`trained` steps): is the epoch budget spent? Three epochs
        in a row without a training batch are an error."""
        cfg = self.cfg
        if cfg.train.max_epochs and self.progress.epoch >= cfg.train.max_epochs:
            return True
        self.empty_epochs = 0 if trained else self.empty_epochs + 1
        if self.empty_epochs >= 3:
            raise UserError(
                f"data.dir {cfg.data.dir}: three epochs in a row yielded no training batch "
                f"(selection too small for {self.world} ranks x batch {self.batch_size}?)"
            )
        return False

    # ---- eval, checkpoints, totals, the end --------------------------------------------------------

    def evaluate(self) -> float:
        """Val loss on this rank's val batches; eval.jsonl and the metrics get the point."""
        progress = self.progress
        t0 = time.perf_counter()
        loss = self.engine.evaluate(_val_batches(self.manifest.dir, self.cfg, self.rank, self.world,
                                                 self.val_cache))
        progress.eval_seconds += time.perf_counter() - t0
        progress.last_val_loss = loss
        self.eval_log.write(
            {
                "step": progress.step,
                "val_loss": loss,
                "perplexity": math.exp(loss) if loss < 50 else float("inf"),
                "samples_trained": progress.samples_trained * self.world,
                "train_seconds": progress.train_seconds,
                "train_cpu_seconds": progress.train_cpu_seconds,
                "wall_seconds": progress.wall_offset + time.perf_counter() - self.wall_start,
            }
        )
        self.metrics.observe_eval(loss)
        self.board.log_eval(progress.step, loss)
        return loss

    def save(self, stream: Any) -> None:
        """A checkpoint: the engine's state plus progress (with `stream`'s position), teacher and RNG."""
        from attent_scale import checkpoint as ckpt
        from attent_scale.config import config_to_dict
        from attent_scale.runlog import count_lines

        progress = self.progress
        t0 = time.perf_counter()
        progress.log_lines = {name: count_lines(self.run_dir / name) if self.is_main else 0
                              for name in LOG_FILES}
        # the stream position goes into the checkpoint only: left in `progress`, it would make the next
        # epoch replay this one's stream instead of asking the teacher
        state = {
            "progress": {**_progress_state(progress, self.wall_start),
                         "stream_state": stream.state_dict() if stream is not None else None},
            "teacher": self.teacher.state_dict(),
            "rng": ckpt.rng_state(),
        }
        ckpt.save_checkpoint(
            self.run_dir,
            progress.step,
            self.engine,
            state,
            rank=self.rank,
            world_size=self.world,
            keep_last=self.cfg.checkpoint.keep_last,
            config=config_to_dict(self.cfg),
            group=self.group,
        )
        self.last_save = time.perf_counter()
        seconds = time.perf_counter() - t0
        progress.checkpoint_seconds += seconds
        self.metrics.observe_checkpoint(seconds)

    def totals(self) -> dict[str, Any]:
        """This rank's running totals: what metrics, logs and the summary report."""
        progress, stats = self.progress, self.teacher.stats
        by_phase = {p: float(stats[f"seconds_{p}"]) for p in PHASES}
        selection_seconds = sum(by_phase.values())
        wall = progress.wall_offset + time.perf_counter() - self.wall_start
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

    def finish(self) -> None:
        """The end of a run: final eval (unless this step had one), last checkpoint, export, summary.json."""
        from attent_scale.runlog import write_json

        cfg = self.cfg
        if not cfg.eval.every_steps or self.progress.step % cfg.eval.every_steps != 0:
            self.evaluate()
        if cfg.checkpoint.every_steps:
            self.save(None)
        if cfg.checkpoint.export:
            self.engine.export(self.run_dir / "export")  # collective: sharded engines gather the weights
        summary = _summary(cfg, self.totals(), self.progress, self.teacher, self.group, self.world)
        if self.is_main:
            write_json(self.run_dir / "summary.json", summary)
        self.metrics.update(self.totals())

    def close(self, failed: bool, exit_code: int) -> None:
        """Close bar, logs and metrics; after a clean run, wait for every rank, then leave the process group
        (never after a failure: see `train`); the data workers stop either way."""
        if self.stream_workers is not None:
            self.stream_workers.close()
        if self.bar is not None:
            self.bar.close()
        self.metrics_log.close()
        self.eval_log.close()
        self.board.close()
        self.metrics.close()
        if self.run_lock is not None:  # a second train() in this process may take run_dir again
            self.run_lock.release()
        if not failed and initialized():
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


def _check_run_dir(run_dir: Path, rank: int) -> None:
    """run_dir must be a directory this job can write: one line otherwise (a file, read-only, ...)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run_dir {run_dir}: exists and is not a directory")
    probe = run_dir / f".write-probe-{rank}-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"run_dir {run_dir}: not writable ({exc.strerror or exc})") from None


def _resume_line(path: Path, progress: Progress, n_train: int, world: int, old_world: int) -> str:
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
    elif progress.remainder_bits is not None and progress.remainder_epoch == progress.epoch:
        owed = Selection(progress.remainder_bits, n_train).count
        where = f"with {owed} ids still owed"
    if old_world != world:
        where += f", written on {old_world} ranks, continued on {world}"
    samples = progress.samples_trained * world  # equal shares on every rank
    return (f"attent-scale: resumed from {path} (step {progress.step}, {samples} samples trained, "
            f"epoch {progress.epoch} {where}, {selection})")


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
    gathered = all_gather_objects(per_rank, group)  # once, at the end: not a hot path
    corrupt_ids = set().union(*all_gather_objects(progress.corrupt_ids, group))  # once, at the end
    summed = all_reduce_values(  # `group` is gloo (the default group, or our own on NCCL jobs)
        [tot[k] for k in ("samples_trained", "tokens_trained", "samples_scored", "corrupt_samples")], "sum",
        group)
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


class _CallableModule(type(sys)):  # types.ModuleType
    """This module, exported as the Python API's `attent_scale.train`, is also callable: `train(cfg)`.
    (A package attribute named like a submodule is replaced by the submodule on its first import, so the
    function alone could not be `attent_scale.train`.)"""

    def __call__(self, cfg: RunConfig) -> int:
        return train(cfg)


sys.modules[__name__].__class__ = _CallableModule
