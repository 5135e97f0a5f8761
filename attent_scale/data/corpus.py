"""Text corpus inputs for the shard builder: files, directories, globs in any reader format
(data/readers.py), the --val-input/--ref-input splits, or the embedded stdlib corpus."""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attent_scale.data.readers import expand_inputs, input_format, iter_records, record_error, units
from attent_scale.errors import UserError

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
DEFAULT_FIELD = "text"
SPLIT_FLAGS = {"val": "--val-input", "ref": "--ref-input"}


@dataclass(frozen=True)
class Document:
    """One document: `name` says where it came from (path, path:line, path:row N, ...); `split` is the
    split its input file was given for (--val-input/--ref-input), None for the hash split; `record` is
    the whole record of a record input when the corpus keeps them (`columns` given: the builder takes
    instruction fields from it)."""

    name: str
    text: str
    split: str | None = None
    record: dict[str, Any] | None = None


def is_blank(doc: Document) -> bool:
    """The one rule for every input format: a document whose text is empty or whitespace only teaches
    nothing; the builder skips it and counts it (manifest: blank_documents). An instruction record (its
    record kept) is judged by the builder on its response instead."""
    return doc.record is None and not doc.text.strip()


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


class Corpus:
    """A re-iterable, deterministic sequence of documents with optional byte/document caps.

    Every input file is read by its format (data/readers.py): a record format (JSONL, parquet, Arrow,
    webdataset tar) gives one document per record, its text under `text_field` (default "text"); any other
    file is one plain-text document, or JSONL when `text_field` is given (as before the record formats).
    Files of `val_inputs` / `ref_inputs` come after the inputs and are that split whole; the caps count
    the inputs only.
    """

    def __init__(
        self,
        inputs: Sequence[str | Path] = (),
        *,
        glob: str = "*",
        text_field: str | None = None,
        max_bytes: int | None = None,
        max_docs: int | None = None,
        val_inputs: Sequence[str | Path] = (),
        ref_inputs: Sequence[str | Path] = (),
        columns: Sequence[str] | None = None,
        field_flag: str = "--text-field",
    ) -> None:
        self.embedded = not inputs
        self.files = stdlib_files() if self.embedded else expand_inputs(inputs, glob)
        self.text_field = text_field
        self.field = text_field or DEFAULT_FIELD
        self.field_flag = field_flag  # the flag that named the field, for errors (--prompt-field)
        # what a record reader must read (parquet/Arrow columns); given, each Document keeps its record
        self.columns = tuple(columns) if columns else (self.field,)
        self.keep_records = bool(columns)
        self.max_bytes = max_bytes
        self.max_docs = max_docs
        if not self.files:
            names = [str(i) for i in inputs]
            raise UserError(f"empty corpus: no input files matched {names} (--glob {glob!r})")
        self.split_files: dict[str, str] = {}  # str(path) -> "val" / "ref" for the given splits
        seen = {f.resolve(): "the inputs" for f in self.files}
        for split, given in (("val", val_inputs), ("ref", ref_inputs)):
            if not given:
                continue
            flag = SPLIT_FLAGS[split]
            found = expand_inputs(given, glob)
            if not found:
                raise UserError(f"{flag} {[str(g) for g in given]}: no input files matched (--glob {glob!r})")
            for f in found:
                if f.resolve() in seen:
                    raise UserError(f"{f}: given both in {seen[f.resolve()]} and {flag}")
                seen[f.resolve()] = flag
                self.split_files[str(f)] = split
            self.files += found

    def describe(self) -> str:
        return "embedded stdlib corpus" if self.embedded else f"{len(self.files)} input file(s)"

    def fixed_splits(self) -> set[str]:
        """The splits taken from their own inputs (--val-input, --ref-input) instead of the hash."""
        return set(self.split_files.values())

    def _is_embedded(self, path: Path) -> bool:
        return self.embedded and str(path) not in self.split_files

    def format_of(self, path: Path) -> str:
        """How `path` is read: a readers.FORMATS value, or "text" (one document per file)."""
        fmt = "text" if self._is_embedded(path) else input_format(path)
        return "jsonl" if fmt == "text" and self.text_field is not None else fmt

    def _decode(self, path: Path, data: bytes) -> str:
        if self._is_embedded(path):
            return data.decode("utf-8", errors="replace")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None

    def record_text(self, loc: str, rec: dict[str, Any]) -> str:
        """The text of one record, or a UserError naming its location."""
        if self.field not in rec:
            raise record_error(loc, f"no field {self.field!r} (set {self.field_flag})")
        value = rec[self.field]
        if isinstance(value, str):
            return value
        kind = "null" if value is None else "bytes, not UTF-8" if isinstance(value, bytes) else \
            f"a {type(value).__name__}"
        raise record_error(loc, f"field {self.field!r} is not a string ({kind})")

    def docs_in(self, path: Path, start: int = 0, stop: int | None = None) -> Iterator[Document]:
        """The documents of one input file, blank ones too (`is_blank`: the builder counts them); with
        `stop`, of one piece of it (a byte range of a JSONL file, a row-group range of a parquet file: see
        `tasks`)."""
        split = self.split_files.get(str(path))
        fmt = self.format_of(path)
        if fmt == "text":
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise _unreadable(path, exc) from None
            yield Document(str(path), self._decode(path, data), split)
            return
        for loc, rec in iter_records(path, start, stop, fmt=fmt, columns=self.columns):
            yield Document(loc, self.record_text(loc, rec), split, rec if self.keep_records else None)

    def tasks(self, chunk_bytes: int, chunk_files: int) -> Iterator[list[tuple[str, int, int | None]]]:
        """The corpus as independent reading tasks, in order: runs of whole files of about `chunk_bytes`
        (at most `chunk_files`), and pieces of `chunk_bytes` of a large JSONL or parquet file; a worker
        reads its task with `docs_of_task`. Only for an uncapped corpus (caps need the in-order prefix)."""
        if self.max_bytes is not None or self.max_docs is not None:
            raise ValueError("a capped corpus is read in order by one process")
        group: list[tuple[str, int, int | None]] = []
        size = 0
        for path in self.files:
            fmt = self.format_of(path)
            pieces = units(path, fmt, chunk_bytes) if fmt != "text" else [(0, None)]
            if len(pieces) > 1:
                if group:
                    yield group
                    group, size = [], 0
                for a, b in pieces:
                    yield [(str(path), a, b)]
                continue
            try:
                size += path.stat().st_size
            except OSError as exc:
                raise _unreadable(path, exc) from None
            group.append((str(path), 0, None))
            if size >= chunk_bytes or len(group) >= chunk_files:
                yield group
                group, size = [], 0
        if group:
            yield group

    def docs_of_task(self, task: list[tuple[str, int, int | None]]) -> Iterator[Document]:
        """The documents of one task of `tasks`, in order."""
        for path, start, stop in task:
            yield from self.docs_in(Path(path), start, stop)

    def _all_blank(self, files: list[Path]) -> int | None:
        """None when `files` hold a non-blank document, else how many blank ones they hold."""
        blank = 0
        for p in files:
            for d in self.docs_in(p):
                if not is_blank(d):
                    return None
                blank += 1
        return blank

    def check_nonempty(self) -> None:
        """A UserError when the inputs, or a --val-input/--ref-input, hold no non-blank document."""
        main = [p for p in self.files if str(p) not in self.split_files]
        groups = [("empty corpus", main)] + [
            (flag, [p for p in self.files if self.split_files.get(str(p)) == split])
            for split, flag in SPLIT_FLAGS.items()]
        for head, files in groups:
            blank = self._all_blank(files) if files else None
            if blank is None:
                continue
            if head == "empty corpus" and self.embedded:
                raise UserError("empty corpus: the embedded stdlib corpus holds no non-blank document")
            what = f"{files[0]} holds" if len(files) == 1 else f"{len(files)} files ({files[0]}, ...) hold"
            counted = f" ({blank} blank: empty or whitespace only)" if blank else ""
            raise UserError(f"{head}: {what} no non-blank document{counted}")

    def __iter__(self) -> Iterator[Document]:
        total = 0
        count = 0
        capped = False
        for path in self.files:
            fixed = str(path) in self.split_files
            if capped and not fixed:
                continue
            for doc in self.docs_in(path):
                if fixed or is_blank(doc):  # a given split is read whole: the caps are for the inputs;
                    yield doc  # a blank document counts toward neither cap (the builder counts it)
                    continue
                size = len(doc.text.encode())
                if (self.max_docs is not None and count >= self.max_docs) or \
                        (self.max_bytes is not None and count > 0 and total + size > self.max_bytes):
                    capped = True
                    break
                total += size
                count += 1
                yield doc
