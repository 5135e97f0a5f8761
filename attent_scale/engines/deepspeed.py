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
from attent_scale.dist import DistInfo, ensure_accelerator_env, init_deepspeed_comm, init_one_rank_group
from attent_scale.engines.base import (
    BaseEngine,
    StepOutcome,
    log_rank0,
    make_adamw,
    make_scheduler,
    resolve_dtype,
)
from attent_scale.errors import UserError
from attent_scale.models import build_model, export_state_dict, prepare_init_from


def ds_config_path(value: str | None) -> Path:
    """`engine.deepspeed_config`: a file; the bare name of a packaged JSON (`deepspeed_zero2`); unset: the
    packaged ZeRO-3 JSON."""
    from attent_scale import assets

    if not value:
        return assets.deepspeed_default()
    given = Path(value)
    packaged = assets.root() / "configs" / f"{value}.json"
    if not given.exists() and assets.is_bare_name(value) and packaged.is_file():
        return packaged
    return given


def load_ds_config(
    cfg: RunConfig, world_size: int, device: torch.device, bf16_supported: bool | None = None
) -> dict[str, Any]:
    """Read `engine.deepspeed_config` and fill in what we own: batch sizes, clipping, bf16 'auto', and
    fp32 gradient accumulation and reduction unless the JSON sets `data_types.grad_accum_dtype` /
    `communication_data_type` itself (DeepSpeed's defaults follow the bf16 model dtype)."""
    path = ds_config_path(cfg.engine.deepspeed_config)
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
    if mp != "auto" or bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = resolve_dtype(mp, device, bf16_supported)[0] == torch.bfloat16
    if ds.get("fp16", {}).get("enabled") == "auto":
        ds["fp16"]["enabled"] = False
    ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    ds.setdefault("communication_data_type", "fp32")
    return ds


class DeepSpeedEngine(BaseEngine):
    """A DeepSpeedEngine around the HF model; torch AdamW + our LambdaLR as client optimizer/scheduler."""

    def __init__(self, cfg: RunConfig, vocab_size: int | None, info: DistInfo) -> None:
        super().__init__(cfg)
        ensure_accelerator_env()
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        init_one_rank_group(info.device)  # a single process still needs a (one-rank) group
        init_deepspeed_comm()
        self.rank, self.world_size, self.local_rank = dist.get_rank(), dist.get_world_size(), info.local_rank
        self.device = info.device
        self.vocab_size = vocab_size
        self.ds_config = load_ds_config(cfg, self.world_size, self.device)
        self.stage = int(self.ds_config["zero_optimization"]["stage"])
        self.dtype = torch.bfloat16 if self.ds_config["bf16"]["enabled"] else torch.float32
        log_rank0(self.rank, f"deepspeed ZeRO-{self.stage}: bf16 {self.ds_config['bf16']['enabled']}, "
                  f"grad accumulation {self.ds_config['data_types']['grad_accum_dtype']}, "
                  f"communication {self.ds_config['communication_data_type']}")
        # Must stay referenced while the model is built (transformers keeps only a weakref): under
        # ZeRO-3 from_config then creates partitioned weights and still runs HF's _init_weights.
        self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        # A .gguf start is dequantized by rank 0 into run_dir/init_model-<hash> first: a GGUF-loaded model is
        # flagged quantized, which skips zero.Init; from the safetensors only rank 0 reads the values.
        self.model_cfg = prepare_init_from(cfg.model, cfg.run_dir, rank=self.rank, barrier=dist.barrier)
        model = build_model(self.model_cfg, vocab_size, seed=cfg.seed)
        optimizer = None if "optimizer" in self.ds_config else make_adamw(model.parameters(), cfg)
        scheduler = None
        if optimizer is not None and "scheduler" not in self.ds_config:
            scheduler = make_scheduler(optimizer, cfg, lambda: self.total_steps)
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
        if self.stage == 3:  # what this rank holds of the weights (its partition, small params in full)
            params = [p for p in self.model.parameters() if hasattr(p, "ds_tensor")]
            held, total = sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)
            log_rank0(self.rank, f"ZeRO-3: rank 0 holds {held} of {total} parameter elements")
        self.group = None
        self.ds.train()

    # --- hooks ---------------------------------------------------------------------------------
    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.ds(input_ids=input_ids, use_cache=False).logits

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        # Our micro loss is already weighted by the batch's token count: no extra 1/GAS here.
        # A non-finite loss is turned into NaN gradients (decided on the device, no host sync) so
        # DeepSpeed's global grad-norm check skips the step on every rank at once (the norm is
        # all-reduced), keeping ranks in lockstep.
        loss = loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
        self.ds.backward(loss, scale_wrt_gas=False)
        self.ds.step()  # a no-op until the gradient-accumulation boundary

    def _optimizer_step(self, loss: torch.Tensor, per_sample: torch.Tensor) -> StepOutcome:
        norm = self.ds.get_global_grad_norm()
        tensors = [loss, per_sample]
        if isinstance(norm, torch.Tensor):
            tensors.append(norm.to(loss.device))
        host = self._to_host(*tensors)
        loss_value, host_ps = float(host[0][0]), host[1]
        norm = float(host[2][0]) if len(host) > 2 else (float(norm) if norm is not None else float("nan"))
        applied = bool(self.ds.was_step_applied()) and math.isfinite(loss_value) and math.isfinite(norm)
        return loss_value, host_ps, norm, applied

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

    can_reshard = False  # a ZeRO checkpoint's partitions are tied to the world size that wrote them

    def verify(self, ckpt_dir: str | Path, tag: str) -> str | None:
        """The first problem with this rank's share of the checkpoint's files (zip structure), or None."""
        from attent_scale.checkpoint import check_torch_zip

        path = Path(ckpt_dir) / tag
        files = sorted(path.glob("*.pt"))
        if not files:
            return f"{tag}/ has no DeepSpeed files"
        for file in files[self.rank::max(1, self.world_size)]:
            problem = check_torch_zip(file)
            if problem is not None:
                return f"{tag}/{file.name} {problem}"
        return None

    def full_state_dict(self) -> dict[str, Any] | None:
        """All weights on CPU on rank 0 (None elsewhere); collective. Trainable parameters come from the
        optimizer's fp32 master copy, not the (possibly bf16) module parameter."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        masters: dict[int, torch.Tensor] = {}
        for param in self.model.parameters():  # same order on every rank: each call is a collective
            if param.requires_grad:
                fp32 = safe_get_full_fp32_param(param)
                if fp32 is not None and self.rank == 0:
                    masters[id(param)] = fp32.detach().to("cpu", torch.float32).clone()
        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.stage == 3):
            if self.rank != 0:
                return None
            sd = {k: v.detach().to("cpu", torch.float32).clone() for k, v in self.model.state_dict().items()}
        for name, param in self.model.named_parameters(remove_duplicate=False):  # tied names share one
            if id(param) in masters and name in sd:
                sd[name] = masters[id(param)].view(sd[name].shape)
        return sd

    def export(self, out_dir: str | Path) -> None:
        """Adapters (LoRA), merged weights on request, or the full model as safetensors, by rank 0."""
        sd = self.full_state_dict()
        if self.rank == 0 and sd is not None:
            export_state_dict(sd, self.model_cfg, self.vocab_size, out_dir,
                              dtype=self.cfg.checkpoint.export_dtype)
        dist.barrier()
