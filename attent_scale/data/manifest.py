"""Shard manifest: the description of a built shard set (manifest.json, in a directory or at a URL) and its
loader."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attent_scale.data import remote
from attent_scale.errors import UserError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_REMOTE_LOADED: dict[tuple[str, bool, remote.Options], Manifest] = {}


def file_problem(path: Path) -> str | None:
    """Why `path` cannot be read as a data file (missing, a directory, a FIFO, ...), or None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is missing"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
        "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
        "not a file"
    return f"is {kind}, not a regular file"


def shard_location(dir: str | Path, name: str) -> str:
    """Where shard `name` of the shard set in `dir` is read: the one place a (set, shard) pair becomes a
    location string (a blend's sources and a plain data.dir both go through it)."""
    if remote.is_url(dir):
        return str(remote.join(dir, name))
    return os.path.join(os.fspath(dir), name)  # a string join: 10^5 shards cost milliseconds


def set_name(dir: str | Path) -> str:
    """A shard set's default label (selection.jsonl, Prometheus): its directory's last component."""
    return remote.redact(os.fspath(dir)).rstrip("/").rsplit("/", 1)[-1] or "data"


@dataclass(frozen=True)
class Part:
    """One shard as a dataset (a manifest's split, or a blend) lays it out: the dataset ids
    [first_id, first_id + count) are read from the shard at `location`, whose own sample keys are the
    ids [local_first, local_first + local_count). With `draw` None the part is the whole shard
    (count == local_count, dataset id = local id + first_id - local_first); else it is the seeded subset
    of `count` of the shard's samples that `draw` keys (data/blend.py), in id order."""

    location: str
    first_id: int
    count: int
    local_first: int
    local_count: int
    source: int = 0
    draw: tuple[int, ...] | None = None
    bytes: int = 0  # the whole shard's size and sha256 (a URL's cached copy is checked against them)
    sha256: str = ""

    def local_ids(self, ids: np.ndarray) -> np.ndarray:
        """The shard's own ids (its sample keys) of dataset ids `ids` (all within this part), ascending
        where `ids` is."""
        rel = np.asarray(ids, dtype=np.int64) - self.first_id
        if self.draw is None:
            return rel + self.local_first
        return subset_ids(self.local_count, self.count, self.draw)[rel] + self.local_first


def subset_ids(n: int, k: int, key: tuple[int, ...]) -> np.ndarray:
    """k of range(n) drawn without replacement by a generator seeded with `key`, ascending: the same on
    every rank and worker."""
    rng = np.random.default_rng(list(key))
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard of a split: holds the dense ids [first_id, first_id + count)."""

    name: str
    first_id: int
    count: int
    bytes: int
    sha256: str = ""  # "" in a manifest that records no hash: that check is skipped
    tokens: int = 0

    @property
    def last_id(self) -> int:
        return self.first_id + self.count

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "first_id": self.first_id,
            "count": self.count,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "tokens": self.tokens,
        }


@dataclass
class Manifest:
    """A loaded manifest.json; `splits` maps split name to its ordered shard list. `dir` is a Path, or a URL
    string for a shard set in object storage (its tokenizer is then a local copy in the remote cache)."""

    dir: Path | str
    seq_len: int
    vocab_size: int
    eos_id: int
    pad_id: int
    tokenizer_path: Path
    tokenizer_sha256: str
    token_dtype: str
    splits: dict[str, list[ShardInfo]]
    newline_symbol: str | None = None
    raw: dict[str, Any] | None = None
    tokenizer_kind: str = "sentencepiece"  # or "hf" / "gguf": a Hugging Face tokenizer saved in tokenizer_dir
    tokenizer_dir: Path | None = None
    sft: bool = False  # instruction data: one example a sample, a loss mask beside its tokens
    sha256: str = ""  # of manifest.json's bytes

    @property
    def is_remote(self) -> bool:
        return isinstance(self.dir, str)

    @property
    def path(self) -> Path | str:
        """manifest.json's own location."""
        return remote.join(self.dir, MANIFEST_NAME)

    @property
    def path_shown(self) -> str:
        """manifest.json's location for a message (credentials redacted)."""
        return remote.redact(str(self.path))

    @property
    def display_dir(self) -> str:
        """`dir` for a message: a URL with its credentials redacted."""
        return remote.redact(str(self.dir))
    _parts: dict[str, list[Part]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def tokenizer_source(self) -> Path:
        """What AutoTokenizer (an HF kind) or sentencepiece loads: the directory, or the .model file."""
        return self.tokenizer_dir if self.tokenizer_dir is not None else self.tokenizer_path

    @classmethod
    def load(cls, dir: str | Path, *, check_files: bool = True) -> Manifest:
        """Read DIR/manifest.json (DIR a path or a URL); raise UserError naming the file when missing,
        invalid or incomplete. A URL's manifest is read once per process (a run's shard set is immutable)."""
        if remote.is_url(dir):
            key = (str(dir).rstrip("/"), check_files, remote.options())
            if key not in _REMOTE_LOADED:
                _REMOTE_LOADED[key] = cls._load(remote.location(dir), check_files)
            return _REMOTE_LOADED[key]
        return cls._load(remote.local(dir), check_files)

    @classmethod
    def _load(cls, d: Path | str, check_files: bool) -> Manifest:
        path = remote.join(d, MANIFEST_NAME)
        shown = remote.redact(str(path))
        try:
            raw_bytes = remote.read_bytes(path)
            data = json.loads(raw_bytes.decode("utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: manifest not found (run `attent-scale shards build`)") from None
        except remote.Unreachable as exc:
            missing = "FileNotFoundError" in exc.reason
            raise UserError(f"{shown}: manifest {'not found' if missing else 'unreachable'} "
                            f"({exc.reason})") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot read manifest: {exc}") from None
        except RecursionError:
            raise UserError(f"{shown}: cannot read manifest: its JSON is nested too deep to parse") from None
        path = shown  # messages below name a URL without its credentials
        tok_dir: Path | str = d
        if isinstance(d, str):  # the tokenizer comes to the local cache, named by its sha256
            try:
                t = data["tokenizer"]
                name = t.get("dir") or t["file"]
                tok_dir = remote.options().cache_root / "tokenizers" / str(t["sha256"])[:32]
                remote.fetch_tree(str(remote.join(d, name)), tok_dir / name)
            except remote.Unreachable as exc:
                raise UserError(f"{exc.url}: tokenizer listed in {path} unreachable ({exc.reason})") from None
            except (KeyError, TypeError, AttributeError) as exc:
                raise UserError(f"{path}: invalid manifest ({type(exc).__name__}: {exc})") from None
            tok_dir = Path(tok_dir)
        try:
            version = data["format_version"]
            if version != FORMAT_VERSION:
                raise UserError(f"{path}: format_version {version} not supported (expected {FORMAT_VERSION})")
            splits = {
                name: [ShardInfo(**s) for s in split["shards"]] for name, split in data["splits"].items()
            }
            m = cls(
                dir=d,
                seq_len=int(data["seq_len"]),
                vocab_size=int(data["vocab_size"]),
                eos_id=int(data["eos_id"]),
                pad_id=int(data["pad_id"]),
                tokenizer_path=Path(tok_dir) / data["tokenizer"]["file"],
                tokenizer_sha256=str(data["tokenizer"]["sha256"]),
                token_dtype=str(data["token_dtype"]),
                splits=splits,
                newline_symbol=data.get("newline_symbol"),
                raw=data,
                tokenizer_kind=str(data["tokenizer"].get("kind", "sentencepiece")),
                tokenizer_dir=Path(tok_dir) / data["tokenizer"]["dir"] if data["tokenizer"].get("dir")
                else None,
                sft=bool(data.get("build", {}).get("sft")),
                sha256=hashlib.sha256(raw_bytes).hexdigest(),
            )
        except UserError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"{path}: invalid manifest ({type(exc).__name__}: {exc})") from None
        if m.seq_len < 2 or m.vocab_size < 1:
            raise UserError(f"{path}: seq_len {m.seq_len} / vocab_size {m.vocab_size}: need >= 2 / >= 1")
        for name, shards in m.splits.items():
            for s in shards:
                ints = (s.first_id, s.count, s.bytes, s.tokens)
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints) or \
                        not isinstance(s.sha256, str):
                    raise UserError(f"{path}: split {name!r} shard {s.name!r}: a field has the wrong type")
                if not isinstance(s.name, str) or Path(s.name).name != s.name or s.name in ("", ".", ".."):
                    raise UserError(f"{path}: split {name!r} shard name {s.name!r} is not a file name in "
                                    f"{remote.redact(str(d))}")
        if m.tokenizer_kind not in ("sentencepiece", "hf", "gguf"):
            raise UserError(f"{path}: tokenizer kind {m.tokenizer_kind!r} not supported")
        if m.token_dtype not in ("uint16", "uint32"):
            raise UserError(f"{path}: token_dtype {m.token_dtype!r} not supported")
        for name, shards in m.splits.items():
            expect = 0
            for s in shards:
                if s.first_id != expect or s.count < 0:
                    raise UserError(f"{path}: split {name!r} shard {s.name} ids are not dense")
                expect = s.last_id
        if check_files:
            counts = m.count_problems()
            if counts:
                raise UserError(f"{path}: {counts[0]}")
            why = file_problem(m.tokenizer_path)
            if why:
                raise UserError(f"{m.tokenizer_path}: tokenizer listed in {path} {why}")
            if isinstance(d, str):
                names = [s.name for shards in m.splits.values() for s in shards]
                try:
                    found = remote.sizes(d, names)
                except remote.Unreachable as exc:
                    raise UserError(f"{exc.url}: shards listed in {path} unreachable "
                                    f"({exc.reason})") from None
                for name in names:
                    if found[name] is None:
                        raise UserError(f"{remote.redact(str(remote.join(d, name)))}: shard listed in {path} "
                                        "is missing")
            else:
                for shards in m.splits.values():
                    for s in shards:
                        why = file_problem(d / s.name)
                        if why:
                            raise UserError(f"{d / s.name}: shard listed in {path} {why}")
        return m

    def count_problems(self) -> list[str]:
        """Where a split's recorded totals (num_samples, tokens) disagree with its shard list."""
        out = []
        for name, info in (self.raw or {}).get("splits", {}).items():
            shards = self.splits.get(name, [])
            for key, have in (("num_samples", shards[-1].last_id if shards else 0),
                              ("tokens", sum(s.tokens for s in shards))):
                said = info.get(key) if isinstance(info, dict) else None
                if said is not None and said != have:
                    out.append(f"split {name!r} {key} {said} != {have} in its shard list")
        return out

    def shards(self, split: str) -> list[ShardInfo]:
        """The ordered shard list of `split`; UserError when the split does not exist."""
        if split not in self.splits:
            shown = remote.redact(str(self.path))
            raise UserError(f"{shown}: no split {split!r} (have {sorted(self.splits)})")
        return self.splits[split]

    def num_samples(self, split: str) -> int:
        shards = self.shards(split)
        return shards[-1].last_id if shards else 0

    def num_tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.shards(split))

    def shard_path(self, shard: ShardInfo) -> Path | str:
        """The shard's location: a Path, or a URL string (open it with data.remote.open_shard)."""
        return remote.join(self.dir, shard.name)

    def open_shard(self, shard: ShardInfo) -> Any:
        """The shard as an open binary file (a URL's comes through the verified local cache)."""
        return remote.open_shard(self.shard_path(shard), shard.bytes, shard.sha256)

    def parts(self, split: str) -> list[Part]:
        """The split's shards as stream parts (each whole, dataset id = shard id); built once per split."""
        if split not in self._parts:
            d = os.fspath(self.dir)
            self._parts[split] = [Part(shard_location(d, s.name), s.first_id, s.count, s.first_id, s.count,
                                       bytes=s.bytes, sha256=s.sha256)
                                  for s in self.shards(split)]
        return self._parts[split]

    def fingerprint(self, split: str) -> str:
        """What a stream position is tied to: the split's shard contents (a resume on other shards fails)."""
        return hashlib.sha256("".join(s.sha256 for s in self.shards(split)).encode()).hexdigest()

    def source_ranges(self, split: str) -> list[tuple[str, int, int]]:
        """(source name, first id, end id) per source of the split: one source, named by the directory."""
        return [(set_name(self.dir), 0, self.num_samples(split))]

    def manifests(self) -> list[tuple[str, Manifest]]:
        """(name, manifest) of every shard set the dataset reads: this one."""
        return [(set_name(self.dir), self)]

    @property
    def itemsize(self) -> int:
        return 2 if self.token_dtype == "uint16" else 4
