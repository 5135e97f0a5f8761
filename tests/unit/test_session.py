"""The teacher session every trainer holds, on one process: the step plan (pure), the epoch start, the
anneal rule, the loss weights, a scoring pass's per-rank share, its state."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from attent_scale.config import TeacherConfig
from attent_scale.teacher import Batching, Budget, Selection, TeacherSession
from attent_scale.teacher.plan import budget_steps, epochs_for_steps, total_steps
from attent_scale.teacher.session import SelectionState, score_share


def _session(n: int = 1000, *, world: int = 1, batch: int = 10, budget: Budget = Budget(epochs=2),
             **cfg: Any) -> TeacherSession:
    return TeacherSession.build(TeacherConfig(**cfg), num_samples=n, seed=0, batching=Batching(world, batch),
                                budget=budget)


# ---------------------------------------------------------------------------------------- the step plan


@pytest.mark.parametrize("n,world,batch,accum,drop_last,steps,padded", [
    (1000, 2, 10, 1, False, 50, 50),
    (1001, 2, 10, 1, False, 50, 51),  # 500 per rank (one dropped); padded: 501, a short 51st batch
    (95, 2, 10, 1, False, 5, 5),  # 47 per rank: 4 full batches and a short one
    (95, 2, 10, 1, True, 4, 5),  # drop_last (online mode, a Trainer's dataloader_drop_last)
    (64, 1, 3, 4, False, 6, 6),  # 22 batches of 3 (the last 1 row), 4 per optimizer step
])
def test_batching_cuts_an_epoch_into_steps_per_rank(n: int, world: int, batch: int, accum: int,
                                                   drop_last: bool, steps: int, padded: int) -> None:
    b = Batching(world, batch, accum, drop_last)
    assert (b.steps(n), b.padded_steps(n)) == (steps, padded)


def test_an_epoch_budget_plans_the_steps_pruning_and_anneal_really_take() -> None:
    """Epoch 0 full (63 steps of 16), epochs 1-4 keep 1000 - 420 = 580 ids (37 steps), epoch 5 is the
    anneal's, full again; on 2 ranks of batch 8 the same (500 / 290 ids per rank)."""
    cfg = dict(mode="ledger", strategy="prune", prune_ratio=0.6, prune_quantile=0.7, anneal_fraction=0.125,
               warmup_epochs=1)
    one = _session(batch=16, budget=Budget(epochs=6, max_steps=10**9), **cfg)
    assert one.teacher.anneal_from == 5  # planned at build: the LR schedule knows it
    assert [one.steps_of(e) for e in range(6)] == [63, 37, 37, 37, 37, 63]
    assert one.total_steps() == 63 + 4 * 37 + 63
    two = _session(world=2, batch=8, budget=Budget(epochs=6, max_steps=10**9), **cfg)
    assert two.total_steps() == one.total_steps()
    capped = _session(batch=16, budget=Budget(epochs=6, max_steps=100), **cfg)
    assert capped.total_steps() == 100
    assert _session(budget=Budget(max_steps=77), **cfg).total_steps() == 77  # a steps budget: the cap


def test_the_plan_follows_what_a_selection_kept() -> None:
    """A prune selection keeps a count only the data gives: once made, the plan reads it (and says so)."""
    s = _session(mode="ledger", strategy="prune", prune_ratio=0.5, prune_quantile=0.0, warmup_epochs=1,
                 budget=Budget(epochs=3, max_steps=10**9))
    before = s.total_steps()
    s.teacher.observe(np.arange(1000), np.r_[np.zeros(900), np.ones(100)].astype(np.float32), 0)
    start = s.begin_epoch(1, 100)
    assert start.replan and start.selection is not None and s.teacher.kept_counts[1] == start.selected
    assert s.steps_of(1) == -(-start.selected // 10) and s.total_steps() != before


def test_a_resume_plans_what_is_left_on_the_new_world_size() -> None:
    """N 1000, batch 10, 2 epochs planned on 2 ranks (2 x 50 steps); stopped at step 70 (20 batches into
    epoch 1), resumed on 4 ranks: 600 ids owed over 4 ranks = 15 steps, so the LR plan ends at 85 — not
    at 50 (both epochs re-planned at 4 ranks), which would end the run before the owed ids train."""
    assert _session(world=2, mode="none").total_steps() == 100
    owed = np.zeros(1000, dtype=bool)
    owed[400:] = True
    for world, want in ((4, 70 + 15), (1, 70 + 60)):
        s = _session(world=world, mode="none")
        s.state = SelectionState(remainder_bits=np.packbits(owed, bitorder="little"), remainder_epoch=1)
        assert s.total_steps(70, 1) == want
    # a same-world resume mid-epoch plans what it always did
    assert _session(world=2, mode="none").total_steps(70, 1, stream_batches=20) == 100


def test_a_hugging_face_budget_fractional_epochs_and_a_steps_budgets_epochs() -> None:
    steps = [8, 6, 6, 8].__getitem__
    assert budget_steps(steps, 2.5) == 8 + 6 + 3 and budget_steps(steps, 4, first=1) == 20
    assert total_steps(steps, epochs=2.5, cap=0) == 17 and total_steps(steps, epochs=0, cap=40) == 40
    assert epochs_for_steps(steps, 20, anneal=False) == 3 and epochs_for_steps(steps, 20, anneal=True) == 4


# ---------------------------------------------------------------------------------------- the epoch


class _Scorer:
    """Scores every id it is handed with a fixed loss per id; records what it was asked."""

    def __init__(self, loss: np.ndarray) -> None:
        self.loss, self.asked = loss, []

    def batches(self, skip: Selection | None, step: int) -> Any:
        ids = score_share(skip, self.loss.shape[0], 0, 1)
        self.asked.append((None if skip is None else skip.count, step, ids.shape[0]))
        for a in range(0, ids.shape[0], 64):
            yield {"ids": torch.from_numpy(ids[a:a + 64])}

    def losses(self, batch: dict[str, Any]) -> torch.Tensor:
        return torch.from_numpy(self.loss[batch["ids"].numpy()])


class _Metrics:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: self.calls.append(name)


def test_an_epoch_start_scores_selects_and_a_resumed_one_keeps_its_selection() -> None:
    n = 400
    loss = np.random.default_rng(0).uniform(0, 5, n).astype(np.float32)
    s = _session(n, mode="cycle", strategy="hard", ratio_schedule="constant", initial_ratio=0.25,
                 interval_schedule="fixed", initial_interval=2, max_interval=2, warmup_epochs=1,
                 full_epochs_per_cycle=0, rescore="stale")
    scorer = _Scorer(loss)
    full = s.begin_epoch(0, 0, scorer)
    assert full.selection is None and full.ratio == 1.0 and not scorer.asked and s.state.epoch == 0
    first = s.begin_epoch(1, 40, scorer)
    assert scorer.asked == [(None, 40, n)]  # the cycle's first subset epoch scores every id
    want = np.sort(np.argsort(-loss, kind="stable")[:100])
    assert first.selection.ids().tolist() == want.tolist() and first.ratio == 0.25
    assert first.planned_steps == 10 and first.record["epoch"] == 1 and not first.resumed
    metrics = _Metrics()
    first.report(metrics)
    assert metrics.calls == ["observe_selection", "observe_sources"]
    again = s.begin_epoch(1, 45, resumed=True)  # a checkpoint inside epoch 1: nothing planned again
    assert again.resumed and again.selection.sha256 == first.selection.sha256 and len(scorer.asked) == 1
    assert s.resume_point(45) == (1, 5) and s.resume_point(50) == (2, 0)


def test_the_owed_ids_of_an_elastic_resume_are_the_epochs_training_set_weights_kept() -> None:
    s = _session(100, batch=4, mode="ledger", strategy="prune", warmup_epochs=1)
    owed = Selection.from_ids(np.arange(10, 30), 100)
    up = Selection.from_ids(np.arange(20, 40), 100)
    s.state = SelectionState(epoch=2, bits=Selection.full(100).bits, weight_bits=up.bits, weight=2.0,
                             ratio=0.7, remainder_bits=owed.bits, remainder_epoch=2)
    start = s.begin_epoch(2, 30)
    assert start.owed and start.selection.ids().tolist() == list(range(10, 30)) and start.planned_steps == 5
    w = s.loss_weights(torch.tensor([10, 25, -1, 35]))
    assert w.tolist() == [1.0, 2.0, 1.0, 2.0]  # upweighted ids carry the weight; a filler (-1) weight 1
    s.teacher.observe(np.arange(100), np.ones(100, np.float32), 30)
    s.begin_epoch(3, 40)
    assert s.state.remainder_bits is None  # the owed epoch is over


def test_loss_weights_are_none_without_a_weighted_selection() -> None:
    s = _session(50, mode="cycle", strategy="random", initial_ratio=0.5, ratio_schedule="constant",
                 warmup_epochs=0, random_reweight=False)
    assert s.loss_weights(torch.arange(4)) is None
    s.begin_epoch(0, 0)
    assert s.loss_weights(torch.arange(4)) is None


def test_the_anneal_rule_steps_and_seconds_and_the_subset_epoch_it_ends() -> None:
    steps = _session(100, mode="ledger", strategy="hard", warmup_epochs=1, anneal_fraction=0.3,
                     budget=Budget(max_steps=20))
    steps.state = SelectionState(epoch=1, start_step=8, steps=7, bits=Selection.full(100).bits)
    assert not steps.anneal_cut(13)
    assert steps.anneal_cut(14) and steps.teacher.anneal_from == 2 and steps.state.steps == 6
    assert not steps.anneal_cut(15)  # once
    seconds = _session(100, mode="ledger", anneal_fraction=0.5,
                       budget=Budget(max_steps=10**6, max_seconds=10))
    assert not seconds.anneal_cut(10**6, train_seconds=4.9)  # the seconds budget decides, not the steps
    assert not seconds.anneal_cut(1, train_seconds=5.0)  # a full epoch (no selection) goes on
    assert seconds.teacher.anneal_from == 0
    epochs = _session(100, mode="ledger", anneal_fraction=0.5, budget=Budget(epochs=4, max_steps=10))
    assert not epochs.anneal_cut(10) and epochs.teacher.anneal_from == 2  # by plan, from the start
    assert not _session(100, mode="online", anneal_fraction=0.5, budget=Budget(max_steps=2)).anneal_cut(2)


@pytest.mark.parametrize("n,world", [(10, 3), (7, 4), (0, 2), (16, 1)])
def test_a_scoring_passs_shares_cover_every_id_once_in_equal_lengths(n: int, world: int) -> None:
    skip = Selection.from_ids(np.arange(0, n, 3), n) if n else None
    shares = [score_share(skip, n, r, world) for r in range(world)]
    assert len({s.shape[0] for s in shares}) == 1
    real = np.concatenate(shares)
    real = real[real >= 0]
    want = [i for i in range(n) if skip is None or i % 3]
    assert sorted(real.tolist()) == want and len(real) == len(want)


def test_state_round_trip_and_old_selection_entries() -> None:
    s = _session(100, mode="ledger", strategy="hard", warmup_epochs=1)
    s.teacher.observe(np.arange(100), np.linspace(0, 1, 100, dtype=np.float32), 0)
    start = s.begin_epoch(1, 10)
    other = _session(100, mode="ledger", strategy="hard", warmup_epochs=1)
    other.load_state_dict(s.state_dict())
    assert other.state.epoch == 1 and other.begin_epoch(1, 12, resumed=True).selection.sha256 == \
        start.selection.sha256
    old = {"bits": start.selection.bits, "weight_bits": None, "weight": 1.0, "ratio": 0.2,
           "remainder_bits": None, "remainder_epoch": -1}  # a selection entry from before the session
    assert SelectionState.from_state(old).epoch == -1 and SelectionState.from_state(old).ratio == 0.2
