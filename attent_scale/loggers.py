"""Rank 0's step and eval loggers of a native run (TensorBoard, W&B) behind one call each."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

from attent_scale.config import RunConfig
from attent_scale.tensorboard import NullBoard, open_board


class Loggers(NullBoard):
    """Every configured logger; each call goes to all of them."""

    def __init__(self, boards: list[NullBoard]) -> None:
        self.boards = boards

    def log_step(self, step: int, *, loss: float, lr: float, tokens_per_second: float,
                 selected_ratio: float, selection_seconds_by_phase: Mapping[str, float],
                 kept_token_share: float | None = None) -> None:
        for b in self.boards:
            b.log_step(step, loss=loss, lr=lr, tokens_per_second=tokens_per_second,
                       selected_ratio=selected_ratio, selection_seconds_by_phase=selection_seconds_by_phase,
                       kept_token_share=kept_token_share)

    def log_eval(self, step: int, val_loss: float) -> None:
        for b in self.boards:
            b.log_eval(step, val_loss)

    def close(self, exit_code: int = 0) -> None:
        """Close each (a failed run passes its exit code: W&B marks the run failed)."""
        for b in self.boards:
            b.close(exit_code)


def open_loggers(cfg: RunConfig, run_dir: Path, *, is_main: bool, resumed_step: int | None) -> Loggers:
    """TensorBoard (`metrics.tensorboard_dir`) and W&B (`metrics.wandb`) on rank 0; no-ops elsewhere.
    A logger that cannot start closes the ones already open and raises its one-line error."""
    from attent_scale.extras import available, missing
    from attent_scale.wandb_logger import open_wandb

    # every rank checks (only rank 0 writes): all fail together instead of rank 0 alone
    if cfg.metrics.wandb.enabled and not available("wandb"):
        raise missing("wandb", "config key 'metrics.wandb.enabled'")
    boards: list[NullBoard] = []
    try:
        boards.append(open_board(cfg.metrics.tensorboard_dir, run_dir, is_main=is_main,
                                 resumed_step=resumed_step))
        boards.append(open_wandb(cfg, run_dir, is_main=is_main, resumed_step=resumed_step))
    except BaseException:
        for b in boards:
            with contextlib.suppress(Exception):
                b.close()
        raise
    return Loggers(boards)
