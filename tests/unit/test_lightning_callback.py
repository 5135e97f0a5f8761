"""AttentCallback without a Trainer: its checks at construction (a teacher config is checked like a YAML one;
online is refused) and causal_lm_loss (the weighted token mean, the unweighted per-row losses)."""

from __future__ import annotations

import pytest

from attent_scale.config import TeacherConfig
from attent_scale.errors import UserError


@pytest.mark.parametrize("bad,message", [
    (dict(mode="online"), "teacher.mode 'online'"),
    (dict(mode="ledger", strategy="hardest"), "teacher.strategy"),
    (dict(mode="ledger", score="excess"), "teacher.reference"),
    (dict(mode="ledger", unit="token", strategy="random"), "teacher.unit 'token'"),
])
def test_bad_teacher_config_raises_at_construction(bad: dict, message: str) -> None:
    from hf_worker import ToyPairs

    from attent_scale.integrations.lightning import AttentCallback
    from attent_scale.integrations.sampler import PadCollator

    with pytest.raises(UserError, match=message):
        AttentCallback(ToyPairs(), batch_size=8, collate_fn=PadCollator(0),
                       teacher_config=TeacherConfig(**bad))


def test_causal_lm_loss_is_the_weighted_token_mean_and_the_unweighted_row_losses() -> None:
    """causal_lm_loss: sum_i w_i * CE_sum_i / tokens with the batch's WEIGHTS_KEY (the engines' weighted
    token mean), the plain token mean without; "sample_losses" each row's unweighted mean CE, detached."""
    import torch
    import torch.nn.functional as F

    from attent_scale.integrations.lightning import WEIGHTS_KEY, causal_lm_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, requires_grad=True)
    labels = torch.tensor([[-100, 1, 2, 3, 4], [-100, -100, 5, 6, -100], [0, 1, 2, 3, 4]])
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    ce = F.cross_entropy(logits.detach().reshape(-1, 7), targets.reshape(-1), ignore_index=-100,
                         reduction="none").view(3, 5).sum(1)
    tokens = (targets != -100).sum(1)
    plain = causal_lm_loss(logits, {"labels": labels})
    assert plain["loss"].item() == pytest.approx(float(ce.sum() / tokens.sum()), rel=1e-5)
    assert plain["sample_losses"].tolist() == pytest.approx((ce / tokens).tolist(), rel=1e-5)
    w = torch.tensor([1.0, 2.5, 0.5])
    weighted = causal_lm_loss(logits, {"labels": labels, WEIGHTS_KEY: w})
    assert weighted["loss"].item() == pytest.approx(float((w * ce).sum() / tokens.sum()), rel=1e-5)
    assert weighted["sample_losses"].tolist() == plain["sample_losses"].tolist()
    assert weighted["loss"].requires_grad and not weighted["sample_losses"].requires_grad
