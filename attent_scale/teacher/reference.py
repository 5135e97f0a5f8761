"""Reference scores (per-sample losses of a reference model, keyed by id): file format, checks, reading."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from attent_scale.errors import UserError

SCORES_FORMAT = "attent-scale-scores/1"
LOSS_KEY = "loss"  # float32 [N]: the loss of sample id i at index i
VAL_HIST_KEY = "val_hist"  # int64 [models, bins] (optional): each fold model's val losses (signals bins)
READ_GAP = 1024  # Reference.losses reads ids closer than this many as one run (4 KiB of losses)


def manifest_sha256(manifest: Any) -> str:
    """sha256 of a shard set's manifest.json (it names every shard's and the tokenizer's sha256)."""
    from attent_scale.data.manifest import MANIFEST_NAME

    if hasattr(manifest, "content_sha256"):  # a blend: its sources' manifests and weights
        return str(manifest.content_sha256())
    known = getattr(manifest, "sha256", "")  # a loaded Manifest's (also for a URL)
    return known or hashlib.sha256((Path(manifest.dir) / MANIFEST_NAME).read_bytes()).hexdigest()


def scores_metadata(manifest: Any, split: str, model_sha256: str) -> dict[str, str]:
    """What a scores file says about where its numbers come from (safetensors metadata: strings)."""
    return {
        "format": SCORES_FORMAT,
        "manifest_sha256": manifest_sha256(manifest),
        "tokenizer_sha256": manifest.tokenizer_sha256,
        "vocab_size": str(manifest.vocab_size),
        "split": split,
        "num_samples": str(manifest.num_samples(split)),
        "model_sha256": model_sha256,
    }


def read_metadata(path: str | Path) -> dict[str, str] | None:
    """The metadata of a scores file, or None when it is absent or not a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return dict(f.metadata() or {})
    except Exception:  # OSError, or safetensors' own error type for a file that is not one
        return None


class Reference:
    """A reference scores file checked against the data a run trains on. Reads only the losses asked for
    (a chunk of the ledger block a rank owns, an online batch's ids), each time from the file: nothing of
    size N is held."""

    def __init__(self, path: str | Path, manifest: Any, split: str, *,
                 num_samples: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: reference scores not found (teacher.reference; "
                            "write them with `attent-scale score`)")
        meta = read_metadata(self.path)
        if meta is None or meta.get("format") != SCORES_FORMAT:
            raise UserError(f"{self.path}: not a scores file written by `attent-scale score`")
        if manifest is None:  # a dataset without shards (AttentTrainer): only the id count can be checked
            self._open(int(num_samples or 0), split)
            return
        n = manifest.num_samples(split)
        if meta.get("vocab_size") != str(manifest.vocab_size) or \
                meta.get("tokenizer_sha256") != manifest.tokenizer_sha256:
            raise UserError(f"{self.path}: reference scores use another vocabulary (vocab_size "
                            f"{meta.get('vocab_size')}, data.dir {manifest.dir} has {manifest.vocab_size} "
                            "and another tokenizer)")
        if meta.get("manifest_sha256") != manifest_sha256(manifest):
            raise UserError(f"{self.path}: reference scores are for another shard set (manifest sha256 "
                            f"{str(meta.get('manifest_sha256'))[:12]}, data.dir {manifest.dir} has "
                            f"{manifest_sha256(manifest)[:12]})")
        if meta.get("split") != split:
            raise UserError(f"{self.path}: reference scores are of split {meta.get('split')!r}, "
                            f"the run trains on {split!r}")
        self._open(n, split)

    def _open(self, n: int, split: str) -> None:
        offset, shape = _loss_layout(self.path)
        if shape != [n]:
            raise UserError(f"{self.path}: reference scores miss ids: {shape} for split {split!r} of "
                            f"{n} samples")
        if self.path.stat().st_size < offset + 4 * n:
            raise UserError(f"{self.path}: reference scores file is truncated")
        self.num_samples = n
        self._offset = offset  # file position of loss[0]
        self.bytes_read = 0  # what losses() read from the file, in all
        meta = read_metadata(self.path) or {}
        self.folds = int(meta.get("folds", "0") or 0)  # a cross-fitted reference (`reference fit`): K
        self.fold_seed = int(meta.get("fold_seed", "0") or 0)
        self.fold_group = int(meta.get("fold_group", "1") or 1)

    def _read(self, fd: int, lo: int, hi: int) -> np.ndarray:
        data = os.pread(fd, 4 * (hi - lo), self._offset + 4 * lo)
        if len(data) != 4 * (hi - lo):
            raise UserError(f"{self.path}: reference scores file is truncated")
        self.bytes_read += len(data)
        return np.frombuffer(data, dtype="<f4").astype(np.float32)

    def losses(self, ids: np.ndarray) -> np.ndarray:
        """Reference losses (float32) of `ids` (all in [0, N)). Reads the ids' runs straight from the
        file (runs closer than READ_GAP ids are read as one), nothing else: a ledger block read in chunks
        reads each slice once, an online batch of scattered ids reads only around those ids."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            return np.zeros(0, dtype=np.float32)
        if int(ids.min()) < 0 or int(ids.max()) >= self.num_samples:
            raise ValueError(f"reference ids must lie in [0, {self.num_samples})")
        uniq = np.unique(ids)
        cuts = np.flatnonzero(np.diff(uniq) > READ_GAP) + 1
        starts, ends = np.r_[0, cuts], np.r_[cuts, uniq.shape[0]]
        vals = np.empty(uniq.shape[0], dtype=np.float32)
        with open(self.path, "rb") as f:
            for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
                lo, hi = int(uniq[a]), int(uniq[b - 1]) + 1
                vals[a:b] = self._read(f.fileno(), lo, hi)[uniq[a:b] - lo]
        return vals[np.searchsorted(uniq, ids)]


    def val_hist(self) -> np.ndarray | None:
        """[rows, bins] int64: the val-loss histogram of each fold's model (row k: fold k's; one row without
        folds), or None when the file has none (a reference written by `attent-scale score` without
        --val-hist)."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="np") as f:
            names = set(f.keys())
            if VAL_HIST_KEY not in names:
                return None
            hist = np.asarray(f.get_tensor(VAL_HIST_KEY), dtype=np.int64)
        return hist.reshape(1, -1) if hist.ndim == 1 else hist

    def fold_of(self, ids: np.ndarray) -> np.ndarray:
        """The fold (0 without folds) whose model scored each id."""
        from attent_scale.teacher.folds import fold_of

        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not self.folds:
            return np.zeros(ids.shape[0], dtype=np.int64)
        return fold_of(ids, self.folds, self.fold_seed, self.fold_group)


def _loss_layout(path: Path) -> tuple[int, list[int] | None]:
    """(file offset of the loss tensor's data, its shape) from the safetensors header; shape None when
    the file holds no float32 loss tensor."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(f.read(size)) if 0 < size < (1 << 26) else {}
        except ValueError:
            header = {}
    entry = header.get(LOSS_KEY) if isinstance(header, dict) else None
    if not isinstance(entry, dict) or entry.get("dtype") != "F32":
        return 0, None
    start, end = entry.get("data_offsets", [0, 0])
    shape = list(entry.get("shape", []))
    if len(shape) != 1 or end - start != 4 * shape[0]:
        return 0, None
    return 8 + size + int(start), shape


class LossArray:
    """Reference losses held in memory, indexed by sample id (AttentTrainer's `reference=`)."""

    def __init__(self, loss: Any, num_samples: int) -> None:
        self.loss = np.asarray(loss, dtype=np.float32).reshape(-1)
        if self.loss.shape[0] != num_samples:
            raise UserError(f"AttentTrainer: reference= holds {self.loss.shape[0]} losses, train_dataset has "
                            f"{num_samples} samples")

    def losses(self, ids: np.ndarray) -> np.ndarray:
        """Reference losses (float32) of `ids`."""
        return self.loss[np.asarray(ids, dtype=np.int64)]


def open_reference(tcfg: Any, manifest: Any, split: str, *, given: Any = None,
                   num_samples: int | None = None) -> Any:
    """The run's reference when `teacher.score` is "excess" or the strategy is learn / rho, else None:
    `given` (losses by id, or an object with `losses(ids)`: AttentTrainer's `reference=`), else the
    teacher.reference scores file, checked against `manifest`'s `split` (or, without a manifest, against
    `num_samples`)."""
    if getattr(tcfg, "score", "loss") != "excess" and getattr(tcfg, "strategy", "") not in ("learn", "rho"):
        return None
    if given is not None:
        return given if hasattr(given, "losses") else LossArray(given, int(num_samples or 0))
    return Reference(tcfg.reference, manifest, split, num_samples=num_samples)
