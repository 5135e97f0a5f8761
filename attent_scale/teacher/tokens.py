"""Token-level selection (Rho-1): one global threshold on token learnability, agreed by all ranks per batch.

A trainer calls `token_weights` once per micro batch with the learner's per-token losses (its training
forward), the reference's (an online forward of a frozen reference, or of a reference adapter) and the
valid mask (labels != -100: padding and prompt tokens never count). The top `keep` fraction of the valid
tokens of *all* ranks by learnability (learner - reference loss) get weight 1, every other token 0. The
threshold is the exact k-th largest key over every rank, found by histogram all-reduce rounds over
order-preserving integer images (teacher/topk.py), never a per-rank cut and never tokens over the wire.
Ties are broken by a counter-based hash of (sample id, position) folded into the key's low bits, so the
kept set depends only on the tokens, not on how they are spread over ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attent_scale.teacher.comm import Comm, resolve_group
from attent_scale.teacher.ledger import loss_image
from attent_scale.teacher.strategies import uniform_noise
from attent_scale.teacher.topk import kth_largest

TIE_COUNTER = (1 << 62) + 0x70C  # the noise counter of the tie-break hash (no selection point reaches it)
KEY_BITS = 64  # 32 bits of the float32 learnability image, 32 bits of tie-break hash


@dataclass(frozen=True)
class TokenPick:
    """One micro batch's token selection: `weights` [B, T] float32 (1 kept, 0 not), the global counts of
    valid and kept tokens, and the kept share."""

    weights: torch.Tensor
    valid: int
    kept: int

    @property
    def share(self) -> float:
        return self.kept / self.valid if self.valid else 1.0


def token_keys(learnability: np.ndarray, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """uint64 keys whose order is the learnability's (float32, NaN lowest), ties broken by a hash of
    (sample id, position): the same key for the same token on any rank."""
    img = loss_image(np.asarray(learnability, dtype=np.float32)).astype(np.uint64)
    slot = np.asarray(ids, dtype=np.int64) * (1 << 20) + np.asarray(positions, dtype=np.int64)
    tie = (uniform_noise(slot, seed=0, cycle=TIE_COUNTER) * 2.0**32).astype(np.uint64)
    return (img << np.uint64(32)) | tie


def token_threshold(keys: np.ndarray, keep: float, group: Any = None) -> tuple[int, int, int]:
    """Collective: (threshold, kept, valid) over every rank: the k-th largest key for k = round(keep *
    valid), the count of keys at or above it (k, more only if two tokens' keys collide at the threshold)
    and the valid tokens; k = 0 gives the threshold 2**64 (nothing kept). Histogram rounds only (a few
    KiB each, whatever the number of tokens)."""
    pg = resolve_group(group)
    comm = Comm(pg) if pg is not None else None
    n = torch.tensor([keys.shape[0]], dtype=torch.int64)
    if comm is not None:
        comm.all_reduce(n, "collective")
    valid = int(n.item())
    k = min(valid, max(0, math.floor(keep * valid + 0.5)))
    if k == 0:
        return 1 << 64, 0, valid
    value, above, equal = kth_largest(np.ascontiguousarray(keys, dtype=np.uint64), k, comm, bits=KEY_BITS)
    return int(value), above + equal, valid


def token_weights(ids: torch.Tensor, learner: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor,
                  keep: float, group: Any = None) -> TokenPick:
    """Collective, once per micro batch on every rank: weight 1 for the top `keep` share of the valid
    tokens of all ranks by learnability (learner - reference token loss, Rho-1's excess loss), 0 for the
    rest and for invalid tokens (padding, prompt, filler rows with id < 0). `ids` [B] sample ids,
    `learner`/`reference`/`valid` [B, T]. The weights sit on `learner`'s device."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if learner.shape != reference.shape or learner.shape != valid.shape or learner.dim() != 2:
        raise ValueError(f"token_weights: learner {tuple(learner.shape)}, reference "
                         f"{tuple(reference.shape)}, valid {tuple(valid.shape)}")
    rows = ids.detach().cpu().to(torch.int64)
    mask = valid.detach().cpu().bool() & (rows >= 0)[:, None]
    score = (learner.detach().float().cpu() - reference.detach().float().cpu())[mask].numpy()
    b, t = mask.shape
    pos = torch.arange(t).expand(b, t)[mask].numpy()
    row_ids = rows[:, None].expand(b, t)[mask].numpy()
    keys = token_keys(score, row_ids, pos)
    thr, kept, n_valid = token_threshold(keys, keep, group)
    chosen = keys >= np.uint64(thr) if kept else np.zeros(keys.shape[0], dtype=bool)
    weights = torch.zeros(b, t, dtype=torch.float32)
    weights[mask] = torch.from_numpy(chosen.astype(np.float32))
    return TokenPick(weights=weights.to(learner.device), valid=n_valid, kept=kept)


def step_kept_tokens(valid_per_micro: list[int], keep: float, world: int, group: Any = None) -> float:
    """Collective: the divisor each rank gives `engines.base.masked_token_loss` for a step of micro
    batches with these valid-token counts (this rank's), so that the gradient the engine averages over
    ranks is the mean over every kept token of the step: (sum over micro batches of round(keep * valid
    over all ranks)) / world."""
    counts = torch.tensor(valid_per_micro, dtype=torch.int64)
    pg = resolve_group(group)
    if pg is not None:
        Comm(pg).all_reduce(counts, "collective")
    kept = sum(min(v, max(0, math.floor(keep * v + 0.5))) for v in counts.tolist())
    return kept / max(1, world)
