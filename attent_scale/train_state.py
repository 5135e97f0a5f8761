"""The trainer's state in small typed pieces, one owner each, each its own checkpoint entry; `upgrade_state`
re-cuts an older checkpoint's entries into today's."""

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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the saved fields of `state` in place (fields it lacks keep their values)."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name in state and f.metadata.get("saved", True):
                setattr(self, f.name, state[f.name])


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


FAULT_KEYS = ("corrupt_samples", "corrupt_ids")  # the "faults" entry (data/faults.py), once in "progress"
# checkpoint entries besides "teacher" and "rng": name -> what a pre-split checkpoint's one "progress"
# entry called each of its fields
_LEGACY = {
    "progress": {f.name: f.name for f in dataclasses.fields(Progress)},
    "faults": {k: k for k in FAULT_KEYS},
    "clock": {f.name: f.name for f in dataclasses.fields(Clocks) if f.metadata.get("saved", True)},
    "selection": {"bits": "selection_bits", "weight_bits": "weight_bits", "weight": "weight",
                  "ratio": "selected_ratio", "remainder_bits": "remainder_bits",
                  "remainder_epoch": "remainder_epoch"},
    "eval": {"last_loss": "last_val_loss"},
}


def upgrade_state(state: dict[str, Any]) -> dict[str, Any]:
    """A rank's checkpoint state in today's entries: one written before the split (everything in one
    "progress" entry, the stream position as its `stream_state`, log counts as `log_lines`) is re-cut; one
    written before the data faults had their own entry gets it from "progress"; a current one is returned
    as it is."""
    if "progress" not in state or "faults" in state:
        return state
    flat = state["progress"]
    out = {k: v for k, v in state.items() if k != "progress"}
    if "clock" in state:  # split already: only the faults move out of "progress"
        out["progress"] = {k: v for k, v in flat.items() if k not in FAULT_KEYS}
        out["faults"] = {k: flat[k] for k in FAULT_KEYS if k in flat}
        return out
    for entry, names in _LEGACY.items():
        out[entry] = {new: flat[old] for new, old in names.items() if old in flat}
    out["stream"] = flat.get("stream_state")
    out["logs"] = dict(flat.get("log_lines") or {})
    return out
