"""`python -m ids_trainer train ...`: the real trainer, recording the ids each rank trains per step.

Every training step appends {"rank", "world", "epoch", "step", "ids"} to ATTENT_IDS_DIR/ids-RANK.jsonl
(one file per rank and launch), so a test can check which ids an epoch trained across restarts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from attent_scale.cli import run
from attent_scale.train import Trainer


def _record() -> None:
    train_step = Trainer.train_step
    out = Path(os.environ["ATTENT_IDS_DIR"])

    def recording_step(self: Trainer, batch: dict[str, Any], stream: Any) -> bool:
        epoch = self.progress.epoch
        took = train_step(self, batch, stream)
        if took:
            ids = [int(i) for i in batch["ids"].tolist() if i >= 0]
            row = {"rank": self.rank, "world": self.world, "epoch": epoch, "step": self.progress.step,
                   "ids": ids}
            with (out / f"ids-{self.rank}-{os.getpid()}.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
        return took

    Trainer.train_step = recording_step  # type: ignore[method-assign]


if __name__ == "__main__":
    _record()
    run()
