"""Checkpoints beside the engine's: per-rank trainer, teacher, stream and RNG state; atomic; keep last K."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from attent_scale.errors import UserError

_STEP_DIR = re.compile(r"^step-(\d{8})$")
_SEP = "/"


def _split(state: Any, prefix: str, tensors: dict[str, torch.Tensor], seen: dict[Any, str] | None = None
           ) -> Any:
    """Move every tensor/ndarray of a nested state into `tensors`; return the JSON-able remainder. An array
    object met twice (e.g. the epoch's selection bits held by the trainer and by the teacher) is stored
    once and referenced."""
    seen = {} if seen is None else seen
    if isinstance(state, (torch.Tensor, np.ndarray)):
        tag = "__tensor__" if isinstance(state, torch.Tensor) else "__ndarray__"
        if isinstance(state, torch.Tensor):
            key = (tag, state.data_ptr(), state.nbytes, str(state.dtype), tuple(state.shape))
        else:
            key = (tag, state.__array_interface__["data"][0], state.nbytes, state.dtype.str, state.shape)
        if key in seen:  # the same memory (after a resume, two arrays over one loaded tensor)
            return {tag: seen[key]}
        seen[key] = prefix
        if isinstance(state, torch.Tensor):
            tensors[prefix] = state.detach().cpu().contiguous()
        else:
            tensors[prefix] = torch.from_numpy(np.ascontiguousarray(state))
        return {tag: prefix}
    if isinstance(state, dict):
        return {str(k): _split(v, f"{prefix}{_SEP}{k}", tensors, seen) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return {"__list__": [_split(v, f"{prefix}{_SEP}{i}", tensors, seen) for i, v in enumerate(state)]}
    if isinstance(state, (np.integer, np.floating)):
        return state.item()
    return state


def _join(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__ndarray__" in node:
            return tensors[node["__ndarray__"]].numpy()
        if "__list__" in node:
            return [_join(v, tensors) for v in node["__list__"]]
        return {k: _join(v, tensors) for k, v in node.items()}
    return node


def save_state(path_stem: Path, state: dict[str, Any]) -> None:
    """Write `state` as `<stem>.safetensors` (tensors) plus `<stem>.json` (everything else)."""
    tensors: dict[str, torch.Tensor] = {}
    rest = _split(state, "", tensors)
    save_file(tensors, str(path_stem.with_suffix(".safetensors")))
    path_stem.with_suffix(".json").write_text(json.dumps(rest))


def load_state(path_stem: Path) -> dict[str, Any]:
    tensors = load_file(str(path_stem.with_suffix(".safetensors")))
    rest = json.loads(path_stem.with_suffix(".json").read_text())
    return _join(rest, tensors)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": {"keys": np_state[1], "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"], n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / "COMPLETE").exists():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(run_dir: str | Path, step: int, engine: Any, rank_state: dict[str, Any], *,
                    rank: int, world_size: int, keep_last: int) -> Path:
    """Collective: every rank writes into a temp dir, rank 0 marks it complete and renames it."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save(tmp, "engine")
    save_state(tmp / f"rank-{rank:05d}", rank_state)
    _barrier()
    if rank == 0:
        (tmp / "COMPLETE").write_text(json.dumps({"step": step, "world_size": world_size}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, engine: Any, *, rank: int, world_size: int) -> dict[str, Any]:
    """Collective: restore the engine and return this rank's own state."""
    saved_world = json.loads((path / "COMPLETE").read_text()).get("world_size")
    if saved_world != world_size:  # same file on every rank, so every rank raises together
        raise UserError(f"checkpoint {path}: written by {saved_world} ranks, this job has {world_size}; "
                        "resume with the same world size")
    engine.load(path, "engine")
    return load_state(path / f"rank-{rank:05d}")
