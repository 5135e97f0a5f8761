"""Reference scores (per-sample losses of a reference model, keyed by id): file format, checks, reading."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from attent_scale.errors import UserError

SCORES_FORMAT = "attent-scale-scores/1"
LOSS_KEY = "loss"  # float32 [N]: the loss of sample id i at index i


def manifest_sha256(manifest: Any) -> str:
    """sha256 of a shard set's manifest.json (it names every shard's and the tokenizer's sha256)."""
    from attent_scale.data.manifest import MANIFEST_NAME

    return hashlib.sha256((Path(manifest.dir) / MANIFEST_NAME).read_bytes()).hexdigest()


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
    """A reference scores file checked against the data a run trains on. Reads only the id range a rank
    asks for (the ledger block it owns), not the whole file."""

    def __init__(self, path: str | Path, manifest: Any, split: str) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: reference scores not found (teacher.reference; "
                            "write them with `attent-scale score`)")
        meta = read_metadata(self.path)
        if meta is None or meta.get("format") != SCORES_FORMAT:
            raise UserError(f"{self.path}: not a scores file written by `attent-scale score`")
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
        from safetensors import safe_open

        with safe_open(str(self.path), framework="np") as f:
            shape = f.get_slice(LOSS_KEY).get_shape() if LOSS_KEY in set(f.keys()) else None
        if shape != [n]:
            raise UserError(f"{self.path}: reference scores miss ids: {shape} for split {split!r} of "
                            f"{n} samples")
        self.num_samples = n
        self._lo, self._hi = 0, 0
        self._block = np.zeros(0, dtype=np.float32)

    def _load(self, lo: int, hi: int) -> None:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="np") as f:
            self._block = np.asarray(f.get_slice(LOSS_KEY)[lo:hi], dtype=np.float32)
        self._lo, self._hi = lo, hi

    def losses(self, ids: np.ndarray) -> np.ndarray:
        """Reference losses (float32) of `ids` (all in [0, N)); loads the id range they span once."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return np.zeros(0, dtype=np.float32)
        lo, hi = int(ids.min()), int(ids.max()) + 1
        if lo < self._lo or hi > self._hi:
            self._load(min(lo, self._lo) if self._hi > self._lo else lo, max(hi, self._hi))
        return self._block[ids - self._lo]


def open_reference(tcfg: Any, manifest: Any, split: str) -> Reference | None:
    """The run's reference when `teacher.score` is "excess", else None."""
    if getattr(tcfg, "score", "loss") != "excess":
        return None
    return Reference(tcfg.reference, manifest, split)
