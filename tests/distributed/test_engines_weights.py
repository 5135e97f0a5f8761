"""Per-sample loss weights: the weighted token objective, grad accumulation with weights, unbiasedness of
pruning's inverse-probability weights on a toy problem, and weights through DeepSpeed and FSDP ranks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_worker import VOCAB, launch, make_batch, tiny_config, weighted_batches

from attent_scale.config import TeacherConfig, config_from_dict
from attent_scale.engines import build_engine
from attent_scale.engines.base import token_counts, weighted_token_loss
from attent_scale.teacher import Teacher


def _engine(**kw: object):
    return build_engine(config_from_dict(tiny_config("local", **kw)), vocab_size=VOCAB)


def test_weighted_loss_scales_each_sample_and_keeps_the_batch_divisor() -> None:
    engine = _engine(micro_batch_size=8)
    batch = make_batch(8, seed=4)
    w = torch.tensor([0.0, 3.0, 2.0, 1.0, 1.0, 0.5, 1.0, 4.0])
    res = engine.train_step({**batch, "weights": w})
    tok = token_counts(batch["labels"]).float()
    expected = float((res.per_sample * tok * w).sum() / tok.sum())  # per_sample stays unweighted
    assert res.loss == pytest.approx(expected, rel=1e-5)
    # weights of 1 are the unweighted objective, bit for bit
    a, b = _engine(micro_batch_size=8), _engine(micro_batch_size=8)
    ra, rb = a.train_step(batch), b.train_step({**batch, "weights": torch.ones(8)})
    assert ra.loss == rb.loss and ra.grad_norm == rb.grad_norm


def test_grad_accum_with_weights_matches_full_batch() -> None:
    batch = {**make_batch(8, seed=2), "weights": torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 1.0, 3.0, 1.0])}
    one, two = _engine(grad_accum_steps=1, micro_batch_size=8), _engine(grad_accum_steps=2)
    for _ in range(3):
        r1, r2 = one.train_step(batch), two.train_step(batch)
        assert math.isclose(r1.loss, r2.loss, rel_tol=1e-5)
        assert math.isclose(r1.grad_norm, r2.grad_norm, rel_tol=1e-4)
    for (n, p1), (_, p2) in zip(one.model.named_parameters(), two.model.named_parameters(), strict=True):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5, msg=n)


def _per_sample_grads(engine, batch) -> torch.Tensor:
    """[B, P] gradient of each sample's term of the step objective (weight 1, batch of one)."""
    params = [p for p in engine.model.parameters() if p.requires_grad]
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        ps = engine.per_sample_loss(one)
        loss = weighted_token_loss(ps, token_counts(one["labels"]).float(), None, 1)
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def test_pruned_weighted_gradient_is_the_full_gradient_in_expectation() -> None:
    """Toy problem: 24 sequences with their training losses in the ledger. Over many epochs of unbiased
    pruning (different noise each epoch), the mean of the kept samples' weighted summed gradient matches
    the full data's summed gradient; without the weights it is biased towards the high-loss samples."""
    engine = _engine()
    n = 24
    batch = make_batch(n, seed=7, pad_rows=False)
    batch["ids"] = torch.arange(n)
    grads = _per_sample_grads(engine, batch).double()  # the engine's objective, per sample
    full = grads.sum(0)
    with torch.no_grad():
        losses = engine.per_sample_loss(batch)
    teacher = Teacher(TeacherConfig(mode="ledger", strategy="prune", warmup_epochs=1, prune_ratio=0.5,
                                    prune_quantile=0.5), num_samples=n, seed=3)
    teacher.observe(batch["ids"], losses, step=0)
    draws = 400
    weighted = torch.zeros_like(full)
    unweighted = torch.zeros_like(full)
    for epoch in range(1, draws + 1):
        sel = teacher.select(epoch, step=epoch)
        keep = torch.from_numpy(sel.mask(np.arange(n)))
        w = sel.sample_weights(np.arange(n)).double() * keep
        weighted += (w[:, None] * grads).sum(0)
        unweighted += (keep.double()[:, None] * grads).sum(0)
    weighted /= draws
    unweighted /= draws
    # the exact expectation: P(kept) * weight == 1 for every id
    err = float((weighted - full).norm() / full.norm())
    bias = float((unweighted - full).norm() / full.norm())
    assert err < 0.05, err
    assert bias > 3 * err, (bias, err)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine", ["deepspeed_zero2", "fsdp"])
def test_weights_reach_the_loss_on_two_ranks(tmp_path: Path, engine: str) -> None:
    """2 ranks x 8 weighted rows x 2 micro batches == one process on all 16 rows at once (same init)."""
    res = launch(f"{engine}_weighted", tmp_path, timeout=300)
    parts = weighted_batches(2)
    whole = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    local = _engine(micro_batch_size=16)
    expected = [local.train_step(whole).loss for _ in range(3)]
    ref = local.score(make_batch(8, seed=99)).tolist()
    assert res[0]["final_score"] == res[1]["final_score"]
    assert res[0]["final_score"] == pytest.approx(ref, abs=2e-4)
    # each rank reports its own batch's objective; the global one is their mean (equal token counts)
    got = [(a + b) / 2 for a, b in zip(res[0]["losses"], res[1]["losses"], strict=True)]
    assert got == pytest.approx(expected, rel=1e-4)
