"""TeacherSession: the teacher as every trainer holds it — build, the epoch start, after each step, the one
anneal rule, the planned steps, the loss weights of a batch, and its checkpoint entries.

A trainer adapter (train.py's `Trainer`, integrations/hf.py's `AttentTrainer`, any later one) translates its
framework's hooks into these calls and applies what they return; it never reaches into the `Teacher`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from attent_scale.config import TeacherConfig
from attent_scale.data.partition import FILLER, rank_block
from attent_scale.data.selection import Selection
from attent_scale.dist import all_reduce_values, group_size
from attent_scale.teacher import plan as planning
from attent_scale.teacher.comm import Comm
from attent_scale.teacher.plan import Batching, EpochPlan
from attent_scale.teacher.records import PHASES
from attent_scale.teacher.reference import open_reference
from attent_scale.teacher.teacher import StopRequest, Teacher
from attent_scale.teacher.token_step import TokenStep

SELECTING = ("cycle", "ledger")  # the modes whose epochs train a selection


class Scorer(Protocol):
    """A trainer's scoring pass, built once by the trainer: this rank's share of the training ids as
    batches (each with "ids", int64, -1 for a filler row) and a forward without grad. The session runs it
    when an epoch's plan scores."""

    def batches(self, skip: Selection | None, step: int) -> Iterable[dict[str, Any]]:
        """This rank's batches of every id not in `skip` (None: every id), padded so that every rank runs
        the same number of forwards."""
        ...

    def losses(self, batch: dict[str, Any]) -> torch.Tensor:
        """Per-sample losses [B] of one batch."""
        ...


def default_teacher_config() -> TeacherConfig:
    """The project default (configs/demo.yaml's teacher section): after one full epoch, each epoch drops
    only the samples the signal calls memorized, learned or unlearnable (gap+learn, from the training
    forwards' losses and the last evaluation's), at most 80%. It needs an evaluation (AttentTrainer's
    eval_dataset, AttentCallback's validation)."""
    return TeacherConfig(mode="ledger", strategy="signal", signal="gap+learn", ratio_schedule="constant",
                         initial_ratio=0.2, final_ratio=0.8, total_cycles=5, interval_schedule="fixed",
                         initial_interval=1, max_interval=3, warmup_epochs=1, full_epochs_per_cycle=0,
                         rescore="stale")


def score_share(skip: Selection | None, num_samples: int, rank: int, world: int) -> np.ndarray:
    """This rank's ids of a scoring pass over a map-style dataset: its contiguous block of the ids not in
    `skip` (the block arithmetic of a padded stream, data/partition.rank_block), padded with FILLER (-1)
    to the same length on every rank, so that every rank runs the same number of forwards (ZeRO-3)."""
    pool = np.arange(num_samples, dtype=np.int64)
    if skip is not None:
        pool = pool[~skip.mask(pool)]
    start, real, per = rank_block(pool.shape[0], rank, world, pad=True)
    mine = np.full(per, FILLER, dtype=np.int64)
    mine[:real] = pool[start:start + real]
    return mine


@dataclass(frozen=True)
class Budget:
    """A run's length: an epoch budget (`epochs`, may be fractional; 0: none), a steps cap (`max_steps`;
    0: none) and a seconds budget (`max_seconds`; 0: none)."""

    epochs: float = 0.0
    max_steps: int = 0
    max_seconds: float = 0.0


@dataclass
class SelectionState:
    """What the current epoch trains (owner: the session; its checkpoint entry "selection"). `epoch`: the
    epoch it belongs to (-1: none planned yet), begun at optimizer step `start_step`, planned to take
    `steps` steps per rank (fewer once the anneal point ended it). `bits`: the selection (packed, ceil(N/8)
    uint8; None = every id), `weight_bits` its ids that carry loss weight `weight`, `ratio` the fraction
    of the data the epoch trains. After a resume on another world size: the ids epoch `remainder_epoch`
    still owes (`remainder_bits`), trained once over the new ranks instead of that epoch's selection."""

    epoch: int = -1
    start_step: int = 0
    steps: int = 0
    bits: Any = None
    weight_bits: Any = None
    weight: float = 1.0
    ratio: float = 1.0
    remainder_bits: Any = None
    remainder_epoch: int = -1

    def state_dict(self) -> dict[str, Any]:
        """Its fields by name (arrays as they are: the checkpoint stores an array the teacher holds once)."""
        return dict(self.__dict__)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SelectionState:
        """From a state_dict (an older one lacks the newer fields: their defaults)."""
        return cls(**{k: v for k, v in state.items() if k in cls.__dataclass_fields__})

    def remainder_due(self, epoch: int) -> bool:
        """Does epoch `epoch` train an elastic resume's owed ids instead of a selection?"""
        return self.remainder_bits is not None and self.remainder_epoch == epoch

    def drop_remainder_before(self, epoch: int) -> None:
        """Forget owed ids once their epoch is over."""
        if self.remainder_epoch < epoch:
            self.remainder_bits, self.remainder_epoch = None, -1

    def selection(self, num_ids: int, *, owed: bool = False) -> Selection | None:
        """The epoch's training set with its loss weights (`owed`: the owed ids instead; None: every id)."""
        bits = self.remainder_bits if owed else self.bits
        if bits is None:
            return None
        up = None if self.weight_bits is None else np.asarray(self.weight_bits, dtype=np.uint8)
        return Selection(np.asarray(bits, dtype=np.uint8), num_ids, upweight=up, weight=self.weight)


@dataclass(frozen=True)
class EpochStart:
    """What `begin_epoch` decided for one epoch. `selection`: what the epoch trains, with its loss weights
    (None: every id, weight 1). `resumed`: the epoch continues a checkpoint's selection (nothing planned,
    scored or selected); `owed`: it trains an elastic resume's owed ids, each once over this world (its
    stream must be padded: none dropped). `planned_steps`: steps per rank for the ids it trains. `replan`:
    the plan's counts changed (prune kept a data-given count), so a budget planned from them must be
    planned again (`TeacherSession.total_steps`). `phase_seconds`: teacher seconds this start took, by
    phase. `record`: the selection record behind `selection` (None without a fresh one). `ratio`: the
    fraction of the data trained (online mode: of each step's candidates)."""

    plan: EpochPlan
    selection: Selection | None
    num_samples: int
    planned_steps: int
    ratio: float
    resumed: bool = False
    owed: bool = False
    replan: bool = False
    phase_seconds: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PHASES})
    record: dict[str, Any] | None = None

    @property
    def epoch(self) -> int:
        return self.plan.epoch

    @property
    def selected(self) -> int:
        """Ids the epoch trains."""
        return self.selection.count if self.selection is not None else self.num_samples

    @property
    def weighted(self) -> bool:
        return self.selection is not None and self.selection.weighted

    @property
    def staleness_median(self) -> int | None:
        st = (self.record or {}).get("staleness")
        return st.get("median") if st else None

    def report(self, metrics: Any) -> None:
        """The one wiring of a selection event to a trainer's metrics (metrics.Metrics or NullMetrics):
        phase seconds, ratio and staleness; what it kept of each source; what strategy signal dropped."""
        metrics.observe_selection(self.phase_seconds, selected_ratio=self.ratio,
                                  staleness_median=self.staleness_median)
        record = self.record or {}
        if record.get("sources"):
            metrics.observe_sources(record["sources"])
        if record.get("signal"):
            metrics.observe_signal(record["signal"])


class TeacherSession:
    """The teacher of one training run (module docstring). Every method that says "collective" must be
    called by every rank in the same order; the others are local."""

    def __init__(self, teacher: Teacher, *, batching: Batching, budget: Budget, group: Any = None,
                 tokens: TokenStep | None = None) -> None:
        self.teacher = teacher
        self.tokens = tokens  # teacher.unit token: the per-micro-batch token selection (None: samples)
        self.batching = batching  # set again by a trainer whose loader's batch size changes
        self.budget = budget
        self.group = group  # the run's bookkeeping group (None: the default group, or none)
        self.state = SelectionState()
        self._training: Selection | None = None  # what the current epoch trains (loss weights come from it)
        self._weight_table: tuple[Selection, torch.device, torch.Tensor] | None = None

    @classmethod
    def build(cls, cfg: TeacherConfig, *, num_samples: int, seed: int, batching: Batching, budget: Budget,
              group: Any = None, record_path: Path | None = None, data: Any = None, split: str = "train",
              reference: Any = None, sources: list[Any] | None = None) -> TeacherSession:
        """Collective when `group` spans ranks: the teacher over `num_samples` ids (selection records to
        `record_path` on rank 0), its reference for `teacher.score: excess` (`reference` given as losses or
        an object with `losses(ids)`, else teacher.reference's scores file checked against `data`'s
        `split`), and an epoch budget's anneal planned from the start (the plan and the LR know it)."""
        tokens = None
        if cfg.unit == "token":  # the strategy picks tokens; the sample schedule is off (every epoch all ids)
            cfg = dataclasses.replace(cfg, mode="none")
        ref = open_reference(cfg, data, split, given=reference, num_samples=num_samples)
        teacher = Teacher(cfg, num_samples=num_samples, seed=seed, record_path=record_path, group=group,
                          reference=ref, sources=sources)
        if cfg.unit == "token":
            tokens = TokenStep(cfg, seed=seed, world=group_size(group), group=group,
                               charge=teacher.add_score_seconds)
        anneal = teacher.anneal_epoch(budget.epochs)
        if anneal is not None:
            teacher.start_anneal(anneal)
        return cls(teacher, batching=batching, budget=budget, group=group, tokens=tokens)

    # ------------------------------------------------------------------ what trainers read

    @property
    def cfg(self) -> TeacherConfig:
        return self.teacher.cfg

    @property
    def mode(self) -> str:
        return self.teacher.mode

    @property
    def num_samples(self) -> int:
        return self.teacher.num_samples

    @property
    def selecting(self) -> bool:
        """Cycle or ledger mode: epochs train selections and the losses of training forwards count."""
        return self.mode in SELECTING

    @property
    def wants_val(self) -> bool:
        """Strategy signal: an evaluation's per-sample val losses (`observe_val`) set its thresholds."""
        return self.selecting and self.cfg.strategy == "signal"

    def candidate_batch_size(self, batch_size: int) -> int:
        """Per-rank batch size to draw from the stream (online mode draws more candidates than it trains)."""
        return self.teacher.candidate_batch_size(batch_size)

    # ------------------------------------------------------------------ the epoch start

    def begin_epoch(self, epoch: int, step: int, scorer: Scorer | None = None, *,
                    resumed: bool = False, stop: StopRequest | None = None) -> EpochStart:
        """Collective (every rank, same order): the start of `epoch` at optimizer step `step`. An elastic
        resume's owed epoch trains its owed ids; an epoch `resumed` from a checkpoint keeps the selection
        it started with. Otherwise the teacher plans the epoch, `scorer` scores when the plan says so (with
        teacher.rescore=stale it skips the ids the previous subset epoch trained: their training losses
        are fresh), and a subset epoch gets the teacher's selection. With `stop`, a stop signal on any rank
        ends the scoring pass within `stop.every` batches: ScoringStopped on every rank, nothing selected."""
        st, n = self.state, self.num_samples
        if self.tokens is not None:
            self.tokens.epoch = epoch
        st.drop_remainder_before(epoch)  # owed ids of an epoch that is over are trained
        plan = self.teacher.plan_epoch(epoch)
        if st.remainder_due(epoch) or resumed:
            owed = st.remainder_due(epoch)
            st.epoch = epoch
            self._training = st.selection(n, owed=owed)
            count = self._training.count if self._training is not None else n
            steps = self.batching.padded_steps(count) if owed else self.batching.steps(count)
            return EpochStart(plan, self._training, n, steps, st.ratio, resumed=resumed, owed=owed)
        teacher = self.teacher
        before = _phase_seconds(teacher)
        if plan.score:
            if scorer is None:
                raise ValueError(f"epoch {epoch} scores, but begin_epoch got no scorer")
            skip = st.selection(n) if self.cfg.rescore == "stale" else None
            teacher.score_pass(scorer.batches(skip, step), scorer.losses, step, stop=stop)
        selection = teacher.select(epoch, step) if plan.subset else None
        after = _phase_seconds(teacher)
        count = selection.count if selection is not None else n
        st.epoch, st.start_step, st.steps = epoch, step, self.batching.steps(count)
        st.bits = None if selection is None else selection.bits
        st.weight_bits = None if selection is None else selection.upweight
        st.weight = 1.0 if selection is None else selection.weight
        if selection is not None:
            st.ratio = count / n if n else 1.0
        else:
            st.ratio = self.cfg.online_ratio if self.mode == "online" else 1.0
        self._training = selection
        return EpochStart(
            plan, selection, n, st.steps, st.ratio,
            replan=selection is not None and (self.cfg.strategy in ("prune", "signal")
                                              or epoch in teacher.kept_counts),
            phase_seconds={p: after[p] - before[p] for p in PHASES},
            record=teacher.last_record if selection is not None else None)

    def resume_point(self, step: int) -> tuple[int, int]:
        """Where a run resumed at optimizer step `step` stands: (the epoch to run, its steps already done).
        An epoch whose planned steps are all done (or none held yet) gives the next epoch from its start."""
        st = self.state
        done = step - st.start_step
        if st.epoch < 0 or done >= st.steps:
            return st.epoch + 1, 0
        return st.epoch, done

    # ------------------------------------------------------------------ every step

    def loss_weights(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Per-row loss weights of a batch's `ids` (ids < 0 are fillers: weight 1) under the epoch's
        selection, on the ids' device (looked up in a bitset copied there once per selection: no host
        sync per micro batch); None when every weight is 1. The one call a trainer's loss path makes: a
        row's weight scales its token CE sum (engines.base.weighted_token_loss)."""
        sel = self._training
        if sel is None or not sel.weighted:
            return None
        cached = self._weight_table
        if cached is None or cached[0] is not sel or cached[1] != ids.device:
            self._weight_table = (sel, ids.device, torch.from_numpy(sel.upweight.copy()).to(ids.device))
        table = self._weight_table[2]
        idx = ids.reshape(-1).to(torch.int64)
        real = idx >= 0
        idx = idx.clamp(min=0)
        hit = ((table[idx >> 3].to(torch.int64) >> (idx & 7)) & 1).bool() & real
        return torch.where(hit, sel.weight, 1.0).to(torch.float32)

    def after_step(self, ids: torch.Tensor, losses: torch.Tensor, step: int) -> None:
        """Collective every few steps: the per-sample losses of optimizer step `step` (numbered from 0: the
        steps done before it; ids < 0 are fillers and ignored) go into the ledger, then, every
        EXCHANGE_EVERY steps, the pending observations to their owner ranks."""
        self.teacher.observe(ids, losses, step)
        self.teacher.exchange_due(step + 1)

    def anneal_cut(self, step: int, train_seconds: float = 0.0) -> bool:
        """After optimizer step `step` (the steps done), with a steps or seconds budget: once the last
        teacher.anneal_fraction of it begins, every later epoch trains all data with weight 1. True when
        that ends the current subset epoch here (its steps end at `step`). The seconds clock differs per
        rank: with a seconds budget the ranks agree on it (a collective, until the anneal starts). Epoch
        budgets anneal by plan (`build`)."""
        if self.teacher.anneal_from is not None or not self._anneal_due(step, train_seconds):
            return False
        st = self.state
        self.teacher.start_anneal(st.epoch + 1)
        if st.bits is None:
            return False
        st.steps = step - st.start_step  # the epoch is over where it stands
        return True

    def _anneal_due(self, step: int, train_seconds: float) -> bool:
        a, b = self.cfg.anneal_fraction, self.budget
        if not a or b.epochs or not self.selecting:
            return False
        if b.max_seconds:
            due = float(train_seconds >= (1 - a) * b.max_seconds)
            return all_reduce_values([due], "max", self.group)[0] >= 1
        return bool(b.max_steps) and step >= (1 - a) * b.max_steps

    def online_pick(self, batch: dict[str, Any], score: Any, batch_size: int, step: int) -> dict[str, Any]:
        """Collective (online mode): `score(batch)` the candidates (selection cost: the score phase), then
        the teacher picks this step's `batch_size` samples per rank across ranks."""
        t0 = time.perf_counter()
        scores = score(batch)
        self.teacher.add_score_seconds(time.perf_counter() - t0)
        return self.teacher.online_pick(batch, scores, batch_size, step)

    def observe_val(self, hist: np.ndarray, step: int, *, summed: bool = True) -> None:
        """Strategy signal: an evaluation's per-sample val loss histogram (`signals.histogram` bins) at
        `step`; `summed` False: this rank's counts, summed over the ranks here (a collective)."""
        if not summed and self.teacher.group is not None:
            t = torch.from_numpy(np.ascontiguousarray(hist, dtype=np.int64))
            Comm(self.teacher.group).all_reduce(t, "val_hist")
            hist = t.numpy()
        self.teacher.observe_val(hist, step)

    def exclude(self, ids: list[int], step: int) -> None:
        """Corrupt samples: never selected again (until a readable observation of the id)."""
        self.teacher.exclude(ids, step)

    # ------------------------------------------------------------------ the plan

    def steps_of(self, epoch: int) -> int:
        """Optimizer steps per rank that `epoch` takes under the plan (`Teacher.planned_count`)."""
        t = self.teacher
        return self.batching.steps(t.planned_count(t.plan_epoch(epoch), t.num_samples))

    def total_steps(self, step: int = 0, epoch: int = 0, stream_batches: int | None = None) -> int:
        """The steps the run takes and its LR schedule decays over (plan.total_steps): the steps cap, or
        an epoch budget's steps under the plan, capped; planned from where the run stands (`step` done,
        `epoch` under way with `stream_batches` of its batches given, None at its start). Plan again after
        an EpochStart that says `replan`, and after a resume (another world size changes what is left)."""
        st, b = self.state, self.budget
        owed = None
        if st.remainder_due(epoch):
            owed = self.batching.padded_steps(Selection(st.remainder_bits, self.num_samples).count)
        return planning.total_steps(self.steps_of, epochs=b.epochs, cap=b.max_steps, step=step, epoch=epoch,
                                    stream_batches=stream_batches, owed_steps=owed)

    def planned_epochs(self) -> int:
        """The epochs a steps budget reaches into under the plan (plan.epochs_for_steps)."""
        return planning.epochs_for_steps(self.steps_of, self.budget.max_steps,
                                         anneal=bool(self.cfg.anneal_fraction))

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Its checkpoint entries: "teacher" (this rank's ledger block, caches, stats), "selection" and, with
        teacher.unit token, "tokens" (the run's kept and target token counts)."""
        out = {"teacher": self.teacher.state_dict(), "selection": self.state.state_dict()}
        if self.tokens is not None:
            out["tokens"] = self.tokens.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any],
                        peers: dict[int, dict[str, Any]] | None = None) -> None:
        """Restore `state_dict()`; the teacher state of another world size needs `peers` (elastic resume:
        see `Teacher.load_state_dict`)."""
        self.teacher.load_state_dict(state["teacher"], peers=peers)
        self.state = SelectionState.from_state(state.get("selection") or {})
        if self.tokens is not None:
            self.tokens.load_state_dict(state.get("tokens"))
        self._training, self._weight_table = None, None


def _phase_seconds(teacher: Teacher) -> dict[str, float]:
    """The teacher's cumulative selection seconds by phase."""
    return {p: float(teacher.stats[f"seconds_{p}"]) for p in PHASES}
