"""AttentTrainer with teacher.unit token on 2 real ranks: a LoRA reference adapter beside the learner's on its
peft model (one forward through the shared base), each micro batch's loss over the top token_ratio of the
target tokens of both ranks; the kept share in Trainer's logs and Prometheus; interrupted and resumed, the
same losses as without the interruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from servers import free_port
from test_hf_trainer import _losses, _run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ref_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reference adapter for hf_worker's model (same base: seed 0), its LoRA weights moved off zero."""
    import torch
    from hf_worker import VOCAB
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0,
                                      fan_in_fan_out=True, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    out = tmp_path_factory.mktemp("hfref") / "adapter"
    model.save_pretrained(out)
    return out


def _spec(adapter: Path) -> dict:
    teacher = {"mode": "none", "unit": "token", "strategy": "hard", "token_ratio": 0.6,
               "token_reference": str(adapter)}
    return {"batch": 4, "ga": 2, "max_steps": 8, "teacher": teacher}


def test_token_unit_trains_reports_the_kept_share_and_resumes_exactly(tmp_path: Path,
                                                                      ref_adapter: Path) -> None:
    straight = _run(tmp_path, "straight", 2, metrics_port=free_port(1), **_spec(ref_adapter))
    hist = json.loads((straight / "log_history.json").read_text())
    shares = [h["attent/kept_token_share"] for h in hist if "loss" in h]
    assert len(shares) == 8 and all(s == pytest.approx(0.6, abs=0.03) for s in shares), shares
    losses = _losses(straight)
    assert all(0 < v < 10 for v in losses)
    prom = (straight / "metrics.prom").read_text()
    line = next(x for x in prom.splitlines() if x.startswith("attent_kept_token_ratio{"))
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(shares[-1], abs=1e-6)

    cut = _run(tmp_path, "cut", 2, save_steps=4, stop_after_step=5, **_spec(ref_adapter))
    assert (cut / "checkpoint-4" / "attent" / "rank1.json").exists()
    _run(tmp_path, "cut", 2, save_steps=4, resume=True, **_spec(ref_adapter))
    assert _losses(cut) == pytest.approx(losses, rel=1e-6, abs=1e-7)
    resumed = [h["attent/kept_token_share"] for h in json.loads((cut / "log_history.json").read_text())
               if "loss" in h]
    assert resumed[-1] == shares[-1]  # the token counts are in the checkpoint
