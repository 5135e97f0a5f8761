"""The epoch plan and the step plan: pure functions of the teacher config, the epoch, and the counts the
selections kept. The same answer on every rank, after a resume, and in every trainer."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from attent_scale.config import TeacherConfig
from attent_scale.teacher.picks import strategy
from attent_scale.teacher.schedules import interval_at, ratio_at, round_half_up

StepsOf = Callable[[int], int]  # steps_of(epoch): optimizer steps per rank that the epoch takes


@dataclass(frozen=True)
class EpochPlan:
    """What the trainer does in one epoch. `phase`: "full" (teacher off, warm-up or a cycle's full
    epochs), "subset" (train on `teacher.select(...)`), "online" (per-step selection). `cycle` is -1
    outside cycles; `index` is the epoch's position inside its phase of the cycle (-1 outside)."""

    epoch: int
    phase: str
    score: bool
    subset: bool
    cycle: int = -1
    index: int = -1
    ratio: float | None = None
    interval: int = 0


def ratio_of(cfg: TeacherConfig, cycle: int) -> float:
    """The fraction a cycle's selection keeps (prune: the expected kept fraction, the mean threshold
    planned as the median)."""
    if cfg.strategy == "prune":
        return 1.0 - cfg.prune_ratio * (cfg.prune_quantile or 0.5)
    return ratio_at(cfg.ratio_schedule, cycle, initial=cfg.initial_ratio, final=cfg.final_ratio,
                    total_cycles=cfg.total_cycles)


def interval_of(cfg: TeacherConfig, cycle: int) -> int:
    """Subset epochs of a cycle."""
    return interval_at(cfg.interval_schedule, cycle, initial=cfg.initial_interval, maximum=cfg.max_interval,
                       total_cycles=cfg.total_cycles)


def plan_epoch(cfg: TeacherConfig, epoch: int, anneal_from: int | None = None) -> EpochPlan:
    """Pure function of (config, epoch, anneal start): the same answer on every rank and after a resume.
    cycle mode: epochs < warmup_epochs are full; then cycle c = interval(c) subset epochs (the first
    one starts with a scoring pass, except for strategies that need no fresh losses) followed by
    full_epochs_per_cycle full epochs. After total_cycles the cycles go on with the final ratio and
    interval. ledger mode: epochs < warmup_epochs full, then every epoch is a subset epoch chosen from
    the training losses (cycle = epoch - warmup_epochs drives the ratio schedule). From `anneal_from` on
    every epoch is full."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    c = cfg
    if c.mode == "none":
        return EpochPlan(epoch, "full", False, False)
    if c.mode == "online":
        return EpochPlan(epoch, "online", False, False)
    if epoch < c.warmup_epochs or (anneal_from is not None and epoch >= anneal_from):
        return EpochPlan(epoch, "full", False, False)
    e = epoch - c.warmup_epochs
    if c.mode == "ledger":
        return EpochPlan(epoch, "subset", False, True, cycle=e, index=0, ratio=ratio_of(c, e), interval=1)
    cycle = 0
    while True:
        n_sub = interval_of(c, cycle)
        length = n_sub + c.full_epochs_per_cycle
        if cycle >= c.total_cycles - 1:  # schedule frozen: jump arithmetically
            cycle += e // length
            e %= length
            break
        if e < length:
            break
        e -= length
        cycle += 1
    if e < n_sub:
        return EpochPlan(epoch, "subset", e == 0 and strategy(c.strategy).scores, True,
                         cycle=cycle, index=e, ratio=ratio_of(c, cycle), interval=n_sub)
    return EpochPlan(epoch, "full", False, False, cycle=cycle, index=e - n_sub, ratio=None, interval=n_sub)


def anneal_epoch(cfg: TeacherConfig, max_epochs: float) -> int | None:
    """First epoch of the all-data anneal under an epoch budget (None without annealing)."""
    a = cfg.anneal_fraction
    if not a or not max_epochs or cfg.mode not in ("cycle", "ledger"):
        return None
    return round_half_up((1.0 - a) * max_epochs)


def planned_count(cfg: TeacherConfig, plan: EpochPlan, num: int, *, num_samples: int,
                  kept_counts: Mapping[int, int]) -> int:
    """Samples an epoch of `plan` trains out of `num` (every id observed with a finite loss; `num_samples`
    ids in all). A strategy whose selection sets the epoch's count (prune, signal, floors: `kept_counts`,
    epoch -> ids kept): what the epoch's selection kept once it was made; before that, signal, learn and prune
    below the mean (prune_quantile 0, a count only the losses decide) what the latest selection kept,
    else prune's median count, the ratio's count for the others."""
    if not plan.subset or plan.ratio is None:
        return num
    if num == num_samples and plan.epoch in kept_counts:  # what its selection kept
        return kept_counts[plan.epoch]
    if cfg.strategy in ("signal", "learn"):  # keeps what its rule does not drop: all, until it has selected
        if num == num_samples and kept_counts:
            return kept_counts[max(kept_counts)]
        return num
    if cfg.strategy == "prune":
        if num == num_samples and kept_counts and not cfg.prune_quantile:
            return kept_counts[max(kept_counts)]
        n_low = round_half_up((cfg.prune_quantile or 0.5) * num)
        return num - round_half_up(cfg.prune_ratio * n_low)
    return round_half_up(plan.ratio * num)


def candidate_batch_size(cfg: TeacherConfig, batch_size: int) -> int:
    """Per-rank batch size to draw from the stream: ceil(B / online_ratio) in online mode, else B."""
    if cfg.mode != "online":
        return int(batch_size)
    return max(int(batch_size), math.ceil(batch_size / cfg.online_ratio - 1e-9))


# ---------------------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Batching:
    """How a trainer cuts an epoch of n ids into optimizer steps per rank: n // world ids per rank (the
    rest is dropped by rank equalisation) in batches of `batch` (the last one short, or dropped with
    `drop_last`), `accum` batches per optimizer step."""

    world: int
    batch: int
    accum: int = 1
    drop_last: bool = False

    def steps(self, n: int) -> int:
        """Optimizer steps per rank of an epoch of `n` ids."""
        per = n // max(1, self.world)
        batches = per // self.batch if self.drop_last else math.ceil(per / self.batch)
        return math.ceil(batches / self.accum)

    def padded_steps(self, n: int) -> int:
        """Optimizer steps per rank of a padded epoch of `n` ids (none dropped: ceil(n / world) per rank,
        the shorter shares topped up with a filler; an elastic resume's owed ids)."""
        per = math.ceil(n / max(1, self.world))
        return math.ceil(math.ceil(per / self.batch) / self.accum)


def budget_steps(steps_of: StepsOf, epochs: float, first: int = 0) -> int:
    """Steps of epochs `first`..`epochs - 1` under the plan; a fractional last epoch (a Hugging Face
    num_train_epochs of 2.5) adds that share of its steps, rounded up."""
    whole = math.floor(epochs)
    total = sum(steps_of(e) for e in range(first, whole))
    frac = epochs - whole
    if frac > 0 and first <= whole:
        total += math.ceil(frac * steps_of(whole))
    return total


def epochs_for_steps(steps_of: StepsOf, max_steps: int, *, anneal: bool) -> int:
    """Epochs a steps budget reaches into under the plan (each at least one step); one more with an
    anneal, whose point may end a subset epoch early."""
    epochs, total = 0, 0
    while total < max_steps and epochs < 1_000_000:
        total += max(1, steps_of(epochs))
        epochs += 1
    return epochs + 1 if anneal else epochs


def total_steps(steps_of: StepsOf, *, epochs: float, cap: int, step: int = 0, epoch: int = 0,
                stream_batches: int | None = None, owed_steps: int | None = None) -> int:
    """The steps a run takes and its LR schedule decays over: the steps cap `cap` (0: none), or with an
    epoch budget the steps its epochs take under the plan, capped; planned from where a run stands: steps
    done (`step`) plus what is left of epoch `epoch` and the later ones. `stream_batches`: the batches a
    resumed stream of epoch `epoch` already gave (None: at an epoch's start); `owed_steps`: the epoch
    trains an elastic resume's owed ids in that many steps instead."""
    if not epochs:
        return cap
    if owed_steps is not None:
        current = owed_steps
    elif stream_batches is not None:  # mid-epoch: this epoch's planned steps, less those it took
        current = steps_of(epoch)
    else:  # at an epoch's start: it is planned with the later ones
        current = 0
    consumed = stream_batches or 0
    first_later = epoch + (1 if current or consumed else 0)
    later = budget_steps(steps_of, epochs, first_later)
    if first_later == 0:
        later = max(1, later)
    total = max(1, step + max(0, current - consumed) + later)
    return min(cap, total) if cap else total
