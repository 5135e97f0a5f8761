"""A build's output directory: one build at a time (a lock beside it), what an earlier build wrote there (the
only files `--overwrite` may replace), the temp directories of builds that died, and the swap into place.

A build writes into `.NAME.tmp-PID` beside `NAME` and renames it into place at the end; the previous set
moves to `.NAME.old-PID` first and only the files a build wrote are deleted from it. The lock is
`.NAME.lock` beside the output, held with flock(2) for the whole build: the kernel drops it when its holder
dies (kill -9 included), so a lock held means a live build, and a temp directory beside an output whose lock
this build holds belongs to a build that is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from attent_scale.errors import UserError

MANIFEST = "manifest.json"
PART = "part.json"
# what a build (or a training run's integrity cache) writes into an output directory, besides the shards
# and the tokenizer a manifest names
_SHARD = re.compile(r"^(train|val|ref)-\d{6}\.tar$")
_OWN_NAMES = {MANIFEST, PART, "tokenizer.model", "tokenizer", "tokens", ".part"}
_CACHE = ".attent-verified"  # data/integrity.py's cache beside the shards (and its temp files)
SHOW = 5  # names listed in a message before "and N more"


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def temp_dir(out: Path, kind: str = "tmp", pid: int | None = None) -> Path:
    """`.NAME.tmp-PID` (the build being written) or `.NAME.old-PID` (the set it replaces) beside OUT."""
    return out.parent / f".{out.name}.{kind}-{os.getpid() if pid is None else pid}"


def _names(paths: Iterable[str]) -> str:
    names = sorted(paths)
    more = f" and {len(names) - SHOW} more" if len(names) > SHOW else ""
    return ", ".join(names[:SHOW]) + more


def _own_entry(name: str) -> bool:
    """A name a build writes at the top of a shard directory, a part directory or its temp directory."""
    return name in _OWN_NAMES or bool(_SHARD.match(name)) or name.startswith(_CACHE)


def earlier_build(out: Path) -> set[str] | None:
    """The top-level entries of OUT an earlier build wrote: its manifest.json, the shards and tokenizer it
    lists (or a part's part.json, tokens/ and tokenizer), the integrity cache; None when OUT holds no
    manifest.json or part.json that reads as one."""
    for name in (MANIFEST, PART):
        try:
            data = json.loads((out / name).read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(data, dict):
            return None
        owned = {name}
        try:
            if name == MANIFEST:
                for split in data["splits"].values():
                    owned.update(str(s["name"]) for s in split["shards"])
                tok = data["tokenizer"]
                owned.add(str(tok.get("dir") or tok["file"]).split("/", 1)[0])
            else:
                owned.update({"tokens", str(data["settings"]["tokenizer_file"])})
        except (KeyError, TypeError, AttributeError):
            return None
        owned.update(p.name for p in out.iterdir() if p.name.startswith(_CACHE))
        return {n for n in owned if "/" not in n and n not in ("", ".", "..")}
    return None


def _entries(out: Path) -> set[str]:
    try:
        return {p.name for p in out.iterdir()}
    except FileNotFoundError:
        return set()


def check_output(out: Path, overwrite: bool) -> None:
    """OUT must be absent, empty, or (with --overwrite) a shard set a build wrote and nothing else; a
    UserError naming what is in the way otherwise."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output exists and is not a directory")
    entries = _entries(out) if out.is_dir() else set()
    if not entries:
        return
    owned = earlier_build(out)
    others = entries - (owned or set())
    if not overwrite:
        if owned is None:
            raise UserError(f"{out}: output directory is not empty and holds no shard set "
                            f"({_names(others)}); choose another --out")
        raise UserError(f"{out}: output directory is not empty (use --overwrite to replace the shard set "
                        "in it)")
    if owned is None:
        raise UserError(f"{out}: --overwrite replaces only a shard set a build wrote there; this directory "
                        f"has no {MANIFEST} and holds {len(others)} other file(s): {_names(others)} (move "
                        "them, or choose another --out)")
    if others:
        raise UserError(f"{out}: --overwrite replaces only a shard set a build wrote there; this directory "
                        f"also holds {len(others)} other file(s): {_names(others)} (move them, or choose "
                        "another --out)")


def check_inputs(out: Path, inputs: Iterable[Path], what: str = "the input file") -> None:
    """No input may be OUT or lie inside it: a build replaces OUT."""
    root = out.resolve()
    for p in inputs:
        q = Path(p).resolve()
        if q == root or root in q.parents:
            raise UserError(f"{out}: --out holds {what} {p}; a build never writes over its inputs (choose "
                            "another --out)")


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside OUT for a build: a second build into OUT fails at once, naming the first."""
    path = lock_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{out}: another build ({holder}) is writing this output now; wait for it to "
                            "finish, or choose another --out") from None
        except OSError as exc:  # a filesystem without flock: build unlocked, as before
            os.close(fd)
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            print(f"attent-scale: warning: {path}: cannot lock ({exc.strerror}); two builds into {out} at "
                  "once would not be caught", file=sys.stderr)
            yield
            return
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # a finishing build removed the file between our open and our lock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _builder_tree(d: Path) -> bool:
    """Does directory `d` hold only what a build writes (so it is safe to delete as a build's temp)?"""
    try:
        return all(_own_entry(p.name) for p in d.iterdir())
    except OSError:
        return False


def remove_stale(out: Path) -> None:
    """With the lock held: delete the temp directories that builds into OUT left when they died (a held
    lock means no other build is live), saying so; one holding anything a build does not write is left
    and named."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)$")
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return
    for d in siblings:
        m = pattern.match(d.name)
        if not m or int(m.group(2)) == os.getpid() or d.is_symlink() or not d.is_dir():
            continue
        if _builder_tree(d):
            shutil.rmtree(d, ignore_errors=True)
            what = "temp directory" if m.group(1) == "tmp" else "replaced set"
            print(f"attent-scale: removed {d}: the {what} of a build into {out} that stopped without "
                  f"cleaning up (pid {m.group(2)})", file=sys.stderr)
        else:
            print(f"attent-scale: warning: {d} looks like a dead build's temp directory but holds files no "
                  "build writes; left as it is", file=sys.stderr)


def swap_in(tmp: Path, out: Path) -> None:
    """Put the finished build TMP in OUT's place. An earlier set there is moved aside and only the files it
    wrote are deleted; anything else found in OUT (put there while this build ran) stops the swap."""
    if not out.exists():
        tmp.rename(out)
        return
    check_output(out, overwrite=True)
    owned = earlier_build(out) or set()
    old = temp_dir(out, "old")
    out.rename(old)
    tmp.rename(out)
    for name in owned:
        p = old / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    try:
        old.rmdir()
    except OSError:
        left = _entries(old)
        print(f"attent-scale: warning: {old}: kept, it holds {_names(left)}, which the replaced set did not "
              "list", file=sys.stderr)
