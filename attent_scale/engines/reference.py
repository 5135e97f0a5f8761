"""Online reference forwards for token-level learnability: a frozen model beside the learner, or a frozen
LoRA reference adapter on the learner's own peft model (one forward through the shared base)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attent_scale.engines.base import token_ce

ADAPTER = "reference"  # the reference adapter's name beside the learner's ("default")


class FrozenReference:
    """A frozen causal LM (a model directory, e.g. `reference fit`'s fold export) beside the learner: eval
    mode, no grad, per-token fp32 CE. Sharding: with `mesh` (the learner's FSDP2 mesh) each transformer
    block and the root are `fully_shard`ed as the learner's are, so it holds 1/world of the weights and
    every rank must run `token_losses` in lockstep (one per micro batch); without one it is replicated on
    every rank, which is what a ZeRO-3 learner gets too (a small reference fits every rank)."""

    def __init__(self, model_dir: str | Path, device: torch.device, *, mesh: Any = None,
                 chunk_tokens: int = 8192) -> None:
        from transformers import AutoModelForCausalLM

        from attent_scale.models import transformer_blocks

        with _replicated_load():
            self.model: nn.Module = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model.to(device).eval()
        self.model.requires_grad_(False)
        self.device, self.chunk_tokens, self.sharded = device, chunk_tokens, mesh is not None
        if mesh is not None:
            from torch.distributed.fsdp import fully_shard

            for block in transformer_blocks(self.model):
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    def token_losses(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[B, T] fp32 token CE of the reference (0 where labels are -100), on its device."""
        with torch.no_grad():
            logits = self.model(input_ids=input_ids.to(self.device), use_cache=False).logits
            return token_ce(logits, labels.to(self.device), self.chunk_tokens)


class AdapterReference:
    """A LoRA reference adapter loaded frozen into the learner's peft model beside the adapter it trains:
    the reference forward routes every row through `ADAPTER` (peft's per-call `adapter_names`), so it costs
    one forward through the shared base and changes no state: the learner's adapter stays the active and
    the only trainable one (peft's `set_adapter` would flip requires_grad; it is never called)."""

    def __init__(self, peft_model: nn.Module, adapter_dir: str | Path, *, chunk_tokens: int = 8192) -> None:
        if not hasattr(peft_model, "peft_config"):
            raise ValueError("AdapterReference needs the learner's peft model (model.lora.enabled)")
        self.model = peft_model
        trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        was_training = peft_model.training
        peft_model.load_adapter(str(adapter_dir), adapter_name=ADAPTER, is_trainable=False)
        peft_model.train(was_training)  # peft puts the whole model in eval mode for an inference adapter
        now = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        if now != trainable:  # the learner trains exactly what it trained before
            raise RuntimeError(f"loading the reference adapter changed the trainable parameters "
                               f"({len(trainable)} -> {len(now)})")
        self.chunk_tokens = chunk_tokens

    def token_losses(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[B, T] fp32 token CE of base + reference adapter (0 where labels are -100), without grad and
        without dropout; the model's train/eval mode is restored."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                names = [ADAPTER] * int(input_ids.shape[0])
                logits = model(input_ids=input_ids, adapter_names=names, use_cache=False).logits
                return token_ce(logits, labels.to(logits.device), self.chunk_tokens)
        finally:
            model.train(was_training)


@contextmanager
def _replicated_load() -> Iterator[None]:
    """While a ZeRO-3 learner's HfDeepSpeedConfig is alive (a DeepSpeed engine's, or a Trainer's
    TrainingArguments'), transformers would build any model partitioned by `zero.Init`, whose weights
    only the learner's engine gathers: the frozen reference is loaded whole meanwhile (the config is set
    aside and put back)."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # no deepspeed integration: nothing partitions
        yield
        return
    held = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = held


def open_token_reference(path: str, *, device: torch.device, mesh: Any = None,
                         peft_model: nn.Module | None = None,
                         where: str = "engine local") -> FrozenReference | AdapterReference:
    """teacher.token_reference as the online reference of token selection: a LoRA adapter directory
    (adapter_config.json) loaded frozen beside the learner's adapter on its peft model (`peft_model`: None
    where the trainer cannot host one, `where` says which), else a model directory as a FrozenReference
    (sharded over `mesh` when given); UserError naming the key otherwise."""
    from attent_scale.errors import UserError

    key = "config key 'teacher.token_reference'"
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"{key}: {path} is not a directory (a model directory or a LoRA adapter directory)")
    if (root / "adapter_config.json").is_file():
        if peft_model is None or not hasattr(peft_model, "peft_config"):
            raise UserError(f"{key}: {path} is a LoRA adapter, which needs the learner's peft model "
                            f"(model.lora.enabled) on {where}; give a model directory instead")
        return AdapterReference(peft_model, root)
    if not (root / "config.json").is_file():
        raise UserError(f"{key}: {path} has neither config.json (a model) nor adapter_config.json (an "
                        "adapter)")
    return FrozenReference(root, device, mesh=mesh)
