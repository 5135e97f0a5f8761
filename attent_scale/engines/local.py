"""Single-process engine: the model on one device, torch AdamW, no distributed init."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import torch

from attent_scale.config import RunConfig
from attent_scale.engines.base import (
    BaseEngine,
    StepOutcome,
    log_rank0,
    make_adamw,
    make_scheduler,
    resolve_dtype,
    resume_lr,
)
from attent_scale.errors import UserError
from attent_scale.export import export_model
from attent_scale.models import build_model, prepare_init_from


class LocalEngine(BaseEngine):
    """One process; weights in fp32, bf16 autocast on CUDA when mixed precision resolves to bf16."""

    def __init__(self, cfg: RunConfig, vocab_size: int | None, device: torch.device | None = None) -> None:
        super().__init__(cfg)
        self.vocab_size = vocab_size
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype, why = resolve_dtype(cfg.engine.mixed_precision, self.device)
        log_rank0(self.rank, f"{why}; compute dtype {str(self.dtype).removeprefix('torch.')}")
        # a .gguf start becomes a safetensors directory in run_dir first (rank 0 writes, all wait)
        self.model_cfg = prepare_init_from(cfg.model, cfg.run_dir, rank=self.rank, barrier=self._barrier)
        self.model = build_model(self.model_cfg, vocab_size, seed=cfg.seed).to(self.device)
        self._wrap()
        self.optimizer = make_adamw(self.model.parameters(), cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, lambda: self.total_steps)
        self.model.train()

    def _wrap(self) -> None:
        """Hook for sharding wrappers (FSDP); nothing to do on one process."""

    def _barrier(self) -> None:
        """Wait for every rank (a no-op on one process)."""

    # --- hooks ---------------------------------------------------------------------------------
    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        autocast = self.dtype != torch.float32 and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast):
            return self.model(input_ids=input_ids, use_cache=False).logits

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()  # a non-finite loss gives non-finite grads: the step is skipped after the fact

    def _any_rank(self, flag: torch.Tensor) -> torch.Tensor:
        """Max of a device flag over the ranks (identity on one process); no host sync."""
        return flag

    def _clip(self) -> torch.Tensor:
        """Global grad norm before clipping, as a device tensor; clips in place."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return norm

    def _optimizer_step(self, loss: torch.Tensor, per_sample: torch.Tensor) -> StepOutcome:
        norm = self._clip()
        # skip on every rank together when any rank's loss or the global norm is non-finite
        bad_loss = self._any_rank((~torch.isfinite(loss)).float().reshape(1))
        host_bad, host_norm, host_loss, host_ps = self._to_host(bad_loss, norm, loss, per_sample)
        loss_value, grad_norm = float(host_loss[0]), float(host_norm[0])
        if host_bad[0] > 0 or not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return loss_value, host_ps, float("nan") if host_bad[0] > 0 else grad_norm, False
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, host_ps, grad_norm, True

    def _set_train(self, mode: bool) -> None:
        if self.model.training != mode:  # every train_step asks: walking the modules costs more than this
            self.model.train(mode)

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # --- state -----------------------------------------------------------------------------------
    def save(self, ckpt_dir: str | Path, tag: str) -> None:
        """Write model, optimizer and scheduler state to `ckpt_dir/tag/engine.pt`."""
        path = Path(ckpt_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "steps_done": self.steps_done,
        }
        with (path / "engine.pt").open("wb") as f:  # a failed write keeps its OSError (disk full)
            torch.save(state, f)

    def load(self, ckpt_dir: str | Path, tag: str) -> None:
        """Restore what `save` wrote."""
        file = Path(ckpt_dir) / tag / "engine.pt"
        try:  # tensors and plain containers only: a tampered file cannot run code
            state = torch.load(file, map_location=self.device, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UserError(f"{file}: not a checkpoint this engine wrote (it holds objects other than "
                            f"tensors and plain values: {str(exc).splitlines()[0][:200]})") from None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        resume_lr(self.optimizer, self.scheduler, self.cfg.train.lr, self.rank)
        self.steps_done = int(state["steps_done"])

    can_reshard = True  # one rank: nothing to reshard

    def verify(self, ckpt_dir: str | Path, tag: str) -> str | None:
        """The first problem with this rank's part of a checkpoint (None: it looks whole)."""
        from attent_scale.checkpoint import check_torch_zip

        file = Path(ckpt_dir) / tag / "engine.pt"
        if not file.exists():
            return f"{tag}/engine.pt missing"
        problem = check_torch_zip(file)
        return None if problem is None else f"{tag}/engine.pt {problem}"

    def full_state_dict(self) -> dict[str, Any] | None:
        """The whole model's state dict on CPU on rank 0 (None elsewhere); collective when sharded."""
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in self.model.state_dict().items()}

    def export(self, out_dir: str | Path, tokenizer_dir: Path | None = None) -> None:
        """Write adapters (LoRA), merged weights on request, or the full model as safetensors (rank 0),
        whole or not at all (attent_scale/export.py); collective."""
        export_model(self.full_state_dict(), out_dir, rank=self.rank, group=self.group, mcfg=self.model_cfg,
                     vocab_size=self.vocab_size, dtype=self.cfg.checkpoint.export_dtype,
                     tokenizer_dir=tokenizer_dir)
