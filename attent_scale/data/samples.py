"""The shard sample format, its one writer and reader: per sample a token member plus an optional loss mask.

A shard is a tar stream (what webdataset's TarWriter writes); sample `id` is the members named
`{id:010d}.tokens.u16` (or `.tokens.u32`: the manifest's token dtype) and, for instruction data, a
`{id:010d}.mask.u8` right after it: one byte per token, 1 where the token is a training target. A
sample's labels are its tokens shifted by one, -100 where the mask says the token is not a target (a
prompt), so every loss that ignores -100 counts response tokens only. Readers take an open binary file.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

KEY_WIDTH = 10  # sample keys are zero-padded global ids
TAR_MTIME = 0  # constant tar metadata: re-runs give byte-identical shards
TAR_USER = "attent"
MASK_FIELD = "mask.u8"
IGNORE_INDEX = -100
_TOKEN_FIELDS = {"uint16": "tokens.u16", "uint32": "tokens.u32"}


def sample_key(sample_id: int) -> str:
    return f"{sample_id:0{KEY_WIDTH}d}"


def token_field(dtype: str) -> str:
    """The member suffix of a sample's tokens for the manifest's token dtype."""
    return _TOKEN_FIELDS[np.dtype(dtype).name]


@dataclass
class Sample:
    """One decoded sample: `tokens` (seq_len + 1 at most) and, for instruction data, its loss mask."""

    tokens: np.ndarray
    mask: np.ndarray | None = None  # uint8 per token, 1 = a target

    @property
    def inputs(self) -> np.ndarray:
        return self.tokens[:-1]

    @property
    def labels(self) -> np.ndarray:
        """The next-token targets of `inputs` (int64), -100 where the target token is masked out."""
        labels = self.tokens[1:].astype(np.int64)
        if self.mask is not None:
            labels[self.mask[1:] == 0] = IGNORE_INDEX
        return labels


@dataclass
class RawSample:
    """The members of one sample as stored: key (the id as text) and {field: bytes}."""

    key: str
    fields: dict[str, bytes]

    @property
    def id(self) -> int | None:
        try:
            return int(self.key)
        except ValueError:
            return None


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
    info.uname = info.gname = TAR_USER
    tf.addfile(info, io.BytesIO(data))


def write_samples(f: BinaryIO, samples: Iterable[tuple[int, np.ndarray, np.ndarray | None]],
                  dtype: str) -> int:
    """Write (id, tokens, mask or None) samples to the open binary file `f` as one tar stream; the
    tokens written. Without importing webdataset's writer (it imports torch: seconds per worker)."""
    field = token_field(dtype)
    dt = np.dtype(dtype)
    n = 0
    with tarfile.open(fileobj=f, mode="w|") as tf:
        for sid, tokens, mask in samples:
            key = sample_key(sid)
            _add(tf, f"{key}.{field}", np.ascontiguousarray(tokens, dtype=dt).tobytes())
            if mask is not None:
                _add(tf, f"{key}.{MASK_FIELD}", np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
            n += len(tokens)
    return n


def read_samples(f: BinaryIO) -> Iterator[RawSample]:
    """The samples of the open tar stream `f` (read front to back, never seeked: an object-store stream
    will do), in stored order: consecutive members with one key form a sample. Raises what the tar
    reader raises (OSError, tarfile.TarError, EOFError, ValueError). No webdataset import: it imports
    torch, seconds in every builder worker."""
    current: RawSample | None = None
    with tarfile.open(fileobj=f, mode="r|") as tf:
        for info in tf:
            if not info.isfile():
                continue
            fh = tf.extractfile(info)
            data = fh.read() if fh is not None else b""
            key, _, field = info.name.split("/")[-1].partition(".")
            if current is not None and key != current.key:
                yield current
                current = None
            if current is None:
                current = RawSample(key, {})
            current.fields[field] = data
    if current is not None:
        yield current


def decode(raw: RawSample, dtype: np.dtype, seq_len: int, vocab_size: int) -> Sample | str:
    """The decoded sample, or why it does not decode (one phrase)."""
    field = token_field(dtype.name)
    data = raw.fields.get(field)
    if data is None:
        return f"no {field} member"
    extra = set(raw.fields) - {field, MASK_FIELD}
    if extra:
        return f"unexpected member(s) {sorted(extra)}"
    if len(data) % dtype.itemsize:
        return f"{field} is {len(data)} bytes, not a multiple of {dtype.itemsize}"
    tokens = np.frombuffer(data, dtype=dtype)
    if not 2 <= len(tokens) <= seq_len + 1:
        return f"{len(tokens)} tokens (need 2..{seq_len + 1})"
    if int(tokens.max()) >= vocab_size:
        return f"token id {int(tokens.max())} >= vocab_size {vocab_size}"
    mask = None
    if MASK_FIELD in raw.fields:
        mask = np.frombuffer(raw.fields[MASK_FIELD], dtype=np.uint8)
        if len(mask) != len(tokens):
            return f"{MASK_FIELD} has {len(mask)} entries for {len(tokens)} tokens"
        if int(mask.max()) > 1:
            return f"{MASK_FIELD} holds a value other than 0/1"
    return Sample(tokens, mask)
