"""Per-sample loss, LR schedule and micro-batch split of attent_scale.engines.base."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attent_scale.engines.base import lr_lambda, per_sample_loss, split_micro


def _reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    b, t, v = logits.shape
    ce = F.cross_entropy(logits.float().reshape(b * t, v), labels.reshape(b * t), reduction="none",
                         ignore_index=-100).view(b, t)
    valid = (labels != -100).float()
    return (ce * valid).sum(1) / valid.sum(1).clamp(min=1)


def _data(b: int = 5, t: int = 7, v: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 3
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, 4:] = -100  # padded tail
    labels[1] = -100  # no target at all
    labels[2, ::2] = -100  # scattered ignores
    return logits, labels


@pytest.mark.parametrize("chunk_tokens", [1, 7, 15, 10_000])
def test_per_sample_loss_matches_reference(chunk_tokens: int) -> None:
    logits, labels = _data()
    got = per_sample_loss(logits, labels, chunk_tokens=chunk_tokens)
    assert got.dtype == torch.float32 and got.shape == (5,)
    torch.testing.assert_close(got, _reference(logits, labels), rtol=1e-6, atol=1e-6)
    assert got[1].item() == 0.0


def test_per_sample_loss_gradient_matches_reference() -> None:
    logits, labels = _data()
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    w = torch.arange(1.0, 6.0)
    (per_sample_loss(a, labels, chunk_tokens=8) * w).sum().backward()
    (_reference(b, labels) * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    assert a.grad[1].abs().sum() == 0  # a row with no targets gets no gradient


def test_per_sample_loss_bf16_logits_accumulate_in_fp32() -> None:
    logits, labels = _data(v=50)
    lb = logits.to(torch.bfloat16)
    got = per_sample_loss(lb, labels, chunk_tokens=7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _reference(lb.float(), labels), rtol=1e-5, atol=1e-5)


def test_per_sample_loss_fp32_grad_is_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 logits need no upcast copy: one cross-entropy over all rows, no recompute in backward, and the
    same values as the chunked no-grad pass; bf16 logits keep the chunks and their recompute."""
    from attent_scale.engines import base

    calls = []
    inner = base._chunk_token_ce
    monkeypatch.setattr(base, "_chunk_token_ce", lambda lg, lb: calls.append(lg.shape[0]) or inner(lg, lb))
    logits, labels = _data()
    a = logits.clone().requires_grad_(True)
    got = per_sample_loss(a, labels, chunk_tokens=8)
    got.sum().backward()
    assert calls == [5]  # all 5 rows at once, nothing recomputed in backward
    with torch.no_grad():
        assert torch.equal(got.detach(), per_sample_loss(logits, labels, chunk_tokens=8))
    calls.clear()
    lb = logits.to(torch.bfloat16).requires_grad_(True)
    ref = lb.detach().float().requires_grad_(True)
    (per_sample_loss(lb, labels, chunk_tokens=14) * torch.arange(1.0, 6.0)).sum().backward()
    (_reference(ref, labels) * torch.arange(1.0, 6.0)).sum().backward()
    assert calls == [2, 2, 1, 1, 2, 2]  # 3 chunks of 2 rows, each recomputed in backward (last chunk first)
    torch.testing.assert_close(lb.grad.float(), ref.grad, rtol=2e-2, atol=2e-2)


def test_per_sample_loss_rejects_misaligned_labels() -> None:
    logits, labels = _data()
    with pytest.raises(ValueError):
        per_sample_loss(logits, labels[:, :-1])


def test_lr_warmup_then_cosine_to_min_ratio() -> None:
    kw = {"warmup_steps": 4, "max_steps": 20, "min_lr_ratio": 0.1}
    assert [lr_lambda(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_lambda(4, **kw) == 1.0
    assert math.isclose(lr_lambda(12, **kw), 0.55)
    assert math.isclose(lr_lambda(20, **kw), 0.1) and math.isclose(lr_lambda(50, **kw), 0.1)
    values = [lr_lambda(s, **kw) for s in range(4, 21)]
    assert all(x >= y for x, y in zip(values, values[1:], strict=False))
    assert lr_lambda(0, warmup_steps=0, max_steps=10, min_lr_ratio=0.0) == 1.0


def _rows(b: int, weights: bool = False) -> dict[str, torch.Tensor]:
    batch = {"ids": torch.arange(b), "input_ids": torch.arange(b * 3).view(b, 3),
             "labels": torch.ones(b, 3, dtype=torch.int64)}
    if weights:
        batch["weights"] = torch.full((b,), 2.0)
    return batch


def test_split_micro_exact_count() -> None:
    parts, real = split_micro(_rows(5), 2)
    assert [p["ids"].tolist() for p in parts] == [[0, 1, 2], [3, 4]] and real == 2


def test_split_micro_short_batch_gets_filler_micro_batches() -> None:
    """5 rows, accumulation 16: 5 real micro batches of one row, then 11 filler rows that carry no target,
    id -1 and weight 0 (every rank still runs 16 forwards/backwards)."""
    parts, real = split_micro(_rows(5, weights=True), 16)
    assert len(parts) == 16 and real == 5
    assert [p["ids"].tolist() for p in parts[:5]] == [[i] for i in range(5)]
    for p in parts[5:]:
        assert p["ids"].tolist() == [-1] and p["weights"].tolist() == [0.0]
        assert (p["labels"] == -100).all() and p["input_ids"].shape == (1, 3)
    with pytest.raises(ValueError):
        split_micro(_rows(0), 2)


@pytest.mark.parametrize("micro,accum", [(1, 16), (2, 16), (3, 4), (8, 1), (5, 3)])
def test_split_micro_sizes_never_exceed_micro_batch_size(micro: int, accum: int) -> None:
    """Any batch of at most micro * accum rows: exactly `accum` micro batches, none above micro_batch_size,
    every row once and in order; a full batch gives `accum` micro batches of exactly `micro` rows."""
    for b in range(1, micro * accum + 1):
        parts, real = split_micro(_rows(b), accum)
        sizes = [p["ids"].shape[0] for p in parts]
        assert len(parts) == accum and max(sizes) <= micro, (b, sizes)
        assert torch.cat([p["ids"] for p in parts[:real]]).tolist() == list(range(b))
        assert all(p["ids"].tolist() == [-1] for p in parts[real:])
        if b == micro * accum:
            assert sizes == [micro] * accum and real == accum
