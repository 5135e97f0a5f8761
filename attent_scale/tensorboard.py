"""TensorBoard scalars of a native run (`metrics.tensorboard_dir`): rank 0 writes them, other ranks no-op.

Tags (the step is the optimizer step, the one metrics.jsonl and eval.jsonl carry)::

    train/loss, train/lr, train/tokens_per_second     every step metrics.jsonl gets a line
    selection/ratio                                    the fraction of the data the current epoch trains
    selection/kept_token_share                         teacher.unit token: kept / target tokens so far
    selection/seconds/<phase>                          cumulative selection seconds of this rank, by phase
    val/loss                                           every evaluation (step 0 included)

A fresh run writes a restart marker at step 0 and a resumed run one at the checkpoint's step + 1
(SummaryWriter's ``purge_step``): TensorBoard drops what an earlier attempt wrote from there on, so a
resumed curve has each step once, the way metrics.jsonl is cut back to the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attent_scale.errors import UserError

KEY = "metrics.tensorboard_dir"
FLUSH_SECONDS = 30  # SummaryWriter's background flush; close() flushes the rest


class NullBoard:
    """TensorBoard off (or not rank 0): every method is a no-op."""

    def log_step(self, step: int, *, loss: float, lr: float, tokens_per_second: float,
                 selected_ratio: float, selection_seconds_by_phase: Mapping[str, float],
                 kept_token_share: float | None = None) -> None:
        """One metrics.jsonl point."""

    def log_eval(self, step: int, val_loss: float) -> None:
        """One evaluation."""

    def close(self, exit_code: int = 0) -> None:
        """Flush and close (idempotent); `exit_code`: how the run ended (a logger may record it)."""


class Board(NullBoard):
    """A SummaryWriter on one directory."""

    def __init__(self, log_dir: Path, purge_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        try:
            self.writer: Any = SummaryWriter(str(log_dir), purge_step=purge_step, flush_secs=FLUSH_SECONDS)
        except OSError as exc:
            reason = exc.strerror or exc
            raise UserError(f"config key '{KEY}': cannot write to {log_dir} ({reason})") from None

    def log_step(self, step: int, *, loss: float, lr: float, tokens_per_second: float,
                 selected_ratio: float, selection_seconds_by_phase: Mapping[str, float],
                 kept_token_share: float | None = None) -> None:
        w = self.writer
        w.add_scalar("train/loss", loss, step)
        w.add_scalar("train/lr", lr, step)
        w.add_scalar("train/tokens_per_second", tokens_per_second, step)
        w.add_scalar("selection/ratio", selected_ratio, step)
        if kept_token_share is not None:
            w.add_scalar("selection/kept_token_share", kept_token_share, step)
        for phase, seconds in selection_seconds_by_phase.items():
            w.add_scalar(f"selection/seconds/{phase}", seconds, step)

    def log_eval(self, step: int, val_loss: float) -> None:
        self.writer.add_scalar("val/loss", val_loss, step)
        self.writer.flush()  # evaluations are rare: a live TensorBoard sees each one at once

    def close(self, exit_code: int = 0) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()


def board_dir(tensorboard_dir: str, run_dir: Path) -> Path | None:
    """Where the event files go: a relative `metrics.tensorboard_dir` is under run_dir; '' is off (None)."""
    if not tensorboard_dir:
        return None
    path = Path(tensorboard_dir).expanduser()
    return path if path.is_absolute() else run_dir / path


def open_board(tensorboard_dir: str, run_dir: Path, *, is_main: bool, resumed_step: int | None) -> NullBoard:
    """Rank 0's writer when `metrics.tensorboard_dir` is set (a NullBoard otherwise); `resumed_step` is the
    step of the checkpoint the run resumed from (None: a fresh run)."""
    path = board_dir(tensorboard_dir, run_dir)
    if path is None or not is_main:
        return NullBoard()
    from attent_scale.extras import require

    require("tensorboard", f"config key '{KEY}'")  # torch.utils.tensorboard writes through it
    return Board(path, 0 if resumed_step is None else resumed_step + 1)
