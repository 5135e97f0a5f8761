"""DeepSpeed engine: ZeRO stage 2 or 3 from a DeepSpeed JSON, with our batch sizes, optimizer and LR."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from attent_scale.config import RunConfig
from attent_scale.dist import DistInfo, ensure_accelerator_env, init_one_rank_group
from attent_scale.engines.base import BaseEngine, make_adamw, make_scheduler
from attent_scale.errors import UserError
from attent_scale.models import build_model, export_state_dict


def load_ds_config(cfg: RunConfig, world_size: int, device: torch.device) -> dict[str, Any]:
    """Read `engine.deepspeed_config` and fill in what we own: batch sizes, clipping, bf16 'auto'."""
    path = cfg.engine.deepspeed_config
    if not path:
        raise UserError("config key 'engine.deepspeed_config': required when engine.name is 'deepspeed'")
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"config key 'engine.deepspeed_config': {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"config key 'engine.deepspeed_config': {path}: invalid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"config key 'engine.deepspeed_config': {path}: top level must be an object")
    ds = copy.deepcopy(raw)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (2, 3):
        raise UserError(
            f"config key 'engine.deepspeed_config': {path}: zero_optimization.stage must be 2 or 3"
        )
    t = cfg.train
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum_steps
    ds["train_batch_size"] = t.micro_batch_size * t.grad_accum_steps * world_size
    ds["gradient_clipping"] = t.grad_clip
    ds["zero_allow_untested_optimizer"] = True  # our client optimizer is torch AdamW
    mp = cfg.engine.mixed_precision
    bf16 = ds.setdefault("bf16", {})
    if mp != "auto":
        bf16["enabled"] = mp == "bf16"
    elif bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = device.type == "cuda"
    if ds.get("fp16", {}).get("enabled") == "auto":
        ds["fp16"]["enabled"] = False
    return ds


class DeepSpeedEngine(BaseEngine):
    """A DeepSpeedEngine around the HF model; torch AdamW + our LambdaLR as client optimizer/scheduler."""

    def __init__(self, cfg: RunConfig, vocab_size: int | None, info: DistInfo) -> None:
        super().__init__(cfg)
        ensure_accelerator_env()
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        init_one_rank_group(info.device)  # a single process still needs a (one-rank) group
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        self.rank, self.world_size, self.local_rank = dist.get_rank(), dist.get_world_size(), info.local_rank
        self.device = info.device
        self.vocab_size = vocab_size
        self.ds_config = load_ds_config(cfg, self.world_size, self.device)
        self.stage = int(self.ds_config["zero_optimization"]["stage"])
        # Must stay referenced while the model is built (transformers keeps only a weakref): under
        # ZeRO-3 from_config then creates partitioned weights and still runs HF's _init_weights.
        self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        model = build_model(cfg.model, vocab_size, seed=cfg.seed)
        optimizer = None if "optimizer" in self.ds_config else make_adamw(model.parameters(), cfg)
        scheduler = None
        if optimizer is not None and "scheduler" not in self.ds_config:
            scheduler = make_scheduler(optimizer, cfg)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            model_parameters=None
            if optimizer is not None
            else [p for p in model.parameters() if p.requires_grad],
            dist_init_required=False,
        )
        self.model = self.ds.module
        self.group = None
        self.ds.train()

    # --- hooks ---------------------------------------------------------------------------------
    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.ds(input_ids=input_ids, use_cache=False).logits

    def _backward(self, loss: torch.Tensor, nonfinite: bool) -> None:
        # Our micro loss is already weighted by the batch's token count: no extra 1/GAS here.
        # A non-finite loss is turned into NaN gradients so DeepSpeed's global grad-norm check skips
        # the step on every rank at once (the norm is all-reduced), keeping ranks in lockstep.
        if nonfinite:
            loss = loss * float("nan")
        self.ds.backward(loss, scale_wrt_gas=False)
        self.ds.step()  # a no-op until the gradient-accumulation boundary

    def _optimizer_step(self, nonfinite: bool) -> tuple[float, bool]:
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        applied = bool(self.ds.was_step_applied()) and not nonfinite and math.isfinite(norm)
        return norm, applied

    def _set_train(self, mode: bool) -> None:
        self.ds.train(mode)

    def current_lr(self) -> float:
        return float(self.ds.get_lr()[0])

    # --- state -----------------------------------------------------------------------------------
    def save(self, ckpt_dir: str | Path, tag: str) -> None:
        """DeepSpeed checkpoint into `ckpt_dir/tag/` (call on every rank with the same tag)."""
        self.ds.save_checkpoint(
            str(ckpt_dir), tag=tag, client_state={"steps_done": self.steps_done}, save_latest=False
        )

    def load(self, ckpt_dir: str | Path, tag: str) -> None:
        """Restore model, optimizer and LR scheduler (every rank, same tag)."""
        path, client = self.ds.load_checkpoint(
            str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise UserError(f"no DeepSpeed checkpoint '{tag}' in {ckpt_dir}")
        self.steps_done = int((client or {}).get("steps_done", 0))

    def full_state_dict(self) -> dict[str, Any] | None:
        """All weights gathered on every rank, copied to CPU on rank 0 (collective under ZeRO-3)."""
        import deepspeed

        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.stage == 3):
            if self.rank != 0:
                return None
            return {
                k: v.detach().to("cpu", torch.float32).clone() for k, v in self.model.state_dict().items()
            }

    def export(self, out_dir: str | Path) -> None:
        """Adapters (LoRA), merged weights on request, or the full model as safetensors, by rank 0."""
        sd = self.full_state_dict()
        if self.rank == 0 and sd is not None:
            export_state_dict(sd, self.cfg.model, self.vocab_size, out_dir)
        dist.barrier()
