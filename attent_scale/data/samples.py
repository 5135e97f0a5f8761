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


_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # regular file types (7: contiguous file, read as regular)
# links, devices, dirs, fifos, global pax headers, GNU long link names: read past, never a file
_SKIPPED = (b"1", b"2", b"3", b"4", b"5", b"6", b"g", b"K")


def _octal(field: bytes) -> int:
    """A tar header number: NUL/space-terminated octal, or GNU base-256 (high bit set)."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise tarfile.ReadError("invalid header") from None


def _signed_checksum(header: bytes) -> int:
    """The header checksum as some old tar writers computed it: bytes as signed chars."""
    signed = memoryview(header).cast("b")
    return sum(signed) - sum(signed[148:156]) + 256


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise tarfile.ReadError("unexpected end of data")
    return data


def _pax(data: bytes) -> dict[str, str]:
    """The records of a pax extended header: b"<len> <key>=<value>\\n" each."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        end = pos + int(data[pos:sp])
        key, _, value = data[sp + 1:end - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return out


def _tar_files(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular member of the tar stream `f`, front to back, never seeked.

    The shards' hot path: tarfile's stream reader builds a TarInfo per member and costs ~80 us a
    sample, about 2% of a small model's step; this reads the 512-byte headers directly (ustar, with
    pax and GNU long-name headers) and raises tarfile.ReadError for what tarfile would refuse."""
    first, long_name, pax = True, None, {}
    while True:
        header = f.read(_BLOCK)
        if not header:
            if first:
                raise tarfile.ReadError("empty file")
            return  # tarfile accepts a stream that stops after a whole member
        if len(header) != _BLOCK:
            raise tarfile.ReadError("truncated header")
        first = False
        if header == bytes(_BLOCK):
            return  # end-of-archive marker
        stored = _octal(header[148:156])
        if stored != sum(header) - sum(header[148:156]) + 256 and stored != _signed_checksum(header):
            raise tarfile.ReadError("invalid header")
        kind = header[156:157]
        size = int(pax["size"]) if "size" in pax else _octal(header[124:136])
        data = _read_exact(f, size)
        if size % _BLOCK:
            _read_exact(f, _BLOCK - size % _BLOCK)
        if kind == b"x":
            pax = _pax(data)
            continue
        if kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind in _REGULAR:
            name = pax.get("path") or long_name
            if name is None:
                name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if header[257:263] in (b"ustar\0", b"ustar "):
                    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    if prefix:
                        name = f"{prefix}/{name}"
            yield name, data
        elif kind not in _SKIPPED:
            raise tarfile.ReadError(f"unsupported member type {kind!r}")
        long_name, pax = None, {}


def read_samples(f: BinaryIO) -> Iterator[RawSample]:
    """The samples of the open tar stream `f` (read front to back, never seeked: an object-store stream
    will do), in stored order: consecutive members with one key form a sample. Raises what the tar
    reader raises (OSError, tarfile.TarError, EOFError, ValueError)."""
    current: RawSample | None = None
    for name, data in _tar_files(f):
        key, _, field = name.rsplit("/", 1)[-1].partition(".")
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
