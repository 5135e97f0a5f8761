"""What a selection strategy may see of the teacher (`TeacherView`) and what it hands back (`Pick`).

A strategy (teacher/picks.py, signals.py, floors.py) reads this rank's ledger block through the one block
iterator (`TeacherView.blocks`), the config, the excess losses against a reference, and reaches the other
ranks through one collective (`all_reduce`) and the exact distributed top-k (`top_bits`). It returns what it
decided; it writes nothing into the teacher."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from attent_scale.config import TeacherConfig
from attent_scale.data.selection import Selection
from attent_scale.teacher.comm import Comm
from attent_scale.teacher.ledger import Ledger, unpack_entries
from attent_scale.teacher.topk import select_block_bits

KEY_CHUNK = 1 << 17  # ids per chunk when keys are computed from the ledger block
Chunks = Callable[[], Iterator[np.ndarray]]  # re-iterable: each call walks this rank's block again


@dataclass(frozen=True)
class Pick:
    """One strategy's decision for a selection: keep the `k` ids of largest key over every rank's
    `key_chunks` (float64 chunks of this rank's ledger block, KEY_CHUNK ids each). `images`: order-preserving
    uint64 images of the keys and their bit width, when the strategy has cheaper ones than `topk.key_image`.
    `after`: what the strategy does with the top-k (loss weights), a pure function of the selection.
    `plans_count`: the selection's size is the epoch's planned count (a count only the data gives, which
    the step plan re-reads). `record`: the strategy's own entry of the selection record (signal). The
    counts go into the record."""

    k: int
    key_chunks: Chunks
    n_obs: int
    n_nonfinite: int
    images: tuple[Chunks, int] | None = None
    after: Callable[[Selection], Selection] | None = None
    plans_count: bool = False
    record: dict[str, Any] | None = None


@dataclass(frozen=True)
class Block:
    """One chunk [lo, hi) of this rank's ledger block: its packed entries (0 = never observed) and, with
    history, the previous entries."""

    lo: int
    hi: int
    entries: np.ndarray
    prev: np.ndarray | None = None

    @cached_property
    def ids(self) -> np.ndarray:
        return np.arange(self.lo, self.hi, dtype=np.int64)

    @property
    def seen(self) -> np.ndarray:
        """Which ids have an observation."""
        return self.entries != 0

    @cached_property
    def loss(self) -> np.ndarray:
        """The last observed losses (float32; meaningless where not `seen`)."""
        return unpack_entries(self.entries)[0]


@dataclass(frozen=True)
class TeacherView:
    """A strategy's view of the teacher for one selection (module docstring). `comm` is None on one
    process; its bytes and seconds are the selection's."""

    cfg: TeacherConfig
    num_samples: int
    seed: int
    rank: int
    world_size: int
    group: Any
    ledger: Ledger
    reference: Any = None  # teacher.score=excess: an object with `losses(ids)`, else None
    sources: list[Any] = field(default_factory=list)  # floors.SourceRange: the training ids by source
    val_hist: np.ndarray | None = None  # strategy signal: the val losses' histogram, summed over ranks
    val_step: int | None = None
    comm: Comm | None = None

    def blocks(self) -> Iterator[Block]:
        """This rank's ledger block, KEY_CHUNK ids at a time (each chunk starts 8-aligned: whole bytes of a
        selection bitset). The one walk over the ledger every strategy takes."""
        led = self.ledger
        for a in range(led.lo, led.hi, KEY_CHUNK):
            b = min(led.hi, a + KEY_CHUNK)
            yield Block(a, b, led.block_entries(a, b), led.block_prev(a, b))

    def excess(self, ids: np.ndarray, loss: np.ndarray) -> np.ndarray:
        """teacher.score=excess: learner loss minus the reference model's loss of the same ids (float32);
        without a reference the loss itself."""
        if self.reference is None:
            return loss
        return (loss.astype(np.float32) - self.reference.losses(ids)).astype(np.float32)

    def all_reduce(self, values: np.ndarray) -> np.ndarray:
        """Collective: the element-wise sum over every rank (counted as the selection's "collective")."""
        t = torch.from_numpy(np.ascontiguousarray(values))
        if self.comm is not None:
            self.comm.all_reduce(t, "collective")
        return t.numpy()

    def all_sum(self, values: list[int]) -> list[int]:
        """Collective: integer counts summed over every rank."""
        return [int(v) for v in self.all_reduce(np.asarray(values, dtype=np.int64)).tolist()]

    def top_bits(self, images: Chunks, k: int, *, bits: int = 64, report: dict[str, Any] | None = None
                 ) -> np.ndarray:
        """Collective: the packed bitset (N bits, every rank the same) of the `k` ids of largest image
        over every rank's blocks (`images`: uint64 chunks in block order, below 2**bits), ties to the
        smaller id."""
        return select_block_bits(images, self.ledger.lo, self.ledger.hi, self.num_samples, k, bits=bits,
                                 group=self.group, report=report)
