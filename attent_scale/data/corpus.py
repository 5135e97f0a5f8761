"""Text corpus inputs for the shard builder: files, directories, JSONL, or the embedded stdlib corpus."""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attent_scale.errors import UserError

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class Document:
    """One document: `name` says where it came from (path, or path:line for JSONL); `record` is the
    whole JSON object of a JSONL line (the builder takes instruction fields from it)."""

    name: str
    text: str
    record: dict[str, Any] | None = None


def _unreadable(path: Path, exc: OSError) -> UserError:
    return UserError(f"{path}: cannot read input file ({exc.strerror or exc})")


def _skip_stdlib_dir(name: str) -> bool:
    return name in SKIP_DIRS or name.endswith("_test") or name.endswith("_tests")


def stdlib_files() -> list[Path]:
    """The .py sources of the running Python's standard library, test suites and site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(_skip_stdlib_dir(part) for part in rel.parts[:-1]):
            continue
        if p.name.startswith("test_") or not p.is_file():
            continue
        files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _expand(inputs: Sequence[str | Path], glob: str) -> list[Path]:
    files: list[Path] = []
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            found = sorted((q for q in p.rglob(glob) if q.is_file()), key=lambda q: q.as_posix())
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif p.exists():  # a FIFO or device would block the build or never end
            raise UserError(f"{p}: input is not a regular file or directory")
        else:
            raise UserError(f"{p}: input file not found")
    return files


class Corpus:
    """A re-iterable, deterministic sequence of documents with optional byte/document caps.

    Plain text: one document per file. With `text_field`, every input file is JSONL and each non-blank
    line is one document, its text under `text_field`.
    """

    def __init__(
        self,
        inputs: Sequence[str | Path] = (),
        *,
        glob: str = "*",
        text_field: str | None = None,
        max_bytes: int | None = None,
        max_docs: int | None = None,
    ) -> None:
        self.embedded = not inputs
        self.files = stdlib_files() if self.embedded else _expand(inputs, glob)
        self.text_field = text_field
        self.field_flag = "--text-field"  # the flag that named text_field, for errors (--prompt-field)
        self.max_bytes = max_bytes
        self.max_docs = max_docs
        if not self.files:
            names = [str(i) for i in inputs]
            raise UserError(f"empty corpus: no input files matched {names} (--glob {glob!r})")

    def describe(self) -> str:
        return "embedded stdlib corpus" if self.embedded else f"{len(self.files)} input file(s)"

    def _decode(self, path: Path, data: bytes, offset: int = 0) -> str:
        if self.embedded:
            return data.decode("utf-8", errors="replace")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text (byte {offset + exc.start})") from None

    def _read(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise _unreadable(path, exc) from None

    def _read_lines(self, path: Path, start: int, stop: int) -> tuple[int, bytes]:
        """(byte offset of the first, bytes of) the lines that start in [start, stop): the line running
        into `start` is skipped, the line running over `stop` is finished."""
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

    def _line_number(self, path: Path, offset: int) -> int:
        """1-based number of the line starting at byte `offset` (read only for an error message)."""
        with path.open("rb") as f:
            return f.read(offset).count(b"\n") + 1

    def docs_in(self, path: Path, start: int = 0, stop: int | None = None) -> Iterator[Document]:
        """The non-blank documents of one input file; with `stop` (JSONL only), of the lines that start
        in bytes [start, stop), so that a large JSONL file splits into independent ranges."""
        if self.text_field is None:  # with --text-field every input file is JSONL, one document a line
            text = self._decode(path, self._read(path))
            if text.strip():
                yield Document(str(path), text)
            return
        # a range knows its first line's byte offset, not its number: that is counted only for an error
        offset, data = (0, self._read(path)) if stop is None else self._read_lines(path, start, stop)
        lineno = 1
        for raw in data.split(b"\n"):
            try:
                line = self._decode(path, raw, offset)
                rec = self._jsonl_record(line) if line.strip() else None
                value = self._jsonl_text(rec) if rec is not None else None
            except UserError as exc:
                where = lineno if stop is None else self._line_number(path, offset)
                raise UserError(f"{path}:{where}: {str(exc).removeprefix(f'{path}: ')}") from None
            if value is not None:
                yield Document(f"{path}:{lineno}" if stop is None else f"{path}@{offset}", value, rec)
            offset += len(raw) + 1
            lineno += 1

    def _jsonl_record(self, line: str) -> dict[str, Any]:
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise UserError(f"invalid JSON ({exc})") from None
        if not isinstance(rec, dict):
            kind = type(rec).__name__
            raise UserError(f"not a JSON object (a {kind}); each line must hold {{{self.text_field!r}: ...}}")
        return rec

    def _jsonl_text(self, rec: dict[str, Any]) -> str:
        if self.text_field not in rec:
            raise UserError(f"no field {self.text_field!r} (set {self.field_flag})")
        value = rec[self.text_field]
        if not isinstance(value, str):
            raise UserError(f"field {self.text_field!r} is not a string")
        return value

    def tasks(self, chunk_bytes: int, chunk_files: int) -> Iterator[list[tuple[str, int, int | None]]]:
        """The corpus as independent reading tasks, in order: runs of whole files of about `chunk_bytes`
        (at most `chunk_files`), and byte ranges of `chunk_bytes` of a large JSONL file; a worker reads
        its task with `docs_of_task`. Only for an uncapped corpus (the caps need the in-order prefix)."""
        if self.max_bytes is not None or self.max_docs is not None:
            raise ValueError("a capped corpus is read in order by one process")
        group: list[tuple[str, int, int | None]] = []
        size = 0
        for path in self.files:
            try:
                n = path.stat().st_size
            except OSError as exc:
                raise _unreadable(path, exc) from None
            if self.text_field is not None and n > 2 * chunk_bytes:
                if group:
                    yield group
                    group, size = [], 0
                for a in range(0, n, chunk_bytes):
                    yield [(str(path), a, min(a + chunk_bytes, n))]
                continue
            group.append((str(path), 0, None))
            size += n
            if size >= chunk_bytes or len(group) >= chunk_files:
                yield group
                group, size = [], 0
        if group:
            yield group

    def docs_of_task(self, task: list[tuple[str, int, int | None]]) -> Iterator[Document]:
        """The documents of one task of `tasks`, in order."""
        for path, start, stop in task:
            yield from self.docs_in(Path(path), start, stop)

    def __iter__(self) -> Iterator[Document]:
        total = 0
        count = 0
        for path in self.files:
            for doc in self.docs_in(path):
                if self.max_docs is not None and count >= self.max_docs:
                    return
                size = len(doc.text.encode())
                if self.max_bytes is not None and count > 0 and total + size > self.max_bytes:
                    return
                total += size
                count += 1
                yield doc
