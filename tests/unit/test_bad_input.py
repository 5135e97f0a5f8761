"""Config spellings users write, and bad model/seed settings: accepted, or one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from attent_scale.config import ModelConfig, load_config
from attent_scale.errors import UserError
from attent_scale.models import check_model_fits

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3e-4", 3e-4),
        ("1E-3", 1e-3),
        (".5", 0.5),
        ("1_000.0", 1000.0),
        ("2.5e+3", 2500.0),
        ("1e3", 1000.0),
        ("+.5", 0.5),
        ("5", 5.0),
        ("1.", 1.0),
        ("'3e-4'", 3e-4),
        ('"1E-3"', 1e-3),
    ],
)
def test_every_float_spelling_is_a_float_in_yaml_and_set(tmp_path: Path, text: str, value: float) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  lr: {text}\nmodel:\n  config:\n    layer_norm_epsilon: {text}\n")
    cfg = load_config(path)
    assert cfg.train.lr == pytest.approx(value) and isinstance(cfg.train.lr, float)
    if not text.startswith(("'", '"')):  # free-form keys keep what YAML says; quoted stays a string
        assert cfg.model.config["layer_norm_epsilon"] == pytest.approx(value)
    via_set = load_config(None, [f"train.lr={text}", f"teacher.temperature={text}"])
    assert via_set.train.lr == pytest.approx(value) and via_set.teacher.temperature == pytest.approx(value)


@pytest.mark.parametrize("text", ["abc", "1e", "'1.5.5'", "true"])
def test_non_numbers_for_float_keys_are_one_line_errors(text: str) -> None:
    with pytest.raises(UserError, match=r"config key 'train.lr': expected a number"):
        load_config(None, [f"train.lr={text}"])


def test_integers_stay_integers() -> None:
    cfg = load_config(None, ["train.max_steps=1_000", "seed=7"])
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    with pytest.raises(UserError, match="train.max_steps': expected an integer"):
        load_config(None, ["train.max_steps=1e3"])


def test_negative_seed_is_rejected() -> None:
    with pytest.raises(UserError, match=r"config key 'seed': -1 must be >= 0"):
        load_config(None, ["seed=-1"])


GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_positions": 16}, r"'model.config.n_positions': 16 positions is fewer than .* seq_len 32"),
        ({"n_embd": 30, "n_head": 4}, r"'model.config.n_embd': 30 is not divisible by model.config.n_head 4"),
    ],
)
def test_model_that_cannot_train_on_the_data_is_a_one_line_error(change: dict, message: str) -> None:
    check_model_fits(ModelConfig(config=dict(GPT2)), 512, 32)
    with pytest.raises(UserError, match=message):
        check_model_fits(ModelConfig(config={**GPT2, **change}), 512, 32)


def test_llama_heads_mismatch_is_one_line() -> None:
    bad = {
        "model_type": "llama",
        "hidden_size": 30,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
    }
    with pytest.raises(UserError, match=r"config key 'model.config"):
        check_model_fits(ModelConfig(config=bad), 512, 32)
