"""Held-out evaluation: when it is due (eval.every_steps) and this rank's val batches."""

from __future__ import annotations

import itertools
from typing import Any

from attent_scale.config import RunConfig


class Validator:
    """Decides when the val loss is measured and keeps the last one (its checkpoint entry "eval")."""

    def __init__(self, cfg: RunConfig, *, rank: int, world: int) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.every_steps = cfg.eval.every_steps
        self.last_loss = float("nan")
        self.patience = cfg.eval.early_stop_patience
        self.best_loss = float("inf")  # early stopping: the best val loss so far, and evaluations since it
        self.since_best = 0
        self._cache: list[Any] = []
        self.stream: Any = None  # the val ShardStream last built (its unreachable shards, for the trainer)

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

    def batches(self, data_dir: Any) -> Any:
        """This rank's val batches, read by a DataLoader worker (not on the training thread); a bounded
        val set (eval.max_batches) is read once and kept in memory for every later evaluation."""
        from attent_scale.data import ShardStream

        if self._cache:
            return self._cache
        cfg = self.cfg
        val = ShardStream(data_dir, "val", rank=self.rank, world_size=self.world, seed=cfg.seed, epoch=0,
                          batch_size=cfg.eval.batch_size, num_workers=1)
        self.stream = val
        if not cfg.eval.max_batches:
            return val
        self._cache.extend(itertools.islice(val, cfg.eval.max_batches))
        return self._cache

    def state_dict(self) -> dict[str, Any]:
        return {"last_loss": self.last_loss, "best_loss": self.best_loss, "since_best": self.since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_loss = float(state.get("last_loss", float("nan")))
        self.best_loss = float(state.get("best_loss", float("inf")))
        self.since_best = int(state.get("since_best", 0))
