"""What each selection strategy keeps: one `pick_*` function per strategy, behind `STRATEGIES`.

A pick function takes the strategy's view of the teacher (teacher/view.py) and returns a `Pick`: pure in
what it decides, collective where it counts over ranks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from attent_scale.data.selection import Selection
from attent_scale.teacher.learnability import pick_learn, pick_rho
from attent_scale.teacher.ledger import NEG_INF_IMAGE, POS_INF_IMAGE, loss_image
from attent_scale.teacher.schedules import round_half_up
from attent_scale.teacher.signals import pick_signal
from attent_scale.teacher.strategies import strategy_keys, uniform_noise
from attent_scale.teacher.view import KEY_CHUNK, Chunks, Pick, TeacherView

__all__ = ["KEY_CHUNK", "STRATEGIES", "Pick", "Strategy", "pick_hard", "pick_prune", "pick_random",
           "pick_soft", "round_half_up", "strategy"]


@dataclass(frozen=True)
class Strategy:
    """A selection strategy. `scores`: the first subset epoch of a cycle starts with a scoring pass;
    `reuse`: later subset epochs of a cycle reuse its first selection; `staleness`: the record reports
    the age of the losses it ranked; `reads_losses`: pending observations go to their owners before it
    picks (a collective)."""

    pick: Callable[[TeacherView, int, float], Pick]
    scores: bool
    reuse: bool
    staleness: bool
    reads_losses: bool = True


def _loss_counts(v: TeacherView) -> tuple[int, int]:
    """Collective: (observed, finite) ids over all ranks."""
    n_obs, n_fin = v.all_sum(list(v.ledger.counts()))
    return n_obs, n_fin


def _loss_keys(v: TeacherView, epoch: int) -> Chunks:
    """Keys of this rank's block from the ledger losses (excess losses with a reference): never-observed
    ids get +inf (always kept), non-finite losses NaN (never chosen)."""
    cfg = v.cfg

    def chunks() -> Iterator[np.ndarray]:
        for b in v.blocks():
            loss = v.excess(b.ids, b.loss)
            keys = strategy_keys(cfg.strategy, loss, b.ids, seed=v.seed, cycle=epoch,
                                 temperature=cfg.temperature, normalization=cfg.normalization).numpy()
            keys[~b.seen] = np.inf
            yield keys

    return chunks


def _ledger_images(v: TeacherView) -> tuple[Chunks, int]:
    """hard without a reference: the key is the float32 loss itself, so the ledger entry's 32-bit loss
    image is already in key order (non-finite losses get 0 like a NaN key, unseen ids 2**32, above all):
    integer work only, 33 bits."""

    def chunks() -> Iterator[np.ndarray]:
        for b in v.blocks():
            u = b.entries & np.uint64(0xFFFFFFFF)
            u[(u >= np.uint64(POS_INF_IMAGE)) | (u <= np.uint64(NEG_INF_IMAGE))] = 0
            u[~b.seen] = np.uint64(1 << 32)
            yield u

    return chunks, 33


def pick_hard(v: TeacherView, epoch: int, ratio: float) -> Pick:
    """The round(ratio * finite) highest losses, and every never-observed id."""
    n_obs, n_fin = _loss_counts(v)
    return Pick(k=v.num_samples - n_obs + round_half_up(ratio * n_fin), key_chunks=_loss_keys(v, epoch),
                n_obs=n_obs, n_nonfinite=n_obs - n_fin,
                images=_ledger_images(v) if v.reference is None else None)  # excess keys are not stored


def pick_soft(v: TeacherView, epoch: int, ratio: float) -> Pick:
    """As many as hard, sampled without replacement by softmax (or sigmoid) of the loss (Gumbel-top-k)."""
    n_obs, n_fin = _loss_counts(v)
    return Pick(k=v.num_samples - n_obs + round_half_up(ratio * n_fin), key_chunks=_loss_keys(v, epoch),
                n_obs=n_obs, n_nonfinite=n_obs - n_fin)


def pick_random(v: TeacherView, epoch: int, ratio: float) -> Pick:
    """round(ratio * N) ids uniformly at random (no losses needed); with random_reweight the kept ids
    carry weight N / k."""
    n = v.num_samples

    def chunks() -> Iterator[np.ndarray]:
        for b in v.blocks():
            yield strategy_keys("random", np.zeros(0), b.ids, seed=v.seed, cycle=epoch).numpy()

    def after(sel: Selection) -> Selection:
        if v.cfg.random_reweight and 0 < sel.count < n:
            return Selection(sel.bits, n, upweight=sel.bits.copy(), weight=n / sel.count)
        return sel

    return Pick(k=round_half_up(ratio * n), key_chunks=chunks, n_obs=n, n_nonfinite=0, after=after)


def pick_prune(v: TeacherView, epoch: int, ratio: float) -> Pick:
    """Unbiased pruning: drop round(prune_ratio * n_low) of the low-score ids at random, keep every other
    id; with reweight the kept low ids carry 1 / P(kept) = n_low / (n_low - n_drop). What it keeps is the
    epoch's planned count (below the mean, a count only the losses decide)."""
    low_bits, n_low, n_obs, n_fin = _prune_low(v)
    n = v.num_samples

    def after(sel: Selection) -> Selection:
        dropped = n - sel.count
        if v.cfg.reweight and n_low > dropped:
            return Selection(sel.bits, n, upweight=low_bits & sel.bits, weight=n_low / (n_low - dropped))
        return sel

    return Pick(k=n - round_half_up(v.cfg.prune_ratio * n_low), key_chunks=_prune_keys(v, low_bits, epoch),
                n_obs=n_obs, n_nonfinite=n_obs - n_fin, after=after, plans_count=True)


def _scores(v: TeacherView) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(entries, scores) of this rank's ledger block in chunks: scores are the float32 losses, or excess
    losses with a reference (NaN for never observed ids)."""
    for b in v.blocks():
        score = v.excess(b.ids, b.loss)
        score[~b.seen] = np.nan
        yield b.entries, score


def _prune_low(v: TeacherView) -> tuple[np.ndarray, int, int, int]:
    """Collective. The low-score ids of unbiased pruning, as a bitset over all N ids: the
    round(prune_quantile * n_fin) smallest finite scores (ties to the smaller id), or with
    prune_quantile 0 those below the mean. Works over this rank's block in chunks (O(N / world) and
    the one bitset). Returns (bits, n_low, n_obs, n_fin)."""
    cfg = v.cfg
    n_obs = n_fin = total = 0
    for entries, score in _scores(v):
        fin = np.isfinite(score)
        n_obs += int(np.count_nonzero(entries))
        n_fin += int(np.count_nonzero(fin))
        # the mean from an exact fixed-point sum: the same bits whatever the number of ranks
        fixed = np.round(np.minimum(score[fin].astype(np.float64), 1e4) * 2.0**20).astype(np.int64)
        total += int(fixed.sum())
    n_obs, n_fin, total = v.all_sum([n_obs, n_fin, total])
    if cfg.prune_quantile > 0:
        n_low = round_half_up(cfg.prune_quantile * n_fin)

        def images() -> Iterator[np.ndarray]:  # smaller finite score = larger image; non-finite and unseen 0
            for _, score in _scores(v):
                u = np.uint32(0xFFFFFFFF) - loss_image(score)
                u[~np.isfinite(score)] = 0
                yield u.astype(np.uint64)

        bits = v.top_bits(images, n_low, bits=32)
    else:
        mean = total / n_fin if n_fin else 0.0

        def below() -> Iterator[np.ndarray]:
            for _, score in _scores(v):
                fin = np.isfinite(score)
                fixed = np.round(np.minimum(np.where(fin, score, 0.0).astype(np.float64), 1e4) * 2.0**20)
                yield (fin & (fixed < mean)).astype(np.uint64)

        (n_low,) = v.all_sum([sum(int(np.count_nonzero(u)) for u in below())])
        bits = v.top_bits(below, n_low, bits=1)
    return bits, n_low, n_obs, n_fin


def _prune_keys(v: TeacherView, low_bits: np.ndarray, epoch: int) -> Chunks:
    """Keys of this rank's block for pruning: low ids get uniform noise keyed by (seed, epoch, id), every
    other id (high, non-finite, never observed) +inf; keeping the top k = N - round(prune_ratio * n_low)
    drops exactly that many low ids, each with the same probability, whatever the number of ranks."""

    def chunks() -> Iterator[np.ndarray]:
        for b in v.blocks():  # b.lo is a multiple of 8: whole bytes of the bitset
            byte = low_bits[b.lo // 8:(b.hi + 7) // 8]
            low = np.unpackbits(byte, count=b.hi - b.lo, bitorder="little").astype(bool)
            keys = np.full(b.hi - b.lo, np.inf, dtype=np.float64)
            keys[low] = uniform_noise(b.ids[low], seed=v.seed, cycle=epoch)
            yield keys

    return chunks


# Adding a strategy: a pick function and one line here (and its name in config.TeacherConfig.strategy).
STRATEGIES: dict[str, Strategy] = {
    "hard": Strategy(pick_hard, scores=True, reuse=True, staleness=True),
    "soft": Strategy(pick_soft, scores=True, reuse=False, staleness=True),
    "random": Strategy(pick_random, scores=False, reuse=True, staleness=False, reads_losses=False),
    "prune": Strategy(pick_prune, scores=False, reuse=False, staleness=True),
    "signal": Strategy(pick_signal, scores=True, reuse=False, staleness=True),
    "learn": Strategy(pick_learn, scores=False, reuse=True, staleness=False, reads_losses=False),
    "rho": Strategy(pick_rho, scores=True, reuse=True, staleness=True),
}


def strategy(name: str) -> Strategy:
    """The registered strategy `name` (ValueError naming the choices otherwise)."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r} (one of {', '.join(STRATEGIES)})") from None
