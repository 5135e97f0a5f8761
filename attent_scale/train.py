"""The native trainer: `Trainer` builds the run's components once, then `train()` runs the loop.

Each component owns its state (a checkpoint entry) and says when it is due: the teacher session
(teacher/session.py: the epoch's selection, the planned steps, the loss weights), `Progress` and `Clocks`
(train_state.py), `DataFaults` (data/faults.py), `Validator` (validate.py), `Checkpointer` (checkpoint.py),
`StopCheck` (stop.py), `RunLogs` (runlog.py); a resume is one call (resume.py); run totals in totals.py."""

from __future__ import annotations

import argparse
import copy
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from attent_scale.config import RunConfig, add_override_argument, load_config
from attent_scale.deadline import EndDeadline
from attent_scale.dist import all_gather_objects, all_reduce_values, initialized, side_group
from attent_scale.errors import UserError
from attent_scale.malloc import malloc_state, tune_malloc
from attent_scale.stop import END_EPOCH, PREEMPT, STOP, Poll, StopCheck, StopSignal, decide
from attent_scale.totals import PHASES, REMOTE_KEYS, RunTotals, remote_totals, teacher_totals
from attent_scale.train_state import Clocks, Progress, now

__all__ = ["END_EPOCH", "PREEMPT", "PHASES", "STOP", "Progress", "StopSignal", "Trainer", "add_parser",
           "train"]

PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: checkpoint written after SIGTERM/SIGUSR1; the Slurm script requeues
PREEMPTED_MARKER = "PREEMPTED"  # written to run_dir beside that checkpoint; removed when the run goes on


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
        with trainer.end:  # the end deadline is disarmed however close ends
            trainer.close(failed, exit_code)


def _data_label(cfg: RunConfig) -> str:
    """How messages name the run's data: data.dir, or the blend's sources."""
    from attent_scale.data.manifest import set_name

    if cfg.data.dir or not cfg.data.sources:
        return f"data.dir {cfg.data.dir}"
    return "data.sources (" + ", ".join(s.name or set_name(s.dir) for s in cfg.data.sources) + ")"


class Trainer:
    """One training job: `__init__` builds the components in order and runs nothing; `train()` is the loop
    (epoch_stream → train_step → after-step checks, then finish). The loop's counters are `self.progress`,
    its seconds `self.clock`; a resumed stream position waits in `self.resume_stream` until the epoch's
    stream takes it."""

    def __init__(self, cfg: RunConfig) -> None:
        # Heavy imports here so `attent-scale --help` stays fast.
        from attent_scale.checkpoint import Checkpointer, move_aside_earlier
        from attent_scale.config import config_to_dict
        from attent_scale.data import remote
        from attent_scale.data.blend import open_data
        from attent_scale.data.faults import DataFaults
        from attent_scale.data.integrity import check_shards
        from attent_scale.data.workers import StreamWorkers
        from attent_scale.dist import init_distributed
        from attent_scale.engines import build_engine
        from attent_scale.loggers import open_loggers
        from attent_scale.metrics import Metrics
        from attent_scale.models import check_model_fits
        from attent_scale.resume import resume
        from attent_scale.runlock import lock_run_dir
        from attent_scale.runlog import RunLogs
        from attent_scale.teacher import Batching, Budget, TeacherSession
        from attent_scale.teacher.folds import holdout_selection
        from attent_scale.teacher.plan import candidate_batch_size
        from attent_scale.validate import Validator, check_val_split

        self.cfg = cfg
        self.clock = Clocks()  # the wall clock counts from here
        self.progress = Progress()
        self.resume_stream: dict[str, Any] | None = None  # a checkpoint's mid-epoch stream position
        self.stream: Any = None  # the epoch under way's ShardStream (None between epochs)
        self.saved_step = -1  # the step of the newest checkpoint written or resumed from
        if os.environ.get("ATTENT_NUM_THREADS"):  # bench --clock cpu pins each arm to this many threads
            torch.set_num_threads(int(os.environ["ATTENT_NUM_THREADS"]))
        tune_malloc()
        self.info = init_distributed()
        self.rank, self.world = self.info.rank, self.info.world_size
        self.is_main = self.rank == 0
        # the data and the job must fit each other
        remote.configure(remote.from_config(cfg.data))
        self.data_label = remote.redact(_data_label(cfg))  # what messages name: never a URL's credentials
        self.manifest = open_data(cfg.data, cfg.seed)  # a Manifest, or a Blend of data.sources
        self.batch_size = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
        self.n_train = self.manifest.num_samples(cfg.data.train_split)
        self.holdout = holdout_selection(cfg.data.holdout, self.n_train)  # None, or the ids trained on
        _preflight(cfg, self.n_train, self.world, self.batch_size, self.data_label)
        check_val_split(cfg, self.manifest, self.data_label)
        self.run_dir = Path(cfg.run_dir)
        _check_run_dir(self.run_dir, self.rank)
        self.run_lock = lock_run_dir(self.run_dir, self.rank)  # one job per run_dir; released in close
        if not cfg.checkpoint.resume and self.is_main:  # a fresh run never writes beside an earlier run's
            moved = move_aside_earlier(self.run_dir)
            if moved:
                print(moved, file=sys.stderr)
        # Teacher and loop bookkeeping talk over CPU tensors: on NCCL jobs they get a gloo group of their own.
        self.group = side_group()
        for _, m in self.manifest.manifests():  # a blend: every source's shard set
            check_shards(m, self.run_dir, rank=self.rank, world=self.world, group=self.group)
        t = cfg.teacher
        candidates = candidate_batch_size(t, self.batch_size)  # online mode draws more than it trains
        self.session = TeacherSession.build(
            t, num_samples=self.n_train, seed=cfg.seed, group=self.group,
            batching=Batching(self.world, candidates, drop_last=t.mode == "online"),
            budget=Budget(cfg.train.max_epochs, cfg.train.max_steps, cfg.train.max_seconds),
            record_path=self.run_dir / "selection.jsonl" if self.is_main else None, data=self.manifest,
            split=cfg.data.train_split, sources=_sources(cfg, self.manifest))
        self.faults = DataFaults(cfg.data, num_samples=self.n_train, rank=self.rank, world=self.world,
                                 group=self.group, label=self.data_label,
                                 check_every=cfg.train.stop_check_every, exclude=self.session.exclude)
        self.total_steps = self.session.total_steps()  # the run's length: the LR schedule decays over it
        check_model_fits(cfg.model, int(self.manifest.vocab_size), self.manifest.seq_len)
        self.engine = build_engine(cfg, self.manifest)
        self.engine.total_steps = self.total_steps
        _attach_token_reference(cfg, self.session, self.engine)
        self.checkpointer = Checkpointer(self.run_dir, every_steps=cfg.checkpoint.every_steps,
                                         every_minutes=cfg.checkpoint.every_minutes,
                                         keep_last=cfg.checkpoint.keep_last, rank=self.rank,
                                         world_size=self.world, group=self.group)
        self.validator = Validator(cfg.eval, seed=cfg.seed, rank=self.rank, world=self.world,
                                   data=self.manifest, session=self.session, faults=self.faults)
        self.logs = RunLogs(self.run_dir, self.is_main)
        self._config_recorded = False
        self.resumed = None
        if cfg.checkpoint.resume:
            parts = {"progress": self.progress, "clock": self.clock, "faults": self.faults,
                     "eval": self.validator, "logs": self.logs}
            self.resumed = resume(self.run_dir, rank=self.rank, world=self.world, group=self.group,
                                  engine=self.engine, session=self.session, parts=parts,
                                  config=config_to_dict(cfg), data=self.manifest, split=cfg.data.train_split)
        if self.resumed is None:
            self.logs.reset(None)  # a fresh run starts its logs empty
        else:
            self.resume_stream = self.resumed.stream
            self.saved_step = self.progress.step
            self.replan()  # steps done plus what is left at this world size
        if self.is_main:
            (self.run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        # after the resume check (a refused resume leaves the recorded config as it was) and the plan
        self._record_config()
        self.logs.open()  # the teacher appends selection records itself; ours open after truncation
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        self.metrics = Metrics.create(cfg.metrics, rank=self.rank, local_rank=self.info.local_rank, node=node,
                                      totals=self.totals())  # a resumed run's counters go on from its totals
        self.board = open_loggers(cfg, self.run_dir, is_main=self.is_main,  # TensorBoard, W&B
                                  resumed_step=None if self.resumed is None else self.progress.step)
        self.validator.open(self.logs.eval, self.metrics, self.board)
        self.stopper = StopCheck(every=cfg.train.stop_check_every, max_seconds=cfg.train.max_seconds,
                                 group=self.group)
        # one set of DataLoader workers for every epoch and scoring pass (started on first use)
        self.stream_workers = StreamWorkers(cfg.data.num_workers) if cfg.data.num_workers > 0 else None
        self.scorer = _ShardScorer(self)
        self.empty_epochs = 0  # epochs in a row whose stream ran out without a training batch
        self.bar = _progress_bar(self.total_steps, self.progress.step) if self.is_main else None
        # every phase after the last step ends within train.end_timeout_seconds (deadline.py)
        self.end = EndDeadline(cfg.train.end_timeout_seconds, rank=self.rank, world=self.world,
                               run_dir=self.run_dir)

    def replan(self) -> None:
        """The run's total steps again, from where it stands (after a resume, or a selection whose kept
        count only the data gives): the engine's LR schedule decays over them and config.yaml records them."""
        p = self.progress
        stream_batches = None if self.resume_stream is None else int(self.resume_stream["batches_consumed"])
        planned = self.session.total_steps(p.step, p.epoch, stream_batches)
        if planned == self.total_steps:
            return
        self.total_steps = self.engine.total_steps = planned
        if self._config_recorded:
            self._record_config()

    def _record_config(self) -> None:
        """config.yaml (rank 0) with the steps this run plans (runlog.write_run_config)."""
        from attent_scale.runlog import write_run_config

        if self.is_main:
            write_run_config(self.run_dir, self.cfg, self.total_steps)
        self._config_recorded = True

    def train(self) -> int:
        """Epoch after epoch (start, stream, steps) until a budget, the data or a stop signal ends the run;
        returns the exit code."""
        from attent_scale.teacher import ScoringStopped

        progress, clock, faults = self.progress, self.clock, self.faults
        if self.resumed is None and self.validator.should_validate(progress.step):
            self.evaluate()  # the step-0 point of every val-loss curve
        while progress.step < self.total_steps:
            try:
                stream = self.stream = self.epoch_stream()
            except ScoringStopped:  # a stop signal during the teacher's scoring pass, agreed by every rank
                return self.preempt(self.save_between_epochs())
            faults.check(progress.step, progress.samples_trained, now=True)  # the scoring pass's faults too
            trained, decision = 0, None
            for batch in clock.timed(stream):
                if not self.train_step(batch, stream):
                    continue  # online mode skipped a short last candidate batch
                trained += 1
                faults.check(progress.step, progress.samples_trained)
                cut = self.session.anneal_cut(progress.step, clock.train_seconds)  # ends a subset epoch
                if self.validator.should_validate(progress.step):
                    self.evaluate()
                poll = self.stopper.poll(progress.step, clock.train_seconds, self.checkpointer.late(),
                                         last=progress.step >= self.total_steps)
                if self.checkpoint_due(poll):
                    faults.check(progress.step, progress.samples_trained, now=True)  # none unreadable saved
                    # an anneal cut saves as the end of this epoch: a resume starts the anneal like we do
                    self.save(stream, epoch_done=cut)
                decision = decide(poll, step=progress.step, last_step=self.total_steps, cut=cut)
                if decision is not None:
                    break
            if decision == PREEMPT:
                return self.preempt()
            faults.count(stream)
            if decision == STOP:
                break
            progress.epoch += 1  # the stream ran out, or the anneal point ended this epoch early
            self.stream = None
            if decision is None and self.epoch_budget_spent(trained):
                break
        self.end.enter("final checks")
        faults.check(progress.step, progress.samples_trained, final=True)  # trained nothing: no export
        self.finish()
        return 0

    def epoch_stream(self) -> Any:
        """This epoch's `ShardStream` over what the teacher session says it trains (a fresh epoch is planned,
        scored and selected there); a resumed one continues from the checkpointed stream position."""
        from attent_scale.teacher import Selection

        loop_t0 = now()
        progress = self.progress
        start = self.session.begin_epoch(progress.epoch, progress.step, self.scorer,
                                         resumed=self.resume_stream is not None, stop=self.stopper)
        if start.replan:
            self.replan()
        if not (start.resumed or start.owed):
            start.report(self.metrics)
        ids = None if start.selection is None else Selection(start.selection.bits, self.n_train)
        stream = self._shard_stream(progress.epoch, self.session.candidate_batch_size(self.batch_size), ids,
                                    pad=start.owed)
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
        """Online pick, the batch's loss weights, engine step, after-step teacher work, bookkeeping, logs and
        metrics; False when online mode skips a short last candidate batch (no step taken)."""
        step_t0 = now()
        progress, session = self.progress, self.session
        if session.mode == "online":
            if len(batch["ids"]) < session.candidate_batch_size(self.batch_size):
                progress.online_dropped_batches += 1  # same on every rank: equal counts
                return False
            batch = session.online_pick(batch, self.engine.score, self.batch_size, progress.step)
        weights = session.loss_weights(batch["ids"])
        if weights is not None:
            batch["weights"] = weights
        result = self.engine.train_step(batch, tokens=session.tokens)
        real = batch["ids"] >= 0
        self.faults.note(stream, progress.step)
        if progress.step + 1 >= self.total_steps:
            self.end.enter("last step")  # its selection exchange, stop check, eval or save
        session.after_step(batch["ids"][real], result.per_sample[real], progress.step)
        progress.step += 1
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

    def log_step(self, batch: dict[str, Any], result: Any, step_seconds: float) -> None:
        """metrics.jsonl every log_every steps, Prometheus and the progress bar every step."""
        progress, world = self.progress, self.world
        tokens_per_s = int((batch["labels"] != -100).sum()) * world / max(step_seconds, 1e-9)
        tot = self.totals()
        if progress.step % self.cfg.train.log_every == 0 or progress.step == self.total_steps:
            row = tot.metrics_row(world=world, loss=result.loss, lr=result.lr, grad_norm=result.grad_norm,
                                  tokens_per_second=tokens_per_s)
            if self.session.tokens is not None:  # teacher.unit token: this step's kept share, all ranks'
                row["step_kept_token_share"] = self.session.tokens.step_share
            self.logs.metrics.write(row)
            self.board.log_step(progress.step, loss=result.loss, lr=result.lr, tokens_per_second=tokens_per_s,
                                selected_ratio=tot.selected_ratio,
                                selection_seconds_by_phase=tot.selection_seconds_by_phase,
                                kept_token_share=tot.kept_token_share)
        self.metrics.observe_step(step_seconds, result.loss)
        self.metrics.update(tot)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{result.loss:.3f}", epoch=progress.epoch)

    def check_nonfinite(self, stream: Any) -> None:
        """Too many non-finite losses in a row: set aside the checkpoints holding the weights that gave them,
        then stop with a one-line error."""
        from attent_scale import checkpoint as ckpt

        progress = self.progress
        if progress.nonfinite_in_row >= self.cfg.train.max_nonfinite_in_row:  # no checkpoint of these weights
            raise NonFiniteLossError(ckpt.set_aside_nonfinite(
                self.run_dir, progress.step, progress.nonfinite_in_row, rank=self.rank, group=self.group))

    # ---- after a step: checkpoint, preemption, the epoch budget -----------------------------------

    def checkpoint_due(self, poll: Poll) -> bool:
        """After this step's stop poll: a stop signal's checkpoint, or a periodic one (every_steps, or some
        rank's every_minutes)?"""
        if poll.preempt:
            return True
        # none while losses are non-finite: a rotation (keep_last) would drop the last checkpoint before them
        return self.progress.nonfinite_in_row == 0 and self.checkpointer.should_save(
            self.progress.step, last_step=self.total_steps, late=poll.save_late)

    def preempt(self, checkpoint: str | None = None) -> int:
        """After a stop signal's checkpoint: leave the marker a launcher script checks, and the exit code.
        `checkpoint`: what became of the checkpoint, when the stop came between epochs (default: written)."""
        from attent_scale.runlog import write_json

        received = self.stopper.signal.received
        step = self.progress.step
        if self.is_main:
            # torchrun turns a worker's exit code into its own 1: the marker file is what a
            # launcher script checks to tell "preempted, requeue me" from a failure
            marker = {"step": step, "signal": received}
            write_json(self.run_dir / PREEMPTED_MARKER, marker)
            what = checkpoint or f"checkpoint at step {step} written"
            print(f"attent-scale: {received or 'stop signal'}: {what}, exiting with {PREEMPT_EXIT_CODE} for "
                  "requeue", file=sys.stderr)
        return PREEMPT_EXIT_CODE

    def save_between_epochs(self) -> str:
        """Collective: a stop signal ended the teacher's scoring pass at the start of an epoch (step N):
        checkpoint step N, unless the newest checkpoint is at step N already or nothing was trained yet
        (the requeued run scores again from there). Returns what it did, for the preempt line."""
        step = self.progress.step
        where = f"stopped the teacher's scoring pass for epoch {self.progress.epoch} at step {step}"
        if step == 0:
            return f"{where}; nothing trained yet, no checkpoint (a rerun starts over)"
        if self.saved_step == step:
            return f"{where}; checkpoint at step {step} is there already"
        self.save(None)
        return f"{where}; checkpoint at step {step} written"

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
        """The val loss now: the Validator measures it and writes eval.jsonl, the metrics and the board;
        with eval.early_stop_patience, val that stopped improving ends the run here."""
        loss = self.validator.validate(self.engine, self.progress.step, clock=self.clock,
                                       samples_trained=self.progress.samples_trained * self.world)
        if self.validator.stop_early(loss):
            self.total_steps = self.progress.step
        return loss

    def save(self, stream: Any, epoch_done: bool = False) -> None:
        """A checkpoint: the engine's state plus each component's own entry and the RNG's.
        `stream`: the epoch's stream, whose position a resume continues from (None: at an epoch's start, or
        at a resumed position no stream has taken yet); `epoch_done`: saved as the end of this epoch (a
        resume starts the next one, no stream)."""
        from attent_scale import checkpoint as ckpt
        from attent_scale.config import config_to_dict

        t0 = time.perf_counter()
        progress = self.progress.state_dict()
        if epoch_done:
            progress["epoch"] += 1
        position = stream.state_dict() if stream is not None else self.resume_stream  # a position not taken
        session = self.session.state_dict()
        state = {
            "progress": progress,
            "clock": self.clock.state_dict(),
            "selection": session["selection"],
            "stream": None if epoch_done else position,
            "eval": self.validator.state_dict(),
            "logs": self.logs.state_dict(),
            "faults": self.faults.state_dict(),
            "teacher": session["teacher"],
            **({"tokens": session["tokens"]} if "tokens" in session else {}),  # teacher.unit token's counts
            "rng": ckpt.rng_state(),
        }
        self.checkpointer.save(self.progress.step, self.engine, state, config=config_to_dict(self.cfg))
        self.saved_step = self.progress.step
        seconds = time.perf_counter() - t0
        self.clock.checkpoint_seconds += seconds
        self.metrics.observe_checkpoint(seconds)

    def totals(self) -> RunTotals:
        """This rank's running totals: what metrics.jsonl, Prometheus and summary.json report."""
        from attent_scale.data.remote import stats as remote_stats

        p, c, f = self.progress, self.clock, self.faults
        return RunTotals(**teacher_totals(
            self.session.teacher.stats, steps=p.step, epoch=p.epoch, samples_trained=p.samples_trained,
            tokens_trained=p.tokens_trained, nonfinite_skipped=p.nonfinite_skipped,
            online_dropped_batches=p.online_dropped_batches, corrupt_samples=f.corrupt_samples,
            corrupt_ids=len(f.corrupt_ids), dropped_samples=p.dropped_samples, train_seconds=c.train_seconds,
            train_cpu_seconds=c.train_cpu_seconds, eval_seconds=c.eval_seconds,
            eval_cpu_seconds=c.eval_cpu_seconds, checkpoint_seconds=c.checkpoint_seconds,
            wall_seconds=c.wall(),
            selected_ratio=self.session.state.ratio, train_loss=p.last_train_loss,
            kept_token_share=None if self.session.tokens is None else self.session.tokens.share,
            val_loss=self.validator.last_loss, **remote_totals(remote_stats())))

    def finish(self) -> None:
        """The end of a run: final eval (unless this step had one), last checkpoint, export, summary.json."""
        from attent_scale.runlog import write_json

        self.end.enter("final eval")
        if not self.validator.should_validate(self.progress.step):
            self.evaluate()
        self.end.enter("checkpoint")
        if self.checkpointer.enabled:  # where the stream stands: a resume with a larger budget goes on there
            self.save(self.stream)
        self.end.enter("export")
        if self.cfg.checkpoint.export:
            from attent_scale import checkpoint as ckpt
            from attent_scale.export import ExportFailed

            tok = self.manifest.tokenizer_dir if self.manifest.tokenizer_kind != "sentencepiece" else None
            try:  # collective: sharded engines gather the weights; written whole or not at all
                self.engine.export(self.run_dir / "export", tokenizer_dir=tok)
            except ExportFailed as exc:
                raise exc.keeping(ckpt.latest_checkpoint(self.run_dir), self.progress.step) from None
        self.end.enter("summary")
        tot = self.totals()
        summary = _summary(self.cfg, tot, self.faults.corrupt_ids, self.group, self.world)
        if self.is_main:
            write_json(self.run_dir / "summary.json", summary)
        self.metrics.update(tot)

    def close(self, failed: bool, exit_code: int) -> None:
        """Close bar, logs and metrics; after a clean run, wait for every rank, then leave the process group
        (never after a failure: see `train`); the data workers stop either way. Each part runs under the
        end deadline (disarmed by `train`)."""
        self.end.enter("close")
        if self.stream_workers is not None:
            self.stream_workers.close()
        if self.bar is not None:
            self.bar.close()
        self.logs.close()
        self.board.close(exit_code or int(failed))  # W&B marks a failed run failed
        self.end.enter("metrics linger", extra_seconds=self.cfg.metrics.linger_seconds)
        self.metrics.close()
        if self.run_lock is not None:  # a second train() in this process may take run_dir again
            self.run_lock.release()
        self.end.enter("final barrier")
        if not failed and initialized():
            if exit_code == 0:
                dist.barrier()
            dist.destroy_process_group()


class _ShardScorer:
    """The teacher session's scoring pass (teacher/session.py:Scorer) over shards: this rank's padded share
    of the training ids not skipped, read like an epoch's, scored by the engine; what the stream met goes to
    the data faults."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def batches(self, skip: Any, step: int) -> Any:
        t = self.trainer
        stream = t._shard_stream(t.progress.epoch, t.cfg.eval.batch_size,
                                 None if skip is None else skip.complement(), pad=True)
        yield from stream
        t.faults.note(stream, step)
        t.faults.count(stream)

    def losses(self, batch: dict[str, Any]) -> Any:
        return self.trainer.engine.score(batch)


def _attach_token_reference(cfg: RunConfig, session: Any, engine: Any) -> None:
    """teacher.unit token with strategy hard: its online reference beside the engine's model (sharded over an
    FSDP2 engine's mesh; a LoRA reference adapter only on engine local, whose model is the peft model)."""
    if session.tokens is None or session.tokens.strategy != "hard":
        return
    from attent_scale.engines.reference import open_token_reference

    name = cfg.engine.name
    session.tokens.reference = open_token_reference(
        cfg.teacher.token_reference, device=engine.device, mesh=getattr(engine, "mesh", None),
        peft_model=engine.model if name == "local" else None, where=f"engine {name} (use engine local)")


def _preflight(cfg: RunConfig, n_train: int, world: int, batch_size: int, label: str) -> None:
    """The data and the job must fit each other: one line otherwise."""
    if n_train < world * batch_size:
        raise UserError(f"{label}: {n_train} training samples is too few for {world} ranks x batch "
                        f"{batch_size}")
    if cfg.engine.name == "local" and world > 1:
        raise UserError(f"engine.name 'local' is one process, but this job has {world} ranks; "
                        "use engine.name=deepspeed or fsdp under torchrun")


def _sources(cfg: RunConfig, manifest: Any) -> list[Any]:
    """The training ids by source, with the blend's floors (teacher/floors.py)."""
    from attent_scale.teacher.floors import SourceRange

    floors = [s.floor for s in cfg.data.sources] or [0.0]
    if any(floors) and cfg.teacher.mode not in ("cycle", "ledger"):
        raise UserError(f"config key 'data.sources[*].floor': floors apply to cycle and ledger "
                        f"selections, not teacher.mode {cfg.teacher.mode!r}")
    ranges = manifest.source_ranges(cfg.data.train_split)
    return [SourceRange(name, lo, hi, f) for (name, lo, hi), f in zip(ranges, floors, strict=True)]


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
