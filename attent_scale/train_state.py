"""The trainer's state in small typed pieces, one owner each, each its own checkpoint entry."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


class _Entry:
    """A dataclass saved as one checkpoint entry: its fields by name (arrays kept as they are, not copied,
    so the checkpoint stores an array the teacher also holds once)."""

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in state.items() if k in names})


@dataclass
class Progress(_Entry):
    """The loop's counters (owner: the step loop); this rank's own counts, summed over ranks in the totals."""

    step: int = 0
    epoch: int = 0
    samples_trained: int = 0
    tokens_trained: int = 0
    nonfinite_skipped: int = 0
    nonfinite_in_row: int = 0
    online_dropped_batches: int = 0  # online mode: short last candidate batches skipped (equal on all ranks)
    corrupt_samples: int = 0  # replaced by filler samples (stream faults): encounters
    corrupt_ids: list[int] = field(default_factory=list)  # distinct ids of those samples this rank met
    dropped_samples: int = 0  # dropped by rank equalisation (< world size per epoch)
    last_train_loss: float = float("nan")


@dataclass
class Clocks(_Entry):
    """Seconds by what they were spent on (owner: the trainer); `wall_start` is this attempt's start, not
    saved: a checkpoint folds the attempt's wall time into `wall_offset`."""

    train_seconds: float = 0.0  # loop time excluding eval and checkpoints (selection included)
    train_cpu_seconds: float = 0.0  # the same span in this process's CPU time: robust to a shared machine
    eval_seconds: float = 0.0
    eval_cpu_seconds: float = 0.0  # the evaluations in this process's CPU time (a reference fit's cost)
    checkpoint_seconds: float = 0.0
    wall_offset: float = 0.0  # wall seconds of earlier attempts (resume)
    wall_start: float = field(default_factory=time.perf_counter, metadata={"saved": False})

    def state_dict(self) -> dict[str, Any]:
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.metadata.get("saved", True)}
        state["wall_offset"] = self.wall()
        return state

    def wall(self) -> float:
        """Wall seconds of the whole run: earlier attempts plus this one."""
        return self.wall_offset + time.perf_counter() - self.wall_start

    def charge(self, start: tuple[float, float]) -> float:
        """Add the wall and CPU time since `start` (a `now()`) to the training clocks; returns the wall
        seconds."""
        wall, cpu = now()
        self.train_seconds += wall - start[0]
        self.train_cpu_seconds += cpu - start[1]
        return wall - start[0]

    def timed(self, stream: Any) -> Iterator[Any]:
        """Iterate the stream, charging the time spent waiting for data to the training clock."""
        it = iter(stream)
        while True:
            t0 = now()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.charge(t0)
            yield batch


def now() -> tuple[float, float]:
    """(wall, CPU) clock readings."""
    return time.perf_counter(), time.process_time()


@dataclass
class SelectionState(_Entry):
    """What the epoch trains (owner: the epoch start, from the teacher's selection)."""

    bits: Any = None  # the selection: packed bits, ceil(N/8) uint8 (None = full data)
    weight_bits: Any = None  # packed ids of the selection that carry loss weight `weight` (pruning)
    weight: float = 1.0
    ratio: float = 1.0  # fraction of the data the current epoch trains on
    # after a resume on another world size: the ids epoch `remainder_epoch` still owes (packed bits), trained
    # once over the new ranks instead of that epoch's selection
    remainder_bits: Any = None
    remainder_epoch: int = -1

    def remainder_due(self, epoch: int) -> bool:
        """Does epoch `epoch` train an elastic resume's owed ids instead of a selection?"""
        return self.remainder_bits is not None and self.remainder_epoch == epoch

    def drop_remainder_before(self, epoch: int) -> None:
        """Forget owed ids once their epoch is over."""
        if self.remainder_epoch < epoch:
            self.remainder_bits, self.remainder_epoch = None, -1


# checkpoint entries besides "teacher" and "rng": name -> what a pre-split checkpoint's one "progress"
# entry called each of its fields
_LEGACY = {
    "progress": {f.name: f.name for f in dataclasses.fields(Progress)},
    "clock": {f.name: f.name for f in dataclasses.fields(Clocks) if f.metadata.get("saved", True)},
    "selection": {"bits": "selection_bits", "weight_bits": "weight_bits", "weight": "weight",
                  "ratio": "selected_ratio", "remainder_bits": "remainder_bits",
                  "remainder_epoch": "remainder_epoch"},
    "eval": {"last_loss": "last_val_loss"},
}


def upgrade_state(state: dict[str, Any]) -> dict[str, Any]:
    """A rank's checkpoint state in today's entries: one written before the split (everything in one
    "progress" entry, the stream position as its `stream_state`, log counts as `log_lines`) is re-cut;
    a current one is returned as it is."""
    if "clock" in state or "progress" not in state:
        return state
    flat = state["progress"]
    out = {k: v for k, v in state.items() if k != "progress"}
    for entry, names in _LEGACY.items():
        out[entry] = {new: flat[old] for new, old in names.items() if old in flat}
    out["stream"] = flat.get("stream_state")
    out["logs"] = dict(flat.get("log_lines") or {})
    return out
