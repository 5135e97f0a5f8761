"""Weights & Biases scalars of a native run (`metrics.wandb`): rank 0 logs them, other ranks no-op.

The keys are TensorBoard's tags (attent_scale/tensorboard.py), at the optimizer step::

    train/loss, train/lr, train/tokens_per_second, selection/ratio, selection/seconds/<phase>, val/loss

The W&B run id is kept in run_dir/wandb-run-id: a resumed run logs into the same W&B run (W&B drops
points at or below the step it has already seen, so an earlier attempt's steps after the checkpoint stay
as they were logged); a fresh run starts a new W&B run. `metrics.wandb.mode: offline` (or WANDB_MODE=
offline) writes under `dir` with no account and no network; `wandb sync DIR/wandb/offline-run-*` uploads.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attent_scale.config import RunConfig, config_to_dict
from attent_scale.errors import UserError
from attent_scale.extras import require
from attent_scale.tensorboard import NullBoard

ID_FILE = "wandb-run-id"


def wandb_dir(value: str, run_dir: Path) -> Path:
    """Where W&B writes: `metrics.wandb.dir` ('' = run_dir; relative = under run_dir)."""
    if not value:
        return run_dir
    path = Path(value).expanduser()
    return path if path.is_absolute() else run_dir / path


class WandbBoard(NullBoard):
    """One W&B run, open until `close`."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resumed_step: int | None) -> None:
        w = cfg.metrics.wandb
        wandb = require("wandb", "config key 'metrics.wandb.enabled'")
        out = wandb_dir(w.dir, run_dir)
        id_path = run_dir / ID_FILE
        try:
            out.mkdir(parents=True, exist_ok=True)
            run_id = id_path.read_text().strip() if resumed_step is not None and id_path.is_file() else ""
            if not run_id:
                run_id = secrets.token_hex(4)  # W&B ids: lower-case letters and digits
                id_path.write_text(run_id + "\n")
        except OSError as exc:
            raise UserError(f"config key 'metrics.wandb.dir': cannot write to {out} "
                            f"({exc.strerror or exc})") from None
        try:
            self.run: Any = wandb.init(project=w.project, entity=w.entity or None, mode=w.mode or None,
                                       dir=str(out), name=w.name or run_dir.name, id=run_id, resume="allow",
                                       config=config_to_dict(cfg))
        except (wandb.errors.Error, OSError, ValueError) as exc:  # no login online, a bad entity, ...
            raise UserError(f"metrics.wandb: W&B would not start ({str(exc).splitlines()[0]}); "
                            "metrics.wandb.mode: offline needs no account") from None

    def log_step(self, step: int, *, loss: float, lr: float, tokens_per_second: float,
                 selected_ratio: float, selection_seconds_by_phase: Mapping[str, float],
                 kept_token_share: float | None = None) -> None:
        row = {"train/loss": loss, "train/lr": lr, "train/tokens_per_second": tokens_per_second,
               "selection/ratio": selected_ratio}
        row.update({f"selection/seconds/{p}": s for p, s in selection_seconds_by_phase.items()})
        if kept_token_share is not None:
            row["selection/kept_token_share"] = kept_token_share
        self.run.log(row, step=step)

    def log_eval(self, step: int, val_loss: float) -> None:
        self.run.log({"val/loss": val_loss}, step=step)

    def close(self, exit_code: int = 0) -> None:
        run, self.run = self.run, None
        if run is not None:
            run.finish(exit_code=exit_code)


def open_wandb(cfg: RunConfig, run_dir: Path, *, is_main: bool, resumed_step: int | None) -> NullBoard:
    """Rank 0's W&B run when `metrics.wandb.enabled` (a NullBoard otherwise)."""
    if not cfg.metrics.wandb.enabled or not is_main:
        return NullBoard()
    return WandbBoard(cfg, run_dir, resumed_step)
