"""Input readers: one record iterator over JSONL (plain, .gz, .zst), parquet, Arrow / `save_to_disk`
datasets and webdataset tars, plus the expansion of files, directories and globs into input files."""

from __future__ import annotations

import glob as globlib
import io
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from attent_scale.errors import UserError
from attent_scale.extras import require

HF_STATE = "state.json"  # what `Dataset.save_to_disk` writes beside its .arrow files
HF_INFO = "dataset_info.json"
HF_DICT = "dataset_dict.json"  # `DatasetDict.save_to_disk`: one sub-directory per split
BATCH_ROWS = 1024
# name endings -> format; the longest matching ending wins
FORMATS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".jsonl.gz": "jsonl.gz", ".ndjson.gz": "jsonl.gz", ".json.gz": "jsonl.gz",
    ".jsonl.zst": "jsonl.zst", ".ndjson.zst": "jsonl.zst", ".json.zst": "jsonl.zst",
    ".parquet": "parquet", ".pq": "parquet",
    ".arrow": "arrow",
    ".tar": "tar", ".tar.gz": "tar", ".tgz": "tar",
}
# endings of files no reader here can read; anything else is plain text (one document per file)
UNKNOWN = (".gz", ".zst", ".zstd", ".bz2", ".xz", ".lz4", ".zip", ".7z", ".rar", ".csv", ".tsv", ".xlsx",
           ".feather", ".orc", ".avro", ".pkl", ".pickle", ".npy", ".npz")
KNOWN = ".jsonl[.gz|.zst], .parquet, .arrow, .tar[.gz], a save_to_disk directory, or plain text"
_RANGE = re.compile(r"^(?P<path>.*)@(?P<offset>\d+)$")


def input_format(path: Path) -> str:
    """The reader for `path` by its name: one of FORMATS' values, or "text"; an unknown compressed or
    binary ending is a UserError."""
    name = path.name.lower()
    best = max((e for e in FORMATS if name.endswith(e)), key=len, default=None)
    if best is not None:
        return FORMATS[best]
    if name.endswith(UNKNOWN):
        ending = "." + name.rsplit(".", 1)[-1]
        raise UserError(f"{path}: unknown input format {ending!r} (known: {KNOWN})")
    return "text"


def record_error(loc: str, message: str) -> UserError:
    """`LOC: message`, a JSONL byte range's `path@offset` named by its line (counted only here)."""
    m = _RANGE.match(loc)
    if m and Path(m["path"]).is_file():
        with open(m["path"], "rb") as f:
            line = f.read(int(m["offset"])).count(b"\n") + 1
        loc = f"{m['path']}:{line}"
    return UserError(f"{loc}: {message}")


def _unreadable(path: Path | str, exc: BaseException) -> UserError:
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
    return UserError(f"{path}: cannot read input file ({why})")


# ---------------------------------------------------------------------------------------- expansion

def _hf_files(d: Path) -> list[Path]:
    """The .arrow files of a `save_to_disk` directory, in its state.json order."""
    if (d / HF_DICT).is_file():
        try:
            splits = json.loads((d / HF_DICT).read_text()).get("splits", [])
        except (OSError, ValueError, AttributeError):
            splits = []
        first = f"{d / splits[0]}" if splits else f"{d}/SPLIT"
        raise UserError(f"{d}: a DatasetDict (splits: {', '.join(splits) or '?'}); give one split's "
                        f"directory, e.g. {first} (and --val-input for another)")
    try:
        state = json.loads((d / HF_STATE).read_text())
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{d / HF_STATE}: not a save_to_disk state ({type(exc).__name__}: {exc})") from None
    files = [d / n for n in names]
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: listed in {d / HF_STATE} but missing")
    return files


def is_hf_dataset(d: Path) -> bool:
    return d.is_dir() and ((d / HF_STATE).is_file() and (d / HF_INFO).is_file() or (d / HF_DICT).is_file())


def _dataset_root(f: Path, top: Path, cache: dict[Path, Path | None]) -> Path | None:
    """The save_to_disk directory at or below `top` that holds file `f`, if any."""
    d = f.parent
    chain = []
    root = None
    while True:
        if d in cache:
            root = cache[d]
            break
        chain.append(d)
        if is_hf_dataset(d):
            root = d
            break
        if d == top or d == d.parent:
            break
        d = d.parent
    for c in chain:
        cache[c] = root
    return root


def _expand_dir(p: Path, glob: str) -> list[Path]:
    if is_hf_dataset(p):
        return _hf_files(p)
    files: list[Path] = []
    seen: set[Path] = set()
    cache: dict[Path, Path | None] = {}
    for q in sorted((q for q in p.rglob(glob) if q.is_file()), key=lambda q: q.as_posix()):
        root = _dataset_root(q, p, cache)
        if root is None:
            files.append(q)
        elif root not in seen:  # a dataset's metadata is no document; its .arrow files are read whole
            seen.add(root)
            files.extend(_hf_files(root))
    return files


def expand_inputs(inputs: Sequence[str | Path], glob: str = "*") -> list[Path]:
    """Input files of files, directories (recursive, names matching `glob`; a save_to_disk directory
    gives its .arrow files) and glob patterns, in a deterministic order."""
    files: list[Path] = []
    for inp in inputs:
        p = Path(inp)
        if not p.exists() and globlib.has_magic(str(inp)):
            matched = sorted(globlib.glob(str(inp), recursive=True))
            if not matched:
                raise UserError(f"{inp}: no input file matches")
            files.extend(expand_inputs(matched, glob))
        elif p.is_dir():
            files.extend(_expand_dir(p, glob))
        elif p.is_file():
            files.append(p)
        elif p.exists():  # a FIFO or device would block the build or never end
            raise UserError(f"{p}: input is not a regular file or directory")
        else:
            raise UserError(f"{p}: input file not found")
    return files


# ---------------------------------------------------------------------------------------- records

def _json_record(path: Path, raw: bytes, offset: int) -> dict[str, Any] | None:
    """The object on one JSONL line (None for a blank line); errors without a location."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"not UTF-8 text (byte {offset + exc.start})") from None
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except ValueError as exc:
        raise UserError(f"invalid JSON ({exc})") from None
    if not isinstance(rec, dict):
        raise UserError(f"not a JSON object (a {type(rec).__name__}); each line must hold one object")
    return rec


def _read_range(path: Path, start: int, stop: int) -> tuple[int, bytes]:
    """(byte offset of the first, bytes of) the lines that start in [start, stop): the line running into
    `start` is skipped, the line running over `stop` is finished."""
    try:
        with path.open("rb") as f:
            if start > 0:
                f.seek(start - 1)
                if f.read(1) != b"\n":
                    f.readline()
            first = f.tell()
            data = f.read(max(0, stop - first))
            if data and not data.endswith(b"\n"):
                data += f.readline()
            return first, data
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _jsonl(path: Path, start: int, stop: int | None) -> Iterator[tuple[str, dict[str, Any]]]:
    if stop is None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _unreadable(path, exc) from None
        offset = 0
    else:
        offset, data = _read_range(path, start, stop)
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        loc = f"{path}:{lineno}" if stop is None else f"{path}@{offset}"
        try:
            rec = _json_record(path, raw, offset)
        except UserError as exc:
            raise record_error(loc, str(exc)) from None
        if rec is not None:
            yield loc, rec
        offset += len(raw) + 1


def _compressed_jsonl(path: Path, codec: str) -> Iterator[tuple[str, dict[str, Any]]]:
    pa = require("pyarrow", f"{path}: reading .{codec} streams")

    lineno, offset = 0, 0
    try:
        with io.BufferedReader(pa.input_stream(str(path), compression=codec)) as f:
            for raw in f:
                lineno += 1
                try:
                    rec = _json_record(path, raw.rstrip(b"\n"), offset)
                except UserError as exc:
                    raise UserError(f"{path}:{lineno}: {exc}") from None
                offset += len(raw)
                if rec is not None:
                    yield f"{path}:{lineno}", rec
    except (OSError, EOFError, pa.ArrowException) as exc:
        if isinstance(exc, FileNotFoundError | PermissionError):
            raise _unreadable(path, exc) from None
        raise UserError(f"{path}:{lineno + 1}: cannot decompress {codec} ({exc})") from None


def _columns(names: Sequence[str], columns: Sequence[str] | None) -> list[str] | None:
    """The wanted columns that exist; all (None) when one is missing, so an error can list them."""
    if columns is None or any(c not in names for c in columns):
        return None
    return list(columns)


def _parquet(path: Path, start: int, stop: int | None,
             columns: Sequence[str] | None) -> Iterator[tuple[str, dict[str, Any]]]:
    pa = require("pyarrow", f"{path}: reading parquet")
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
    except (OSError, pa.ArrowException) as exc:
        if isinstance(exc, FileNotFoundError | PermissionError):
            raise _unreadable(path, exc) from None
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    meta = pf.metadata
    stop = meta.num_row_groups if stop is None else stop
    row = sum(meta.row_group(i).num_rows for i in range(start))
    groups = list(range(start, stop))
    if not groups:
        return
    batches = pf.iter_batches(batch_size=BATCH_ROWS, row_groups=groups,
                              columns=_columns(pf.schema_arrow.names, columns))
    while True:
        try:
            batch = next(batches, None)
        except (OSError, pa.ArrowException) as exc:
            raise UserError(f"{path}:row {row}: cannot read parquet ({exc})") from None
        if batch is None:
            return
        for rec in batch.to_pylist():
            yield f"{path}:row {row}", rec
            row += 1


def _arrow(path: Path, columns: Sequence[str] | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """An Arrow IPC stream (what `save_to_disk` writes) or IPC file, memory-mapped batch by batch."""
    pa = require("pyarrow", f"{path}: reading Arrow files")

    row = 0
    try:
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        except pa.ArrowInvalid:
            source.seek(0)
            fr = pa.ipc.open_file(source)
            batches = (fr.get_batch(i) for i in range(fr.num_record_batches))
        cols = None
        while True:
            batch = next(batches, None)
            if batch is None:
                return
            cols = _columns(batch.schema.names, columns) if cols is None else cols
            if cols is not None:
                batch = batch.select(cols)
            for rec in batch.to_pylist():
                yield f"{path}:row {row}", rec
                row += 1
    except (OSError, pa.ArrowException) as exc:
        if isinstance(exc, FileNotFoundError | PermissionError):
            raise _unreadable(path, exc) from None
        raise UserError(f"{path}:row {row}: not a readable Arrow file ({exc})") from None


def _tar(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """webdataset samples: members grouped by key; text members decoded, a .json member's fields merged
    in, and a `.txt` member also under "text" (webdataset's usual text field)."""
    from webdataset.handlers import reraise_exception  # imports torch: only for tar inputs
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    key = None
    try:
        with path.open("rb") as f:
            members = (dict(m, __url__=str(path)) for m in tar_file_iterator(f, handler=reraise_exception))
            for sample in group_by_keys(members, handler=reraise_exception):
                key = sample.get("__key__")
                rec: dict[str, Any] = {"__key__": key}
                for ext, data in sample.items():
                    if ext.startswith("__") or not isinstance(data, bytes):
                        continue
                    if ext == "json":
                        try:
                            obj = json.loads(data.decode("utf-8"))
                        except (UnicodeDecodeError, ValueError) as exc:
                            raise UserError(f"{path}:sample {key}: {key}.json is not valid JSON ({exc})") \
                                from None
                        if isinstance(obj, dict):
                            rec.update(obj)
                        continue
                    try:
                        rec[ext] = data.decode("utf-8")
                    except UnicodeDecodeError:
                        rec[ext] = data
                if "txt" in rec and "text" not in rec:
                    rec["text"] = rec["txt"]
                yield f"{path}:sample {key}", rec
    except UserError:
        raise
    except (FileNotFoundError, PermissionError) as exc:
        raise _unreadable(path, exc) from None
    except Exception as exc:  # tarfile / webdataset raise many kinds on a truncated or garbled tar
        after = f" after sample {key}" if key is not None else ""
        raise UserError(f"{path}: not a readable tar{after} ({type(exc).__name__}: {exc})") from None


def iter_records(path: str | Path, start: int = 0, stop: int | None = None, *, fmt: str | None = None,
                 columns: Sequence[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, record) for every record of one input file, in order. `location` is `path:LINE`
    (JSONL; `path@OFFSET` in a byte range, see `record_error`), `path:row N` (parquet, Arrow; 0-based) or
    `path:sample KEY` (tar). [start, stop) is a byte range of a plain JSONL file or a row-group range
    of a parquet file (see `units`); `fmt` overrides the format by name; `columns` is what the caller
    reads (parquet/Arrow read only those when all exist). Errors are UserErrors naming the location."""
    path = Path(path)
    fmt = fmt or input_format(path)
    if fmt == "jsonl":
        yield from _jsonl(path, start, stop)
    elif fmt == "jsonl.gz":
        yield from _compressed_jsonl(path, "gzip")
    elif fmt == "jsonl.zst":
        yield from _compressed_jsonl(path, "zstd")
    elif fmt == "parquet":
        yield from _parquet(path, start, stop, columns)
    elif fmt == "arrow":
        yield from _arrow(path, columns)
    elif fmt == "tar":
        yield from _tar(path)
    else:
        raise UserError(f"{path}: not a record format (known: {KNOWN})")


def units(path: Path, fmt: str, chunk_bytes: int) -> list[tuple[int, int | None]]:
    """Independent [start, stop) pieces of one file for parallel reading, about `chunk_bytes` each: byte
    ranges of a plain JSONL file, row-group runs of a parquet file, else the whole file (0, None)."""
    try:
        n = path.stat().st_size
    except OSError as exc:
        raise _unreadable(path, exc) from None
    if n <= 2 * chunk_bytes:
        return [(0, None)]
    if fmt == "jsonl":
        return [(a, min(a + chunk_bytes, n)) for a in range(0, n, chunk_bytes)]
    if fmt == "parquet":
        pa = require("pyarrow", f"{path}: reading parquet")
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(str(path)).metadata
        except (OSError, pa.ArrowException) as exc:
            raise UserError(f"{path}: not a readable parquet file ({exc})") from None
        out: list[tuple[int, int | None]] = []
        a, size = 0, 0
        for i in range(meta.num_row_groups):
            size += meta.row_group(i).total_byte_size
            if size >= chunk_bytes:
                out.append((a, i + 1))
                a, size = i + 1, 0
        if a < meta.num_row_groups:
            out.append((a, meta.num_row_groups))
        return out or [(0, None)]
    return [(0, None)]
