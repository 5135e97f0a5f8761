"""The trainer: `Trainer` builds the parts, then runs plan → score → select → stream → step → observe.

The parts own their state and say when they are due: `Progress` (the loop's counters), `Clocks`,
`SelectionState` (what the epoch trains) in train_state.py; `StopCheck` (stop.py), `Checkpointer`
(checkpoint.py), `Validator` (validate.py), `RunLogs` (runlog.py); run totals in totals.py."""

from __future__ import annotations

import argparse
import copy
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from attent_scale.config import RunConfig, add_override_argument, load_config
from attent_scale.dist import all_gather_objects, all_reduce_values, initialized, side_group
from attent_scale.errors import UserError
from attent_scale.malloc import malloc_state, tune_malloc
from attent_scale.stop import END_EPOCH, PREEMPT, STOP, Poll, StopCheck, StopSignal, decide
from attent_scale.totals import PHASES, REMOTE_KEYS, RunTotals, remote_totals, teacher_totals
from attent_scale.train_state import Clocks, Progress, SelectionState, now

__all__ = ["END_EPOCH", "PREEMPT", "PHASES", "STOP", "Progress", "StopSignal", "Trainer", "add_parser",
           "planned_steps", "total_steps", "train"]

PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: checkpoint written after SIGTERM/SIGUSR1; the Slurm script requeues
PREEMPTED_MARKER = "PREEMPTED"  # written to run_dir beside that checkpoint; removed when the run goes on
# config keys a checkpoint must agree on to be resumed (dotted prefixes)
RESUME_KEYS = ("seed", "model", "engine.name", "teacher.mode", "data.train_split", "data.blend_samples")


class NonFiniteLossError(UserError):
    """Too many non-finite training losses in a row."""

    exit_code = 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train with (or without) the AtteNT teacher")
    parser.add_argument("--config", required=True, help="run config: a YAML file, or the name of a packaged "
                        "one (demo, gpu_gpt2_small, ...: `attent-scale init DIR` copies them out)")
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


def total_steps(teacher: Any, *, n_train: int, world: int, batch_size: int, max_epochs: int, cap: int,
                step: int, epoch: int, selection: SelectionState, stream_batches: int | None) -> int:
    """The steps the run takes and its LR schedule decays over: train.max_steps (`cap`), or with an epoch
    budget the steps its epochs take under the teacher's plan, capped. Re-planned once a prune selection
    says how many ids it really kept (below the mean is a count only the data gives), and after a resume:
    steps done (`step`) plus what is left at this world size, which an elastic resume changes.
    `stream_batches`: the batches a resumed stream of epoch `epoch` already gave (None: at an epoch's
    start)."""
    from attent_scale.teacher import Selection

    if not max_epochs:
        return cap
    if selection.remainder_due(epoch):
        # elastic resume: the interrupted epoch's owed ids over this world, in padded equal blocks
        owed = Selection(selection.remainder_bits, n_train).count
        per_rank = math.ceil(owed / world)
        current = math.ceil(per_rank / teacher.candidate_batch_size(batch_size))
    elif stream_batches is not None:  # mid-epoch: this epoch's planned steps, less those it took
        current = planned_steps(teacher, n_train, world, batch_size, epoch + 1, epoch)
    else:  # at an epoch's start: it is planned with the later ones
        current = 0
    consumed = stream_batches or 0
    first_later = epoch + (1 if current or consumed else 0)
    later = planned_steps(teacher, n_train, world, batch_size, max_epochs, first_later)
    return min(cap, max(1, step + max(0, current - consumed) + later))


def _all_reduce_max(value: float, group: Any) -> float:
    """Max over the ranks of `group`; any backend (a CUDA tensor on NCCL), any world size (1 included)."""
    return all_reduce_values([float(value)], "max", group)[0]


def train(cfg: RunConfig) -> int:
    """Run one training job (any engine, any teacher mode); returns the process exit code."""
    trainer = Trainer(copy.deepcopy(cfg))  # the trainer owns its config: the caller's stays as it was
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



def _data_label(cfg: RunConfig) -> str:
    """How messages name the run's data: data.dir, or the blend's sources."""
    from attent_scale.data.manifest import set_name

    if cfg.data.dir or not cfg.data.sources:
        return f"data.dir {cfg.data.dir}"
    return "data.sources (" + ", ".join(s.name or set_name(s.dir) for s in cfg.data.sources) + ")"


class Trainer:
    """One training job: `__init__` builds the parts in order, `train()` is the loop over the phases
    (epoch_stream → train_step → after-step checks, then finish). State lives with its owner: the loop's
    counters in `self.progress`, seconds in `self.clock`, the epoch's selection in `self.selection`, a
    resumed stream position in `self.resume_stream` until the epoch's stream takes it."""

    def __init__(self, cfg: RunConfig) -> None:
        # Heavy imports here so `attent-scale --help` stays fast.
        from attent_scale.checkpoint import Checkpointer
        from attent_scale.data.blend import open_data
        from attent_scale.data.integrity import check_shards
        from attent_scale.data.workers import StreamWorkers
        from attent_scale.dist import init_distributed
        from attent_scale.engines import build_engine
        from attent_scale.loggers import open_loggers
        from attent_scale.metrics import Metrics
        from attent_scale.models import check_model_fits
        from attent_scale.runlock import lock_run_dir
        from attent_scale.runlog import RunLogs
        from attent_scale.teacher.folds import holdout_selection
        from attent_scale.validate import Validator

        self.cfg = cfg
        self.clock = Clocks()  # the wall clock counts from here
        self.progress = Progress()
        self.selection = SelectionState()
        self.resume_stream: dict[str, Any] | None = None  # a checkpoint's mid-epoch stream position
        if os.environ.get("ATTENT_NUM_THREADS"):  # bench --clock cpu pins each arm to this many threads
            torch.set_num_threads(int(os.environ["ATTENT_NUM_THREADS"]))
        tune_malloc()
        # distributed init
        self.info = init_distributed()
        self.rank, self.world = self.info.rank, self.info.world_size
        self.is_main = self.rank == 0
        # the data and the job must fit each other
        from attent_scale.data import remote

        remote.configure(remote.from_config(cfg.data))
        self.data_label = remote.redact(_data_label(cfg))  # what messages name: never a URL's credentials
        self.unreachable: list[str] = []  # shards this rank gave up on after the retries (one line each)
        self.manifest = open_data(cfg.data, cfg.seed)  # a Manifest, or a Blend of data.sources
        self.batch_size = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
        self.n_train = self.manifest.num_samples(cfg.data.train_split)
        self.holdout = holdout_selection(cfg.data.holdout, self.n_train)  # None, or the ids trained on
        if self.n_train < self.world * self.batch_size:
            raise UserError(
                f"{self.data_label}: {self.n_train} training samples is too few for "
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
        for _, m in self.manifest.manifests():  # a blend: every source's shard set
            check_shards(m, self.run_dir, rank=self.rank, world=self.world, group=self.group)
        self.teacher = self._build_teacher()
        self.total_steps = self._plan_total()  # the run's length; the engine's LR schedule gets it below
        check_model_fits(cfg.model, int(self.manifest.vocab_size), self.manifest.seq_len)
        self.engine = build_engine(cfg, self.manifest)
        self.engine.total_steps = self.total_steps
        self.checkpointer = Checkpointer(self.run_dir, every_steps=cfg.checkpoint.every_steps,
                                         every_minutes=cfg.checkpoint.every_minutes,
                                         keep_last=cfg.checkpoint.keep_last, rank=self.rank,
                                         world_size=self.world, group=self.group)
        self.validator = Validator(cfg, rank=self.rank, world=self.world)
        self.logs = RunLogs(self.run_dir, self.is_main)
        self.resumed_from = self._resume()
        # after the resume check (a refused resume leaves the recorded config as it was) and the plan
        self._config_recorded = self._record_config()
        self.logs.open()  # the teacher appends selection records itself; ours open after truncation
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        self.metrics = Metrics.create(cfg.metrics, rank=self.rank, local_rank=self.info.local_rank, node=node,
                                      totals=self.totals())  # a resumed run's counters go on from its totals
        self.board = open_loggers(cfg, self.run_dir, is_main=self.is_main,  # TensorBoard, W&B
                                  resumed_step=None if self.resumed_from is None else self.progress.step)
        self.stopper = StopCheck(every=cfg.train.stop_check_every, max_seconds=cfg.train.max_seconds,
                                 group=self.group)
        # one set of DataLoader workers for every epoch and scoring pass (started on first use)
        self.stream_workers = StreamWorkers(cfg.data.num_workers) if cfg.data.num_workers > 0 else None
        self.empty_epochs = 0  # epochs in a row whose stream ran out without a training batch
        self.bar = _progress_bar(self.total_steps, self.progress.step) if self.is_main else None

    def _build_teacher(self) -> Any:
        """The teacher; an anneal under an epoch budget is started by plan (the step plan knows it)."""
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
            sources=self._sources(),
        )
        anneal = teacher.anneal_epoch(cfg.train.max_epochs)
        if anneal is not None:  # the budget's last epochs train all data: the plan (and the LR) knows it
            teacher.start_anneal(anneal)
        return teacher

    def _sources(self) -> list[Any]:
        """The training ids by source, with the blend's floors (teacher/floors.py)."""
        from attent_scale.teacher.floors import SourceRange

        cfg = self.cfg
        floors = [s.floor for s in cfg.data.sources] or [0.0]
        if any(floors) and cfg.teacher.mode not in ("cycle", "ledger"):
            raise UserError(f"config key 'data.sources[*].floor': floors apply to cycle and ledger "
                            f"selections, not teacher.mode {cfg.teacher.mode!r}")
        ranges = self.manifest.source_ranges(cfg.data.train_split)
        return [SourceRange(name, lo, hi, f) for (name, lo, hi), f in zip(ranges, floors, strict=True)]

    def _plan_total(self) -> int:
        """The run's total steps from where it stands now (see `total_steps`)."""
        cfg, p = self.cfg, self.progress
        stream_batches = None if self.resume_stream is None else int(self.resume_stream["batches_consumed"])
        return total_steps(self.teacher, n_train=self.n_train, world=self.world, batch_size=self.batch_size,
                           max_epochs=cfg.train.max_epochs, cap=cfg.train.max_steps, step=p.step,
                           epoch=p.epoch, selection=self.selection, stream_batches=stream_batches)

    def plan_steps(self) -> None:
        """Re-plan the run's total steps (after a resume, or a prune selection): the engine's LR schedule
        decays over the new total and config.yaml records it."""
        planned = self._plan_total()
        if planned == self.total_steps:
            return
        self.total_steps = self.engine.total_steps = planned
        if getattr(self, "_config_recorded", False):
            self._record_config()

    def _record_config(self) -> bool:
        """config.yaml (rank 0): the user's config as the run reads it (train.max_steps is the user's cap:
        rerunning it re-plans from scratch), headed by the steps this run plans under an epoch budget."""
        import yaml

        from attent_scale.config import config_to_dict

        if self.is_main:
            cfg = self.cfg
            head = ""
            if cfg.train.max_epochs:
                head = (f"# planned steps: {self.total_steps} (train.max_epochs {cfg.train.max_epochs} under "
                        f"the teacher's plan, capped by train.max_steps; the LR schedule decays over them)\n")
            text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
            (self.run_dir / "config.yaml").write_text(head + text)
        return True

    def _resume(self) -> Path | None:
        """With checkpoint.resume, load the newest undamaged checkpoint (engine, teacher, RNG and every part's
        entry), on this world size or another, and cut the run's logs back to it; a fresh run starts them
        empty. Returns the checkpoint resumed from."""
        from attent_scale import checkpoint as ckpt

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
                                         data_dir=self.manifest, split=self.cfg.data.train_split,
                                         num_ids=self.n_train)
            except UserError:
                raise
            except ValueError as exc:  # a state that does not fit this run (teacher, stream)
                raise UserError(f"checkpoint {resume_from}: {exc}") from None
            self._load_state(state)
            self.plan_steps()
            if self.is_main:
                print(_resume_line(resume_from, self.progress, self.selection, self.resume_stream,
                                   self.n_train, self.world, old_world), file=sys.stderr)
            self.logs.reset(state["logs"])
        else:
            self.logs.reset(None)
        if self.is_main:
            (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        return resume_from

    def _load_state(self, state: dict[str, Any]) -> None:
        """Every part takes its own entry of a checkpoint's rank state (the layout of
        train_state.upgrade_state)."""
        from attent_scale import checkpoint as ckpt

        ckpt.set_rng_state(state["rng"])
        self.progress = Progress.from_state(state["progress"])
        self.clock = Clocks.from_state({**state["clock"], "wall_start": self.clock.wall_start})
        self.selection = SelectionState.from_state(state["selection"])
        self.resume_stream = state["stream"]
        self.validator.load_state_dict(state.get("eval") or {})

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
        from attent_scale.data.blend import blend_layout_changes

        saved = ckpt.saved_config(path)
        if saved is None:
            return
        now = config_to_dict(self.cfg)
        changed = ckpt.changed_keys(saved, now, RESUME_KEYS)
        changed += blend_layout_changes(saved, now)
        if changed:
            raise UserError(f"checkpoint {path}: resume refused, changed since it was written: "
                            f"{'; '.join(changed)} (use another run_dir, or checkpoint.resume=false)")

    # ---- the loop ---------------------------------------------------------------------------------

    def train(self) -> int:
        """Epoch after epoch (plan, stream, steps) until a budget, the data or a stop signal ends the run;
        returns the exit code."""
        progress = self.progress
        if self.resumed_from is None and self.validator.should_validate(progress.step):
            self.evaluate()  # the step-0 point of every val-loss curve
        while progress.step < self.total_steps:
            stream = self.epoch_stream()
            self.check_corrupt_budget(now=True)  # the epoch's scoring pass may have met corrupt samples
            trained, decision = 0, None
            for batch in self.clock.timed(stream):
                if not self.train_step(batch, stream):
                    continue  # online mode skipped a short last candidate batch
                trained += 1
                self.check_corrupt_budget()
                cut = self.anneal_cut()
                if self.validator.should_validate(progress.step):
                    self.evaluate()
                poll = self.stopper.poll(progress.step, self.clock.train_seconds, self.checkpointer.late())
                if self.checkpoint_due(poll):
                    self.check_corrupt_budget(now=True)  # no checkpoint holds a shard nobody could read
                    # an anneal cut saves as the end of this epoch: a resume starts the anneal like we do
                    self.save(stream, epoch_done=cut)
                decision = decide(poll, step=progress.step, last_step=self.total_steps, cut=cut)
                if decision is not None:
                    break
            if decision == PREEMPT:
                return self.preempt()
            progress.corrupt_samples += stream.faults
            if decision == STOP:
                break
            progress.epoch += 1  # the stream ran out, or the anneal point ended this epoch early
            self.selection.drop_remainder_before(progress.epoch)  # an elastic resume's owed ids are trained
            if decision is None and self.epoch_budget_spent(trained):
                break
        self.check_corrupt_budget(final=True)  # before the export: a run that trained nothing exports nothing
        self.finish()
        return 0

    # ---- plan → score → select, once per fresh epoch ----------------------------------------------

    def plan_epoch(self) -> None:
        """The epoch start every trainer shares (`teacher.epoch.begin_epoch`): plan, score this rank's part
        of the data when the plan says so, select; the selection lands in `self.selection`."""
        from attent_scale.teacher import Selection
        from attent_scale.teacher.epoch import begin_epoch

        progress, bits = self.progress, self.selection.bits
        trained = None if bits is None else Selection(bits, self.n_train)
        start = begin_epoch(self.teacher, progress.epoch, progress.step, self.score_pass, trained=trained,
                            steps_for=_steps_for(self.teacher, self.world, self.batch_size))
        self.select(start)
        if any(start.phase_seconds.values()):
            self.metrics.observe_selection(start.phase_seconds)
        if start.record is not None and start.record.get("sources"):
            self.metrics.observe_sources(start.record["sources"])
        if start.record is not None and start.record.get("signal"):
            self.metrics.observe_signal(start.record["signal"])

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
        """The epoch's selection (`start.selection`, None = full data) into `self.selection`; a prune
        selection re-plans the epoch budget's steps."""
        state, selection = self.selection, start.selection
        if start.replan:
            self.plan_steps()
        state.bits = None if selection is None else selection.bits
        state.weight_bits = None if selection is None else selection.upweight
        state.weight = 1.0 if selection is None else selection.weight
        if selection is not None:
            state.ratio = start.ratio
        else:
            state.ratio = self.cfg.teacher.online_ratio if self.teacher.mode == "online" else 1.0

    def epoch_stream(self) -> Any:
        """This epoch's `ShardStream` over its selection: a fresh epoch asks the teacher first (plan_epoch),
        a resumed one continues from the checkpointed stream position."""
        from attent_scale.teacher import Selection

        loop_t0 = now()
        progress, state = self.progress, self.selection
        remainder = state.remainder_due(progress.epoch)
        if self.resume_stream is None and not remainder:
            self.plan_epoch()
        bits = state.remainder_bits if remainder else state.bits
        selection = None if bits is None else Selection(bits, self.n_train, upweight=state.weight_bits,
                                                        weight=state.weight)
        stream = self._shard_stream(progress.epoch, self.teacher.candidate_batch_size(self.batch_size),
                                    selection, pad=remainder)
        if self.resume_stream is not None:
            stream.load_state_dict(self.resume_stream)
            self.resume_stream = None
        else:
            progress.dropped_samples += stream.dropped
        self.clock.charge(loop_t0)
        return stream

    def _shard_stream(self, epoch: int, batch: int, selection: Any = None, pad: bool = False) -> Any:
        from attent_scale.data import ShardStream
        from attent_scale.teacher.folds import restrict

        cfg = self.cfg
        selection = restrict(selection, self.holdout)  # data.holdout: one fold's ids held out (or alone)
        return ShardStream(self.manifest, cfg.data.train_split, rank=self.rank, world_size=self.world,
                           seed=cfg.seed, epoch=epoch, batch_size=batch, selection=selection,
                           shuffle_buffer=cfg.data.shuffle_buffer, num_workers=cfg.data.num_workers,
                           workers=self.stream_workers, pad=pad)

    # ---- one step ---------------------------------------------------------------------------------

    def train_step(self, batch: dict[str, Any], stream: Any) -> bool:
        """Online pick, engine step, observe, bookkeeping, logs and metrics; False when online mode skips
        a short last candidate batch (no step taken)."""
        step_t0 = now()
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
        step_seconds = self.clock.charge(step_t0)
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
        if progress.step % self.cfg.train.log_every == 0 or progress.step == self.total_steps:
            self.logs.metrics.write(tot.metrics_row(world=world, loss=result.loss, lr=result.lr,
                                                    grad_norm=result.grad_norm,
                                                    tokens_per_second=tokens_per_s))
            self.board.log_step(progress.step, loss=result.loss, lr=result.lr, tokens_per_second=tokens_per_s,
                                selected_ratio=tot.selected_ratio,
                                selection_seconds_by_phase=tot.selection_seconds_by_phase)
        self.metrics.observe_step(step_seconds, result.loss)
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
        gone = stream.take_unreachable()
        self.unreachable += gone
        for line in gone if self.cfg.data.skip_unreachable else ():
            print(f"attent-scale: rank {self.rank}: warning: {line}; its samples are skipped as corrupt "
                  "(data.skip_unreachable)", file=sys.stderr)
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
        seen, trained, gone = all_reduce_values(
            [len(progress.corrupt_ids), progress.samples_trained, len(self.unreachable)], "sum", self.group)
        if gone and not cfg.data.skip_unreachable:  # every rank stops here together, naming one URL
            lines = sorted(set().union(*all_gather_objects(self.unreachable, self.group)))
            more = f" ({len(lines) - 1} more shard(s) too)" if len(lines) > 1 else ""
            raise UserError(f"{lines[0]}{more}; {self.data_label} (raise data.retries / data.backoff, "
                            "or data.skip_unreachable: true to skip it like a corrupt shard)")
        budget = cfg.data.max_corrupt_fraction * self.n_train
        corrupt = int(seen)
        if seen > budget and self.world > 1:  # a sum over ranks counts an id two ranks met twice
            corrupt = len(set().union(*all_gather_objects(progress.corrupt_ids, self.group)))
        if corrupt > budget and cfg.data.max_corrupt_fraction < 1.0:
            raise UserError(
                f"{self.data_label}: {corrupt} of {self.n_train} training samples are corrupt "
                f"({corrupt / self.n_train:.1%}) at step {progress.step}, over data.max_corrupt_fraction "
                f"{cfg.data.max_corrupt_fraction} (1.0 disables; the warnings above name the shards)"
            )
        if final and trained == 0:
            raise UserError(
                f"{self.data_label}: no sample trained in {progress.step} steps ({corrupt} corrupt "
                f"samples met); nothing exported"
            )

    # ---- after a step: anneal, checkpoint, preemption ---------------------------------------------

    def anneal_cut(self) -> bool:
        """Steps or seconds budgets: start the anneal once its point is reached; True when that ends the
        current subset epoch early (the next epoch trains all data)."""
        if self.teacher.anneal_from is None and _anneal_due(self.cfg, self.progress, self.clock,
                                                            self.total_steps, self.group):
            self.teacher.start_anneal(self.progress.epoch + 1)
            return self.selection.bits is not None
        return False

    def checkpoint_due(self, poll: Poll) -> bool:
        """After this step's stop poll: a stop signal's checkpoint, or a periodic one (every_steps, or some
        rank's every_minutes)?"""
        return poll.preempt or self.checkpointer.should_save(self.progress.step, last_step=self.total_steps,
                                                             late=poll.save_late)

    def preempt(self) -> int:
        """After a stop signal's checkpoint: leave the marker a launcher script checks, and the exit code."""
        from attent_scale.runlog import write_json

        received = self.stopper.signal.received
        if self.is_main:
            # torchrun turns a worker's exit code into its own 1: the marker file is what a
            # launcher script checks to tell "preempted, requeue me" from a failure
            marker = {"step": self.progress.step, "signal": received}
            write_json(self.run_dir / PREEMPTED_MARKER, marker)
            print(
                f"attent-scale: {received or 'stop signal'}: checkpoint at step "
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
                f"{self.data_label}: three epochs in a row yielded no training batch "
                f"(selection too small for {self.world} ranks x batch {self.batch_size}?)"
            )
        return False

    # ---- eval, checkpoints, totals, the end --------------------------------------------------------

    def evaluate(self) -> float:
        """Val loss on this rank's val batches; eval.jsonl and the metrics get the point."""
        progress, clock = self.progress, self.clock
        t0, c0 = time.perf_counter(), time.process_time()
        signal = self.cfg.teacher.strategy == "signal" and self.teacher.mode in ("cycle", "ledger")
        loss = self.engine.evaluate(self.validator.batches(self.manifest), sample_hist=signal)
        if self.validator.stream is not None:  # val shards given up on stop the run like train shards
            self.unreachable += self.validator.stream.take_unreachable()
        if signal:  # the teacher's thresholds come from the val losses' distribution
            self.teacher.observe_val(self.engine.val_histogram, progress.step)
        clock.eval_seconds += time.perf_counter() - t0
        clock.eval_cpu_seconds += time.process_time() - c0
        self.validator.last_loss = loss
        if self.validator.stop_early(loss):  # eval.early_stop_patience: val stopped improving: end here
            self.total_steps = progress.step
        self.logs.eval.write(
            {
                "step": progress.step,
                "val_loss": loss,
                "perplexity": math.exp(loss) if loss < 50 else float("inf"),
                "samples_trained": progress.samples_trained * self.world,
                "train_seconds": clock.train_seconds,
                "train_cpu_seconds": clock.train_cpu_seconds,
                "wall_seconds": clock.wall(),
            }
        )
        self.metrics.observe_eval(loss)
        self.board.log_eval(progress.step, loss)
        return loss

    def save(self, stream: Any, epoch_done: bool = False) -> None:
        """A checkpoint: the engine's state plus each part's own entry, the teacher's and the RNG's.
        `stream`: the epoch's stream, whose position a resume continues from (None: at an epoch's start);
        `epoch_done`: saved as the end of this epoch (a resume starts the next one, no stream)."""
        from attent_scale import checkpoint as ckpt
        from attent_scale.config import config_to_dict

        t0 = time.perf_counter()
        progress = self.progress.state_dict()
        if epoch_done:
            progress["epoch"] += 1
        state = {
            "progress": progress,
            "clock": self.clock.state_dict(),
            "selection": self.selection.state_dict(),
            "stream": stream.state_dict() if stream is not None and not epoch_done else None,
            "eval": self.validator.state_dict(),
            "logs": self.logs.state_dict(),
            "teacher": self.teacher.state_dict(),
            "rng": ckpt.rng_state(),
        }
        self.checkpointer.save(self.progress.step, self.engine, state, config=config_to_dict(self.cfg))
        seconds = time.perf_counter() - t0
        self.clock.checkpoint_seconds += seconds
        self.metrics.observe_checkpoint(seconds)

    def totals(self) -> RunTotals:
        """This rank's running totals: what metrics.jsonl, Prometheus and summary.json report."""
        from attent_scale.data.remote import stats as remote_stats

        p, c = self.progress, self.clock
        return RunTotals(**teacher_totals(
            self.teacher.stats, steps=p.step, epoch=p.epoch, samples_trained=p.samples_trained,
            tokens_trained=p.tokens_trained, nonfinite_skipped=p.nonfinite_skipped,
            online_dropped_batches=p.online_dropped_batches, corrupt_samples=p.corrupt_samples,
            corrupt_ids=len(p.corrupt_ids), dropped_samples=p.dropped_samples, train_seconds=c.train_seconds,
            train_cpu_seconds=c.train_cpu_seconds, eval_seconds=c.eval_seconds,
            eval_cpu_seconds=c.eval_cpu_seconds, checkpoint_seconds=c.checkpoint_seconds,
            wall_seconds=c.wall(),
            selected_ratio=self.selection.ratio, train_loss=p.last_train_loss,
            val_loss=self.validator.last_loss, **remote_totals(remote_stats())))

    def finish(self) -> None:
        """The end of a run: final eval (unless this step had one), last checkpoint, export, summary.json."""
        from attent_scale.runlog import write_json

        if not self.validator.should_validate(self.progress.step):
            self.evaluate()
        if self.checkpointer.enabled:
            self.save(None)
        if self.cfg.checkpoint.export:
            self.engine.export(self.run_dir / "export")  # collective: sharded engines gather the weights
            if self.is_main and self.manifest.tokenizer_kind != "sentencepiece":
                from attent_scale.models import save_data_tokenizer

                save_data_tokenizer(self.run_dir / "export", self.manifest.tokenizer_dir)
        tot = self.totals()
        summary = _summary(self.cfg, tot, self.progress.corrupt_ids, self.group, self.world)
        if self.is_main:
            write_json(self.run_dir / "summary.json", summary)
        self.metrics.update(tot)

    def close(self, failed: bool, exit_code: int) -> None:
        """Close bar, logs and metrics; after a clean run, wait for every rank, then leave the process group
        (never after a failure: see `train`); the data workers stop either way."""
        if self.stream_workers is not None:
            self.stream_workers.close()
        if self.bar is not None:
            self.bar.close()
        self.logs.close()
        self.board.close(exit_code or int(failed))  # W&B marks a failed run failed
        self.metrics.close()
        if self.run_lock is not None:  # a second train() in this process may take run_dir again
            self.run_lock.release()
        if not failed and initialized():
            if exit_code == 0:
                dist.barrier()
            dist.destroy_process_group()


def _anneal_due(cfg: RunConfig, progress: Progress, clock: Clocks, total: int, group: Any) -> bool:
    """Steps or seconds budgets: has the last `teacher.anneal_fraction` of the budget (`total` steps, or
    train.max_seconds) begun? (Epoch budgets anneal by plan.) The seconds clock differs per rank, so ranks
    agree on it with one all-reduce."""
    a = cfg.teacher.anneal_fraction
    if not a or cfg.train.max_epochs or cfg.teacher.mode not in ("cycle", "ledger"):
        return False
    if cfg.train.max_seconds:
        return _all_reduce_max(float(clock.train_seconds >= (1 - a) * cfg.train.max_seconds), group) >= 1
    return progress.step >= (1 - a) * total


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


def _resume_line(path: Path, progress: Progress, selection: SelectionState, stream: dict[str, Any] | None,
                 n_train: int, world: int, old_world: int) -> str:
    """One line saying what a resumed run continues from."""
    from attent_scale.teacher import Selection

    if selection.bits is None:
        chosen = f"full data (ratio {selection.ratio:.3g})"
    else:
        sel = Selection(selection.bits, n_train)
        chosen = f"selection sha256 {sel.sha256} ({sel.count} ids, ratio {selection.ratio:.3g})"
    where = "at its start"
    if stream is not None:
        where = f"after {stream['batches_consumed']} of its batches"
    elif selection.remainder_due(progress.epoch):
        owed = Selection(selection.remainder_bits, n_train).count
        where = f"with {owed} ids still owed"
    if old_world != world:
        where += f", written on {old_world} ranks, continued on {world}"
    samples = progress.samples_trained * world  # equal shares on every rank
    return (f"attent-scale: resumed from {path} (step {progress.step}, {samples} samples trained, "
            f"epoch {progress.epoch} {where}, {chosen})")


def _progress_bar(total: int, start: int) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=start,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=not sys.stderr.isatty() and os.environ.get("ATTENT_PROGRESS") != "1",
    )


def _summary(cfg: RunConfig, tot: RunTotals, corrupt_ids: list[int], group: Any, world: int
             ) -> dict[str, Any]:
    """summary.json: the totals' view with the counts summed over ranks, plus every rank's own row."""
    per_rank = tot.rank_row()
    gathered = all_gather_objects(per_rank, group)  # once, at the end: not a hot path
    distinct = set().union(*all_gather_objects(corrupt_ids, group))

    keys = ("samples_trained", "tokens_trained", "samples_scored", "corrupt_samples", *REMOTE_KEYS)
    # `group` is gloo (the default group, or our own on NCCL jobs)
    summed = all_reduce_values([getattr(tot, k) for k in keys], "sum", group)
    job = {"world_size": world, "torch_threads": torch.get_num_threads(), "malloc": malloc_state(),
           "engine": cfg.engine.name, "teacher_mode": cfg.teacher.mode, "strategy": cfg.teacher.strategy}
    return tot.summary(job=job, summed=dict(zip(keys, summed, strict=True)), corrupt_ids=len(distinct),
                       per_rank=[RunTotals.rank_entry(r, row) for r, row in enumerate(gathered)])


class _CallableModule(type(sys)):  # types.ModuleType
    """This module, exported as the Python API's `attent_scale.train`, is also callable: `train(cfg)`.
    (A package attribute named like a submodule is replaced by the submodule on its first import, so the
    function alone could not be `attent_scale.train`.)"""

    def __call__(self, cfg: RunConfig) -> int:
        return train(cfg)


sys.modules[__name__].__class__ = _CallableModule
