"""Learnability against a reference that never saw the sample (strategies learn and rho): rules, keys, record.

Every loss compared here comes from the same kind of pass, so no rule can rank samples by when they were
seen (learner losses from training forwards minus a reference did: docs/benchmarks.md):
- `learn`, rule `reference`: the reference's loss of a train sample (a model that never trained on it,
  `attent-scale reference fit`) against the same model's losses on the val split, which it never saw
  either: on clean data both come from one distribution and nothing is dropped; a share of train samples
  above every val explanation (a one-sided KS excess) is unlike held-out text (noise), a share below is
  text the reference saw elsewhere in train (repeats). No learner loss at all: the selection is fixed.
- `learn`, rule `fixed`: base loss minus reference loss (Token Cleaning), two fixed models' scoring passes.
- `rho`: RHO-LOSS's reducible loss, learner minus reference, where the learner's loss is from a scoring
  pass (a ledger entry of kind SCORE); an id whose last loss is a training forward's (kind TRAIN) is not
  comparable and is kept, never ranked.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from attent_scale.teacher.ledger import SCORE, unpack_entries
from attent_scale.teacher.signals import BIN_WIDTH, NUM_BINS, histogram, quantiles

if TYPE_CHECKING:
    from attent_scale.teacher.view import Pick, TeacherView

KEEP, NOISE, REPEATED = 0, 1, 2
REASONS = ("noise", "repeated")  # codes 1, 2
TAILS = {"high": (True, False), "low": (False, True), "both": (True, True)}


@dataclass(frozen=True)
class TailCuts:
    """One reference model's cut points (nats): a train sample is noise when its reference loss is at or
    above `high`, repeated when below `low`; each tail's KS excess and allowance, for the record."""

    high: float = float("inf")
    low: float = float("-inf")
    high_excess: float = 0.0
    low_excess: float = 0.0
    allowance: float = 0.0

    def as_dict(self) -> dict[str, float | None]:
        return {k: (round(float(v), 4) if np.isfinite(v) else None) for k, v in self.__dict__.items()}


def excess_cut(train_hist: np.ndarray, val_hist: np.ndarray, tolerance: float, allowance: float
               ) -> tuple[int, float, float]:
    """The low tail's cut as a bin count: a train loss in the first `bins` bins (below bins * BIN_WIDTH)
    is one no val sample explains. The excess is the one-sided two-sample KS statistic D = max_t
    F_train(t) - F_val(t); only when it passes `allowance + tolerance * sqrt(1/n_val + 1/n_train)` is the
    share D of the lowest train losses cut (whole bins, never past the bin where D peaks: exactly the
    train mass below every val loss when the two do not overlap). Returns (bins (0: no cut), D, gate)."""
    nt, nv = int(train_hist.sum()), int(val_hist.sum())
    if nt == 0 or nv == 0:
        return 0, 0.0, 0.0
    ct = np.cumsum(train_hist)
    d = ct / nt - np.cumsum(val_hist) / nv
    peak = int(np.argmax(d))
    excess, gate = float(d[peak]), float(allowance + tolerance * np.sqrt(1.0 / nv + 1.0 / nt))
    if excess <= gate:
        return 0, excess, gate
    b = int(np.searchsorted(ct, excess * nt - 1e-6, side="left")) + 1  # the bins holding the share
    return min(b, peak + 1), excess, gate


def tail_cuts(train_hist: np.ndarray, val_hist: np.ndarray, tolerance: float, allowance: float,
              tails: str) -> TailCuts:
    """The cuts of the reference rule from a model's train-loss and val-loss histograms (signals bins):
    each tail's excess_cut (the high tail on the reversed histograms). Exchangeable train and val losses
    (clean data, a model that saw neither) stay below the gate: no cut."""
    high_on, low_on = TAILS[tails]
    low_bins, low_x, gate = excess_cut(train_hist, val_hist, tolerance, allowance)
    high_bins, high_x, _ = excess_cut(train_hist[::-1], val_hist[::-1], tolerance, allowance)
    high = (NUM_BINS - high_bins) * BIN_WIDTH if high_on and high_bins else float("inf")
    low = low_bins * BIN_WIDTH if low_on and low_bins else float("-inf")
    return TailCuts(high=high, low=low, high_excess=high_x, low_excess=low_x, allowance=gate)


def reference_reasons(loss: np.ndarray, fold: np.ndarray, cuts: list[TailCuts]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(reason code, strength in nats past the cut) per sample from its reference loss and the cuts of the
    fold model that scored it; non-finite losses are kept."""
    loss = np.asarray(loss, dtype=np.float64)
    code = np.zeros(loss.shape[0], dtype=np.int8)
    strength = np.zeros(loss.shape[0], dtype=np.float64)
    fin = np.isfinite(loss)
    high = np.array([c.high for c in cuts])[fold]
    low = np.array([c.low for c in cuts])[fold]
    with np.errstate(invalid="ignore"):
        noise = fin & (loss >= high)
        rep = fin & (loss < low)
    code[noise], strength[noise] = NOISE, loss[noise] - high[noise] + BIN_WIDTH
    code[rep], strength[rep] = REPEATED, low[rep] - loss[rep]
    return code, strength


def _chunks(v: TeacherView) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids, reference loss, fold) of this rank's ledger block, in the view's blocks."""
    ref = v.reference
    for blk in v.blocks():
        yield blk.ids, ref.losses(blk.ids).astype(np.float64), ref.fold_of(blk.ids)


def pick_learn(v: TeacherView, epoch: int, ratio: float) -> Pick:
    """Collective. teacher.learn_rule reference: drop only what the reference rule calls noise (or
    repeated), at most a share 1 - `ratio` of the ids (the strongest first); fixed: keep the round(ratio *
    finite) ids of largest base - reference loss. Its record is the selection record's `signal` entry;
    what it keeps is the epoch's planned count."""
    if v.cfg.learn_rule == "fixed":
        return _pick_fixed(v, epoch, ratio)
    from attent_scale.teacher.schedules import round_half_up
    from attent_scale.teacher.view import Pick

    cfg, ref = v.cfg, v.reference
    if ref is None:
        raise ValueError("strategy learn needs the reference's losses (teacher.reference)")
    val = ref.val_hist()
    if val is None:
        raise ValueError(f"{ref.path}: no val losses of the reference (`val_hist`): write it with "
                         "`attent-scale reference fit` (or `attent-scale score --val-hist`)")
    models = val.shape[0]
    train = np.zeros((models, NUM_BINS), dtype=np.int64)
    n_fin = 0
    for _, loss, fold in _chunks(v):
        fin = np.isfinite(loss)
        n_fin += int(np.count_nonzero(fin))
        for k in range(models):
            train[k] += histogram(loss[fold == k])
    total = v.all_reduce(np.concatenate([[n_fin], train.reshape(-1)]).astype(np.int64))
    n_fin, train = int(total[0]), total[1:].reshape(models, NUM_BINS)
    cuts = [tail_cuts(train[k], val[k], cfg.learn_tolerance, cfg.learn_allowance, cfg.learn_tails)
            for k in range(models)]
    by = np.zeros(3, dtype=np.int64)
    for _, loss, fold in _chunks(v):
        by += np.bincount(reference_reasons(loss, fold, cuts)[0], minlength=3).astype(np.int64)
    by = v.all_reduce(by)
    n_cand = int(by[1:].sum())
    n_drop = min(n_cand, n_fin - round_half_up(ratio * n_fin))

    def chunks() -> Iterator[np.ndarray]:
        for _, loss, fold in _chunks(v):
            code, strength = reference_reasons(loss, fold, cuts)
            keys = np.full(loss.shape[0], np.inf, dtype=np.float64)
            keys[code > 0] = -strength[code > 0]  # the weakest are kept first when the cap binds
            yield keys

    reasons = {name: int(by[i + 1]) for i, name in enumerate(REASONS)}
    if n_drop < n_cand:
        reasons["capped"] = n_cand - n_drop
    record = {
        "name": f"learn:reference:{cfg.learn_tails}", "n": n_fin, "dropped": n_drop,
        "dropped_share": round(n_drop / n_fin, 6) if n_fin else 0.0, "reasons": reasons,
        "thresholds": {f"model{k}": c.as_dict() for k, c in enumerate(cuts)},
        "val": {"n": int(val.sum()), **(quantiles(val.sum(axis=0)) or {})},
        "loss": quantiles(train.sum(axis=0)),
    }
    return Pick(k=v.num_samples - n_drop, key_chunks=chunks, n_obs=v.num_samples, n_nonfinite=0,
                plans_count=True, record=record)


def _pick_fixed(v: TeacherView, epoch: int, ratio: float) -> Pick:
    """Keep the round(ratio * finite) ids of largest base - reference loss (and every id either model
    could not score)."""
    from attent_scale.teacher.reference import Reference
    from attent_scale.teacher.schedules import round_half_up
    from attent_scale.teacher.view import Pick

    base = Reference(v.cfg.learn_base, None, "train", num_samples=v.num_samples)

    def gaps() -> Iterator[np.ndarray]:
        for ids, loss, _ in _chunks(v):
            yield base.losses(ids).astype(np.float64) - loss

    n_fin = v.all_sum([sum(int(np.count_nonzero(np.isfinite(g))) for g in gaps())])[0]
    hist = np.zeros(NUM_BINS, dtype=np.int64)
    for g in gaps():
        hist += histogram(g, 16.0)
    hist = v.all_reduce(hist)

    def chunks() -> Iterator[np.ndarray]:
        for g in gaps():
            yield np.where(np.isfinite(g), g, np.inf)

    k = v.num_samples - n_fin + round_half_up(ratio * n_fin)
    record = {"name": "learn:fixed", "n": n_fin, "dropped": v.num_samples - k,
              "dropped_share": round((v.num_samples - k) / n_fin, 6) if n_fin else 0.0,
              "reasons": {"low_learnability": v.num_samples - k}, "thresholds": None,
              "val": None, "loss": quantiles(hist, 16.0)}
    return Pick(k=k, key_chunks=chunks, n_obs=v.num_samples, n_nonfinite=0, plans_count=True, record=record)


def pick_rho(v: TeacherView, epoch: int, ratio: float) -> Pick:
    """Collective. RHO-LOSS: keep the round(ratio * n) ids of largest learner - reference loss among the n
    ids whose last learner loss is a scoring pass's (finite); ids without one (never scored, or last seen
    by a training forward) are not comparable and are kept; non-finite losses are never kept."""
    from attent_scale.teacher.schedules import round_half_up
    from attent_scale.teacher.view import Pick

    ref = v.reference
    if ref is None:
        raise ValueError("strategy rho needs the reference's losses (teacher.reference)")

    def reducible() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(comparable, learner - reference) per chunk; NaN where not comparable or not finite."""
        for blk in v.blocks():
            loss, _, kind = unpack_entries(blk.entries)
            comparable = blk.seen & (kind == SCORE)
            yield comparable, np.where(comparable, loss.astype(np.float64) - ref.losses(blk.ids), np.nan)

    counts = np.zeros(2, dtype=np.int64)
    hist = np.zeros(NUM_BINS, dtype=np.int64)
    for comparable, gap in reducible():
        counts += [int(np.count_nonzero(comparable)), int(np.count_nonzero(np.isfinite(gap)))]
        hist += histogram(gap, 16.0)
    total = v.all_reduce(np.concatenate([counts, hist]))
    n_cmp, n_fin, hist = int(total[0]), int(total[1]), total[2:]

    def chunks() -> Iterator[np.ndarray]:
        for comparable, gap in reducible():
            yield np.where(comparable, gap, np.inf)  # not comparable: kept; comparable non-finite: NaN

    k = v.num_samples - n_cmp + round_half_up(ratio * n_fin)
    record = {"name": "rho", "n": n_fin, "dropped": n_fin - round_half_up(ratio * n_fin),
              "dropped_share": round(1 - round_half_up(ratio * n_fin) / n_fin, 6) if n_fin else 0.0,
              "reasons": {"low_learnability": n_fin - round_half_up(ratio * n_fin)},
              "not_comparable": v.num_samples - n_cmp, "thresholds": None, "val": None,
              "loss": quantiles(hist, 16.0)}
    return Pick(k=k, key_chunks=chunks, n_obs=n_cmp, n_nonfinite=n_cmp - n_fin, plans_count=True,
                record=record)


def is_learn_record(signal: dict[str, Any]) -> bool:
    """A record's `signal` entry written by strategy learn or rho (not by strategy signal)."""
    name = str(signal.get("name", ""))
    return name.startswith("learn:") or name == "rho"


def explain(records: list[dict[str, Any]]) -> str | None:
    """One sentence on what strategy learn / rho dropped and why, from a run's selection records (None
    without such records). It names a case only when something was dropped."""
    sig = [r["signal"] for r in records if r.get("signal") and is_learn_record(r["signal"])]
    if not sig:
        return None
    dropped = sum(s["dropped"] for s in sig)
    n = sum(s["n"] for s in sig)
    share = dropped / n if n else 0.0
    if share < 0.02:
        return (f"the teacher kept {100 * (1 - share):.0f}% of samples: the reference found nothing unlike "
                "its held-out text; expect no speedup")
    by: dict[str, int] = {}
    for s in sig:
        for name, count in s["reasons"].items():
            if name != "capped":
                by[name] = by.get(name, 0) + count
    main = max(by, key=lambda key: by[key])
    mostly = "mostly" if by[main] * 2 > dropped else "most of them"
    what = {"noise": "samples the reference (which never saw them) fits worse than any held-out text: noise",
            "repeated": "samples the reference fits better than held-out text because it saw their content "
                        "elsewhere in train: repeats",
            "low_learnability": "samples with the lowest learnability against the reference"}[main]
    return f"the teacher dropped {100 * share:.0f}% of samples, {mostly} {what}"
