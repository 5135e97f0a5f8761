"""What each selection strategy keeps: one `pick_*` function per strategy, behind `STRATEGIES`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from attent_scale.data.selection import Selection
from attent_scale.teacher.comm import Comm
from attent_scale.teacher.learnability import pick_learn, pick_rho
from attent_scale.teacher.ledger import NEG_INF_IMAGE, POS_INF_IMAGE, loss_image, unpack_entries
from attent_scale.teacher.signals import pick_signal
from attent_scale.teacher.strategies import strategy_keys, uniform_noise
from attent_scale.teacher.topk import select_block_bits

if TYPE_CHECKING:
    from attent_scale.teacher.teacher import Teacher

KEY_CHUNK = 1 << 17  # ids per chunk when keys are computed from the ledger block
Chunks = Callable[[], Iterator[np.ndarray]]  # re-iterable: each call walks this rank's block again


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class Pick:
    """One strategy's decision for a selection: keep the `k` ids of largest key over every rank's
    `key_chunks` (float64 chunks of this rank's ledger block). `images`: order-preserving uint64 images
    of the keys and their bit width, when the strategy has cheaper ones than `topk.key_image`. `after`:
    what the strategy does with the top-k (loss weights, kept counts). The counts go into the record."""

    k: int
    key_chunks: Chunks
    n_obs: int
    n_nonfinite: int
    images: tuple[Chunks, int] | None = None
    after: Callable[[Selection], Selection] | None = None


@dataclass(frozen=True)
class Strategy:
    """A selection strategy. `scores`: the first subset epoch of a cycle starts with a scoring pass;
    `reuse`: later subset epochs of a cycle reuse its first selection; `staleness`: the record reports
    the age of the losses it ranked."""

    pick: Callable[[Teacher, int, float, Comm | None], Pick]
    scores: bool
    reuse: bool
    staleness: bool


def _loss_counts(t: Teacher, comm: Comm | None) -> tuple[int, int]:
    """Collective: pending observations to their owners, then (observed, finite) ids over all ranks."""
    t.ledger.exchange(comm=comm)
    n_obs, n_fin = t._all_sum(list(t.ledger.counts()), comm)
    return n_obs, n_fin


def _loss_keys(t: Teacher, epoch: int) -> Chunks:
    """Keys of this rank's block from the ledger losses (excess losses with a reference): never-observed
    ids get +inf (always kept), non-finite losses NaN (never chosen)."""
    cfg, led = t.cfg, t.ledger

    def chunks() -> Iterator[np.ndarray]:
        for a in range(led.lo, led.hi, KEY_CHUNK):
            b = min(led.hi, a + KEY_CHUNK)
            ids = np.arange(a, b, dtype=np.int64)
            v = led.block_entries(a, b)
            loss = t._excess(ids, unpack_entries(v)[0])
            keys = strategy_keys(cfg.strategy, loss, ids, seed=t.seed, cycle=epoch,
                                 temperature=cfg.temperature, normalization=cfg.normalization).numpy()
            keys[v == 0] = np.inf
            yield keys

    return chunks


def _ledger_images(t: Teacher) -> tuple[Chunks, int]:
    """hard without a reference: the key is the float32 loss itself, so the ledger entry's 32-bit loss
    image is already in key order (non-finite losses get 0 like a NaN key, unseen ids 2**32, above all):
    integer work only, 33 bits."""
    led = t.ledger

    def chunks() -> Iterator[np.ndarray]:
        for a in range(led.lo, led.hi, KEY_CHUNK):
            v = led.block_entries(a, min(led.hi, a + KEY_CHUNK))
            u = v & np.uint64(0xFFFFFFFF)
            u[(u >= np.uint64(POS_INF_IMAGE)) | (u <= np.uint64(NEG_INF_IMAGE))] = 0
            u[v == 0] = np.uint64(1 << 32)
            yield u

    return chunks, 33


def pick_hard(t: Teacher, epoch: int, ratio: float, comm: Comm | None) -> Pick:
    """The round(ratio * finite) highest losses, and every never-observed id."""
    n_obs, n_fin = _loss_counts(t, comm)
    return Pick(k=t.num_samples - n_obs + round_half_up(ratio * n_fin), key_chunks=_loss_keys(t, epoch),
                n_obs=n_obs, n_nonfinite=n_obs - n_fin,
                images=_ledger_images(t) if t.reference is None else None)  # excess keys are not stored


def pick_soft(t: Teacher, epoch: int, ratio: float, comm: Comm | None) -> Pick:
    """As many as hard, sampled without replacement by softmax (or sigmoid) of the loss (Gumbel-top-k)."""
    n_obs, n_fin = _loss_counts(t, comm)
    return Pick(k=t.num_samples - n_obs + round_half_up(ratio * n_fin), key_chunks=_loss_keys(t, epoch),
                n_obs=n_obs, n_nonfinite=n_obs - n_fin)


def pick_random(t: Teacher, epoch: int, ratio: float, comm: Comm | None) -> Pick:
    """round(ratio * N) ids uniformly at random (no losses needed); with random_reweight the kept ids
    carry weight N / k."""
    led = t.ledger

    def chunks() -> Iterator[np.ndarray]:
        for a in range(led.lo, led.hi, KEY_CHUNK):
            ids = np.arange(a, min(led.hi, a + KEY_CHUNK), dtype=np.int64)
            yield strategy_keys("random", np.zeros(0), ids, seed=t.seed, cycle=epoch).numpy()

    def after(sel: Selection) -> Selection:
        if t.cfg.random_reweight and 0 < sel.count < t.num_samples:
            weight = t.num_samples / sel.count
            return Selection(sel.bits, t.num_samples, upweight=sel.bits.copy(), weight=weight)
        return sel

    return Pick(k=round_half_up(ratio * t.num_samples), key_chunks=chunks, n_obs=t.num_samples, n_nonfinite=0,
                after=after)


def pick_prune(t: Teacher, epoch: int, ratio: float, comm: Comm | None) -> Pick:
    """Unbiased pruning: drop round(prune_ratio * n_low) of the low-score ids at random, keep every other
    id; with reweight the kept low ids carry 1 / P(kept) = n_low / (n_low - n_drop)."""
    t.ledger.exchange(comm=comm)
    low_bits, n_low, n_obs, n_fin = _prune_low(t, comm)
    n = t.num_samples

    def after(sel: Selection) -> Selection:
        if t.cfg.reweight and n_low > n - sel.count:
            weight = n_low / (n_low - (n - sel.count))
            sel = Selection(sel.bits, n, upweight=low_bits & sel.bits, weight=weight)
        t.kept_counts[int(epoch)] = sel.count
        return sel

    return Pick(k=n - round_half_up(t.cfg.prune_ratio * n_low), key_chunks=_prune_keys(t, low_bits, epoch),
                n_obs=n_obs, n_nonfinite=n_obs - n_fin, after=after)


def _block_scores(t: Teacher) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids, entries, scores) of this rank's ledger block, KEY_CHUNK ids at a time: scores are the
    float32 losses, or excess losses with a reference (NaN for never observed ids)."""
    led = t.ledger
    for a in range(led.lo, led.hi, KEY_CHUNK):
        b = min(led.hi, a + KEY_CHUNK)
        ids = np.arange(a, b, dtype=np.int64)
        v = led.block_entries(a, b)
        loss = t._excess(ids, unpack_entries(v)[0])
        loss[v == 0] = np.nan
        yield ids, v, loss


def _prune_low(t: Teacher, comm: Comm | None) -> tuple[np.ndarray, int, int, int]:
    """Collective. The low-score ids of unbiased pruning, as a bitset over all N ids: the
    round(prune_quantile * n_fin) smallest finite scores (ties to the smaller id), or with
    prune_quantile 0 those below the mean. Works over this rank's block in chunks (O(N / world) and
    the one bitset). Returns (bits, n_low, n_obs, n_fin)."""
    cfg = t.cfg
    lo, hi = t.ledger.lo, t.ledger.hi
    n_obs = n_fin = total = 0
    for _, v, score in _block_scores(t):
        fin = np.isfinite(score)
        n_obs += int(np.count_nonzero(v))
        n_fin += int(np.count_nonzero(fin))
        # the mean from an exact fixed-point sum: the same bits whatever the number of ranks
        fixed = np.round(np.minimum(score[fin].astype(np.float64), 1e4) * 2.0**20).astype(np.int64)
        total += int(fixed.sum())
    n_obs, n_fin, total = t._all_sum([n_obs, n_fin, total], comm)
    if cfg.prune_quantile > 0:
        n_low = round_half_up(cfg.prune_quantile * n_fin)

        def images() -> Iterator[np.ndarray]:  # smaller finite score = larger image; non-finite and unseen 0
            for _, _, score in _block_scores(t):
                u = np.uint32(0xFFFFFFFF) - loss_image(score)
                u[~np.isfinite(score)] = 0
                yield u.astype(np.uint64)

        bits = select_block_bits(images, lo, hi, t.num_samples, n_low, bits=32, group=t.group)
    else:
        mean = total / n_fin if n_fin else 0.0

        def below() -> Iterator[np.ndarray]:
            for _, _, score in _block_scores(t):
                fin = np.isfinite(score)
                fixed = np.round(np.minimum(np.where(fin, score, 0.0).astype(np.float64), 1e4) * 2.0**20)
                yield (fin & (fixed < mean)).astype(np.uint64)

        (n_low,) = t._all_sum([sum(int(np.count_nonzero(u)) for u in below())], comm)
        bits = select_block_bits(below, lo, hi, t.num_samples, n_low, bits=1, group=t.group)
    return bits, n_low, n_obs, n_fin


def _prune_keys(t: Teacher, low_bits: np.ndarray, epoch: int) -> Chunks:
    """Keys of this rank's block for pruning: low ids get uniform noise keyed by (seed, epoch, id), every
    other id (high, non-finite, never observed) +inf; keeping the top k = N - round(prune_ratio * n_low)
    drops exactly that many low ids, each with the same probability, whatever the number of ranks."""
    led = t.ledger

    def chunks() -> Iterator[np.ndarray]:
        for a in range(led.lo, led.hi, KEY_CHUNK):  # a is a multiple of 8: whole bytes of the bitset
            b = min(led.hi, a + KEY_CHUNK)
            byte = low_bits[a // 8:(b + 7) // 8]
            low = np.unpackbits(byte, count=b - a, bitorder="little").astype(bool)
            keys = np.full(b - a, np.inf, dtype=np.float64)
            ids = np.arange(a, b, dtype=np.int64)[low]
            keys[low] = uniform_noise(ids, seed=t.seed, cycle=epoch)
            yield keys

    return chunks


# Adding a strategy: a pick function and one line here (and its name in config.TeacherConfig.strategy).
STRATEGIES: dict[str, Strategy] = {
    "hard": Strategy(pick_hard, scores=True, reuse=True, staleness=True),
    "soft": Strategy(pick_soft, scores=True, reuse=False, staleness=True),
    "random": Strategy(pick_random, scores=False, reuse=True, staleness=False),
    "prune": Strategy(pick_prune, scores=False, reuse=False, staleness=True),
    "signal": Strategy(pick_signal, scores=True, reuse=False, staleness=True),
    "learn": Strategy(pick_learn, scores=False, reuse=True, staleness=False),
    "rho": Strategy(pick_rho, scores=True, reuse=True, staleness=True),
}


def strategy(name: str) -> Strategy:
    """The registered strategy `name` (ValueError naming the choices otherwise)."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r} (one of {', '.join(STRATEGIES)})") from None
