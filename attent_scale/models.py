"""HF causal LMs from a config dict or a local safetensors directory, LoRA via peft, and export."""

from __future__ import annotations

import contextlib
import difflib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attent_scale.config import LoraConfig, ModelConfig
from attent_scale.errors import UserError

# Names of the ModuleList that holds the transformer blocks in common HF causal LMs.
_BLOCK_LIST_NAMES = ("h", "layers", "blocks", "layer")


def hf_config(mcfg: ModelConfig, vocab_size: int | None) -> Any:
    """The transformers config for `mcfg`, with vocab_size checked against (or taken from) the data."""
    from transformers import AutoConfig

    if mcfg.pretrained:
        path = Path(mcfg.pretrained)
        if not path.is_dir():
            raise UserError(f"config key 'model.pretrained': {path} is not a directory")
        if not any(path.glob("*.safetensors")):
            raise UserError(f"config key 'model.pretrained': no *.safetensors weights in {path}")
        try:
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"config key 'model.pretrained': cannot read {path}/config.json ({exc})"
            ) from None
        key = "model.pretrained"
    else:
        raw = dict(mcfg.config)
        model_type = raw.pop("model_type", None)
        if not model_type:
            raise UserError("config key 'model.config.model_type': required (e.g. gpt2, llama)")
        if "vocab_size" not in raw and vocab_size is not None:
            raw["vocab_size"] = vocab_size
        # HF defaults (e.g. gpt2's 50256) point outside a small vocabulary; training never generates.
        raw.setdefault("bos_token_id", None)
        raw.setdefault("eos_token_id", None)
        from transformers import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else " (e.g. gpt2, llama)"
            raise UserError(f"config key 'model.config.model_type': unknown model type {model_type!r}{hint}")
        try:
            config = AutoConfig.for_model(model_type, **raw)
        except _config_errors() as exc:
            # transformers validates some configs itself (llama: hidden size vs heads); keep one line
            cause = getattr(exc, "__cause__", None) or exc
            raise UserError(f"config key 'model.config': {cause}".replace("\n", " ")) from None
        key = "model.config.vocab_size"
    if vocab_size is not None and config.vocab_size != vocab_size:
        raise UserError(
            f"config key '{key}': model vocab_size {config.vocab_size} != tokenizer vocab_size {vocab_size} "
            "in the data manifest"
        )
    return config


def _config_errors() -> tuple[type[BaseException], ...]:
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub: configs are not strict dataclasses
        return (ValueError, TypeError)
    return (ValueError, TypeError, StrictDataclassError)


def check_model_fits(mcfg: ModelConfig, vocab_size: int | None, seq_len: int) -> None:
    """Fail in one line, before any engine starts, when the model cannot train on `seq_len` windows."""
    config = hf_config(mcfg, vocab_size)
    raw = mcfg.config if not mcfg.pretrained else {}

    def key(*names: str) -> str:
        given = next((n for n in names if n in raw), names[0])
        return f"model.pretrained ({given})" if mcfg.pretrained else f"model.config.{given}"

    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions < seq_len:
        name = key("n_positions", "max_position_embeddings")
        raise UserError(f"config key '{name}': {positions} positions is fewer than the data manifest's "
                        f"seq_len {seq_len}")
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads:
        raise UserError(f"config key '{key('n_embd', 'hidden_size')}': {hidden} is not divisible by "
                        f"{key('n_head', 'num_attention_heads')} {heads}")


def build_model(mcfg: ModelConfig, vocab_size: int | None, *, seed: int = 0) -> nn.Module:
    """Build the causal LM (weights initialised from `seed`, or loaded from `pretrained`), LoRA applied.

    Under ZeRO-3 the caller must hold a live `HfDeepSpeedConfig` while this runs so the weights are
    created partitioned and still go through HF's `_init_weights`.
    """
    from transformers import AutoModelForCausalLM

    config = hf_config(mcfg, vocab_size)
    torch.manual_seed(seed)
    if mcfg.pretrained:
        model = AutoModelForCausalLM.from_pretrained(
            mcfg.pretrained,
            config=config,
            local_files_only=True,
            use_safetensors=True,
            dtype=torch.float32,
        )
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    if mcfg.lora.enabled:
        model = apply_lora(model, mcfg.lora)
    return model


def apply_lora(model: nn.Module, lcfg: LoraConfig) -> nn.Module:
    """Wrap `model` with peft LoRA adapters; only adapter weights stay trainable."""
    import warnings

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in lcfg.target_modules if t not in names]
    if missing:
        raise UserError(
            f"config key 'model.lora.target_modules': {missing} not found in the model "
            f"(module names include: {', '.join(sorted(n for n in names if not n.isdigit())[:12])})"
        )
    pcfg = PeftLoraConfig(
        r=lcfg.r,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        target_modules=list(lcfg.target_modules),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        return get_peft_model(model, pcfg)


def is_lora(model: nn.Module) -> bool:
    """True when `model` is a peft model."""
    return hasattr(model, "peft_config")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (the children of the longest ModuleList named h/layers/blocks)."""
    best: nn.ModuleList | None = None
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and name.rsplit(".", 1)[-1] in _BLOCK_LIST_NAMES
            and (best is None or len(module) > len(best))
        ):
            best = module
    if best is None:
        raise ValueError("cannot find the transformer blocks (no ModuleList named h/layers/blocks)")
    return list(best)


@contextlib.contextmanager
def zero3_init_disabled() -> Iterator[None]:
    """Build plain (unpartitioned) modules even while an HfDeepSpeedConfig for ZeRO-3 is alive."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def export_state_dict(
    state_dict: dict[str, torch.Tensor], mcfg: ModelConfig, vocab_size: int | None, out_dir: str | Path
) -> list[Path]:
    """Write a full (gathered, CPU) state dict as safetensors: `adapter/` (LoRA) and `merged/`
    (when `lora.export_merged`), or `model/` without LoRA. Returns the directories written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved_init = mcfg.pretrained
    # Rebuild on CPU from the config only: the weights come from `state_dict`.
    config = hf_config(mcfg, vocab_size)
    from transformers import AutoModelForCausalLM

    with zero3_init_disabled():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if mcfg.lora.enabled:
            model = apply_lora(model, mcfg.lora)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = {k for k in missing if "lm_head" in k}
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"export: state dict mismatch (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    written: list[Path] = []
    if mcfg.lora.enabled:
        model.save_pretrained(str(out / "adapter"), safe_serialization=True)
        written.append(out / "adapter")
        if mcfg.lora.export_merged:
            merged = model.merge_and_unload()
            merged.save_pretrained(str(out / "merged"), safe_serialization=True)
            written.append(out / "merged")
    else:
        model.save_pretrained(str(out / "model"), safe_serialization=True)
        written.append(out / "model")
    (out / "export.json").write_text(
        json.dumps({"lora": mcfg.lora.enabled, "base": saved_init, "dirs": [p.name for p in written]}) + "\n"
    )
    return written


def load_adapter(base: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Attach exported LoRA adapters (safetensors) to a base model."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
