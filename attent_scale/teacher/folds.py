"""Cross-fitting folds: an id's fold (a counter-based hash of (seed, id run)) and the id filter of a fold."""

from __future__ import annotations

from typing import Any

import numpy as np

from attent_scale.data.selection import CHUNK_BYTES, Selection
from attent_scale.teacher.strategies import uniform_noise

# the noise counter the fold hash uses: no selection point (epoch, step) reaches it, so a fold's ids are
# independent of what any strategy draws for them
FOLD_COUNTER = (1 << 62) + 0x4F1D
TRAIN_ON = ("rest", "fold")
# ids of one run share a fold: consecutive ids are consecutive text (shards build cuts each split's token
# stream into windows in order), so a document's windows mostly fall in one fold and a model trained on
# the other folds has not seen the rest of the document
DEFAULT_GROUP = 64


def fold_of(ids: np.ndarray, folds: int, seed: int, group: int = DEFAULT_GROUP) -> np.ndarray:
    """The fold (int64 in [0, folds)) of each id: floor(folds * u), u uniform in (0, 1) keyed by (seed,
    id // group) alone, so an id's fold is the same on any rank, in any worker, at any world size."""
    if folds < 1 or group < 1:
        raise ValueError(f"folds and group must be >= 1, got {folds} and {group}")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    u = uniform_noise(ids // group, seed=seed, cycle=FOLD_COUNTER)
    return np.minimum((u * folds).astype(np.int64), folds - 1)


def fold_selection(num_ids: int, folds: int, fold: int, seed: int, *, train_on: str = "rest",
                   group: int = DEFAULT_GROUP) -> Selection:
    """The ids a fold's run trains on, as a bitset over [0, num_ids): every id outside fold `fold`
    (train_on "rest": a cross-fitting model that never sees the fold), or only the fold's ids ("fold": a
    held-out slice, e.g. what a reference adapter trains on). Built in chunks: no N-sized id array."""
    if not 0 <= fold < folds:
        raise ValueError(f"fold {fold} outside [0, {folds})")
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on {train_on!r}: one of {', '.join(TRAIN_ON)}")
    bits = np.zeros((num_ids + 7) // 8, dtype=np.uint8)
    step = 8 * CHUNK_BYTES
    for a in range(0, num_ids, step):
        ids = np.arange(a, min(num_ids, a + step), dtype=np.int64)
        inside = fold_of(ids, folds, seed, group) == fold
        keep = inside if train_on == "fold" else ~inside
        packed = np.packbits(keep, bitorder="little")
        bits[a // 8:a // 8 + packed.shape[0]] = packed
    return Selection(bits, num_ids)


def holdout_selection(holdout: Any, num_ids: int) -> Selection | None:
    """The training-id filter of a `data.holdout` config section (None when it is off: folds 0)."""
    if not holdout.folds:
        return None
    return fold_selection(num_ids, holdout.folds, holdout.fold, holdout.seed, train_on=holdout.train_on,
                          group=holdout.group)


def restrict(selection: Selection | None, keep: Selection | None) -> Selection | None:
    """`selection` (None: every id) restricted to the ids of `keep` (None: no filter); its loss weights
    stay with the ids that remain."""
    if keep is None:
        return selection
    if selection is None:
        return keep
    if selection.num_ids != keep.num_ids:
        raise ValueError(f"selection over {selection.num_ids} ids, filter over {keep.num_ids}")
    up = None if selection.upweight is None else selection.upweight & keep.bits
    return Selection(selection.bits & keep.bits, selection.num_ids, upweight=up, weight=selection.weight)
