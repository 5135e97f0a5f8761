"""What is safe to drop (teacher.strategy: signal): the per-sample signals, the threshold rule, its record."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from attent_scale.teacher.ledger import unpack_entries
from attent_scale.teacher.schedules import round_half_up
from attent_scale.teacher.view import Pick, TeacherView

if TYPE_CHECKING:
    from attent_scale.config import TeacherConfig

# Per-sample losses are counted in fixed bins (1/128 nat over [0, 32)), so the val distribution and the
# train distribution are integer histograms: summed over ranks they have the same bits on any world size.
BIN_WIDTH = 1.0 / 128
NUM_BINS = 32 * 128
FALL_OFFSET = 16.0  # falls (previous - last loss) are binned over [-16, 16)
KEEP, MEMORIZED, LEARNED, UNLEARNABLE = 0, 1, 2, 3
REASONS = ("memorized", "learned", "unlearnable")  # codes 1, 2, 3
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
SIGNALS = ("gap", "learn", "gap+learn", "excess")


def histogram(values: np.ndarray | torch.Tensor, offset: float = 0.0) -> np.ndarray:
    """int64 counts of the finite `values + offset` in NUM_BINS bins of BIN_WIDTH from 0 (values outside
    go to the first or last bin)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)] + offset
    idx = np.clip(np.floor(v / BIN_WIDTH), 0, NUM_BINS - 1).astype(np.int64)
    return np.bincount(idx, minlength=NUM_BINS).astype(np.int64)


def quantile(hist: np.ndarray, q: float, offset: float = 0.0) -> float | None:
    """The q-quantile of a histogram (the lower edge of the bin holding the ceil(q * n)-th value, so
    `value < quantile` holds for fewer than q * n of them); None for an empty one."""
    n = int(hist.sum())
    if n == 0:
        return None
    rank = max(1, int(np.ceil(q * n)))
    b = int(np.searchsorted(np.cumsum(hist), rank))
    return b * BIN_WIDTH - offset


def quantiles(hist: np.ndarray, offset: float = 0.0) -> dict[str, float] | None:
    """QUANTILES of a histogram as {"q05": ..., ...}, rounded to the bin width."""
    if int(hist.sum()) == 0:
        return None
    return {f"q{round(q * 100):02d}": round(float(quantile(hist, q, offset)), 4) for q in QUANTILES}


@dataclass(frozen=True)
class Thresholds:
    """The rule's cut points in nats for one selection. memorized: below `memorized`, the lowest train
    losses in the share `excess - tolerance` by which the train losses' distribution sits below the val
    losses' (`memorized_cut`); learned: below `learned` (a low val quantile) when it fell less than
    `min_fall` since its previous observation; unlearnable: above `unlearnable` (a high val quantile plus
    margin) when it fell less than `min_fall`; with a reference (signal excess), a sample whose excess
    loss is below `excess` is dropped and its reason is told by where its loss sits."""

    memorized: float
    learned: float
    unlearnable: float
    min_fall: float
    excess: float
    gap_excess: float = 0.0  # max over t of F_train(t) - F_val(t)
    gap_tolerance: float = 0.0  # its sampling noise allowance: tolerance * sqrt(1/n_val + 1/n_train)

    def as_dict(self) -> dict[str, float]:
        return {k: round(float(v), 4) for k, v in self.__dict__.items()}


def memorized_cut(train_hist: np.ndarray, val_hist: np.ndarray, tolerance: float, floor: float = 0.0
                  ) -> tuple[float, float, float]:
    """(threshold, excess, allowance): a train loss below `threshold` counts as memorized. The excess is
    the two-sample Kolmogorov-Smirnov statistic one-sided toward low train losses, max_t F_train(t) -
    F_val(t); what lies beyond the allowance `floor + tolerance * sqrt(1/n_val + 1/n_train)` (the
    ordinary overfitting of a model still learning, plus the sampling noise: 1.36 is 95%) is the share of
    train samples no held-out sample explains, and the threshold takes that many of the lowest train
    losses (at most up to where the excess peaks). On data the model generalizes on, the excess stays
    inside the allowance and the threshold is -inf: nothing is memorized."""
    nt, nv = int(train_hist.sum()), int(val_hist.sum())
    if nt == 0 or nv == 0:
        return -np.inf, 0.0, 0.0
    ct = np.cumsum(train_hist)
    d = ct / nt - np.cumsum(val_hist) / nv
    peak = int(np.argmax(d))
    excess, allowance = float(d[peak]), float(floor + tolerance * np.sqrt(1.0 / nv + 1.0 / nt))
    share = excess - allowance
    if share <= 0:
        return -np.inf, excess, allowance
    b = int(np.searchsorted(ct, share * nt + 1e-6, side="right"))  # the first bin past the share: whole bins
    return min(b, peak + 1) * BIN_WIDTH, excess, allowance


def thresholds(cfg: TeacherConfig, val_hist: np.ndarray, train_hist: np.ndarray | None = None
               ) -> Thresholds | None:
    """Cut points from the val histogram and the train losses' (None without a val pass: then nothing
    is dropped; without train losses nothing is memorized)."""
    if int(val_hist.sum()) == 0:
        return None

    def q(p: float) -> float:
        return float(quantile(val_hist, p))

    cut, excess, allowance = memorized_cut(train_hist if train_hist is not None else np.zeros_like(val_hist),
                                           val_hist, cfg.signal_tolerance, cfg.signal_gap_allowance)
    return Thresholds(memorized=cut - cfg.signal_margin, learned=q(cfg.signal_learned_quantile),
                      unlearnable=q(cfg.signal_unlearnable_quantile) + cfg.signal_margin,
                      min_fall=cfg.signal_min_fall, excess=cfg.signal_excess, gap_excess=excess,
                      gap_tolerance=allowance)


def reasons(signal: str, th: Thresholds | None, loss: np.ndarray, prev: np.ndarray | None,
            excess: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(reason code per sample, strength): KEEP unless the rule of `signal` says a sample is safe to drop.
    `loss`: last losses (NaN: never observed or non-finite, always KEEP here); `prev`: the observation
    before it (NaN: none, so its fall is unknown and learn never drops it); `excess`: loss minus the
    reference's (signal excess). `strength` is how far past its threshold a dropped sample is (nats): a
    cap drops the strongest first."""
    loss = np.asarray(loss, dtype=np.float64)
    code = np.zeros(loss.shape[0], dtype=np.int8)
    strength = np.zeros(loss.shape[0], dtype=np.float64)
    if th is None:
        return code, strength
    fin = np.isfinite(loss)
    with np.errstate(invalid="ignore"):
        if signal == "excess":
            if excess is None:
                raise ValueError("signal excess needs the reference's losses")
            drop = fin & np.isfinite(excess) & (excess < th.excess)
            code[drop] = LEARNED
            code[drop & (loss < th.memorized)] = MEMORIZED
            code[drop & (loss > th.unlearnable)] = UNLEARNABLE
            strength[drop] = th.excess - excess[drop]
            return code, strength
        if signal in ("learn", "gap+learn"):
            fall = np.full_like(loss, np.nan) if prev is None else np.asarray(prev, dtype=np.float64) - loss
            flat = fin & np.isfinite(fall) & (fall < th.min_fall)
            learned = flat & (loss < th.learned)
            noise = flat & (loss > th.unlearnable)
            code[learned] = LEARNED
            strength[learned] = th.learned - loss[learned]
            code[noise] = UNLEARNABLE
            strength[noise] = loss[noise] - th.unlearnable
        if signal in ("gap", "gap+learn"):
            mem = fin & (loss < th.memorized)
            code[mem] = MEMORIZED
            strength[mem] = th.memorized - loss[mem]
    return code, strength


# ---------------------------------------------------------------------------------------- the pick

def _block(v: TeacherView) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]]:
    """(entries, last loss, previous loss, excess) of this rank's ledger block in chunks; NaN loss for
    never-observed ids, NaN previous loss where there is none."""
    for b in v.blocks():
        loss = b.loss.astype(np.float64)
        loss[~b.seen] = np.nan
        prev = None
        if b.prev is not None:
            prev = unpack_entries(b.prev)[0].astype(np.float64)
            prev[b.prev == 0] = np.nan
        excess = None
        if v.cfg.signal == "excess" and v.reference is not None:
            excess = loss - v.reference.losses(b.ids).astype(np.float64)
        yield b.entries, loss, prev, excess


def pick_signal(v: TeacherView, epoch: int, ratio: float) -> Pick:
    """Collective. Drop only what the signal says is safe to drop (memorized, learned, unlearnable),
    at most a share 1 - `ratio` of the finite ids (the ratio schedule is a cap, not a target: above it
    the strongest signals go first); keep every other id, never-observed ids included. Its record holds
    the dropped share, the counts per reason and the distributions; what it keeps is the epoch's planned
    count."""
    cfg = v.cfg
    val_hist = v.val_hist if v.val_hist is not None else np.zeros(NUM_BINS, dtype=np.int64)
    counts = np.zeros(2, dtype=np.int64)  # observed, finite
    loss_h = np.zeros(NUM_BINS, dtype=np.int64)
    fall_h = np.zeros(NUM_BINS, dtype=np.int64)
    for entries, loss, prev, _ in _block(v):
        counts[0] += int(np.count_nonzero(entries))
        counts[1] += int(np.count_nonzero(np.isfinite(loss)))
        loss_h += histogram(loss)
        if prev is not None:
            fall_h += histogram(prev - loss, FALL_OFFSET)
    total = v.all_reduce(np.concatenate([counts, loss_h, fall_h]))
    n_obs, n_fin = int(total[0]), int(total[1])
    loss_h, fall_h = total[2:2 + NUM_BINS], total[2 + NUM_BINS:]
    th = thresholds(cfg, val_hist, loss_h)
    by_reason = np.zeros(4, dtype=np.int64)
    for _, loss, prev, excess in _block(v):
        by_reason += np.bincount(reasons(cfg.signal, th, loss, prev, excess)[0], minlength=4).astype(np.int64)
    by_reason = v.all_reduce(by_reason)
    n_cand = int(by_reason[1:].sum())
    cap = n_fin - round_half_up(ratio * n_fin)  # at most this many dropped
    n_drop = min(n_cand, cap)

    def chunks() -> Iterator[np.ndarray]:
        for entries, loss, prev, excess in _block(v):
            code, strength = reasons(cfg.signal, th, loss, prev, excess)
            keys = np.full(loss.shape[0], np.inf, dtype=np.float64)
            drop = code > 0
            keys[drop] = -strength[drop]  # the weakest signals are kept first when the cap binds
            keys[(entries != 0) & ~np.isfinite(loss)] = np.nan  # non-finite: never chosen (as hard)
            yield keys

    dropped = {name: int(by_reason[i + 1]) for i, name in enumerate(REASONS)}
    if n_drop < n_cand:  # the cap kept some: the counts per reason are of the candidates
        dropped["capped"] = n_cand - n_drop
    record = {
        "name": cfg.signal,
        "dropped": n_drop,
        "dropped_share": round(n_drop / n_fin, 6) if n_fin else 0.0,
        "reasons": dropped,
        "thresholds": th.as_dict() if th is not None else None,
        "val": {"n": int(val_hist.sum()), "step": v.val_step, **(quantiles(val_hist) or {})},
        "loss": quantiles(loss_h),
        "fall": quantiles(fall_h, FALL_OFFSET),
    }
    k = v.num_samples - n_obs + (n_fin - n_drop)
    return Pick(k=k, key_chunks=chunks, n_obs=n_obs, n_nonfinite=n_obs - n_fin, plans_count=True,
                record=record)


def explain(records: list[dict[str, Any]]) -> str | None:
    """One sentence on which case the data is in, from a run's selection records (None without a
    signal record): the share of samples dropped over the subset epochs and the main reason."""
    sig = [r["signal"] for r in records if r.get("signal")]
    if not sig:
        return None
    dropped = sum(s["dropped"] for s in sig)
    n = sum(int(r["n_scored"] or 0) - int(r["n_nonfinite"] or 0) for r in records if r.get("signal"))
    share = dropped / n if n else 0.0
    if share < 0.02:
        return (f"the teacher kept {100 * (1 - share):.0f}% of samples: nothing safe to drop "
                "(no memorized copies, learned examples or unlearnable noise); expect no speedup")
    if share < 0.1:
        return (f"the teacher kept {100 * (1 - share):.0f}% of samples: little safe to drop; expect a "
                "small speedup at most")
    by = {name: sum(s["reasons"].get(name, 0) for s in sig) for name in REASONS}
    main = max(REASONS, key=lambda k: by[k])
    mostly = "mostly" if by[main] * 2 > dropped else "most of them"
    # memorized: copies, or examples seen more often than the model generalizes from (many epochs)
    what = {"memorized": ("memorized samples (copies, or seen more often than the model can use)",
                          "this data has repeats to drop"),
            "learned": ("examples already learned", "the model has learned much of this data"),
            "unlearnable": ("unlearnable noise", "this data has noise to drop")}[main]
    return f"the teacher dropped {100 * share:.0f}% of samples, {mostly} {what[0]}: {what[1]}"
