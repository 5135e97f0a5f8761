"""Per-source selection: what a selection keeps of each source of a blend, and the floors that top up a
source it would starve (the same bits on every rank).

A floor f of a source with n ids (its training ids, after weights) means: the selection keeps at least
need = min(round_half_up(f * n), eligible + kept) of them, eligible being the source's ids the top-k did
not keep whose strategy key is not NaN (a non-finite loss or a corrupt sample is never chosen). After the
global top-k, a source below its need gets the (need - kept) unselected ids of the largest key, the same
keys (loss, seed, cycle, id) the top-k ranked, ties to the smaller id, found with the same exact
distributed top-k (topk.select_block_bits); sources are topped up in data.sources order. Floors add ids,
never remove any: a selection with top-ups holds more than the ratio's k (the record says how many).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from attent_scale.data.selection import Selection
from attent_scale.teacher.schedules import round_half_up
from attent_scale.teacher.topk import key_image
from attent_scale.teacher.view import Pick, TeacherView


@dataclass(frozen=True)
class SourceRange:
    """One source of the training ids: the ids [lo, hi), named, with its floor (0: none)."""

    name: str
    lo: int
    hi: int
    floor: float = 0.0

    @property
    def samples(self) -> int:
        return self.hi - self.lo


def _source_index(sources: list[SourceRange], ids: np.ndarray) -> np.ndarray:
    ends = np.array([s.hi for s in sources], dtype=np.int64)
    return np.searchsorted(ends, ids, side="right")


def _mask(selection: Selection, a: int, b: int) -> np.ndarray:
    """The selection's bits of ids [a, b) as bools (a chunk of the ledger block: a is 8-aligned)."""
    return np.unpackbits(selection.slice_bits(a, b), count=b - a, bitorder="little").view(bool)


def _chunks(v: TeacherView, pick: Pick,
            selection: Selection) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids, keys, selected) of this rank's ledger block, in the pick's chunks (KEY_CHUNK ids each)."""
    a = v.ledger.lo
    for keys in pick.key_chunks():
        b = a + len(keys)
        yield np.arange(a, b, dtype=np.int64), keys, _mask(selection, a, b)
        a = b


def apply_floors(v: TeacherView, pick: Pick, selection: Selection) -> tuple[Selection, list[int]]:
    """Collective: `selection` with every floored source topped up to its need (module docstring);
    returns it and the ids added per source."""
    sources: list[SourceRange] = v.sources
    added = [0] * len(sources)
    floored = [i for i, s in enumerate(sources) if s.floor > 0]
    if not floored:
        return selection, added
    eligible = np.zeros(len(sources), dtype=np.int64)
    for ids, keys, chosen in _chunks(v, pick, selection):
        ok = ~np.isnan(keys) & ~chosen
        eligible += np.bincount(_source_index(sources, ids[ok]), minlength=len(sources))[:len(sources)]
    eligible = v.all_reduce(eligible)
    bits = selection.bits
    for i in floored:
        s = sources[i]
        kept = selection.count_range(s.lo, s.hi)
        short = min(round_half_up(s.floor * s.samples) - kept, int(eligible[i]))
        if short <= 0:
            continue

        def images(s: SourceRange = s) -> Iterator[np.ndarray]:
            for ids, keys, chosen in _chunks(v, pick, selection):
                u = key_image(keys)
                u[(ids < s.lo) | (ids >= s.hi) | chosen] = 0
                yield u

        bits = bits | v.top_bits(images, short, bits=64)
        added[i] = short
    if not any(added):
        return selection, added
    out = Selection(bits, v.num_samples, upweight=selection.upweight, weight=selection.weight)
    return out, added


def source_report(v: TeacherView, selection: Selection, added: list[int]) -> list[dict[str, Any]]:
    """Collective: per source of the training ids, what the selection keeps: samples, selected, dropped
    (samples - selected), floor and the ids it added, and the mean of the last observed finite loss over
    the source's ids and over its selected ids (None where none is observed)."""
    sources: list[SourceRange] = v.sources
    n = len(sources)
    acc = np.zeros(4 * n, dtype=np.float64)  # loss sum, loss count, selected loss sum, selected count
    for blk in v.blocks():
        a, b = blk.lo, blk.hi
        loss = blk.loss
        fin = blk.seen & np.isfinite(loss)
        sel = fin & _mask(selection, a, b)
        for i, s in enumerate(sources):  # sources are contiguous id ranges: slice, do not search
            lo, hi = max(a, s.lo) - a, min(b, s.hi) - a
            if lo >= hi:
                continue
            for j, m in enumerate((fin[lo:hi], sel[lo:hi])):
                acc[2 * j * n + i] += float(loss[lo:hi][m].sum(dtype=np.float64))
                acc[(2 * j + 1) * n + i] += int(np.count_nonzero(m))
    acc = v.all_reduce(acc)

    def mean(total: float, count: float) -> float | None:
        return round(total / count, 6) if count else None

    out = []
    for i, s in enumerate(sources):
        kept = selection.count_range(s.lo, s.hi)
        out.append({"name": s.name, "samples": s.samples, "selected": kept, "dropped": s.samples - kept,
                    "floor": s.floor, "floor_added": added[i],
                    "mean_loss": mean(acc[i], acc[n + i]),
                    "mean_loss_selected": mean(acc[2 * n + i], acc[3 * n + i])})
    return out
