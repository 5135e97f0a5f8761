"""Token-level selection in the step (teacher.unit: token): per micro batch the learner's token losses from
its training forward, the reference's from an online no-grad forward, one global threshold, the masked loss.

Written once; every trainer calls it the same way (the native engines' `train_step(batch, tokens=...)`,
AttentTrainer's `compute_loss`): `divisor` once per optimizer step before its first backward (a collective:
the step's kept-token total over all ranks), then `loss` once per micro batch on every rank (a collective:
`tokens.token_weights`' histogram rounds). Strategy `hard` keys a token by learner − reference token loss
(Rho-1's excess); strategy `random` by a counter-based hash of (seed, epoch, sample id, position), so the
mask is the same on any world size and its kept share is exactly `token_ratio`. Padding, prompt tokens
(labels −100) and filler rows (id < 0) never count. The kept and target token counts are global (the same
on every rank) and are this component's checkpoint entry."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from attent_scale.config import TeacherConfig
from attent_scale.engines.base import IGNORE_INDEX, masked_token_loss
from attent_scale.teacher.strategies import uniform_noise
from attent_scale.teacher.tokens import step_kept_tokens, token_weights

RANDOM_COUNTER = (1 << 61) + 0x70D  # the noise counter of strategy random's token mask, plus the epoch


class TokenReference(Protocol):
    """What a token reference gives (engines/reference.py: FrozenReference, AdapterReference)."""

    def token_losses(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...


class TokenStep:
    """The token selection of one run (module docstring). `reference` is set by the trainer once its model
    exists (strategy hard); `charge(seconds)` books the reference forwards and threshold rounds as
    selection cost."""

    def __init__(self, cfg: TeacherConfig, *, seed: int, world: int, group: Any = None,
                 charge: Callable[[float], None] | None = None) -> None:
        self.keep = float(cfg.token_ratio)
        self.strategy = cfg.strategy
        self.seed, self.world, self.group = int(seed), max(1, int(world)), group
        self.charge = charge
        self.reference: TokenReference | None = None
        self.epoch = 0  # strategy random's mask changes with the epoch (set by the session)
        self.kept_tokens = 0  # target tokens kept, over every rank and step of the run
        self.target_tokens = 0  # target tokens seen (labels != -100, real rows), over every rank and step
        self.step_kept = 0  # the same two counts for the current optimizer step (reset by `divisor`)
        self.step_target = 0

    @property
    def share(self) -> float:
        """Kept target tokens / target tokens over the run so far (1.0 before any)."""
        return self.kept_tokens / self.target_tokens if self.target_tokens else 1.0

    @property
    def step_share(self) -> float:
        """The kept share of the last optimizer step."""
        return self.step_kept / self.step_target if self.step_target else 1.0

    def divisor(self, labels: Sequence[torch.Tensor]) -> float:
        """Collective, once per optimizer step on every rank, before its first backward: the divisor that
        makes each micro batch's `loss` its share of the mean over every kept token of the step on all
        ranks (`tokens.step_kept_tokens`), given the step's micro batches' targets (aligned with the
        logits, −100 where nothing is predicted)."""
        self.step_kept = self.step_target = 0
        counts = [int((lb != IGNORE_INDEX).sum()) for lb in labels]
        return step_kept_tokens(counts, self.keep, self.world, self.group)

    def weights(self, ids: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor,
                learner: torch.Tensor) -> torch.Tensor:
        """Collective, once per micro batch on every rank: [B, T] float32 weights (1 kept, 0 not) on
        `learner`'s device; `learner` the training forward's token losses (detached), `targets` aligned
        with them (−100: not a target), `ids` the rows' sample ids (< 0: filler)."""
        t0 = time.perf_counter()
        valid = targets != IGNORE_INDEX
        if self.strategy == "random":
            key = torch.from_numpy(self._noise(ids, targets.shape[1])).view(targets.shape)
            pick = token_weights(ids, key, torch.zeros_like(key), valid.cpu(), self.keep, self.group)
            weights = pick.weights.to(learner.device)
        else:
            if self.reference is None:
                raise RuntimeError("TokenStep: strategy hard needs its reference (set by the trainer)")
            ref = self.reference.token_losses(input_ids, targets)
            pick = token_weights(ids, learner, ref.to(learner.device), valid.to(learner.device), self.keep,
                                 self.group)
            weights = pick.weights
        self.kept_tokens += pick.kept
        self.target_tokens += pick.valid
        self.step_kept += pick.kept
        self.step_target += pick.valid
        if self.charge is not None:
            self.charge(time.perf_counter() - t0)
        return weights

    def loss(self, ids: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor,
             token_losses: torch.Tensor, divisor: float, row_weights: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Collective (see `weights`): the micro batch's share of the step's loss, Σ over kept tokens of the
        token CE (times a row's loss weight, if any) / `divisor`. `token_losses` [B, T] with grad."""
        w = self.weights(ids, input_ids, targets, token_losses.detach())
        if row_weights is not None:
            w = w * row_weights.to(w.device, w.dtype).reshape(-1, 1)
        return masked_token_loss(token_losses, w, targets.to(token_losses.device), divisor)

    def _noise(self, ids: torch.Tensor, length: int) -> np.ndarray:
        """Strategy random's keys: uniform numbers from (seed, epoch, id, position), float32 [B * T]."""
        rows = ids.detach().cpu().to(torch.int64).clamp(min=0).numpy()
        slot = (rows[:, None] * (1 << 20) + np.arange(length, dtype=np.int64)[None, :]).reshape(-1)
        return uniform_noise(slot, seed=self.seed, cycle=RANDOM_COUNTER + self.epoch).astype(np.float32)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Its checkpoint entry "tokens": the run's kept and target token counts (global, every rank's)."""
        return {"kept_tokens": self.kept_tokens, "target_tokens": self.target_tokens}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore `state_dict()` (None: a checkpoint from before token selection, counts from 0)."""
        state = state or {}
        self.kept_tokens = int(state.get("kept_tokens", 0))
        self.target_tokens = int(state.get("target_tokens", 0))
