"""Shard builder: tokenize a corpus (N processes, or one part of a multi-machine build), pack windows, write
tar shards; merging parts gives the same bytes as a one-process build.

A build has two phases. Tokenize: the input files, in corpus order and in tasks of about 1 MB (runs of
whole files, or byte ranges of a large JSONL file), go to worker processes that read and encode them,
pick each document's split by a hash of its text, and append the split's tokens to their own token file;
the main process hands out file names and records, in order, where each task's tokens went (a "part").
Write: the split's token stream is the concatenation of those segments, so every window (seq_len + 1
tokens, stride seq_len) and every shard boundary is known up front, and shards are written by worker
processes independently. `--part I/N` stops after the tokenize phase and leaves a part directory;
`shards merge` runs the write phase over parts 0..N-1. A one-machine build is one part plus the write phase.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from attent_scale.data import output, remote
from attent_scale.data.corpus import Corpus, Document, is_blank
from attent_scale.data.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, ShardInfo
from attent_scale.data.readers import record_error
from attent_scale.data.samples import KEY_WIDTH, sample_key, token_field, write_samples
from attent_scale.data.tokenizer import (
    HFTokenizer,
    Tokenizer,
    is_hf_tokenizer,
    load_tokenizer,
    sha256_file,
    train_tokenizer,
    tree_sha256,
)
from attent_scale.errors import UserError

__all__ = ["build_shards", "merge_parts", "sample_key", "token_field"]

TOKENIZER_NAME = "tokenizer.model"
PART_NAME = "part.json"
PART_FORMAT = "attent-scale-part/1"
SPLITS = ("train", "val", "ref")
CHUNK_BYTES = 1 << 20  # text per tokenize task
CHUNK_DOCS = 4096
# part settings that must agree across the parts of one merge
PART_SETTINGS = ("seq_len", "token_dtype", "val_fraction", "ref_fraction", "shard_size_mb",
                 "samples_per_shard", "seed", "model_type", "tokenizer_sha256", "embedded", "num_parts",
                 "tokenizer_kind", "tokenizer_file", "sft", "fixed_splits")
MASK_SUFFIX = ".mask"  # beside a token file: one uint8 per token, 1 = a training target (SFT builds)


def _text_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def val_split_of(text: str, val_fraction: float) -> bool:
    """Document-level split by a hash of the text: True means the document goes to val."""
    return _text_hash(text) < val_fraction * 2.0**64


def split_of(text: str, val_fraction: float, ref_fraction: float = 0.0) -> str:
    """The split of a document, by a hash of its text: [0, v) val, [v, v + r) ref, the rest train.
    Adding a ref split moves only train documents; val stays the same."""
    h = _text_hash(text)
    if h < val_fraction * 2.0**64:
        return "val"
    if h < (val_fraction + ref_fraction) * 2.0**64:
        return "ref"
    return "train"


def _tar_cost(nbytes: int) -> int:
    return 512 + (nbytes + 511) // 512 * 512


def default_workers() -> int:
    """All cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def parse_part(text: str) -> tuple[int, int]:
    """`I/N` -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--part {text!r}: expected I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--part {text!r}: need 0 <= I < N")
    return i, n


# ---------------------------------------------------------------------------------------- worker pool

class _Pool:
    """Ordered map over tasks with N worker processes (inline for N = 1) and a bounded queue, so the
    main process never reads far ahead of the workers. A worker that dies (the out-of-memory killer,
    kill -9) stops the build with one line: concurrent.futures reports it (BrokenProcessPool), where a
    multiprocessing.Pool would wait forever for the task the dead worker held."""

    def __init__(self, workers: int, initializer: Callable[..., None] | None = None,
                 initargs: tuple = ()) -> None:
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        if workers > 1:
            # spawn: no fork of a process that may hold threads (torch, tqdm's monitor)
            self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                            initializer=initializer, initargs=initargs)
        elif initializer is not None:
            initializer(*initargs)

    def map(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        if self.pool is None:
            for t in tasks:
                yield fn(t)
            return
        pending: deque = deque()
        try:
            for t in tasks:
                pending.append(self.pool.submit(fn, t))
                if len(pending) >= 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise UserError("shards build: a worker process died (killed: out of memory?); nothing written "
                            "(rerun; with fewer --workers if memory is short)") from None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def terminate(self) -> None:
        """Stop at once (an error, a signal): pending tasks cancelled, the workers killed and reaped."""
        if self.pool is None:
            return
        pool, self.pool = self.pool, None
        stop = getattr(pool, "terminate_workers", None)  # Python >= 3.14
        if stop is not None:
            stop()
            return
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join()


# ---------------------------------------------------------------------------------------- tokenize phase

_TOK: dict[str, Any] = {}


@dataclass(frozen=True)
class SftSpec:
    """Instruction data: one example per sample, the loss on the response only."""

    prompt_field: str
    response_field: str
    chat_template: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"prompt_field": self.prompt_field, "response_field": self.response_field,
                "chat_template": self.chat_template}


def sft_fields(doc: Document, spec: SftSpec) -> tuple[str, str]:
    """(prompt, response) of one instruction record; UserError naming the record and the field."""
    rec = doc.record if doc.record is not None else {}
    out = []
    for flag, field in (("--prompt-field", spec.prompt_field), ("--response-field", spec.response_field)):
        if field not in rec:
            raise record_error(doc.name, f"no field {field!r} ({flag})")
        if not isinstance(rec[field], str):
            raise record_error(doc.name, f"field {field!r} is not a string ({flag})")
        out.append(rec[field])
    return out[0], out[1]


def _prefix_ids(tk: Tokenizer | HFTokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text itself (a Llama BOS; none for GPT-2)."""
    if not isinstance(tk, HFTokenizer):
        return []
    full = list(tk.tk("x", add_special_tokens=True)["input_ids"])
    plain = tk.encode("x")
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i]
    return []


def sft_example(tk: Tokenizer | HFTokenizer, prompt: str, response: str, spec: SftSpec, seq_len: int,
                prefix: list[int]) -> tuple[list[int], list[int], bool]:
    """(tokens, mask, truncated) of one example: with the chat template, its rendering of user=prompt,
    assistant=response; without, `prefix` (the tokenizer's own leading special tokens) + prompt +
    response + EOS. mask is 1 on the response's tokens; both are cut to seq_len + 1."""
    if spec.chat_template:
        head, tail = tk.chat(prompt, response)  # type: ignore[union-attr]
        p_ids, r_ids = tk.encode(head), tk.encode(tail)
    else:
        p_ids = prefix + tk.encode(prompt)
        r_ids = tk.encode(response) + [tk.eos_id]
    tokens = p_ids + r_ids
    mask = [0] * len(p_ids) + [1] * len(r_ids)
    cut = len(tokens) > seq_len + 1
    return tokens[: seq_len + 1], mask[: seq_len + 1], cut


def _init_tokenizer(path: str, out_dir: str, dtype: str, val_fraction: float, ref_fraction: float,
                    corpus: Corpus | None = None, sft: SftSpec | None = None, seq_len: int = 0) -> None:
    tk = load_tokenizer(path)
    _TOK.update(tk=tk, out=Path(out_dir), dtype=np.dtype(dtype), val=val_fraction, ref=ref_fraction,
                files={}, corpus=corpus, sft=sft, seq_len=seq_len, prefix=_prefix_ids(tk))


def _token_file(split: str, suffix: str = "") -> tuple[str, Any]:
    """This process's append-only token (or, with MASK_SUFFIX, mask) file for `split` (name relative to
    the part dir, open handle)."""
    files = _TOK["files"]
    if split + suffix not in files:
        name = f"tokens/{split}-{os.getpid()}.bin{suffix}"
        files[split + suffix] = (name, open(_TOK["out"] / name, "ab"))  # noqa: SIM115 - closed at exit
    return files[split + suffix]


_Row = tuple[str, list[int], "list[int] | None", int]  # split, token ids, mask (SFT) or None, text bytes


def _encode_sft(docs: list[Document]) -> tuple[list[_Row], dict[str, list[int]]]:
    """The kept examples of one chunk, and per split how many were skipped (no response token within
    seq_len + 1) and truncated."""
    tk, spec, t = _TOK["tk"], _TOK["sft"], _TOK["seq_len"]
    rows: list[_Row] = []
    counts: dict[str, list[int]] = {}
    for doc in docs:
        prompt, response = sft_fields(doc, spec)
        tokens, mask, cut = sft_example(tk, prompt, response, spec, t, _TOK["prefix"])
        split = doc.split or split_of(f"{prompt}\0{response}", _TOK["val"], _TOK["ref"])
        c = counts.setdefault(split, [0, 0])
        if len(tokens) < 2 or not any(mask[1:]):
            c[0] += 1
            continue
        c[1] += cut
        rows.append((split, tokens, mask, len(prompt.encode("utf-8")) + len(response.encode("utf-8"))))
    return rows, counts


def _tokenize_chunk(docs: list[Document]) -> dict[str, Any]:
    """Encode one chunk; append each split's tokens (and SFT masks) to this process's files; return
    where they went (for SFT also the examples skipped and truncated)."""
    dtype = _TOK["dtype"]
    counts: dict[str, list[int]] = {}
    blank: dict[str, int] = {}
    if _TOK["sft"] is not None:
        rows, counts = _encode_sft(docs)
    else:
        for d in docs:
            if is_blank(d):  # skipped, counted under the split its text hashes to (or its given split)
                split = d.split or split_of(d.text, _TOK["val"], _TOK["ref"])
                blank[split] = blank.get(split, 0) + 1
        docs = [d for d in docs if not is_blank(d)]
        ids_of = _TOK["tk"].encode_docs([d.text for d in docs])
        rows = [(d.split or split_of(d.text, _TOK["val"], _TOK["ref"]), ids, None, len(d.text.encode()))
                for d, ids in zip(docs, ids_of, strict=True)]
    by_split: dict[str, list[_Row]] = {}
    for row in rows:
        by_split.setdefault(row[0], []).append(row)
    out: dict[str, Any] = {}
    for split, group in by_split.items():
        name, f = _token_file(split)
        offset = f.tell()
        f.write(np.concatenate([np.asarray(r[1], dtype=dtype) for r in group]).tobytes())
        f.flush()
        if _TOK["sft"] is not None:  # the mask file runs in step with the token file: token i <-> byte i
            _, mf = _token_file(split, MASK_SUFFIX)
            mf.write(np.concatenate([np.asarray(r[2], dtype=np.uint8) for r in group]).tobytes())
            mf.flush()
        out[split] = {"file": name, "offset": offset, "lengths": np.array([len(r[1]) for r in group]),
                      "text_bytes": sum(r[3] for r in group)}
    for split, (skipped, truncated) in counts.items():
        out.setdefault(split, {"file": None, "offset": 0, "lengths": np.zeros(0, np.int64), "text_bytes": 0})
        out[split].update(skipped=skipped, truncated=truncated)
    for split, n in blank.items():
        out.setdefault(split, {"file": None, "offset": 0, "lengths": np.zeros(0, np.int64), "text_bytes": 0})
        out[split]["blank"] = n
    return out


def _tokenize_files(task: list[tuple[str, int, int | None]]) -> dict[str, Any]:
    """Read one task of `Corpus.tasks` (whole files or a JSONL byte range) here, then encode it: the
    main process only hands out file names, so it never limits how fast N workers read."""
    return _tokenize_chunk(list(_TOK["corpus"].docs_of_task(task)))


def _chunks(corpus: Iterable[Document]) -> Iterator[list[Document]]:
    docs: list[Document] = []
    size = 0
    for doc in corpus:
        docs.append(doc)
        size += len(doc.text)
        if size >= CHUNK_BYTES or len(docs) >= CHUNK_DOCS:
            yield docs
            docs, size = [], 0
    if docs:
        yield docs


@dataclass
class _SplitTokens:
    """One split's token stream: ordered segments (file, byte offset, tokens) plus per-document stats."""

    files: list[str]  # paths (absolute once loaded)
    segments: np.ndarray  # int64 [n, 3]: file index, byte offset, token count
    doc_lengths: np.ndarray  # int64, tokens per document (EOS included), in order
    text_bytes: int
    skipped: int = 0  # SFT examples with no response token within seq_len + 1: not stored
    truncated: int = 0  # SFT examples cut to seq_len + 1
    blank: int = 0  # documents of empty or whitespace-only text (corpus.is_blank): not stored

    @property
    def tokens(self) -> int:
        return int(self.segments[:, 2].sum()) if len(self.segments) else 0


def tokenize_part(corpus: Corpus, out: Path, pool: _Pool, *, progress: bool) -> dict[str, _SplitTokens]:
    """Tokenize `corpus` into OUT/tokens/ with the pool's processes (started by `tokenizer_pool`); the
    splits' token streams, in order."""
    files: dict[str, list[str]] = {s: [] for s in SPLITS}
    segs: dict[str, list[tuple[int, int, int]]] = {s: [] for s in SPLITS}
    lengths: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    text_bytes = dict.fromkeys(SPLITS, 0)
    sft = {s: [0, 0] for s in SPLITS}
    blank = dict.fromkeys(SPLITS, 0)
    bar = tqdm(desc="shards build", unit="doc", disable=None if progress else True)
    if corpus.max_bytes is None and corpus.max_docs is None:
        results = pool.map(_tokenize_files, corpus.tasks(CHUNK_BYTES, CHUNK_DOCS))
    else:  # a cap needs the in-order prefix: this process reads, the workers encode
        results = pool.map(_tokenize_chunk, _chunks(corpus))
    try:
        for result in results:
            for split, r in result.items():
                sft[split][0] += r.get("skipped", 0)
                sft[split][1] += r.get("truncated", 0)
                blank[split] += r.get("blank", 0)
                if r["file"] is None:
                    continue
                if r["file"] not in files[split]:
                    files[split].append(r["file"])
                segs[split].append((files[split].index(r["file"]), r["offset"], int(r["lengths"].sum())))
                lengths[split].append(r["lengths"])
                text_bytes[split] += r["text_bytes"]
                bar.update(len(r["lengths"]))
    finally:
        bar.close()
        for _, f in _TOK.get("files", {}).values():  # the inline (workers=1) case; worker processes
            f.flush()  # flush after every chunk and close their files when they exit
    return {
        s: _SplitTokens(
            files=[str(out / f) for f in files[s]],
            segments=np.array(segs[s], dtype=np.int64).reshape(-1, 3),
            doc_lengths=np.concatenate(lengths[s]).astype(np.int64) if lengths[s] else np.zeros(0, np.int64),
            text_bytes=text_bytes[s],
            skipped=sft[s][0],
            truncated=sft[s][1],
            blank=blank[s],
        )
        for s in SPLITS
    }


def _read_tokens(st: _SplitTokens, dtype: np.dtype, start: int, stop: int, *,
                 mask_of: np.dtype | None = None) -> np.ndarray:
    """Tokens [start, stop) of a split's stream; with `mask_of` (the token dtype), the SFT mask bytes of
    those tokens instead, from the mask files beside the token files."""
    counts = st.segments[:, 2]
    ends = np.cumsum(counts)
    begins = ends - counts
    out = np.empty(stop - start, dtype=dtype)
    k = int(np.searchsorted(ends, start, side="right"))
    pos = start
    while pos < stop:
        fi, off, n = (int(x) for x in st.segments[k])
        lo = pos - int(begins[k])
        take = min(n - lo, stop - pos)
        if take > 0:
            path = st.files[fi] if mask_of is None else st.files[fi] + MASK_SUFFIX
            first = off + lo * dtype.itemsize if mask_of is None else off // mask_of.itemsize + lo
            out[pos - start : pos - start + take] = np.fromfile(path, dtype=dtype, count=take, offset=first)
            pos += take
        k += 1
    return out


# ---------------------------------------------------------------------------------------- write phase

def shard_layout(num_tokens: int, seq_len: int, itemsize: int, max_bytes: float,
                 max_count: int) -> list[tuple[int, int]]:
    """(first window, windows) per shard of a split with `num_tokens` tokens. Windows are seq_len + 1
    tokens at stride seq_len, the last one possibly shorter (kept when it has >= 2 tokens); a shard ends
    at `max_count` windows or before its estimated tar size would pass `max_bytes`."""
    t = seq_len
    n_full = (num_tokens - 1) // t if num_tokens > 0 else 0
    tail = num_tokens - n_full * t
    cost = _tar_cost((t + 1) * itemsize)
    per = max(1, int(max_bytes // cost))
    while (per + 1) * cost <= max_bytes:
        per += 1
    while per > 1 and per * cost > max_bytes:
        per -= 1
    per = min(per, max_count)
    shards = [(i, min(per, n_full - i)) for i in range(0, n_full, per)]
    if tail >= 2:
        c_tail = _tar_cost(tail * itemsize)
        if shards and shards[-1][1] < max_count and shards[-1][1] * cost + c_tail <= max_bytes:
            shards[-1] = (shards[-1][0], shards[-1][1] + 1)
        else:
            shards.append((n_full, 1))
    return shards


def sft_layout(num_examples: int, seq_len: int, itemsize: int, max_bytes: float,
               max_count: int) -> list[tuple[int, int]]:
    """(first sample, samples) per shard of an SFT split: one example a sample, a shard ending at
    `max_count` samples or before its size, counting every sample as a full one with its mask, would
    pass `max_bytes`."""
    cost = _tar_cost((seq_len + 1) * itemsize) + _tar_cost(seq_len + 1)
    per = min(max(1, int(max_bytes // cost)), max_count)
    return [(i, min(per, num_examples - i)) for i in range(0, num_examples, per)]


def tokenizer_pool(workers: int, tokenizer: Path, out: Path, dtype: str, val_fraction: float,
                   ref_fraction: float, corpus: Corpus | None = None, sft: SftSpec | None = None,
                   seq_len: int = 0) -> _Pool:
    """The build's worker processes, each with the tokenizer loaded, writing token files under OUT."""
    (out / "tokens").mkdir(parents=True, exist_ok=True)
    init = (str(tokenizer), str(out), dtype, val_fraction, ref_fraction, corpus, sft, seq_len)
    return _Pool(workers, _init_tokenizer, init)


@dataclass
class _ShardTask:
    """Everything one shard needs: its windows and only the token segments they cover."""

    out: str
    split: str
    index: int
    first: int
    count: int
    seq_len: int
    dtype: str
    tokens: _SplitTokens  # segments covering [start, stop) of the split's stream
    base: int  # stream position of the first of those segments
    start: int
    stop: int
    lengths: np.ndarray | None = None  # SFT: each sample's tokens (one example a sample), with masks


def _shard_task(st: _SplitTokens, ends: np.ndarray, out: Path, split: str, index: int, first: int,
                count: int, seq_len: int, dtype: str, sft: bool = False) -> _ShardTask:
    t = seq_len
    lengths = None
    if sft:
        lengths = st.doc_lengths[first : first + count]
        start = int(st.doc_lengths[:first].sum())
        stop = start + int(lengths.sum())
    else:
        start, stop = first * t, min((first + count - 1) * t + t + 1, int(ends[-1]))
    k0 = int(np.searchsorted(ends, start, side="right"))
    k1 = int(np.searchsorted(ends, stop, side="left")) + 1
    seg = st.segments[k0:k1].copy()
    base = int(ends[k0] - st.segments[k0, 2])
    used = sorted(set(seg[:, 0].tolist()))
    seg[:, 0] = np.searchsorted(used, seg[:, 0])
    sub = _SplitTokens([st.files[i] for i in used], seg, np.zeros(0, np.int64), 0)
    return _ShardTask(str(out), split, index, first, count, t, dtype, sub, base, start, stop, lengths)


def _write_shard(task: _ShardTask) -> dict[str, Any]:
    """Write shard `index` of `split` holding windows [first, first + count); return its ShardInfo."""
    first, count, t, dtype = task.first, task.count, task.seq_len, np.dtype(task.dtype)
    start = task.start
    tokens = _read_tokens(task.tokens, dtype, start - task.base, task.stop - task.base)
    path = Path(task.out) / f"{task.split}-{task.index:06d}.tar"
    if task.lengths is None:
        samples = ((j, tokens[j * t - start : min(j * t - start + t + 1, len(tokens))], None)
                   for j in range(first, first + count))
    else:
        masks = _read_tokens(task.tokens, np.dtype(np.uint8), start - task.base, task.stop - task.base,
                             mask_of=dtype)
        cuts = np.concatenate([[0], np.cumsum(task.lengths)])
        samples = ((first + k, tokens[cuts[k] : cuts[k + 1]], masks[cuts[k] : cuts[k + 1]])
                   for k in range(count))
    with open(path, "wb") as f:
        n_tokens = write_samples(f, samples, dtype.name)
    return ShardInfo(name=path.name, first_id=first, count=count, bytes=path.stat().st_size,
                     sha256=sha256_file(path), tokens=n_tokens).to_json()


def _split_summary(st: _SplitTokens, shards: list[dict[str, Any]]) -> dict[str, Any]:
    lengths = st.doc_lengths if len(st.doc_lengths) else np.zeros(1, dtype=np.int64)
    blank = {"blank_documents": st.blank} if st.blank else {}  # absent: none (older builds did not count)
    return {
        **blank,
        "num_samples": sum(s["count"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "documents": int(len(st.doc_lengths)),
        "text_bytes": st.text_bytes,
        "doc_tokens": {
            # histogram over powers of two: hist[i] = documents with 2**(i-1) < tokens <= 2**i
            "hist_pow2": np.bincount(np.ceil(np.log2(np.maximum(lengths, 1))).astype(int)).tolist(),
            "min": int(lengths.min()),
            "p50": int(np.percentile(lengths, 50)),
            "p90": int(np.percentile(lengths, 90)),
            "max": int(lengths.max()),
        },
        "shards": shards,
    }


def tokenizer_record(tok: Tokenizer | HFTokenizer, stored: Path,
                     source: dict[str, str] | None) -> dict[str, Any]:
    """The manifest's "tokenizer" entry: kind, the stored copy (a file; an HF tokenizer's directory too)
    and its hash, and where it came from."""
    rec: dict[str, Any] = {"kind": tok.kind, "sha256": tree_sha256(stored)}
    if stored.is_dir():
        rec.update(dir=stored.name, file=f"{stored.name}/tokenizer.json")
    else:
        rec["file"] = stored.name
    if source:
        rec["source"] = source
    if tok.chat_template is not None:
        rec["chat_template"] = True
    return rec


def write_shards(splits: dict[str, _SplitTokens], out: Path, settings: dict[str, Any],
                 tok: Tokenizer | HFTokenizer, tok_path: Path, corpus_desc: str,
                 pool: _Pool) -> dict[str, Any]:
    """The write phase: every split's shards (in parallel) and manifest.json in OUT; the manifest dict."""
    seq_len, dtype = settings["seq_len"], settings["token_dtype"]
    sft = settings.get("sft")
    max_count = settings["samples_per_shard"] or 1 << 62
    fixed = settings.get("fixed_splits", [])
    names = [s for s in SPLITS if s != "ref" or settings["ref_fraction"] > 0 or "ref" in fixed]
    size = np.dtype(dtype).itemsize
    cap = settings["shard_size_mb"] * 1e6
    if sft:
        layouts = {s: sft_layout(len(splits[s].doc_lengths), seq_len, size, cap, max_count) for s in names}
    else:
        layouts = {s: shard_layout(splits[s].tokens, seq_len, size, cap, max_count) for s in names}
    if not layouts["train"]:
        what = "instruction example with a response token" if sft else \
            f"training window of --seq-len {seq_len}"
        raise UserError(f"corpus too small: no {what} ({corpus_desc})")

    def tasks() -> Iterator[_ShardTask]:
        for s in names:
            ends = np.cumsum(splits[s].segments[:, 2])
            for k, (first, count) in enumerate(layouts[s]):
                yield _shard_task(splits[s], ends, out, s, k, first, count, seq_len, dtype, bool(sft))

    shards: dict[str, list[dict[str, Any]]] = {s: [] for s in names}
    order = [s for s in names for _ in layouts[s]]
    for split, info in zip(order, pool.map(_write_shard, tasks()), strict=True):
        shards[split].append(info)
    build: dict[str, Any] = {
        "corpus": corpus_desc,
        "val_fraction": settings["val_fraction"],
        "model_type": settings["model_type"],
        "seed": settings["seed"],
    }
    if settings["ref_fraction"] > 0:
        build["ref_fraction"] = settings["ref_fraction"]
    if sft:
        build["sft"] = dict(sft, skipped=sum(splits[s].skipped for s in SPLITS),
                            truncated=sum(splits[s].truncated for s in SPLITS))
    for s in fixed:  # a split read from its own input, not from the hash
        build[f"{s}_input"] = True
    manifest = {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "token_dtype": dtype,
        "token_field": token_field(dtype),
        "key_width": KEY_WIDTH,
        "window": "one example a sample (at most seq_len + 1 tokens), loss mask in mask.u8" if sft else
                  "seq_len + 1 tokens, stride seq_len; the last window of a split may be shorter",
        "newline_symbol": tok.newline_symbol,
        "tokenizer": tokenizer_record(tok, tok_path, settings.get("tokenizer_source")),
        "build": build,
        "splits": {s: _split_summary(splits[s], shards[s]) for s in names},
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


# ---------------------------------------------------------------------------------------- parts

def _save_part(out: Path, splits: dict[str, _SplitTokens], settings: dict[str, Any], part: tuple[int, int],
               corpus: Corpus) -> None:
    meta: dict[str, Any] = {"format": PART_FORMAT, "part": part[0], "settings": settings,
                            "input_files": len(corpus.files), "splits": {}}
    for s, st in splits.items():
        np.save(out / "tokens" / f"{s}-segments.npy", st.segments)
        np.save(out / "tokens" / f"{s}-doc-lengths.npy", st.doc_lengths)
        meta["splits"][s] = {"files": [str(Path(f).relative_to(out)) for f in st.files],
                             "tokens": st.tokens, "text_bytes": st.text_bytes,
                             "documents": int(len(st.doc_lengths)), "skipped": st.skipped,
                             "truncated": st.truncated, "blank": st.blank}
    (out / PART_NAME).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def _load_part(d: Path) -> tuple[dict[str, Any], dict[str, _SplitTokens]]:
    path = d / PART_NAME
    try:
        meta = json.loads(path.read_text())
        if meta.get("format") != PART_FORMAT:
            raise UserError(f"{path}: not a part manifest ({meta.get('format')!r} != {PART_FORMAT!r})")
        splits = {}
        for s in SPLITS:
            info = meta["splits"][s]
            seg = np.load(d / "tokens" / f"{s}-segments.npy")
            files = [str(d / f) for f in info["files"]]
            for f in files:
                if not Path(f).is_file():
                    raise UserError(f"{f}: token file listed in {path} is missing")
            splits[s] = _SplitTokens(files, seg.reshape(-1, 3).astype(np.int64),
                                     np.load(d / "tokens" / f"{s}-doc-lengths.npy"), int(info["text_bytes"]),
                                     int(info.get("skipped", 0)), int(info.get("truncated", 0)),
                                     int(info.get("blank", 0)))
    except UserError:  # a ValueError too: keep its own message
        raise
    except FileNotFoundError as exc:
        raise UserError(f"{exc.filename or path}: not found (not a `shards build --part` output?)") from None
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise UserError(f"{path}: invalid part ({type(exc).__name__}: {exc})") from None
    return meta, splits


def _concat(parts: list[_SplitTokens]) -> _SplitTokens:
    files: list[str] = []
    segs = []
    for p in parts:
        seg = p.segments.copy()
        seg[:, 0] += len(files)
        files += p.files
        segs.append(seg)
    return _SplitTokens(files, np.concatenate(segs) if segs else np.zeros((0, 3), np.int64),
                        np.concatenate([p.doc_lengths for p in parts]).astype(np.int64),
                        sum(p.text_bytes for p in parts), sum(p.skipped for p in parts),
                        sum(p.truncated for p in parts), sum(p.blank for p in parts))


def merge_parts(part_dirs: Sequence[str | Path], out_dir: str | Path, *, workers: int | None = None,
                overwrite: bool = False) -> Manifest:
    """Join the parts 0..N-1 of a `--part` build into one shard set with dense ids (same bytes as a
    one-process build of the same inputs). `out_dir` may be a URL: merged locally, then uploaded."""
    if remote.is_url(out_dir):
        return _build_to_url(str(out_dir), None, overwrite,
                             lambda d: merge_parts(part_dirs, d, workers=workers))
    dirs = [Path(p) for p in part_dirs]
    if not dirs:
        raise UserError("shards merge: no part directories given")
    output.check_inputs(Path(out_dir), dirs, "the input")
    loaded = [(d, *_load_part(d)) for d in dirs]
    first_dir, first, _ = loaded[0]
    n = first["settings"]["num_parts"]
    for d, meta, _ in loaded:
        for key in PART_SETTINGS:
            if meta["settings"].get(key) != first["settings"].get(key):
                raise UserError(f"{d / PART_NAME}: {key} {meta['settings'].get(key)!r} differs from "
                                f"{first_dir / PART_NAME} ({first['settings'].get(key)!r})")
    got = sorted(meta["part"] for _, meta, _ in loaded)
    if got != list(range(n)):
        raise UserError(f"shards merge: need parts 0..{n - 1} of {n} exactly once, got {got}")
    loaded.sort(key=lambda x: x[1]["part"])
    splits = {s: _concat([sp[s] for _, _, sp in loaded]) for s in SPLITS}
    settings = dict(first["settings"])
    desc = "embedded stdlib corpus" if settings["embedded"] else \
        f"{sum(meta['input_files'] for _, meta, _ in loaded)} input file(s)"
    name = settings.get("tokenizer_file", TOKENIZER_NAME)
    tok_path = first_dir / name
    if not tok_path.exists() or tree_sha256(tok_path) != settings["tokenizer_sha256"]:
        raise UserError(f"{tok_path}: missing, or its sha256 differs from its {PART_NAME}")

    def fill(tmp: Path) -> None:
        if tok_path.is_dir():
            shutil.copytree(tok_path, tmp / name)
        else:
            shutil.copyfile(tok_path, tmp / name)
        pool = _Pool(workers or default_workers())
        try:
            write_shards(splits, tmp, settings, load_tokenizer(tmp / name), tmp / name, desc, pool)
            pool.close()
        finally:
            pool.terminate()

    return Manifest.load(_atomic_dir(Path(out_dir), overwrite, fill))


# ---------------------------------------------------------------------------------------- build

class _Stopped(BaseException):
    """A stop signal during a build: unwinds like KeyboardInterrupt, so the temp directory goes too."""


class BuildStopped(UserError):
    """The build stopped on a signal; the exit code is the shell's 128 + signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"{signal.Signals(signum).name}: stopped, nothing written")
        self.exit_code = 128 + signum


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (a scheduler, `kill`) unwinds the build as SIGINT does; its default would skip the cleanup."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        raise _Stopped(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _atomic_dir(out: Path, overwrite: bool, fill: Callable[[Path], None]) -> Path:
    """Run fill(tmp) on a fresh temp dir beside OUT, then swap it into place (data/output.py: one build at a
    time, only an earlier build's files replaced, dead builds' temp dirs removed); nothing left on failure
    (an error, SIGINT, SIGTERM, a full disk)."""
    output.check_output(out, overwrite)
    tmp = output.temp_dir(out)
    try:
        with _stop_on_sigterm(), output.build_lock(out):
            output.remove_stale(out)
            output.check_output(out, overwrite)  # again, under the lock
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                fill(tmp)
                output.swap_in(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except _Stopped as exc:
        raise BuildStopped(exc.args[0]) from None
    except OSError as exc:  # the output side: inputs and the tokenizer raise UserError themselves
        where = f" ({exc.filename})" if exc.filename else ""
        raise UserError(f"{out}: cannot write: {exc.strerror or exc}{where}; nothing written") from None
    return out


class _SftTexts:
    """An SFT corpus as the documents a SentencePiece model trains on: prompt and response text."""

    def __init__(self, corpus: Corpus, spec: SftSpec) -> None:
        self.corpus, self.spec = corpus, spec

    def __iter__(self) -> Iterator[Document]:
        for doc in self.corpus:
            prompt, response = sft_fields(doc, self.spec)
            yield Document(doc.name, f"{prompt}\n{response}")


def _build_to_url(url: str, part: tuple[int, int] | None, overwrite: bool,
                  build: Callable[[Path], Any]) -> Manifest:
    """Build into a local temp directory with `build`, then upload it to `url` (manifest.json last)."""
    shown = remote.redact(url)
    if part is not None:
        raise UserError(f"--out {shown}: --part writes a local part directory; merge, then upload")
    try:
        exists = remote.sizes(url, [MANIFEST_NAME])[MANIFEST_NAME] is not None
    except remote.Unreachable as exc:
        raise UserError(f"--out {shown}: unreachable ({exc.reason})") from None
    if exists and not overwrite:
        raise UserError(f"--out {shown}: already holds a {MANIFEST_NAME} (pass --overwrite to replace it)")
    with tempfile.TemporaryDirectory(prefix="attent-build-") as tmp:
        local_out = Path(tmp) / "shards"
        build(local_out)
        try:
            if exists:  # no shard of the old set may stay behind under the new manifest
                fs = remote.filesystem(url)
                remote.retrying(url, "remove", lambda: fs.rm(url, recursive=True))
            remote.upload_tree(local_out, url)
        except remote.Unreachable as exc:
            raise UserError(f"--out {shown}: upload failed ({exc}); the set there is incomplete and has "
                            f"no {MANIFEST_NAME}") from None
    return Manifest.load(url)


def build_shards(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    seq_len: int = 1024,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    tokenizer: str | Path | None = None,
    val_fraction: float = 0.01,
    ref_fraction: float = 0.0,
    glob: str = "*",
    text_field: str | None = None,
    max_bytes: int | None = None,
    max_docs: int | None = None,
    shard_size_mb: float = 64.0,
    samples_per_shard: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
    part: tuple[int, int] | None = None,
    prompt_field: str | None = None,
    response_field: str | None = None,
    chat_template: bool = False,
    val_input: Sequence[str | Path] = (),
    ref_input: Sequence[str | Path] = (),
) -> Manifest | Path:
    """Build train/val(/ref) shards plus manifest.json and the tokenizer (tokenizer.model, or an HF
    tokenizer's tokenizer/ directory) in `out_dir`; return the manifest. `tokenizer` is a SentencePiece
    .model, a Hugging Face tokenizer directory or tokenizer.json, or a .gguf file (its tokenizer); None
    trains a SentencePiece model. With `prompt_field`/`response_field` (record inputs of any format),
    every record is one instruction example with its loss on the response (`chat_template`: rendered by
    the tokenizer's template). `val_input` / `ref_input`: the val / ref split is these inputs' documents
    instead of a hash split of `inputs` (which then all go to train). With `part=(I, N)`: tokenize only
    the I-th of N contiguous slices of the input files into a part directory for `merge_parts`, and
    return its path. `out_dir` may be a URL (s3://, gs://, http(s)://): the set is built in a local temp
    directory, then uploaded, manifest.json last."""
    if remote.is_url(out_dir):
        return _build_to_url(str(out_dir), part, overwrite, lambda d: build_shards(
            inputs, d, seq_len=seq_len, vocab_size=vocab_size, model_type=model_type, tokenizer=tokenizer,
            val_fraction=val_fraction, ref_fraction=ref_fraction, glob=glob, text_field=text_field,
            max_bytes=max_bytes, max_docs=max_docs, shard_size_mb=shard_size_mb,
            samples_per_shard=samples_per_shard, seed=seed, overwrite=False, progress=progress,
            workers=workers, prompt_field=prompt_field, response_field=response_field,
            chat_template=chat_template, val_input=val_input, ref_input=ref_input))
    out = Path(out_dir)
    if seq_len < 2:
        raise UserError(f"--seq-len {seq_len}: must be at least 2")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if not 0.0 <= ref_fraction < 1.0 or val_fraction + ref_fraction >= 1.0:
        raise UserError(f"--ref-fraction {ref_fraction}: must be in [0, 1) with val + ref fractions < 1")
    if shard_size_mb <= 0:
        raise UserError(f"--shard-size-mb {shard_size_mb}: must be positive")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise UserError(f"--samples-per-shard {samples_per_shard}: must be at least 1")
    for name, cap in (("--max-bytes", max_bytes), ("--max-docs", max_docs)):
        if cap is not None and cap < 1:
            raise UserError(f"{name} {cap}: must be at least 1")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    if part is not None:
        if tokenizer is None:
            raise UserError("--part: needs --tokenizer (every part must encode with the same model)")
        if max_bytes is not None or max_docs is not None:
            raise UserError("--part: --max-bytes/--max-docs cap the whole corpus in order; not with parts")
    sft = None
    if (prompt_field is None) != (response_field is None):
        raise UserError("--prompt-field and --response-field: give both (instruction data) or neither")
    if prompt_field is not None:
        if text_field is not None:
            raise UserError("--text-field: not with --prompt-field/--response-field (instruction records)")
        sft = SftSpec(prompt_field, response_field, chat_template)  # type: ignore[arg-type]
    elif chat_template:
        raise UserError("--chat-template: needs --prompt-field and --response-field")
    if val_input and val_fraction not in (0.0, 0.01):  # 0.01: the default, for the hash split
        raise UserError(f"--val-fraction {val_fraction} with --val-input: the val split is --val-input's "
                        "documents; drop one")
    if ref_input and ref_fraction > 0:
        raise UserError(f"--ref-fraction {ref_fraction} with --ref-input: the ref split is --ref-input's "
                        "documents; drop one")
    val_fraction = 0.0 if val_input else val_fraction
    # SFT: the corpus reads records (any format), a document's text is the prompt, its record carries both
    # fields for the builder
    corpus = Corpus(inputs, glob=glob, text_field=prompt_field if sft else text_field, max_bytes=max_bytes,
                    max_docs=max_docs, val_inputs=val_input, ref_inputs=ref_input,
                    columns=(sft.prompt_field, sft.response_field) if sft else None,
                    field_flag="--prompt-field" if sft else "--text-field")
    output.check_inputs(out, corpus.files)
    output.check_output(out, overwrite)
    user_tok: Tokenizer | HFTokenizer | None = None
    if tokenizer is not None:
        tp = Path(tokenizer)
        if not tp.exists():
            raise UserError(f"{tokenizer}: tokenizer file not found")
        if not tp.is_file() and not (tp.is_dir() and is_hf_tokenizer(tp)):
            raise UserError(f"{tokenizer}: tokenizer is not a regular file (nor a Hugging Face tokenizer "
                            "directory: no tokenizer.json or tokenizer_config.json in it)")
        user_tok = load_tokenizer(tp)  # a bad tokenizer is reported under the user's name, not the copy's
    if chat_template and (user_tok is None or user_tok.chat_template is None):
        what = tokenizer if tokenizer is not None else "a trained sentencepiece model"
        raise UserError(f"--chat-template: {what} has no chat template")
    if part is not None:
        i, n = part
        corpus.files = corpus.files[i * len(corpus.files) // n : (i + 1) * len(corpus.files) // n]
    else:
        corpus.check_nonempty()

    def fill(tmp: Path) -> None:
        source = None
        if user_tok is not None:
            tok_path = user_tok.save(tmp)
            tk = user_tok
            source = {"name": Path(tokenizer).name, "sha256": tree_sha256(Path(tokenizer))}  # type: ignore[arg-type]
        else:
            tok_path = tmp / TOKENIZER_NAME
            texts = corpus if sft is None else _SftTexts(corpus, sft)
            train_tokenizer(texts, tok_path, vocab_size=vocab_size, model_type=model_type, seed=seed)
            tk = Tokenizer(tok_path)
        dtype = "uint16" if tk.vocab_size < 65536 else "uint32"
        settings = {
            "seq_len": seq_len, "token_dtype": dtype, "val_fraction": val_fraction,
            "ref_fraction": ref_fraction, "shard_size_mb": shard_size_mb,
            "samples_per_shard": samples_per_shard, "seed": seed,
            "model_type": model_type if tokenizer is None else "given",
            "tokenizer_sha256": tree_sha256(tok_path), "embedded": corpus.embedded,
            "num_parts": part[1] if part else 1, "tokenizer_kind": tk.kind, "tokenizer_file": tok_path.name,
            "tokenizer_source": source, "sft": sft.to_json() if sft else None,
            "fixed_splits": sorted(corpus.fixed_splits()),
        }
        work = tmp if part is not None else tmp / ".part"
        # one pool for both phases: worker start-up (a fresh interpreter each) is paid once
        pool = tokenizer_pool(workers, tok_path, work, dtype, val_fraction, ref_fraction, corpus, sft,
                              seq_len)
        try:
            splits = tokenize_part(corpus, work, pool, progress=progress)
            if part is not None:
                _save_part(tmp, splits, settings, part, corpus)
            else:
                write_shards(splits, tmp, settings, tk, tok_path, corpus.describe(), pool)
            pool.close()
        finally:
            pool.terminate()
            for _, f in _TOK.get("files", {}).values():
                f.close()
            _TOK.clear()
        if part is None:
            shutil.rmtree(work)

    _atomic_dir(out, overwrite, fill)
    return out if part is not None else Manifest.load(out)
