"""Train-start integrity check: every shard is what manifest.json promises (size always; sha256 and sample
count once, cached by (path, size, mtime)), and the tokenizer is the one the shards were built with.
Shards at a URL: sizes from one listing here; their sha256 is checked by the remote cache as each one is
downloaded (data/remote.py), so nothing is downloaded just to be hashed."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from attent_scale.data import remote
from attent_scale.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, file_problem
from attent_scale.data.tokenizer import tree_sha256
from attent_scale.errors import UserError

CACHE_NAME = ".attent-verified.json"


def _tar_members(data: bytes) -> list[str] | None:
    """Member names of a plain ustar stream (what the builder writes); None when it is not one."""
    names, pos = [], 0
    while pos + 512 <= len(data):
        hdr = data[pos : pos + 512]
        if hdr == bytes(512):
            return names
        try:
            size = int(hdr[124:136].rstrip(b"\0 ").decode() or "0", 8)
        except ValueError:
            return None
        if hdr[156:157] in (b"0", b"\0"):
            names.append(hdr[:100].split(b"\0", 1)[0].decode(errors="replace"))
        pos += 512 + (size + 511) // 512 * 512
    return names if pos <= len(data) else None


def _content_problem(path: Path, s: ShardInfo, manifest: str) -> str | None:
    """Hash and count one shard's samples; why it is not what the manifest says, or None."""
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != s.sha256:
        return f"sha256 differs from {manifest} (a shard from another build, or damaged?)"
    names = _tar_members(data)
    if names is None:
        return "not a tar stream the shard builder wrote"
    keys = {n.split("/")[-1].split(".", 1)[0] for n in names}
    if len(keys) != s.count:
        return f"holds {len(keys)} samples, {manifest} says {s.count}"
    return None


def _load_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _cache_path(m: Manifest, fallback_dir: Path) -> Path:
    """The cache beside the shards when that directory is writable, else in the run directory."""
    return m.dir / CACHE_NAME if os.access(m.dir, os.W_OK) else fallback_dir / CACHE_NAME


def _check_remote_sizes(m: Manifest, shards: list[ShardInfo], mpath: str, world: int, group: Any) -> None:
    """Sizes of shards at a URL from one listing; every rank raises the same error (one collective)."""
    why: str | None = None
    first_bad = len(shards)
    try:
        found = remote.sizes(str(m.dir), [s.name for s in shards])
    except remote.Unreachable as exc:
        found, why, first_bad = {}, f"unreachable ({exc.reason})", 0
    for i, s in enumerate(shards):
        if why is not None:
            break
        have = found.get(s.name)
        if have is None:
            why, first_bad = f"shard listed in {mpath} is missing", i
        elif have != s.bytes:
            why, first_bad = f"{have} bytes, {mpath} says {s.bytes} (damaged or replaced?)", i
    from attent_scale.dist import all_reduce_values

    agreed = all_reduce_values([first_bad], "min", group)[0] if world > 1 else first_bad
    if agreed < len(shards):
        url = remote.redact(str(m.shard_path(shards[int(agreed)])))
        other = f"not what {mpath} says (found by another rank)"
        raise UserError(f"{url}: {why if agreed == first_bad else other}")


def check_shards(m: Manifest, fallback_dir: Path, *, rank: int = 0, world: int = 1,
                 group: Any = None) -> None:
    """Raise UserError naming the first shard (or the tokenizer) that is not what manifest.json promises.
    Sizes are checked every time; contents once per (path, size, mtime), hashed by all ranks in turn.
    Every rank raises the same error (one collective); rank 0 writes the cache."""
    mpath = remote.redact(str(m.path))
    if m.tokenizer_sha256 and tree_sha256(m.tokenizer_source) != m.tokenizer_sha256:
        raise UserError(f"{m.tokenizer_source}: sha256 differs from {mpath} (not the tokenizer the shards "
                        "were built with)")
    shards = [s for split in m.splits.values() for s in split]
    if m.is_remote:
        _check_remote_sizes(m, shards, mpath, world, group)
        return
    stats = []
    for s in shards:
        path = m.shard_path(s)
        why = file_problem(path)
        if why:
            raise UserError(f"{path}: shard listed in {mpath} {why}")
        st = path.stat()
        if st.st_size != s.bytes:
            raise UserError(f"{path}: {st.st_size} bytes, {mpath} says {s.bytes} (damaged or replaced?)")
        stats.append((st.st_size, st.st_mtime_ns))
    unhashed = sum(1 for s in shards if not s.sha256)
    if unhashed and rank == 0:
        print(f"attent-scale: note: {mpath}: {unhashed} shard(s) record no sha256 (an older build); their "
              "contents are not checked", file=sys.stderr)
    cache_file = _cache_path(m, fallback_dir)
    cache = _load_cache(cache_file)
    todo = []
    for i, (s, (size, mtime)) in enumerate(zip(shards, stats, strict=True)):
        seen = cache.get(str(m.shard_path(s).resolve()))
        if s.sha256 and seen != [size, mtime, s.sha256, s.count]:
            todo.append(i)
    first_bad, reason = len(shards), None
    for i in todo[rank::world]:
        s = shards[i]
        try:
            why = _content_problem(m.shard_path(s), s, MANIFEST_NAME)
        except OSError as exc:
            why = f"cannot be read ({exc.strerror or exc})"
        if why:
            first_bad, reason = i, why
            break
    from attent_scale.dist import all_reduce_values

    agreed = all_reduce_values([first_bad], "min", group)[0] if world > 1 else first_bad
    if agreed < len(shards):
        path = m.shard_path(shards[agreed])
        other = f"content is not what {MANIFEST_NAME} says (found by another rank)"
        detail = reason if agreed == first_bad else other
        raise UserError(f"{path}: {detail}")
    if todo and rank == 0:
        for i in todo:
            cache[str(m.shard_path(shards[i]).resolve())] = [*stats[i], shards[i].sha256, shards[i].count]
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}")
            tmp.write_text(json.dumps(cache, sort_keys=True))
            tmp.replace(cache_file)
        except OSError as exc:  # the check still held: only the next start pays it again
            print(f"attent-scale: note: cannot write {cache_file} ({exc.strerror or exc}); shards are "
                  "re-hashed next time", file=sys.stderr)
