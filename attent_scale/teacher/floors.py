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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from attent_scale.data.selection import Selection
from attent_scale.teacher.comm import Comm
from attent_scale.teacher.ledger import loss_from_image
from attent_scale.teacher.picks import KEY_CHUNK, Pick, round_half_up
from attent_scale.teacher.topk import key_image, select_block_bits

if TYPE_CHECKING:
    from attent_scale.teacher.teacher import Teacher


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


def _chunks(t: Teacher, pick: Pick,
            selection: Selection) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids, keys, selected) of this rank's ledger block, in the pick's chunks (KEY_CHUNK ids each)."""
    a = t.ledger.lo
    for keys in pick.key_chunks():
        b = a + len(keys)
        yield np.arange(a, b, dtype=np.int64), keys, _mask(selection, a, b)
        a = b


def apply_floors(t: Teacher, pick: Pick, selection: Selection,
                 comm: Comm | None) -> tuple[Selection, list[int]]:
    """Collective: `selection` with every floored source topped up to its need (module docstring);
    returns it and the ids added per source."""
    sources: list[SourceRange] = t.sources
    added = [0] * len(sources)
    floored = [i for i, s in enumerate(sources) if s.floor > 0]
    if not floored:
        return selection, added
    eligible = np.zeros(len(sources), dtype=np.int64)
    for ids, keys, chosen in _chunks(t, pick, selection):
        ok = ~np.isnan(keys) & ~chosen
        eligible += np.bincount(_source_index(sources, ids[ok]), minlength=len(sources))[:len(sources)]
    eligible_t = torch.from_numpy(eligible)
    if comm is not None:
        comm.all_reduce(eligible_t, "collective")
    eligible = eligible_t.numpy()
    bits = selection.bits
    for i in floored:
        s = sources[i]
        kept = selection.count_range(s.lo, s.hi)
        short = min(round_half_up(s.floor * s.samples) - kept, int(eligible[i]))
        if short <= 0:
            continue

        def images(s: SourceRange = s) -> Iterator[np.ndarray]:
            for ids, keys, chosen in _chunks(t, pick, selection):
                u = key_image(keys)
                u[(ids < s.lo) | (ids >= s.hi) | chosen] = 0
                yield u

        top = select_block_bits(images, t.ledger.lo, t.ledger.hi, t.num_samples, short, bits=64,
                                group=t.group)
        bits = bits | top
        added[i] = short
    if not any(added):
        return selection, added
    out = Selection(bits, t.num_samples, upweight=selection.upweight, weight=selection.weight)
    return out, added


def source_report(t: Teacher, selection: Selection, added: list[int],
                  comm: Comm | None) -> list[dict[str, Any]]:
    """Collective: per source of the training ids, what the selection keeps: samples, selected, dropped
    (samples - selected), floor and the ids it added, and the mean of the last observed finite loss over
    the source's ids and over its selected ids (None where none is observed)."""
    sources: list[SourceRange] = t.sources
    n = len(sources)
    led = t.ledger
    acc = np.zeros(4 * n, dtype=np.float64)  # loss sum, loss count, selected loss sum, selected count
    for a in range(led.lo, led.hi, KEY_CHUNK):
        b = min(led.hi, a + KEY_CHUNK)
        v = led.block_entries(a, b)
        loss = loss_from_image((v & np.uint64(0xFFFFFFFF)).astype(np.uint32))
        fin = (v != 0) & np.isfinite(loss)
        sel = fin & _mask(selection, a, b)
        for i, s in enumerate(sources):  # sources are contiguous id ranges: slice, do not search
            lo, hi = max(a, s.lo) - a, min(b, s.hi) - a
            if lo >= hi:
                continue
            for j, m in enumerate((fin[lo:hi], sel[lo:hi])):
                acc[2 * j * n + i] += float(loss[lo:hi][m].sum(dtype=np.float64))
                acc[(2 * j + 1) * n + i] += int(np.count_nonzero(m))
    acc_t = torch.from_numpy(acc)
    if comm is not None:
        comm.all_reduce(acc_t, "collective")
    acc = acc_t.numpy()

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
