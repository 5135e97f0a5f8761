"""FSDP2 engine: `fully_shard` per transformer block then the root; state via torch.distributed.checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from attent_scale.config import RunConfig
from attent_scale.dist import DistInfo, init_one_rank_group
from attent_scale.engines.base import resume_lr
from attent_scale.engines.local import LocalEngine
from attent_scale.models import transformer_blocks


class FSDPEngine(LocalEngine):
    """Parameters, grads and optimizer state sharded over all ranks; bf16 compute on GPU."""

    def __init__(self, cfg: RunConfig, vocab_size: int | None, info: DistInfo) -> None:
        init_one_rank_group(info.device)  # a no-op under torchrun
        self.rank, self.world_size, self.local_rank = info.rank, info.world_size, info.local_rank
        self.mesh = init_device_mesh(info.device.type, (info.world_size,))
        self.group = self.mesh.get_group()
        super().__init__(cfg, vocab_size, device=info.device)

    def _wrap(self) -> None:
        mp = None
        if self.dtype != torch.float32:
            mp = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        kwargs: dict[str, Any] = {"mesh": self.mesh}
        if mp is not None:
            kwargs["mp_policy"] = mp
        for block in transformer_blocks(self.model):
            fully_shard(block, **kwargs)
        fully_shard(self.model, **kwargs)
        self.dtype = torch.float32  # FSDP casts parameters itself; no autocast on top

    def _barrier(self) -> None:
        dist.barrier(group=self.group)

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        # Gradients are reduce-scattered only after the last micro batch; the earlier ones accumulate
        # unsharded (in the fp32 reduce dtype). Backward always runs: it holds collectives.
        self.model.set_requires_gradient_sync(last)
        loss.backward()

    def _any_rank(self, flag: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return flag

    def save(self, ckpt_dir: str | Path, tag: str) -> None:
        """Sharded model + optimizer via DCP into `ckpt_dir/tag/`; scheduler state by rank 0 as JSON."""
        path = Path(ckpt_dir) / tag
        msd, osd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
        if self.rank == 0:
            meta = {"scheduler": self.scheduler.state_dict(), "steps_done": self.steps_done}
            (path / "engine.json").write_text(json.dumps(meta))
        dist.barrier(group=self.group)

    def load(self, ckpt_dir: str | Path, tag: str) -> None:
        """Restore what `save` wrote (every rank, same tag)."""
        path = Path(ckpt_dir) / tag
        msd, osd = get_state_dict(self.model, self.optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        meta = json.loads((path / "engine.json").read_text())
        self.scheduler.load_state_dict(meta["scheduler"])
        resume_lr(self.optimizer, self.scheduler, self.cfg.train.lr, self.rank)
        self.steps_done = int(meta["steps_done"])

    can_reshard = True  # DCP reshards on load: a checkpoint of W ranks loads on any other W'

    def verify(self, ckpt_dir: str | Path, tag: str) -> str | None:
        """The first problem with the DCP checkpoint (every storage file as long as its metadata says),
        or None; cheap: the metadata and file sizes, not the data."""
        from torch.distributed.checkpoint import FileSystemReader

        path = Path(ckpt_dir) / tag
        meta_file = path / "engine.json"
        if not (path / ".metadata").exists():
            return f"{tag}/.metadata missing"
        try:
            json.loads(meta_file.read_text())
        except (OSError, ValueError):
            return f"{tag}/engine.json missing or truncated"
        try:
            meta = FileSystemReader(str(path)).read_metadata()
        except Exception:  # a truncated pickle raises any of several types
            return f"{tag}/.metadata truncated or unreadable"
        need: dict[str, int] = {}
        for info in (meta.storage_data or {}).values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
        for name, size in sorted(need.items()):
            file = path / name
            if not file.exists():
                return f"{tag}/{name} missing"
            if file.stat().st_size < size:
                return f"{tag}/{name} truncated"
        return None

    def full_state_dict(self) -> dict[str, Any] | None:
        sd = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.rank != 0:
            return None
        return {k: v.detach().to(torch.float32) for k, v in sd.items()}
