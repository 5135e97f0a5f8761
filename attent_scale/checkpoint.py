"""Checkpoints beside the engine's: per-rank trainer, teacher, stream and RNG state; atomic; keep last K;
the newest undamaged one is found on resume."""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from attent_scale.dist import all_gather_objects, initialized
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


def _join(node: Any, tensors: Any) -> Any:
    """Inverse of _split: `tensors` maps keys to tensors (or, for a lazy read, to LazyTensor handles)."""
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__ndarray__" in node:
            t = tensors[node["__ndarray__"]]
            if isinstance(t, LazyTensor):
                t.as_numpy = True
                return t
            return t.numpy()
        if "__list__" in node:
            return [_join(v, tensors) for v in node["__list__"]]
        return {k: _join(v, tensors) for k, v in node.items()}
    return node


class LazyTensor:
    """One tensor of a state file, read only when sliced (`x[a:b]`) or loaded (`x.load()`): a rank that
    re-blocks another world size's ledger reads just the ids of its own block."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key
        self.as_numpy = False  # saved as an ndarray: load() gives one back
        with safe_open(str(path), "pt") as f:
            self.shape = tuple(f.get_slice(key).get_shape())

    def __getitem__(self, index: slice) -> torch.Tensor:
        with safe_open(str(self.path), "pt") as f:
            return f.get_slice(self.key)[index]

    def __len__(self) -> int:
        return self.shape[0]

    def load(self) -> Any:
        with safe_open(str(self.path), "pt") as f:
            t = f.get_tensor(self.key)
        return t.numpy() if self.as_numpy else t


def materialize(node: Any) -> Any:
    """`node` with every LazyTensor read in full (ndarray positions get numpy arrays back)."""
    if isinstance(node, LazyTensor):
        return node.load()
    if isinstance(node, dict):
        return {k: materialize(v) for k, v in node.items()}
    if isinstance(node, list):
        return [materialize(v) for v in node]
    return node


def split_tensors(state: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
    """`state` as (its JSON-able remainder, its tensors by key): arrays become CPU tensors (save_state's
    layout, for a checkpoint dict that must load with torch.load(weights_only=True))."""
    tensors: dict[str, torch.Tensor] = {}
    return _split(state, "", tensors), tensors


def join_tensors(rest: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of split_tensors."""
    return _join(rest, tensors)


def save_state(path_stem: Path, state: dict[str, Any]) -> None:
    """Write `state` as `<stem>.safetensors` (tensors) plus `<stem>.json` (everything else)."""
    tensors: dict[str, torch.Tensor] = {}
    rest = _split(state, "", tensors)
    save_file(tensors, str(path_stem.with_suffix(".safetensors")))
    path_stem.with_suffix(".json").write_text(json.dumps(rest))


def load_state(path_stem: Path, *, lazy: bool = False) -> dict[str, Any]:
    """Read what save_state wrote; `lazy`: tensors become LazyTensor handles (read on use)."""
    file = path_stem.with_suffix(".safetensors")
    rest = json.loads(path_stem.with_suffix(".json").read_text())
    if not lazy:
        return _join(rest, load_file(str(file)))
    return _join(rest, _LazyTensors(file))


class _LazyTensors:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __getitem__(self, key: str) -> LazyTensor:
        return LazyTensor(self.path, key)


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


def move_aside_earlier(run_dir: str | Path) -> str | None:
    """A fresh run (checkpoint.resume=false) in a run_dir that holds an earlier run's checkpoints: rename
    run_dir/checkpoints to checkpoints.before-<UTC time> (kept, never deleted: a later resume must not mix
    the two runs, nor pick the earlier run's newer step). Rank 0 only, before the run writes any. Returns
    the line saying so (None: nothing there)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir() or not any(root.iterdir()):
        return None
    found = list_checkpoints(run_dir)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = root.with_name(f"{root.name}.before-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = root.with_name(f"{root.name}.before-{stamp}-{n}")
    try:
        root.rename(aside)
    except OSError as exc:
        raise UserError(f"run_dir {run_dir}: checkpoint.resume=false, but {root} holds an earlier run's "
                        f"checkpoints and cannot be moved aside ({exc.strerror or exc}); move it yourself, "
                        "choose another run_dir, or resume (checkpoint.resume=true)") from None
    newest = f" (newest: {found[-1][1].name})" if found else ""
    return (f"attent-scale: checkpoint.resume=false: {root} held an earlier run's checkpoints{newest}; moved "
            f"to {aside} so that no later resume mixes the two runs (remove it when you no longer need it)")


NONFINITE = "NONFINITE"  # a checkpoint's COMPLETE renamed: its weights gave non-finite losses; never resumed


def set_aside_nonfinite(run_dir: str | Path, step: int, in_row: int, *, rank: int, group: Any = None) -> str:
    """Collective, after `in_row` non-finite training losses ending at `step`: a non-finite step changes no
    weight, so every checkpoint from the step before the first of them on holds the weights that gave
    them. Rank 0 renames their COMPLETE to NONFINITE (kept for a look, never resumed: a rerun resumes the
    last checkpoint before them, or starts over). Returns the one line saying so, the same on every rank."""
    first = step - in_row + 1
    if rank == 0:
        aside = [p for s, p in list_checkpoints(run_dir) if s >= first - 1]
        for path in aside:
            (path / "COMPLETE").rename(path / NONFINITE)
        left = latest_checkpoint(run_dir)
        names = ", ".join(p.name for p in aside)
        held = (f"{names} {'holds' if len(aside) == 1 else 'hold'} the weights that gave them, set aside "
                f"(COMPLETE renamed {NONFINITE}: never resumed); ") if aside else ""
        rerun = f"a rerun resumes from {left}, the last checkpoint before them" if left is not None else \
            "no checkpoint before them: a rerun starts over"
        line = (f"{in_row} non-finite training steps (loss or gradient norm) in a row at steps "
                f"{first}-{step}; {held}{rerun} (lower train.lr?)")
    else:
        line = None
    return all_gather_objects(line, group)[0]


def _barrier() -> None:
    if initialized():
        dist.barrier()


def _write_error(exc: BaseException) -> str:
    """A one-line reason for a failed write (disk full named as such, also under torch.save's wrapper)."""
    inner: BaseException | None = exc
    while inner is not None and not isinstance(inner, OSError):
        inner = inner.__cause__ or inner.__context__
    if inner is not None:
        exc = inner
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"disk full ({exc.strerror})"
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _agree(error: str | None, group: Any) -> str | None:
    """Collective: None when no rank failed, else this rank's reason (or that another rank failed)."""
    from attent_scale.dist import all_reduce_flag

    ok = all_reduce_flag(error is None, "min", group)
    if ok:
        return None
    return error or "the write failed on another rank"


def save_checkpoint(run_dir: str | Path, step: int, engine: Any, rank_state: dict[str, Any], *,
                    rank: int, world_size: int, keep_last: int, config: dict[str, Any] | None = None,
                    group: Any = None) -> Path:
    """Collective: every rank writes into a temp dir, rank 0 marks it complete and renames it. A failed
    write (a full disk) removes the temp dir on every rank and raises one UserError; the checkpoints
    already there stay as they were."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"

    # imported here: torch.distributed.checkpoint pulls in DTensor and sympy, ~1 CPU-s of every start-up
    from torch.distributed.checkpoint.api import CheckpointException

    def phase(fn: Any) -> None:
        error = None
        try:
            fn()
        # torch.save reports a failed write as a RuntimeError, DCP as a CheckpointException on every rank
        except (OSError, RuntimeError, CheckpointException) as exc:
            error = _write_error(exc)
        reason = _agree(error, group)
        if reason is not None:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            _barrier()
            previous = latest_checkpoint(run_dir)
            kept = f"; {previous.name} kept" if previous is not None else ""
            raise UserError(f"checkpoint {final}: write failed on rank {rank}: {reason}; "
                            f"no partial checkpoint left{kept}")

    def start() -> None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write() -> None:
        engine.save(tmp, "engine")
        save_state(tmp / f"rank-{rank:05d}", rank_state)

    def complete() -> None:
        if rank == 0:
            if config is not None:
                (tmp / "config.json").write_text(json.dumps(config))
            (tmp / "COMPLETE").write_text(json.dumps({"step": step, "world_size": world_size}))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)

    phase(start)
    _barrier()
    phase(write)
    phase(complete)
    if rank == 0:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


class Checkpointer:
    """Periodic checkpoints of one run: decides when one is due (checkpoint.every_steps / every_minutes)
    and writes it (`save_checkpoint`), timing each write."""

    def __init__(self, run_dir: str | Path, *, every_steps: int, every_minutes: float, keep_last: int,
                 rank: int, world_size: int, group: Any = None) -> None:
        self.run_dir, self.every_steps, self.every_minutes = Path(run_dir), every_steps, every_minutes
        self.keep_last, self.rank, self.world_size, self.group = keep_last, rank, world_size, group
        self.last_save = time.perf_counter()  # every_minutes counts from the start or the last checkpoint

    @property
    def enabled(self) -> bool:
        """Does the run checkpoint at all (a last checkpoint at its end)?"""
        return bool(self.every_steps)

    def late(self) -> bool:
        """Has checkpoint.every_minutes passed on this rank's clock? (Ranks agree on it in the stop poll.)"""
        every = self.every_minutes * 60
        return bool(every) and time.perf_counter() - self.last_save >= every

    def should_save(self, step: int, *, last_step: int, late: bool = False) -> bool:
        """Is a periodic checkpoint due after `step`? `late`: some rank's every_minutes has passed. Never
        at `last_step`: the run's end writes its own."""
        due = late or (bool(self.every_steps) and step % self.every_steps == 0)
        return due and step < last_step

    def save(self, step: int, engine: Any, rank_state: dict[str, Any], config: dict[str, Any] | None = None
             ) -> float:
        """Collective: write checkpoint `step`; returns the seconds it took."""
        t0 = time.perf_counter()
        save_checkpoint(self.run_dir, step, engine, rank_state, rank=self.rank, world_size=self.world_size,
                        keep_last=self.keep_last, config=config, group=self.group)
        self.last_save = time.perf_counter()
        return self.last_save - t0


# ---- reading back: which checkpoint, is it whole, what changed ------------------------------------


def saved_world(path: Path) -> int:
    """The number of ranks that wrote the checkpoint at `path`."""
    return int(json.loads((path / "COMPLETE").read_text())["world_size"])


def saved_config(path: Path) -> dict[str, Any] | None:
    """The run config the checkpoint was written under (None for checkpoints older than that record)."""
    file = path / "config.json"
    return json.loads(file.read_text()) if file.exists() else None


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def changed_keys(saved: dict[str, Any], now: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """'key: old -> new' for every config key under `keys` (dotted prefixes) that differs."""
    a, b = _flat(saved), _flat(now)
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or key.startswith(k + ".") for k in keys) and a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


def data_changes(path: Path, saved: dict[str, Any], now: dict[str, Any], n_train: int) -> list[str]:
    """A checkpoint written for another number of training samples than the run's data has now: one item
    naming data.dir (moved to other data, or rebuilt in place) or data.sources, with both counts. The
    count is rank 0's teacher state (a JSON field, the same on every rank)."""
    try:
        written = int(json.loads((path / "rank-00000.json").read_text())["teacher"]["num_samples"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return []  # an older layout: the teacher's own check still refuses a mismatch
    if written == n_train:
        return []
    data = now.get("data") or {}
    counts = f"split {data.get('train_split', 'train')!r}: {written} samples when written, {n_train} now"
    if data.get("sources"):
        return [f"data.sources ({counts})"]
    old, new = (saved.get("data") or {}).get("dir"), data.get("dir")
    if old != new:
        return [f"data.dir {old!r} -> {new!r} ({counts})"]
    return [f"data.dir {new!r} rebuilt since ({counts})"]


def check_safetensors(path: Path) -> str | None:
    """None when the file is a whole safetensors file (its header's data size matches the file size)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 + n:
                return "truncated"
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    except (ValueError, KeyError, TypeError):
        return "not a safetensors file"
    return None if size == 8 + n + end else "truncated"


def check_json(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    except ValueError:
        return "truncated or not JSON"
    return None


def check_torch_zip(path: Path) -> str | None:
    """None when `path` is a torch.save zip whose members all lie inside the file (a cheap check: the
    central directory and member offsets, not the data's CRCs)."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.header_offset + info.compress_size > size:
                    return "truncated"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    except zipfile.BadZipFile:
        return "truncated or not a torch checkpoint"
    return None


def check_rank_files(path: Path, ranks: list[int]) -> str | None:
    """The first problem with the state files of `ranks` in checkpoint `path` ('file: why'), or None."""
    for r in ranks:
        stem = path / f"rank-{r:05d}"
        for file, check in ((stem.with_suffix(".json"), check_json),
                            (stem.with_suffix(".safetensors"), check_safetensors)):
            if not file.exists():
                return f"{file.name} missing"
            problem = check(file)
            if problem is not None:
                return f"{file.name} {problem}"
    return None


def find_checkpoint(run_dir: str | Path, verify: Any, *, rank: int, group: Any = None
                    ) -> tuple[Path | None, list[str]]:
    """Collective: the newest checkpoint every rank finds whole (`verify(path) -> problem or None` checks
    this rank's part), and 'name (problem)' for each newer one skipped. Every rank returns the same."""
    skipped: list[str] = []
    found = list_checkpoints(run_dir)
    for _, path in reversed(found):
        try:
            problem = verify(path)
        except (OSError, ValueError, KeyError) as exc:
            problem = _write_error(exc)
        problems = all_gather_objects(problem, group)
        bad = [f"rank {r}: {p}" if len(problems) > 1 else p for r, p in enumerate(problems) if p is not None]
        if not bad:
            return path, skipped
        skipped.append(f"{path.name} ({bad[0]})")
    if found:
        raise UserError(f"run_dir {run_dir}: no undamaged checkpoint to resume from: {'; '.join(skipped)} "
                        "(remove them, or set checkpoint.resume=false to start over)")
    return None, skipped


def load_checkpoint(path: Path, engine: Any, *, rank: int, world_size: int) -> dict[str, Any]:
    """Collective: restore the engine and return this rank's own state (same world size only)."""
    saved = saved_world(path)
    if saved != world_size:  # same file on every rank, so every rank raises together
        raise UserError(f"checkpoint {path}: written by {saved} ranks, this job has {world_size}; "
                        "resume with the same world size")
    engine.load(path, "engine")
    from attent_scale.train_state import upgrade_state

    return upgrade_state(load_state(path / f"rank-{rank:05d}"))
