"""The epoch start every trainer calls: plan, score (skipping stale ids), select, phase seconds, record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attent_scale.data.selection import Selection
from attent_scale.teacher.records import PHASES
from attent_scale.teacher.teacher import EpochPlan, Teacher

# scorer(skip, step): one collective scoring pass of this rank's share of every id not in `skip` (None:
# every id) into `teacher.score_pass`; the trainer owns the model, the data and the batches
Scorer = Callable[[Selection | None, int], None]
# steps_for(count): optimizer steps per rank of an epoch that trains `count` ids (the trainer's batching)
StepsFor = Callable[[int], int]


@dataclass(frozen=True)
class EpochStart:
    """What `begin_epoch` decided for one epoch. `selection` None: every id, weight 1. `weighted`: some ids
    carry a loss weight (`selection.sample_weights`), which the trainer's loss must apply. `planned_steps`:
    steps per rank for the ids selected (None without `steps_for`). `anneal`: the epoch is in the final
    all-data phase. `replan`: the teacher's planned counts changed (prune kept a data-given count), so a
    budget planned from them must be planned again. `phase_seconds`: teacher seconds this start took, by
    phase. `record`: the selection record behind `selection` (None without one)."""

    plan: EpochPlan
    selection: Selection | None
    num_samples: int
    planned_steps: int | None
    anneal: bool
    replan: bool
    phase_seconds: dict[str, float]
    record: dict[str, Any] | None

    @property
    def epoch(self) -> int:
        return self.plan.epoch

    @property
    def selected(self) -> int:
        """Ids the epoch trains."""
        return self.selection.count if self.selection is not None else self.num_samples

    @property
    def ratio(self) -> float:
        """Fraction of the ids the epoch trains (1.0 without a selection)."""
        return self.selected / self.num_samples if self.selection is not None and self.num_samples else 1.0

    @property
    def weighted(self) -> bool:
        return self.selection is not None and self.selection.weighted

    @property
    def staleness_median(self) -> int | None:
        st = (self.record or {}).get("staleness")
        return st.get("median") if st else None


def phase_seconds(teacher: Teacher) -> dict[str, float]:
    """The teacher's cumulative selection seconds by phase."""
    return {p: float(teacher.stats[f"seconds_{p}"]) for p in PHASES}


def begin_epoch(teacher: Teacher, epoch: int, step: int, scorer: Scorer, *,
                trained: Selection | None = None, steps_for: StepsFor | None = None) -> EpochStart:
    """Collective (every rank, same order): the start of a fresh `epoch` at optimizer step `step`. The
    teacher plans it; a scoring pass runs when the plan says so (with teacher.rescore=stale it skips
    `trained`, the ids the previous subset epoch trained: their training losses are fresh); a subset epoch
    gets the teacher's selection."""
    before = phase_seconds(teacher)
    plan = teacher.plan_epoch(epoch)
    if plan.score:
        scorer(trained if teacher.cfg.rescore == "stale" else None, step)
    selection = teacher.select(epoch, step) if plan.subset else None
    after = phase_seconds(teacher)
    count = selection.count if selection is not None else teacher.num_samples
    anneal = teacher.anneal_from is not None and epoch >= teacher.anneal_from
    return EpochStart(
        plan=plan, selection=selection, num_samples=teacher.num_samples,
        planned_steps=steps_for(count) if steps_for is not None else None,
        anneal=anneal,
        replan=selection is not None and (teacher.cfg.strategy in ("prune", "signal")
                                          or epoch in teacher.kept_counts),
        phase_seconds={p: after[p] - before[p] for p in PHASES},
        record=teacher.last_record if selection is not None else None,
    )


def epoch_steps(teacher: Teacher, epoch: int, num_samples: int, steps_for: StepsFor) -> int:
    """Optimizer steps per rank that `epoch` takes under the teacher's plan (`Teacher.planned_count`: the
    ratio's count, or what a prune selection kept)."""
    return steps_for(teacher.planned_count(teacher.plan_epoch(epoch), num_samples))


def planned_steps(teacher: Teacher, num_samples: int, steps_for: StepsFor, epochs: int,
                  first_epoch: int = 0) -> int:
    """Optimizer steps per rank of epochs `first_epoch`..`epochs - 1` under the teacher's plan."""
    return sum(epoch_steps(teacher, e, num_samples, steps_for) for e in range(first_epoch, epochs))


def plan_anneal(teacher: Teacher, max_epochs: float) -> None:
    """An epoch budget: its last `teacher.anneal_fraction` of epochs train all data, planned from the start
    (so the plan and the LR schedule know it). A no-op without annealing or without an epoch budget."""
    first = teacher.anneal_epoch(max_epochs)  # type: ignore[arg-type]
    if first is not None:
        teacher.start_anneal(first)


def anneal_due(teacher: Teacher, step: int, max_steps: int) -> bool:
    """A steps budget: has its last `teacher.anneal_fraction` begun at `step` (and the anneal not yet)?"""
    a = teacher.cfg.anneal_fraction
    return (bool(a) and bool(max_steps) and teacher.mode in ("cycle", "ledger")
            and teacher.anneal_from is None and step >= (1 - a) * max_steps)
