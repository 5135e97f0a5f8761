"""Token-level building blocks: per-token CE, the masked loss under gradient accumulation, the global token
threshold (teacher/tokens.py) and the online reference forwards (engines/reference.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attent_scale.engines.base import IGNORE_INDEX, masked_token_loss, token_ce, token_ce_sums
from attent_scale.teacher.tokens import step_kept_tokens, token_keys, token_weights


def _batch(b: int = 4, t: int = 12, v: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[2, 8:] = IGNORE_INDEX  # padding
    return logits, labels


@pytest.mark.parametrize("chunk", [8192, 12, 5])
def test_token_ce_is_the_per_token_loss_with_the_label_mask(chunk: int) -> None:
    logits, labels = _batch()
    for dtype in (torch.float32, torch.bfloat16):
        lg = logits.to(dtype)
        got = token_ce(lg, labels, chunk)
        want = F.cross_entropy(lg.float().reshape(-1, 50), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="none").view(4, 12)
        assert got.dtype == torch.float32 and torch.equal(got, want)
        assert (got[labels == IGNORE_INDEX] == 0).all()
        assert torch.equal(token_ce_sums(lg, labels, chunk), got.sum(1))


def _half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _model_loss(weights: torch.Tensor | None, micro: int) -> tuple[float, torch.Tensor]:
    """A linear 'model' over fixed features: the step's loss summed over `micro` micro batches and its
    gradient, with masked_token_loss and the step's kept-token divisor."""
    torch.manual_seed(0)
    feats = torch.randn(6, 10, 8)
    labels = torch.randint(0, 5, (6, 10))
    labels[1, :4] = IGNORE_INDEX
    labels[4, 7:] = IGNORE_INDEX
    w = torch.ones(6, 10) if weights is None else weights
    head = torch.nn.Linear(8, 5)
    torch.manual_seed(1)
    torch.nn.init.normal_(head.weight)
    kept = float(((labels != IGNORE_INDEX) & (w > 0)).sum())
    total = 0.0
    for rows in torch.tensor_split(torch.arange(6), micro):
        tl = token_ce(head(feats[rows]), labels[rows])
        loss = masked_token_loss(tl, w[rows], labels[rows], kept)
        loss.backward()
        total += float(loss.detach())
    return total, head.weight.grad.clone()


def test_masked_loss_is_the_mean_over_kept_tokens_under_accumulation() -> None:
    one, g1 = _model_loss(None, 1)
    three, g3 = _model_loss(None, 3)
    assert one == pytest.approx(three, rel=1e-6) and torch.allclose(g1, g3, atol=1e-6)
    # all weights 1: the ordinary token mean
    torch.manual_seed(0)
    feats, labels = torch.randn(6, 10, 8), torch.randint(0, 5, (6, 10))
    labels[1, :4] = IGNORE_INDEX
    labels[4, 7:] = IGNORE_INDEX
    head = torch.nn.Linear(8, 5)
    torch.manual_seed(1)
    torch.nn.init.normal_(head.weight)
    mean = F.cross_entropy(head(feats).reshape(-1, 5), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    assert one == pytest.approx(float(mean.detach()), rel=1e-6)
    # a mask: the mean over the kept tokens only, the same whatever the micro batching; weights on
    # padding and prompt tokens count nothing
    mask = (torch.arange(60).view(6, 10) % 3 != 0).float()
    a, ga = _model_loss(mask, 1)
    b, gb = _model_loss(mask, 2)
    assert a == pytest.approx(b, rel=1e-6) and torch.allclose(ga, gb, atol=1e-6)
    kept_labels = labels.clone()
    kept_labels[mask == 0] = IGNORE_INDEX
    masked_mean = F.cross_entropy(head(feats).reshape(-1, 5), kept_labels.reshape(-1),
                                  ignore_index=IGNORE_INDEX)
    assert a == pytest.approx(float(masked_mean.detach()), rel=1e-6)


def _tokens(b: int = 6, t: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    learner = torch.rand(b, t, generator=g) * 4
    reference = torch.rand(b, t, generator=g) * 4
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[0, :5] = False  # prompt
    valid[3, 10:] = False  # padding
    ids = torch.arange(100, 100 + b)
    return ids, learner, reference, valid


def test_token_weights_keep_the_top_share_of_valid_tokens_by_learnability() -> None:
    ids, learner, reference, valid = _tokens()
    ids[5] = -1  # a filler row: never counted
    pick = token_weights(ids, learner, reference, valid, keep=0.6)
    real = valid & (ids >= 0)[:, None]
    n = int(real.sum())
    assert pick.valid == n and pick.kept == _half_up(0.6 * n) and int(pick.weights.sum()) == pick.kept
    assert (pick.weights[~real] == 0).all()
    score = (learner - reference)[real]
    kept = pick.weights[real] > 0
    assert float(score[kept].min()) >= float(score[~kept].max())
    assert token_weights(ids, learner, reference, valid, keep=1.0).kept == n
    with pytest.raises(ValueError, match="keep must be in"):
        token_weights(ids, learner, reference, valid, keep=0.0)


def test_ties_are_broken_by_token_not_by_where_it_sits() -> None:
    """All-equal learnability: which tokens are kept depends on (id, position) only, so the rows in
    another order (another rank layout) keep the same tokens."""
    ids, learner, _, valid = _tokens()
    pick = token_weights(ids, learner, learner, valid, keep=0.5)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    again = token_weights(ids[perm], learner[perm], learner[perm], valid[perm], keep=0.5)
    assert torch.equal(again.weights, pick.weights[perm]) and pick.kept == _half_up(0.5 * int(valid.sum()))
    keys = token_keys(np.zeros(3, np.float32), np.array([1, 1, 2]), np.array([0, 1, 0]))
    assert len(set(keys.tolist())) == 3


def test_step_divisor_is_the_kept_tokens_per_rank() -> None:
    assert step_kept_tokens([10, 7], keep=0.5, world=1) == 5 + 4  # round half up per micro batch


def _gpt2(tmp_path: Path, lora: bool) -> torch.nn.Module:
    from attent_scale.config import LoraConfig, ModelConfig
    from attent_scale.models import build_model

    shape = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32}
    cfg = ModelConfig(config=shape, lora=LoraConfig(enabled=lora, r=4))
    return build_model(cfg, 40, seed=0)


def test_a_reference_adapter_shares_the_base_and_leaves_the_learner_as_it_was(tmp_path: Path) -> None:
    from attent_scale.engines.reference import AdapterReference

    ref_model = _gpt2(tmp_path, lora=True)
    with torch.no_grad():  # a trained reference adapter: its B matrices are no longer zero
        for n, p in ref_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.5)
    ref_model.save_pretrained(tmp_path / "adapter")
    learner = _gpt2(tmp_path, lora=True)
    learner.train()
    trainable = sorted(n for n, p in learner.named_parameters() if p.requires_grad)
    ref = AdapterReference(learner, tmp_path / "adapter")
    assert sorted(n for n, p in learner.named_parameters() if p.requires_grad) == trainable
    assert learner.active_adapter == "default" and learner.training
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 40, (3, 20), generator=g)
    y = torch.randint(0, 40, (3, 20), generator=g)
    y[0, :4] = IGNORE_INDEX
    ref_model.eval()
    with torch.no_grad():
        want = token_ce(ref_model(input_ids=x).logits, y)
    got = ref.token_losses(x, y)
    assert torch.allclose(got, want, atol=1e-5) and learner.training
    # the learner's own forward is still the learner's (its zero-initialised adapter = the base)
    learner.eval()
    with torch.no_grad(), learner.disable_adapter():
        base = token_ce(learner(input_ids=x).logits, y)
    with torch.no_grad():
        own = token_ce(learner(input_ids=x).logits, y)
    assert torch.allclose(own, base, atol=1e-6) and not torch.allclose(own, got, atol=1e-3)
    # a learner step moves only the learner's adapter; the reference forward stays what it was
    learner.train()
    opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.5)
    token_ce(learner(input_ids=x).logits, y).sum().backward()
    opt.step()
    assert torch.allclose(ref.token_losses(x, y), want, atol=1e-5)


def test_a_frozen_reference_beside_the_learner(tmp_path: Path) -> None:
    from attent_scale.engines.reference import FrozenReference

    model = _gpt2(tmp_path, lora=False)
    model.save_pretrained(tmp_path / "ref")
    ref = FrozenReference(tmp_path / "ref", torch.device("cpu"))
    x = torch.randint(0, 40, (2, 10))
    y = torch.randint(0, 40, (2, 10))
    model.eval()
    with torch.no_grad():
        want = token_ce(model(input_ids=x).logits, y)
    assert torch.allclose(ref.token_losses(x, y), want, atol=1e-6)
    assert not any(p.requires_grad for p in ref.model.parameters()) and not ref.sharded
