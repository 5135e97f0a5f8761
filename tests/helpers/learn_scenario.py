"""A cross-fitted reference scores file and ledgers for strategies learn and rho (unit and gloo tests): 1000
ids in two folds; clean ids have reference losses from the val distribution, noise ids (id % 10 == 1) far
above it, repeated ids (id % 10 == 0) far below; a learner whose training-forward losses fall with the step
at which an id was seen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from attent_scale.config import TeacherConfig
from attent_scale.score import write_scores_parts
from attent_scale.teacher import Teacher, uniform_noise
from attent_scale.teacher.folds import fold_of
from attent_scale.teacher.reference import SCORES_FORMAT, VAL_HIST_KEY, Reference
from attent_scale.teacher.signals import histogram

N = 1000
FOLDS, FOLD_SEED, GROUP = 2, 5, 8


def kind(ids: np.ndarray) -> np.ndarray:
    """0 clean, 1 noise, 2 repeated."""
    return np.where(ids % 10 == 1, 1, np.where(ids % 10 == 0, 2, 0))


def clean_losses(ids: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """What a model that never saw them gives clean text: uniform on [4, 5) (fold 1's model: [4.2, 5.2))."""
    return 4.0 + 0.2 * fold + uniform_noise(ids, seed=7, cycle=0)


def reference_losses(ids: np.ndarray) -> np.ndarray:
    fold = fold_of(ids, FOLDS, FOLD_SEED, GROUP)
    loss = clean_losses(ids, fold)
    k = kind(ids)
    loss = np.where(k == 1, 7.5 + loss - 4.0, np.where(k == 2, 1.0 + loss - 4.0, loss))
    loss[ids == 3] = np.nan  # a sample the reference could not score: kept
    return loss.astype(np.float32)


def write_reference(path: Path, *, val: bool = True) -> Path:
    """The scores file `attent-scale reference fit` writes for this scenario (val histograms of 2000 val
    samples per fold model, from the clean distribution)."""
    meta = {"format": SCORES_FORMAT, "folds": str(FOLDS), "fold_seed": str(FOLD_SEED),
            "fold_group": str(GROUP), "split": "train", "num_samples": str(N)}
    ids = np.arange(N, dtype=np.int64)
    val_ids = np.arange(10**6, 10**6 + 2000)
    vals = np.stack([histogram(clean_losses(val_ids, np.full(2000, k))) for k in (0, 1)])
    write_scores_parts(path, N, [reference_losses(ids)], meta, {VAL_HIST_KEY: vals} if val else None)
    return path


def reference(path: Path) -> Reference:
    return Reference(path, None, "train", num_samples=N)


def teacher(cfg: dict[str, Any], ref: Any, group: Any = None) -> Teacher:
    return Teacher(TeacherConfig(**cfg), num_samples=N, seed=3, group=group, reference=ref)


def train_forward_losses(ids: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Training-forward losses of a learner that equals the reference at step 0 and falls 0.02 nats per
    step after: ids seen later look more learned, whatever they are."""
    return (reference_losses(ids) - 0.02 * steps).astype(np.float32)


def observe_training(t: Teacher, ids: np.ndarray, batch: int = 50) -> np.ndarray:
    """One epoch of training forwards in the order of `ids`, `batch` ids a step; returns each id's step."""
    steps = np.empty(ids.shape[0], dtype=np.int64)
    for s, a in enumerate(range(0, ids.shape[0], batch)):
        part = ids[a:a + batch]
        steps[a:a + batch] = s
        t.observe(torch.from_numpy(part), torch.from_numpy(train_forward_losses(part, np.full(len(part), s))),
                  step=s)
    return steps


def scoring_losses(ids: np.ndarray) -> np.ndarray:
    """A scoring pass of the learner (one model state for every id): 0.5 nats above the reference on clean
    ids (learnable, not learned yet: reducible), at the reference on noise and repeated ids (nothing
    left to learn there)."""
    k = kind(ids)
    return (reference_losses(ids) + np.where(k == 0, 0.5, 0.0)).astype(np.float32)
