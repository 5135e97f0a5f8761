"""Held-out evaluation: when it is due (eval.every_steps) and this rank's val batches."""

from __future__ import annotations

import itertools
from typing import Any

from attent_scale.config import RunConfig
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
    """Decides when the val loss is measured and keeps the last one (its checkpoint entry "eval")."""

    def __init__(self, cfg: RunConfig, *, rank: int, world: int) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.every_steps = cfg.eval.every_steps
        self.last_loss = float("nan")
        self._cache: list[Any] = []
        self.stream: Any = None  # the val ShardStream last built (its unreachable shards, for the trainer)

    def should_validate(self, step: int) -> bool:
        """A periodic evaluation after `step` (step 0: the first point of every val-loss curve)?"""
        return bool(self.every_steps) and step % self.every_steps == 0

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
        return {"last_loss": self.last_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_loss = float(state.get("last_loss", float("nan")))
