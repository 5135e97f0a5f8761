"""Shard builder: tokenize a corpus, pack EOS-separated documents into windows, write tar shards."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from tqdm import tqdm

from attent_scale.data.corpus import Corpus
from attent_scale.data.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, ShardInfo
from attent_scale.data.tokenizer import Tokenizer, sha256_file, train_tokenizer
from attent_scale.errors import UserError

TOKENIZER_NAME = "tokenizer.model"
KEY_WIDTH = 10  # sample keys are zero-padded global ids
TAR_MTIME = 0  # constant tar metadata: re-runs give byte-identical shards
TAR_USER = "attent"
SPLITS = ("train", "val")


def sample_key(sample_id: int) -> str:
    return f"{sample_id:0{KEY_WIDTH}d}"


def token_field(dtype: str) -> str:
    return "tokens.u16" if dtype == "uint16" else "tokens.u32"


def val_split_of(text: str, val_fraction: float) -> bool:
    """Document-level split by a hash of the text: True means the document goes to val."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h < val_fraction * 2.0**64


def _tar_cost(nbytes: int) -> int:
    return 512 + (nbytes + 511) // 512 * 512


class _SplitWriter:
    """Packs one split's token stream into windows of seq_len + 1 (stride seq_len) and writes shards."""

    def __init__(
        self, tmp: Path, split: str, seq_len: int, dtype: str, max_bytes: float, max_count: int
    ) -> None:
        self.tmp, self.split, self.seq_len, self.dtype = tmp, split, seq_len, np.dtype(dtype)
        self.field = token_field(dtype)
        self.max_bytes, self.max_count = max_bytes, max_count
        self.buf = np.zeros(0, dtype=self.dtype)
        self.writer: wds.ShardWriter | None = None
        self.next_id = 0
        self.tokens = 0  # valid tokens written (all windows)
        self.shard_first = 0
        self.shard_tokens = 0
        self.shard_est = 0
        self.shards: list[ShardInfo] = []
        self.docs = 0
        self.doc_lengths: list[int] = []
        self.text_bytes = 0

    def _post(self, fname: str) -> None:
        path = Path(fname)
        count = self.next_id - self.shard_first
        self.shards.append(
            ShardInfo(
                name=path.name,
                first_id=self.shard_first,
                count=count,
                bytes=path.stat().st_size,
                sha256=sha256_file(path),
                tokens=self.tokens - self.shard_tokens,
            )
        )
        self.shard_first = self.next_id
        self.shard_tokens = self.tokens
        self.shard_est = 0

    def _write(self, window: np.ndarray) -> None:
        data = window.astype(self.dtype, copy=False).tobytes()
        cost = _tar_cost(len(data))
        if self.writer is None:
            pattern = str(self.tmp / f"{self.split}-").replace("%", "%%") + "%06d.tar"
            self.writer = wds.ShardWriter(
                pattern, maxcount=self.max_count, maxsize=float("inf"), post=self._post, verbose=0,
                encoder=False, mtime=TAR_MTIME, user=TAR_USER, group=TAR_USER, mode=0o444,
            )
        elif self.shard_est > 0 and self.shard_est + cost > self.max_bytes:
            self.writer.next_stream()
        self.writer.write({"__key__": sample_key(self.next_id), self.field: data})
        self.next_id += 1
        self.tokens += len(window)
        self.shard_est += cost

    def add(self, ids: list[int], text_bytes: int) -> None:
        self.docs += 1
        self.doc_lengths.append(len(ids))
        self.text_bytes += text_bytes
        buf = np.concatenate([self.buf, np.asarray(ids, dtype=self.dtype)])
        t = self.seq_len
        start = 0
        while len(buf) - start >= t + 1:
            self._write(buf[start : start + t + 1])
            start += t  # windows overlap by one token: every token after the first is a target once
        self.buf = buf[start:]

    def close(self) -> None:
        if len(self.buf) >= 2:
            self._write(self.buf)  # last partial window; its valid length is its stored length
        self.buf = np.zeros(0, dtype=self.dtype)
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def summary(self) -> dict[str, Any]:
        lengths = np.asarray(self.doc_lengths or [0])
        return {
            "num_samples": self.next_id,
            "tokens": self.tokens,
            "documents": self.docs,
            "text_bytes": self.text_bytes,
            "doc_tokens": {
                # histogram over powers of two: hist[i] = documents with 2**(i-1) < tokens <= 2**i
                "hist_pow2": np.bincount(np.ceil(np.log2(np.maximum(lengths, 1))).astype(int)).tolist(),
                "min": int(lengths.min()),
                "p50": int(np.percentile(lengths, 50)),
                "p90": int(np.percentile(lengths, 90)),
                "max": int(lengths.max()),
            },
            "shards": [s.to_json() for s in self.shards],
        }


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: output directory is not empty (use --overwrite)")


def build_shards(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    seq_len: int = 1024,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    tokenizer: str | Path | None = None,
    val_fraction: float = 0.01,
    glob: str = "*",
    text_field: str | None = None,
    max_bytes: int | None = None,
    max_docs: int | None = None,
    shard_size_mb: float = 64.0,
    samples_per_shard: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Build train/val shards plus manifest.json and tokenizer.model in `out_dir`; return the manifest."""
    out = Path(out_dir)
    if seq_len < 2:
        raise UserError(f"--seq-len {seq_len}: must be at least 2")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if shard_size_mb <= 0:
        raise UserError(f"--shard-size-mb {shard_size_mb}: must be positive")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise UserError(f"--samples-per-shard {samples_per_shard}: must be at least 1")
    for name, cap in (("--max-bytes", max_bytes), ("--max-docs", max_docs)):
        if cap is not None and cap < 1:
            raise UserError(f"{name} {cap}: must be at least 1")
    _check_output(out, overwrite)
    corpus = Corpus(inputs, glob=glob, text_field=text_field, max_bytes=max_bytes, max_docs=max_docs)
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise UserError(f"{tokenizer}: tokenizer file not found")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if next(iter(corpus), None) is None:
            raise UserError(f"empty corpus: {corpus.describe()} contain no non-blank text")
        tok_path = tmp / TOKENIZER_NAME
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tok_path)
        else:
            train_tokenizer(corpus, tok_path, vocab_size=vocab_size, model_type=model_type, seed=seed)
        tk = Tokenizer(tok_path)
        dtype = "uint16" if tk.vocab_size < 65536 else "uint32"
        max_count = samples_per_shard or 1 << 62
        writers = {
            s: _SplitWriter(tmp, s, seq_len, dtype, shard_size_mb * 1e6, max_count) for s in SPLITS
        }
        bar = tqdm(corpus, desc="shards build", unit="doc", disable=None if progress else True)
        for doc in bar:
            split = "val" if val_split_of(doc.text, val_fraction) else "train"
            writers[split].add(tk.encode(doc.text) + [tk.eos_id], len(doc.text.encode("utf-8")))
        bar.close()
        for w in writers.values():
            w.close()
        if writers["train"].next_id == 0:
            raise UserError(
                f"corpus too small: no training window of --seq-len {seq_len} ({corpus.describe()})"
            )
        manifest = {
            "format_version": FORMAT_VERSION,
            "seq_len": seq_len,
            "vocab_size": tk.vocab_size,
            "eos_id": tk.eos_id,
            "pad_id": tk.pad_id,
            "token_dtype": dtype,
            "token_field": token_field(dtype),
            "key_width": KEY_WIDTH,
            "window": "seq_len + 1 tokens, stride seq_len; the last window of a split may be shorter",
            "newline_symbol": tk.newline_symbol,
            "tokenizer": {"file": TOKENIZER_NAME, "sha256": sha256_file(tok_path)},
            "build": {
                "corpus": corpus.describe(),
                "val_fraction": val_fraction,
                "model_type": model_type if tokenizer is None else "given",
                "seed": seed,
            },
            "splits": {s: w.summary() for s, w in writers.items()},
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Manifest.load(out)
