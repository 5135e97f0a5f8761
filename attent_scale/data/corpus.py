"""Text corpus inputs for the shard builder: files, directories, JSONL, or the embedded stdlib corpus."""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from attent_scale.errors import UserError

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class Document:
    """One document: `name` says where it came from (path, or path:line for JSONL)."""

    name: str
    text: str


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
        elif p.exists():
            files.append(p)
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
        self.max_bytes = max_bytes
        self.max_docs = max_docs
        if not self.files:
            names = [str(i) for i in inputs]
            raise UserError(f"empty corpus: no input files matched {names} (--glob {glob!r})")

    def describe(self) -> str:
        return "embedded stdlib corpus" if self.embedded else f"{len(self.files)} input file(s)"

    def _read(self, path: Path) -> str:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UserError(f"{path}: cannot read input file ({exc.strerror or exc})") from None
        if self.embedded:
            return data.decode("utf-8", errors="replace")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None

    def _docs_of(self, path: Path) -> Iterator[Document]:
        text = self._read(path)
        if self.text_field is None:  # with --text-field every input file is JSONL, one document a line
            yield Document(str(path), text)
            return
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise UserError(f"{path}:{lineno}: invalid JSON ({exc})") from None
            if not isinstance(rec, dict) or self.text_field not in rec:
                raise UserError(f"{path}:{lineno}: no field {self.text_field!r} (set --text-field)")
            value = rec[self.text_field]
            if not isinstance(value, str):
                raise UserError(f"{path}:{lineno}: field {self.text_field!r} is not a string")
            yield Document(f"{path}:{lineno}", value)

    def __iter__(self) -> Iterator[Document]:
        total = 0
        count = 0
        for path in self.files:
            for doc in self._docs_of(path):
                if not doc.text.strip():
                    continue
                if self.max_docs is not None and count >= self.max_docs:
                    return
                size = len(doc.text.encode())
                if self.max_bytes is not None and count > 0 and total + size > self.max_bytes:
                    return
                total += size
                count += 1
                yield doc
