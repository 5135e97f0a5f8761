"""Shard manifest: the on-disk description of a built shard set (manifest.json) and its loader."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attent_scale.errors import UserError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard of a split: holds the dense ids [first_id, first_id + count)."""

    name: str
    first_id: int
    count: int
    bytes: int
    sha256: str
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
    """A loaded manifest.json; `splits` maps split name to its ordered shard list."""

    dir: Path
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

    @classmethod
    def load(cls, dir: str | Path, *, check_files: bool = True) -> Manifest:
        """Read DIR/manifest.json; raise UserError naming the file when missing, invalid or incomplete."""
        d = Path(dir)
        path = d / MANIFEST_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: manifest not found (run `attent-scale shards build`)") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot read manifest: {exc}") from None
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
                tokenizer_path=d / data["tokenizer"]["file"],
                tokenizer_sha256=str(data["tokenizer"]["sha256"]),
                token_dtype=str(data["token_dtype"]),
                splits=splits,
                newline_symbol=data.get("newline_symbol"),
                raw=data,
            )
        except UserError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: invalid manifest ({type(exc).__name__}: {exc})") from None
        if m.token_dtype not in ("uint16", "uint32"):
            raise UserError(f"{path}: token_dtype {m.token_dtype!r} not supported")
        for name, shards in m.splits.items():
            expect = 0
            for s in shards:
                if s.first_id != expect or s.count < 0:
                    raise UserError(f"{path}: split {name!r} shard {s.name} ids are not dense")
                expect = s.last_id
        if check_files:
            if not m.tokenizer_path.is_file():
                raise UserError(f"{m.tokenizer_path}: tokenizer listed in {path} is missing")
            for shards in m.splits.values():
                for s in shards:
                    if not (d / s.name).is_file():
                        raise UserError(f"{d / s.name}: shard listed in {path} is missing")
        return m

    def shards(self, split: str) -> list[ShardInfo]:
        """The ordered shard list of `split`; UserError when the split does not exist."""
        if split not in self.splits:
            raise UserError(f"{self.dir / MANIFEST_NAME}: no split {split!r} (have {sorted(self.splits)})")
        return self.splits[split]

    def num_samples(self, split: str) -> int:
        shards = self.shards(split)
        return shards[-1].last_id if shards else 0

    def num_tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.shards(split))

    def shard_path(self, shard: ShardInfo) -> Path:
        return self.dir / shard.name

    @property
    def itemsize(self) -> int:
        return 2 if self.token_dtype == "uint16" else 4
