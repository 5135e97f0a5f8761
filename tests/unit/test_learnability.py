"""Strategies learn and rho (teacher/learnability.py), the folds of a cross-fitted reference
(teacher/folds.py) and the one-line config errors that keep learner and reference losses comparable."""

from __future__ import annotations

from pathlib import Path

import learn_scenario as sc
import numpy as np
import pytest
import torch

from attent_scale.config import TeacherConfig, config_from_dict
from attent_scale.errors import UserError
from attent_scale.teacher import Selection, uniform_noise
from attent_scale.teacher.folds import fold_of, fold_selection, restrict
from attent_scale.teacher.learnability import REPEATED, explain, reference_reasons, tail_cuts
from attent_scale.teacher.ledger import SCORE
from attent_scale.teacher.signals import NUM_BINS, histogram

LEARN = dict(mode="ledger", strategy="learn", warmup_epochs=0, ratio_schedule="constant", initial_ratio=0.5,
             learn_tails="both", reference="ref.safetensors")
RHO = dict(mode="cycle", strategy="rho", warmup_epochs=1, ratio_schedule="constant", initial_ratio=0.5,
           rescore="all", interval_schedule="fixed", initial_interval=1, full_epochs_per_cycle=0,
           reference="ref.safetensors")


# ---------------------------------------------------------------------------------------- folds

def test_fold_of_is_a_pure_function_of_seed_and_id_run() -> None:
    ids = np.arange(100_000, dtype=np.int64)
    f = fold_of(ids, 3, seed=11, group=16)
    assert f.min() == 0 and f.max() == 2
    assert np.all(f.reshape(-1, 16) == f.reshape(-1, 16)[:, :1])  # a run of 16 ids shares its fold
    # any subset, any order (a rank's block, a worker's shard) gives the same folds
    perm = np.random.default_rng(0).permutation(ids)[:777]
    assert np.array_equal(fold_of(perm, 3, seed=11, group=16), f[perm])
    assert np.abs(np.bincount(f) / f.size - 1 / 3).max() < 0.02
    assert not np.array_equal(fold_of(ids, 3, seed=12, group=16), f)


@pytest.mark.parametrize("n", [0, 5, 1000, 1003])
def test_fold_selections_partition_the_ids(n: int) -> None:
    folds = [fold_selection(n, 3, k, seed=1, train_on="fold", group=4) for k in range(3)]
    assert sum(s.count for s in folds) == n
    assert all(np.array_equal(s.ids(), np.flatnonzero(fold_of(np.arange(n), 3, 1, 4) == k))
               for k, s in enumerate(folds))
    rest = fold_selection(n, 3, 1, seed=1, train_on="rest", group=4)
    assert np.array_equal(rest.bits, folds[1].complement().bits)


def test_restrict_keeps_the_weights_of_the_ids_that_remain() -> None:
    sel = Selection.from_ids(np.arange(0, 20, 2), 20)
    up = Selection.from_ids(np.array([0, 4, 6]), 20)
    sel = Selection(sel.bits, 20, upweight=up.bits, weight=2.0)
    keep = Selection.from_ids(np.arange(0, 10), 20)
    got = restrict(sel, keep)
    assert got.ids().tolist() == [0, 2, 4, 6, 8]
    assert got.sample_weights(np.array([0, 2, 4])).tolist() == [2.0, 1.0, 2.0]
    assert restrict(None, keep) is keep and restrict(sel, None) is sel


# ---------------------------------------------------------------------------------------- the rule

def _hist(x: np.ndarray) -> np.ndarray:
    return histogram(x)


def test_exchangeable_train_and_val_losses_drop_nothing() -> None:
    """Clean data: train and val losses of a model that saw neither come from one distribution."""
    d = TeacherConfig()
    false = 0
    for seed in range(40):
        u = uniform_noise(np.arange(3000), seed=seed, cycle=1)
        train, val = 4.0 + u[:2500], 4.0 + u[2500:]
        cuts = tail_cuts(_hist(train), _hist(val), d.learn_tolerance, d.learn_allowance, "both")
        false += cuts.high != np.inf or cuts.low != -np.inf
    assert false <= 2  # 99% per tail


def test_outliers_beyond_every_val_loss_are_cut_in_their_tail() -> None:
    u = uniform_noise(np.arange(3000), seed=1, cycle=1)
    train = np.concatenate([4.0 + u[:2000], 8.0 + u[2000:2300], 1.0 + u[2300:2500]])  # 12% noise, 8% repeats
    val = 4.0 + u[2500:]
    cuts = tail_cuts(_hist(train), _hist(val), 1.36, 0.0, "both")
    code, strength = reference_reasons(train, np.zeros(train.size, dtype=np.int64), [cuts])
    assert np.array_equal(code[2000:2300], np.ones(300)) and np.array_equal(code[2300:], np.full(200, 2))
    # D is a max over cut points, biased up by its sampling noise: a few clean samples next to the cut go
    # too (here under 2.5% of the clean ones), never many
    assert np.count_nonzero(code[:2000]) <= 50 and (strength[code > 0] > 0).all()
    high_only = tail_cuts(_hist(train), _hist(val), 1.36, 0.0, "high")
    assert high_only.low == -np.inf and high_only.high == cuts.high
    # a larger allowance than the excess keeps everything
    assert tail_cuts(_hist(train), _hist(val), 1.36, 0.5, "both").high == np.inf


def test_learn_drops_noise_and_repeats_by_the_fold_model_that_scored_them(tmp_path: Path) -> None:
    ref = sc.reference(sc.write_reference(tmp_path / "ref.safetensors"))
    t = sc.teacher(LEARN, ref)
    sel = t.select(0, step=0)
    ids = np.arange(sc.N)
    kept = sel.mask(ids)
    assert kept[sc.kind(ids) == 0].mean() > 0.97 and not kept[sc.kind(ids) > 0].any()
    rec = t.last_record["signal"]
    assert rec["reasons"]["noise"] >= 100 and rec["reasons"]["repeated"] >= 100 and rec["n"] == 999
    assert rec["dropped"] == sc.N - sel.count
    assert set(rec["thresholds"]) == {"model0", "model1"}
    assert t.planned_count(t.plan_epoch(1), sc.N) == sel.count  # the plan follows what it kept
    # the cap: at most 1 - ratio dropped, the strongest first (the farthest noise / repeats)
    capped = sc.teacher({**LEARN, "initial_ratio": 0.9}, ref).select(0, step=0)
    assert capped.count == sc.N - round(0.1 * 999)
    # high only: repeats are kept
    noise_only = sc.teacher({**LEARN, "learn_tails": "high"}, ref).select(0, step=0)
    assert noise_only.mask(ids)[sc.kind(ids) == 2].all()
    text = explain([t.last_record])
    assert text.startswith(f"the teacher dropped {round(100 * rec['dropped'] / 999)}% of samples, "), text


def test_learn_without_val_losses_is_an_error_naming_the_file(tmp_path: Path) -> None:
    ref = sc.reference(sc.write_reference(tmp_path / "ref.safetensors", val=False))
    with pytest.raises(ValueError, match="ref.safetensors: no val losses"):
        sc.teacher(LEARN, ref).select(0, step=0)


def test_a_clean_reference_keeps_everything_and_says_so(tmp_path: Path) -> None:
    from attent_scale.score import write_scores_parts
    from attent_scale.teacher.reference import SCORES_FORMAT, VAL_HIST_KEY

    ids = np.arange(sc.N)
    fold = fold_of(ids, sc.FOLDS, sc.FOLD_SEED, sc.GROUP)
    meta = {"format": SCORES_FORMAT, "folds": "2", "fold_seed": str(sc.FOLD_SEED),
            "fold_group": str(sc.GROUP)}
    val_ids = np.arange(10**6, 10**6 + 500)
    vals = np.stack([histogram(sc.clean_losses(val_ids, np.full(500, k))) for k in (0, 1)])
    path = tmp_path / "clean.safetensors"
    loss = sc.clean_losses(ids, fold).astype(np.float32)
    write_scores_parts(path, sc.N, [loss], meta, {VAL_HIST_KEY: vals})
    t = sc.teacher(LEARN, sc.reference(path))
    assert t.select(0, step=0).count == sc.N
    assert explain([t.last_record]).startswith("the teacher kept 100% of samples")


# ---------------------------------------------------------------------------------------- comparable losses

def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_training_forward_minus_reference_ranks_by_when_seen_and_rho_does_not(tmp_path: Path) -> None:
    """The measured defect (docs/benchmarks.md, Real-model regime): training-forward learner losses minus a
    reference rank samples by the step they were seen. The old rule (signal excess, ledger mode) keeps the
    samples seen first; rho ranks only scoring-pass losses, and what it keeps does not depend on when a
    sample was trained."""
    ref = sc.reference(sc.write_reference(tmp_path / "ref.safetensors"))
    ids = np.arange(sc.N)
    orders = [np.random.default_rng(s).permutation(ids) for s in (0, 1)]
    old_kept, new_kept = [], []
    for order in orders:
        old = sc.teacher(dict(mode="ledger", strategy="signal", signal="excess", score="excess",
                              reference="ref.safetensors", warmup_epochs=0, ratio_schedule="constant",
                              initial_ratio=0.2, signal_excess=-0.09), ref)
        steps = sc.observe_training(old, order)
        step_of = np.empty(sc.N, dtype=np.int64)
        step_of[order] = steps
        old.observe_val(histogram(np.full(10, 4.5)), step=20)
        kept = old.select(0, step=20).mask(ids)
        # kept = seen in the first steps: the keep decision is a function of the step, not of the sample
        fin = np.isfinite(sc.reference_losses(ids))
        assert step_of[kept & fin].max() < step_of[~kept & fin].min()
        old_kept.append(kept)

        new = sc.teacher(RHO, ref)
        sc.observe_training(new, order)  # the warm-up epoch's training forwards: not comparable
        assert new.select(1, step=20).count == sc.N  # nothing ranked on training-forward losses
        new.ledger.observe(ids, sc.scoring_losses(ids), 21, kind=SCORE)  # the cycle's scoring pass
        new_kept.append(new.select(2, step=22).mask(ids))
        assert new.last_record["signal"]["not_comparable"] == 0
    assert not np.array_equal(old_kept[0], old_kept[1])  # the old rule follows the order of training
    assert np.array_equal(new_kept[0], new_kept[1])  # rho does not
    # rho keeps the clean (learnable) samples: their reducible loss is the largest
    assert new_kept[0].sum() == round(0.5 * 999) and not new_kept[0][sc.kind(ids) > 0].any()
    keys = sc.train_forward_losses(ids, np.arange(sc.N) // 50) - sc.reference_losses(ids)
    assert _spearman(keys[np.isfinite(keys)], -np.arange(sc.N)[np.isfinite(keys)]) > 0.99


def test_rho_keeps_ids_last_seen_by_a_training_forward(tmp_path: Path) -> None:
    ref = sc.reference(sc.write_reference(tmp_path / "ref.safetensors"))
    t = sc.teacher(RHO, ref)
    ids = np.arange(sc.N)
    t.ledger.observe(ids, sc.scoring_losses(ids), 10, kind=SCORE)
    later = ids[:300]  # trained after the scoring pass: their last loss is a training forward's
    t.observe(torch.from_numpy(later), torch.from_numpy(sc.train_forward_losses(later, np.full(300, 50))), 11)
    sel = t.select(1, step=12)
    assert sel.mask(later).all()
    comparable = sc.N - 300
    fin = comparable - 1  # id 3: no reference loss
    assert sel.count == 300 + round(0.5 * fin)
    assert t.last_record["signal"]["not_comparable"] == 300


# ---------------------------------------------------------------------------------------- config

def _cfg(**teacher: object) -> dict:
    return {"teacher": teacher, "eval": {"every_steps": 10}}


@pytest.mark.parametrize("teacher,match", [
    (dict(mode="ledger", strategy="learn"), "'teacher.reference': required by teacher.strategy 'learn'"),
    (dict(mode="ledger", strategy="rho", reference="r"), "'teacher.mode': teacher.strategy 'rho' compares"),
    (dict(mode="cycle", strategy="rho", reference="r"), "'teacher.rescore': teacher.strategy 'rho'"),
    (dict(mode="online", strategy="learn", reference="r"), "needs teacher.mode cycle or ledger, not 'onl"),
    (dict(mode="ledger", strategy="learn", reference="r", score="excess"), "'teacher.score': 'excess'"),
    (dict(mode="ledger", strategy="learn", reference="r", learn_rule="fixed"), "'teacher.learn_base'"),
])
def test_learner_and_reference_losses_that_do_not_compare_are_one_line_errors(teacher: dict, match: str
                                                                               ) -> None:
    with pytest.raises(UserError, match=match) as exc:
        config_from_dict(_cfg(**teacher))
    assert "\n" not in str(exc.value)


def test_holdout_config_errors() -> None:
    with pytest.raises(UserError, match="'data.holdout.fold': 2 is outside"):
        config_from_dict({"data": {"holdout": {"folds": 2, "fold": 2}}})
    with pytest.raises(UserError, match="'train.max_epochs': 3 with data.holdout"):
        config_from_dict({"data": {"holdout": {"folds": 2}}, "train": {"max_epochs": 3}})
    with pytest.raises(UserError, match="'reference.folds': 1 must be >= 2"):
        config_from_dict({"reference": {"folds": 1}})
    assert config_from_dict({"data": {"holdout": {"folds": 3, "fold": 2, "train_on": "fold"}}})


def test_early_stop_counts_evaluations_without_a_new_best_and_survives_a_checkpoint() -> None:
    from attent_scale.validate import Validator

    cfg = config_from_dict({"eval": {"early_stop_patience": 2}})
    v = Validator(cfg.eval, seed=0, rank=0, world=1)
    assert [v.stop_early(x) for x in (5.0, 4.0, 4.1)] == [False, False, False]
    w = Validator(cfg.eval, seed=0, rank=0, world=1)
    w.load_state_dict(v.state_dict())
    assert w.stop_early(4.0) is True  # the second in a row without a new best
    off = Validator(config_from_dict({}).eval, seed=0, rank=0, world=1)
    assert not any(off.stop_early(x) for x in (1.0, 2.0, 3.0, 4.0))


def test_histogram_bins_are_what_the_rule_assumes() -> None:
    assert NUM_BINS == 4096 and histogram(np.array([40.0])).argmax() == NUM_BINS - 1
    assert REPEATED == 2


@pytest.mark.parametrize("world", [1, 2])
def test_a_holdout_stream_never_yields_a_held_out_id(tiny_shards: Path, world: int) -> None:
    """data.holdout as the trainer applies it (the epoch's selection restricted to the fold filter):
    every rank's stream yields only ids outside the held-out fold, each at most once per epoch."""
    from attent_scale.data import Manifest, ShardStream

    m = Manifest.load(tiny_shards)
    n = m.num_samples("train")
    keep = fold_selection(n, 2, 1, seed=3, train_on="rest", group=4)
    some = Selection.from_ids(np.arange(0, n, 3), n)  # an epoch's selection of a teacher
    for selection, allowed in ((None, keep.ids()), (some, restrict(some, keep).ids())):
        seen = []
        for rank in range(world):
            stream = ShardStream(m, "train", rank=rank, world_size=world, seed=0, epoch=1, batch_size=8,
                                 selection=restrict(selection, keep), shuffle_buffer=16)
            seen += [i for batch in stream for i in batch["ids"].tolist() if i >= 0]
        assert len(seen) == len(set(seen)) and set(seen) <= set(allowed.tolist())
        assert len(seen) >= len(allowed) - world  # only the M mod W ids equal shares drop


def test_fixed_keeps_the_largest_base_minus_reference_gap(tmp_path: Path) -> None:
    """Token Cleaning at the sample level: the ids the reference (adapter) improved most over the base."""
    from attent_scale.score import write_scores

    ref_path = sc.write_reference(tmp_path / "ref.safetensors")
    ids = np.arange(sc.N)
    gap = uniform_noise(ids, seed=9, cycle=0)
    base = sc.reference_losses(ids) + gap.astype(np.float32)
    write_scores(tmp_path / "base.safetensors", base, {"format": "attent-scale-scores/1"})
    t = sc.teacher({**LEARN, "learn_rule": "fixed", "learn_base": str(tmp_path / "base.safetensors"),
                    "initial_ratio": 0.3}, sc.reference(ref_path))
    kept = t.select(0, step=0).mask(ids)
    fin = np.isfinite(base)
    assert kept.sum() == round(0.3 * fin.sum()) + int((~fin).sum())
    assert gap[kept & fin].min() > gap[~kept & fin].max()
    assert t.last_record["signal"]["name"] == "learn:fixed"
