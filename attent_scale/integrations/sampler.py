"""Per-epoch, per-rank batches of dataset indices for a Trainer: selection-filtered, equal counts per rank."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from attent_scale.teacher import Selection

ID_KEY = "attent_ids"  # batch key carrying the dataset indices (int64) from the collator to the trainer


def epoch_order(ids: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The global training order of `ids` in `epoch`: a permutation keyed by (seed, epoch) only."""
    perm = np.random.default_rng([int(seed), int(epoch)]).permutation(ids.shape[0])
    return ids[perm]


def deal(order: np.ndarray, batch_size: int, rank: int, world_size: int, drop_last: bool = False
         ) -> tuple[list[np.ndarray], int]:
    """This rank's batches of the global `order`, and how many samples equalisation drops.

    Every rank gets floor(n / W) samples (the last n mod W of the order are dropped). Full batches are
    dealt round-robin in order (global batch c goes to rank c mod W, as accelerate shards a plain
    sampler), so the samples of one optimizer step depend only on the global batch size, not on how it
    is split over ranks and accumulation steps; the short tail is cut into W equal pieces.
    """
    w = max(1, int(world_size))
    per_rank = order.shape[0] // w
    dropped = order.shape[0] - per_rank * w
    full = per_rank // batch_size
    batches = [order[(c * w + rank) * batch_size:(c * w + rank + 1) * batch_size] for c in range(full)]
    tail = per_rank - full * batch_size
    if tail and not drop_last:
        start = full * batch_size * w + rank * tail
        batches.append(order[start:start + tail])
    return batches, dropped


class AttentBatchSampler:
    """Batch sampler of one rank: each epoch, the selected indices (all when no selection) in the
    (seed, epoch) order, dealt so that every rank yields the same number of equally sized batches."""

    def __init__(self, num_samples: int, batch_size: int, *, rank: int, world_size: int, seed: int,
                 drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.selection: Selection | None = None
        self.skip = 0  # batches of the epoch not yielded again: those a run resumed inside the epoch trained

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_selection(self, selection: Selection | None) -> None:
        """Train on `selection` from the next iteration on (None = every index)."""
        self.selection = selection

    def _batches(self) -> tuple[list[np.ndarray], int]:
        if self.selection is not None:
            ids = self.selection.ids()
        else:
            ids = np.arange(self.num_samples, dtype=np.int64)
        return deal(epoch_order(ids, self.seed, self.epoch), self.batch_size, self.rank, self.world_size,
                    self.drop_last)

    def batches_for(self, n: int) -> int:
        """Batches per rank for an epoch of `n` samples."""
        per_rank = n // max(1, self.world_size)
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    @property
    def dropped(self) -> int:
        """Samples of the current epoch that equalisation drops (fewer than the world size)."""
        n = self.selection.count if self.selection is not None else self.num_samples
        return n % max(1, self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._batches()[0][self.skip:]:
            yield batch.tolist()

    def __len__(self) -> int:
        """Batches of the whole epoch (`skip` included: a loop resumed inside the epoch counts them done)."""
        return self.batches_for(self.selection.count if self.selection is not None else self.num_samples)


class IndexedDataset(Dataset):
    """Map-style dataset view whose item i is (i, dataset[i]): the index is the sample id."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return int(index), self.dataset[index]


class IdCollator:
    """Collates (index, item) pairs with the user's collator and adds the indices under ID_KEY."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, pairs: list[tuple[int, Any]]) -> Any:
        batch = self.collate([item for _, item in pairs])
        batch[ID_KEY] = torch.tensor([index for index, _ in pairs], dtype=torch.int64)
        return batch


class PadCollator:
    """Right-pads rows of token lists; padding gets label -100 and attention 0, so no loss counts it."""

    def __init__(self, pad_id: int = 0) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        labels = torch.full((len(rows), width), -100, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for j, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[j, :n] = torch.tensor(r["input_ids"])
            labels[j, :n] = torch.tensor(r["labels"])
            mask[j, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
