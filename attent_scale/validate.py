"""Held-out evaluation: when it is due (eval.every_steps), this rank's val batches, and the evaluation itself
with its outputs (eval.jsonl, the metrics, the board, strategy signal's val histogram)."""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

from attent_scale.config import EvalConfig, RunConfig
from attent_scale.errors import UserError


def check_val_split(cfg: RunConfig, data: Any, label: str) -> None:
    """Before training: teacher.strategy 'signal' judges samples by their val losses, so data without a
    val sample would train as uniform, silently; one line instead (like eval.every_steps 0, refused in
    config.py). `label` names the data as messages do ('data.dir PATH')."""
    t = cfg.teacher
    if t.strategy == "signal" and t.mode in ("cycle", "ledger") and data.num_samples("val") == 0:
        raise UserError(f"config key 'teacher.strategy': 'signal' judges samples by their val losses, but "
                        f"{label} has no val samples (split 'val' is empty); rebuild the shards with "
                        "--val-fraction > 0 or --val-input, or choose another teacher.strategy")


class Validator:
    """Measures the val loss and keeps the last one (its checkpoint entry "eval"). `data`: the dataset
    whose "val" split it reads (a Manifest or a blend); `session`: the TeacherSession, which gets the val
    losses' histogram when its strategy wants them; `faults`: the data faults, which get the val shards
    given up on."""

    def __init__(self, cfg: EvalConfig, *, seed: int, rank: int, world: int, data: Any = None,
                 session: Any = None, faults: Any = None) -> None:
        self.cfg, self.seed, self.rank, self.world = cfg, seed, rank, world
        self.data, self.session, self.faults = data, session, faults
        self.every_steps = cfg.every_steps
        self.last_loss = float("nan")
        self.patience = cfg.early_stop_patience
        self.best_loss = float("inf")  # early stopping: the best val loss so far, and evaluations since it
        self.since_best = 0
        self._cache: list[Any] = []
        self.stream: Any = None  # the val ShardStream last built
        self.log: Any = None  # eval.jsonl (runlog.JsonLines), the metrics and the board: `open`
        self.metrics: Any = None
        self.board: Any = None

    def open(self, log: Any, metrics: Any, board: Any) -> None:
        """Where each evaluation is written: eval.jsonl, the metrics (Prometheus) and the board."""
        self.log, self.metrics, self.board = log, metrics, board

    def should_validate(self, step: int) -> bool:
        """A periodic evaluation after `step` (step 0: the first point of every val-loss curve)?"""
        return bool(self.every_steps) and step % self.every_steps == 0

    def stop_early(self, loss: float) -> bool:
        """Count an evaluation's val loss; True once `eval.early_stop_patience` evaluations in a row gave no
        new best (never with patience 0). Every rank gets the same all-reduced loss, so all agree."""
        if not self.patience:
            return False
        if loss < self.best_loss:
            self.best_loss, self.since_best = loss, 0
        else:
            self.since_best += 1
        return self.since_best >= self.patience

    def batches(self) -> Any:
        """This rank's val batches, read by a DataLoader worker (not on the training thread); a bounded
        val set (eval.max_batches) is read once and kept in memory for every later evaluation."""
        from attent_scale.data import ShardStream

        if self._cache:
            return self._cache
        val = ShardStream(self.data, "val", rank=self.rank, world_size=self.world, seed=self.seed, epoch=0,
                          batch_size=self.cfg.batch_size, num_workers=1)
        self.stream = val
        if not self.cfg.max_batches:
            return val
        self._cache.extend(itertools.islice(val, self.cfg.max_batches))
        return self._cache

    def validate(self, engine: Any, step: int, *, clock: Any, samples_trained: int) -> float:
        """Collective: the val loss over every rank's val batches at optimizer step `step` (its seconds go
        to `clock.eval_seconds`); with strategy signal the histogram of the per-sample val losses goes to
        the session. eval.jsonl gets the point with the samples trained (all ranks) and the clocks, the
        metrics and the board the loss."""
        t0, c0 = time.perf_counter(), time.process_time()
        hist = self.session is not None and self.session.wants_val
        loss = engine.evaluate(self.batches(), sample_hist=hist)
        if self.stream is not None and self.faults is not None:  # given-up val shards stop the run too
            self.faults.unreachable += self.stream.take_unreachable()
        if hist:  # the teacher's thresholds come from the val losses' distribution
            self.session.observe_val(engine.val_histogram, step)
        clock.eval_seconds += time.perf_counter() - t0
        clock.eval_cpu_seconds += time.process_time() - c0
        self.last_loss = loss
        if self.log is not None:
            self.log.write({
                "step": step,
                "val_loss": loss,
                "perplexity": math.exp(loss) if loss < 50 else float("inf"),
                "samples_trained": samples_trained,
                "train_seconds": clock.train_seconds,
                "train_cpu_seconds": clock.train_cpu_seconds,
                "wall_seconds": clock.wall(),
            })
        if self.metrics is not None:
            self.metrics.observe_eval(loss)
        if self.board is not None:
            self.board.log_eval(step, loss)
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"last_loss": self.last_loss, "best_loss": self.best_loss, "since_best": self.since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_loss = float(state.get("last_loss", float("nan")))
        self.best_loss = float(state.get("best_loss", float("inf")))
        self.since_best = int(state.get("since_best", 0))
