"""When a run stops: stop signals and the seconds budget, agreed by every rank at a step boundary."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any

from attent_scale.dist import all_reduce_values

# What the loop does after a step (None: go on).
PREEMPT = "preempt"  # a stop signal on some rank: checkpoint written, exit for requeue
STOP = "stop"  # a steps or seconds budget is spent: finish the run
END_EPOCH = "end_epoch"  # the anneal point ends this subset epoch early: the next one trains all data


class StopSignal:
    """Signal handlers only set a flag; ranks agree on it at the next step boundary."""

    def __init__(self) -> None:
        self.received: str | None = None
        # Tests and drills: behave exactly as if a signal arrived during this step.
        self.stop_after_step = int(os.environ.get("ATTENT_STOP_AFTER_STEP", "-1"))
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signal.Signals(signum).name


@dataclass(frozen=True)
class Poll:
    """What every rank agreed on after a step."""

    preempt: bool = False  # some rank got a stop signal
    out_of_time: bool = False  # some rank's train.max_seconds is spent
    save_late: bool = False  # some rank's checkpoint.every_minutes has passed


class StopCheck:
    """Polls the stop signal and the seconds budget; one collective every `every` steps carries any rank's
    signal, clock and due periodic save, so every rank decides the same."""

    def __init__(self, *, every: int, max_seconds: float, group: Any, signal_flag: StopSignal | None = None
                 ) -> None:
        self.every, self.max_seconds, self.group = every, max_seconds, group
        self.signal = signal_flag or StopSignal()

    def requested(self) -> bool:
        """This rank's stop flag (local, no collective): what a scoring pass polls (teacher.StopRequest)."""
        return self.signal.received is not None

    def poll(self, step: int, train_seconds: float, save_late: bool, *, last: bool = False) -> Poll:
        """After step `step`: this rank's signal, clock (`train_seconds`) and `save_late`, agreed over ranks
        on poll steps and after the `last` step (between them: nothing, the next poll carries it)."""
        sig = self.signal
        if step == sig.stop_after_step:
            sig.received = "ATTENT_STOP_AFTER_STEP"
        if step % self.every != 0 and not last:
            return Poll()
        out_of_time = bool(self.max_seconds) and train_seconds >= self.max_seconds
        mine = 2.0 if sig.received else (1.0 if out_of_time else 0.0)
        # a separate element for the save, so one rank's due save cannot hide another rank's signal
        code, late = all_reduce_values([mine, 1.0 if save_late else 0.0], "max", self.group)
        return Poll(preempt=code >= 2, out_of_time=code >= 1, save_late=late >= 1)


def decide(poll: Poll, *, step: int, last_step: int, cut: bool) -> str | None:
    """The loop's next move after a step: PREEMPT, STOP (a budget is spent), END_EPOCH (`cut`: the anneal
    point ends the epoch) or None (go on)."""
    if poll.preempt:
        return PREEMPT
    if step >= last_step or poll.out_of_time:
        return STOP
    return END_EPOCH if cut else None
