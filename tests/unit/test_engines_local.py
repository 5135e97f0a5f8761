"""Local engine: training, grad accumulation, non-finite skip, save/load, score/evaluate, LoRA export."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from engine_worker import VOCAB, make_batch, tiny_config
from safetensors.torch import load_file

from attent_scale.config import config_from_dict
from attent_scale.engines import StepResult, build_engine
from attent_scale.engines.base import per_sample_loss
from attent_scale.engines.local import LocalEngine
from attent_scale.models import build_model, load_adapter


def _engine(**kw: object) -> LocalEngine:
    lora = bool(kw.pop("lora", False))
    engine = build_engine(config_from_dict(tiny_config("local", lora=lora, **kw)), vocab_size=VOCAB)
    assert isinstance(engine, LocalEngine)
    return engine


def test_train_step_decreases_loss_on_fixed_batch() -> None:
    engine = _engine()
    assert (engine.rank, engine.world_size, engine.local_rank, engine.group) == (0, 1, 0, None)
    batch = make_batch(8, seed=1)
    first = engine.train_step(batch)
    assert isinstance(first, StepResult) and not first.skipped
    assert abs(first.loss - math.log(VOCAB)) < 0.1  # fresh init: loss ~ ln(vocab)
    assert first.per_sample.shape == (8,) and first.per_sample.dtype == torch.float32
    assert first.per_sample.device.type == "cpu" and not first.per_sample.requires_grad
    assert first.per_sample[1] == 0.0 and math.isfinite(first.grad_norm) and first.lr == 3e-3
    losses = [engine.train_step(batch).loss for _ in range(8)]
    assert losses[-1] < first.loss - 0.5
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))
    assert engine.steps_done == 9


def test_grad_accum_matches_full_batch() -> None:
    batch = make_batch(8, seed=2)
    one, two = _engine(grad_accum_steps=1, micro_batch_size=8), _engine(grad_accum_steps=2)
    for _ in range(3):
        r1, r2 = one.train_step(batch), two.train_step(batch)
        assert math.isclose(r1.loss, r2.loss, rel_tol=1e-5)
        assert math.isclose(r1.grad_norm, r2.grad_norm, rel_tol=1e-4)
        torch.testing.assert_close(r1.per_sample, r2.per_sample, rtol=1e-5, atol=1e-5)
    assert one.host_syncs == two.host_syncs == 3  # one device-to-host copy per step, not per micro batch
    for (n, p1), (_, p2) in zip(one.model.named_parameters(), two.model.named_parameters(), strict=True):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5, msg=n)


def _capture_grads(engine: LocalEngine) -> list[dict[str, torch.Tensor]]:
    """Record the gradients each step applies (before clipping), in order."""
    seen: list[dict[str, torch.Tensor]] = []
    clip = engine._clip

    def recording() -> torch.Tensor:
        seen.append({n: p.grad.detach().clone() for n, p in engine.model.named_parameters()})
        return clip()

    engine._clip = recording  # type: ignore[method-assign]
    return seen


def test_short_batch_with_accumulation_is_the_exact_mean_over_its_rows() -> None:
    """A rank's short last batch (5 rows, accumulation 16 at micro batch 1, weights as a pruned epoch
    gives them): the step's gradient is the gradient of the weighted token mean over those 5 rows, equal
    to one micro batch of the same 5 rows; per-sample losses come back for the 5 real rows only."""
    batch = make_batch(5, seed=5)
    batch["weights"] = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
    acc = _engine(grad_accum_steps=16, micro_batch_size=1)
    one = _engine(grad_accum_steps=1, micro_batch_size=16)
    ref = build_model(acc.cfg.model, VOCAB, seed=0)
    ref.load_state_dict(acc.model.state_dict())
    g_acc, g_one = _capture_grads(acc), _capture_grads(one)
    r_acc, r_one = acc.train_step(batch), one.train_step(batch)
    # the objective by hand: sum_i w_i * CE_sum_i / tokens, over the 5 rows
    logits = ref(input_ids=batch["input_ids"]).logits
    ps = per_sample_loss(logits, batch["labels"])
    tok = (batch["labels"] != -100).sum(1).float()
    objective = (ps * tok * batch["weights"]).sum() / tok.sum()
    objective.backward()
    assert r_acc.per_sample.shape == (5,) and not r_acc.skipped
    torch.testing.assert_close(r_acc.per_sample, ps.detach(), rtol=1e-5, atol=1e-6)
    assert math.isclose(r_acc.loss, objective.item(), rel_tol=1e-5)
    assert math.isclose(r_acc.loss, r_one.loss, rel_tol=1e-5)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(g_acc[0][n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
        torch.testing.assert_close(g_acc[0][n], g_one[0][n], rtol=1e-4, atol=1e-6, msg=n)
    assert acc.host_syncs == 1  # still one device-to-host copy for the step
    for (n, p1), (_, p2) in zip(acc.model.named_parameters(), one.model.named_parameters(), strict=True):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5, msg=n)


def test_micro_batches_of_b_equal_one_batch_of_b_times_a() -> None:
    """1 x B*A and A micro batches of B give the same updates, for a full and a short batch alike."""
    full, short = make_batch(12, seed=6), make_batch(7, seed=7)
    one = _engine(grad_accum_steps=1, micro_batch_size=12)
    many = _engine(grad_accum_steps=4, micro_batch_size=3)
    for batch in (full, short, full):
        r1, r2 = one.train_step(batch), many.train_step(batch)
        assert math.isclose(r1.loss, r2.loss, rel_tol=1e-5)
        assert math.isclose(r1.grad_norm, r2.grad_norm, rel_tol=1e-4)
        torch.testing.assert_close(r1.per_sample, r2.per_sample, rtol=1e-5, atol=1e-5)
    for (n, p1), (_, p2) in zip(one.model.named_parameters(), many.model.named_parameters(), strict=True):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5, msg=n)


def test_nonfinite_loss_skips_the_step() -> None:
    engine = _engine(warmup_steps=2)
    batch = make_batch(8, seed=3)
    engine.train_step(batch)
    wte = engine.model.transformer.wte.weight
    token = int(batch["input_ids"][0, 0])
    saved = wte.data[token].clone()
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    lr_before = engine.current_lr()
    wte.data[token] = float("inf")
    result = engine.train_step(batch)
    assert result.skipped and not math.isfinite(result.loss)
    wte.data[token] = saved
    for n, p in engine.model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0, msg=n)
    assert engine.current_lr() == lr_before and engine.steps_done == 1
    assert not engine.train_step(batch).skipped


def test_save_load_round_trip_gives_identical_next_step(tmp_path: Path) -> None:
    batch = make_batch(8, seed=4)
    engine = _engine(warmup_steps=3)
    for _ in range(3):
        engine.train_step(batch)
    engine.save(tmp_path, "step3")
    expected = [(r.loss, r.lr) for r in (engine.train_step(batch), engine.train_step(batch))]
    fresh = _engine(warmup_steps=3)
    fresh.load(tmp_path, "step3")
    assert fresh.steps_done == 3
    got = [(r.loss, r.lr) for r in (fresh.train_step(batch), fresh.train_step(batch))]
    assert got == expected


def test_score_and_evaluate() -> None:
    engine = _engine()
    batch, other = make_batch(8, seed=5), make_batch(6, seed=6, pad_rows=False)
    scores = engine.score(batch)
    assert scores.device.type == "cpu" and scores.dtype == torch.float32 and not scores.requires_grad
    assert engine.model.training
    with torch.no_grad():
        logits = engine.model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(scores, per_sample_loss(logits, batch["labels"]))
    tok = [(b["labels"] != -100).sum(1).double() for b in (batch, other)]
    ref = sum(float((engine.score(b).double() * t).sum()) for b, t in zip((batch, other), tok, strict=True))
    ref /= float(tok[0].sum() + tok[1].sum())
    assert math.isclose(engine.evaluate([batch, other]), ref, rel_tol=1e-6)


def test_lora_only_adapters_train_and_export_reloads(tmp_path: Path) -> None:
    engine = _engine(lora=True, lr=1e-2)
    trainable = [n for n, p in engine.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in engine.model.named_parameters() if not p.requires_grad}
    batch = make_batch(8, seed=7)
    losses = [engine.train_step(batch).loss for _ in range(4)]
    assert losses[-1] < losses[0]
    for n, p in engine.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    engine.export(tmp_path)
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert tensors and all(t.numel() > 0 for t in tensors.values())
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in tensors.items())
    expected = engine.score(batch)
    # adapters on a freshly built base (same seed) reproduce the trained model
    cfg = config_from_dict(tiny_config("local"))
    reloaded = load_adapter(build_model(cfg.model, VOCAB, seed=cfg.seed), tmp_path / "adapter").eval()
    with torch.no_grad():
        got = per_sample_loss(reloaded(input_ids=batch["input_ids"]).logits, batch["labels"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), local_files_only=True).eval()
    with torch.no_grad():
        got = per_sample_loss(merged(input_ids=batch["input_ids"]).logits, batch["labels"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_export_full_model_without_lora(tmp_path: Path) -> None:
    engine = _engine()
    engine.export(tmp_path)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"), local_files_only=True).eval()
    batch = make_batch(4, seed=8)
    with torch.no_grad():
        got = per_sample_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    torch.testing.assert_close(got, engine.score(batch), rtol=1e-5, atol=1e-5)


def test_build_engine_takes_vocab_from_the_manifest(tmp_path: Path) -> None:
    import pytest

    from attent_scale.data.manifest import Manifest
    from attent_scale.errors import UserError

    manifest = Manifest(dir=tmp_path, seq_len=32, vocab_size=600, eos_id=1, pad_id=0,
                        tokenizer_path=tmp_path / "tokenizer.model", tokenizer_sha256="",
                        token_dtype="uint16", splits={})
    engine = build_engine(config_from_dict(tiny_config("local")), manifest)
    assert engine.model.config.vocab_size == 600
    raw = tiny_config("local")
    raw["model"]["config"]["vocab_size"] = 1000
    with pytest.raises(UserError, match="vocab_size 1000 != tokenizer vocab_size 600"):
        build_engine(config_from_dict(raw), manifest)
