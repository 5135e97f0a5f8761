"""Where shard sets live: one opener for local paths and s3:// gs:// http(s):// URLs (fsspec), a size-capped
local shard cache, retries with backoff, and URLs with credentials redacted in every message.

Why fsspec (with s3fs, gcsfs, and its own HTTPFileSystem) and not webdataset's ``pipe:`` opener: a pipe
runs ``aws s3 cp``/``curl`` in a subprocess, so an error is an exit status and a stderr line, a retry is
a new process, and a range read is impossible; fsspec reads in-process, raises typed errors we can
classify and count, reads ranges, and takes credentials exactly where each backend's own tools do (the
AWS env vars, ``~/.aws/config`` and ``AWS_ENDPOINT_URL`` for s3fs/botocore; application-default
credentials for gcsfs; ``user:pass@`` or nothing for http).

A shard is read whole into the cache on first use and verified there (its size and sha256 from
manifest.json), then read from local disk: a rank downloads only the shards its epoch plan reads, a subset
epoch that skips most of a shard's samples still downloads that shard at most once, and later epochs and
scoring passes reuse it while it fits under ``cache_max_bytes`` (least recently used files go first).
Every read of a URL is retried ``retries`` times with exponential backoff; what was retried and what
stayed unreachable is counted here (``stats()``), printed on stderr, and the trainer exports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from attent_scale.errors import UserError
from attent_scale.extras import require

SCHEMES = ("s3", "gs", "gcs", "http", "https")
CHUNK = 4 << 20
_URL = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)([^/\s@]+@)?([^\s?#]*)(\?[^\s#]*)?")
T = TypeVar("T")


class Unreachable(OSError):
    """A URL that could not be read after the retries (or at all: missing, forbidden)."""

    def __init__(self, url: str, attempts: int, cause: BaseException) -> None:
        self.url, self.attempts = redact(str(url)), attempts
        self.reason = redact(f"{type(cause).__name__}: {cause}")
        super().__init__(f"{self.url}: unreachable after {attempts} attempt(s) ({self.reason})")


class Corrupt(OSError):
    """A downloaded object that is not what manifest.json says (size or sha256): not retried."""


@dataclass(frozen=True)
class Options:
    """How URLs are read (config: data.cache_dir, data.cache_max_bytes, data.retries, data.backoff)."""

    cache_dir: str = ""  # "" = $XDG_CACHE_HOME/attent-scale (~/.cache/attent-scale)
    cache_max_bytes: int = 64 << 30
    retries: int = 5
    backoff: float = 1.0  # seconds before the first retry; doubled each retry
    backoff_max: float = 30.0
    timeout: float = 60.0  # connect / read timeout of one request, seconds
    # once a URL was given up on, later reads in this process try once: the job is stopping anyway
    # (data.skip_unreachable false), so the reads still due until the ranks agree cost no backoff
    fail_fast: bool = True

    @property
    def cache_root(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "attent-scale"


_options = Options()
_stats: dict[str, int] = {}
_lock = threading.Lock()
_filesystems: dict[tuple[int, str], Any] = {}
_gave_up = False  # some URL was given up on in this process (Options.fail_fast)
_pid = os.getpid()  # whose counts _stats holds: a forked DataLoader worker starts from zero
STAT_KEYS = ("retries", "unreachable", "downloaded_bytes", "cache_hits", "cache_misses", "evicted_bytes")


def configure(options: Options) -> None:
    """Set this process's options (each DataLoader worker gets the stream's through its plan)."""
    global _options
    _options = options


def options() -> Options:
    return _options


def from_config(data: Any) -> Options:
    """Options from a DataConfig (its cache_dir, cache_max_bytes, retries, backoff, backoff_max, timeout)."""
    return replace(Options(), cache_dir=data.cache_dir, cache_max_bytes=int(data.cache_max_bytes),
                   retries=int(data.retries), backoff=float(data.backoff),
                   backoff_max=float(data.backoff_max), timeout=float(data.timeout),
                   fail_fast=not data.skip_unreachable)


# ---- counting -------------------------------------------------------------------------------------
def _own() -> None:
    """Forget counts inherited through fork (the parent ships its own); call with _lock held."""
    global _pid, _gave_up
    if os.getpid() != _pid:
        _pid, _gave_up = os.getpid(), False
        _stats.clear()


def count(key: str, n: int = 1) -> None:
    with _lock:
        _own()
        _stats[key] = _stats.get(key, 0) + n


def stats() -> dict[str, int]:
    """This process's cumulative counts (retries, unreachable, downloaded_bytes, cache_hits, ...)."""
    with _lock:
        _own()
        return {k: _stats.get(k, 0) for k in STAT_KEYS}


def take_stats() -> dict[str, int]:
    """The counts since the last call, reset (a worker ships them to its rank with each batch)."""
    with _lock:
        _own()
        out = {k: v for k, v in _stats.items() if v}
        _stats.clear()
    return out


def add_stats(delta: dict[str, int]) -> None:
    """Add a worker's shipped counts to this process's."""
    for k, v in delta.items():
        if v:
            count(k, int(v))


# ---- names ----------------------------------------------------------------------------------------
def scheme(loc: str | os.PathLike) -> str | None:
    """The URL scheme of `loc` ("s3", "http", ...), or None for a local path (file:// included)."""
    s = str(loc)
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", s)
    if m is None:
        return None
    sch = m.group(1).lower()
    if sch == "file":
        return None
    if sch not in SCHEMES:
        raise UserError(f"{redact(s)}: URL scheme {sch!r} not supported (s3, gs, http, https or a path)")
    return sch


def is_url(loc: str | os.PathLike) -> bool:
    return scheme(loc) is not None


def local(loc: str | os.PathLike) -> Path:
    """A local location as a Path (file:// stripped)."""
    s = str(loc)
    return Path(s[len("file://"):] if s.startswith("file://") else s)


def location(loc: str | os.PathLike) -> str | Path:
    """A URL as a string without a trailing slash, or a local path as a Path."""
    return str(loc).rstrip("/") if is_url(loc) else local(loc)


def join(base: str | os.PathLike, *names: str) -> str | Path:
    """`base`/name...: a URL string for a URL, a Path for a local directory."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *names])
    return local(base).joinpath(*names)


def redact(text: str) -> str:
    """`text` with the user:password@ and the query (tokens, signatures) of every URL in it replaced."""
    def sub(m: re.Match) -> str:
        return m.group(1) + ("***@" if m.group(2) else "") + m.group(3) + ("?***" if m.group(4) else "")
    return _URL.sub(sub, text)


# ---- filesystems and retries ----------------------------------------------------------------------
def filesystem(url: str) -> Any:
    """This process's fsspec filesystem for `url`'s scheme; its own retries are off (ours count)."""
    sch = scheme(url)
    key = (os.getpid(), sch or "file")
    fs = _filesystems.get(key)
    if fs is not None:
        return fs
    t = _options.timeout
    if sch == "s3":
        s3fs = require("s3fs", f"{redact(url)}: s3://")
        fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={
            "retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": t, "read_timeout": t})
        fs.retries = 1
    elif sch in ("gs", "gcs"):
        gcsfs = require("gcsfs", f"{redact(url)}: gs://")
        fs = gcsfs.GCSFileSystem(skip_instance_cache=True, retries=1, timeout=t)
    else:
        aiohttp = require("aiohttp", f"{redact(url)}: http(s)://")
        fsspec = require("fsspec", f"{redact(url)}: http(s)://")
        fs = fsspec.filesystem("http", skip_instance_cache=True,
                               client_kwargs={"timeout": aiohttp.ClientTimeout(total=None, sock_connect=t,
                                                                               sock_read=t)})
    _filesystems[key] = fs
    return fs


def _permanent(exc: BaseException) -> bool:
    """A missing or forbidden object (not worth a retry); fsspec's HTTP info() says FileNotFoundError for
    any failure, so its cause decides there: a 5xx / 429 answer or a connection error is transient."""
    if isinstance(exc, FileNotFoundError) and exc.__cause__ is not None:
        cause = exc.__cause__
        status = getattr(cause, "status", None)
        if isinstance(status, int):
            return status < 500 and status != 429
        return not (isinstance(cause, OSError | TimeoutError) or type(cause).__module__.startswith("aiohttp"))
    return isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError)


def retrying(url: str, what: str, fn: Callable[[], T]) -> T:
    """fn() retried on transient errors with exponential backoff; Unreachable once the retries are spent
    (or at once for a missing / forbidden object). Each retry is counted and printed, URL redacted."""
    global _gave_up
    with _lock:
        _own()
    o = _options
    attempts = 1 if o.fail_fast and _gave_up else o.retries + 1
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below; anything else is the network's
            if isinstance(exc, Corrupt | UserError):
                raise
            if _permanent(exc) or i == attempts - 1:
                count("unreachable")
                _gave_up = True
                err = Unreachable(url, i + 1, exc)
                print(f"attent-scale: warning: giving up: {err}", file=sys.stderr, flush=True)
                raise err from None
            delay = min(o.backoff * 2 ** i, o.backoff_max)
            count("retries")
            why = redact(f"{type(exc).__name__}: {exc}")
            print(f"attent-scale: warning: {redact(url)}: {what} failed ({why}); retry {i + 1}/{o.retries} "
                  f"in {delay:.1f}s", file=sys.stderr, flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_bytes(loc: str | os.PathLike) -> bytes:
    """The whole (small) file at `loc`: manifest.json, a tokenizer file."""
    if not is_url(loc):
        return local(loc).read_bytes()
    url = str(loc)
    return retrying(url, "read", lambda: filesystem(url).cat_file(url))


def size(loc: str | os.PathLike) -> int:
    """Bytes of the file at `loc` (fs.info for a URL)."""
    if not is_url(loc):
        return local(loc).stat().st_size
    url = str(loc)
    return int(retrying(url, "stat", lambda: filesystem(url).info(url))["size"])


def sizes(base: str, names: list[str]) -> dict[str, int | None]:
    """Bytes of base/name for every name (None: missing): one listing for s3/gs, one HEAD each for http."""
    fs = filesystem(base)
    if scheme(base) in ("http", "https"):
        out: dict[str, int | None] = {}
        for n in names:
            try:
                out[n] = size(join(base, n))
            except Unreachable as exc:
                if "FileNotFoundError" not in exc.reason:
                    raise
                out[n] = None
        return out
    def ls() -> list[dict[str, Any]]:
        try:
            return fs.ls(base, detail=True, refresh=True)
        except FileNotFoundError:  # no object under the prefix yet
            return []

    listing = retrying(base, "list", ls)
    have = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in listing
            if e.get("type") != "directory"}
    return {n: have.get(n) for n in names}


# ---- the shard cache ------------------------------------------------------------------------------
def cache_path(url: str) -> Path:
    """Where `url` is cached: CACHE/shards/<hash of the URL without credentials>-<file name>."""
    clean = redact(url)  # the cache key never holds a secret, and equal objects share a file
    digest = hashlib.sha256(clean.encode()).hexdigest()[:20]
    name = clean.split("?", 1)[0].rsplit("/", 1)[-1]
    return _options.cache_root / "shards" / f"{digest}-{name}"


@contextlib.contextmanager
def _cache_lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _touch(path: Path) -> None:
    """Mark `path` most recently used: an explicit nanosecond mtime (the kernel's own clock for file
    times ticks in milliseconds, too coarse to order shards opened in a row)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def _evict(root: Path, need: int, keep: Path) -> None:
    """Delete least recently used cached shards until `need` more bytes fit under cache_max_bytes."""
    entries = []
    for p in root.iterdir():
        if p.name.startswith(".") or p == keep or not p.is_file():
            continue
        with contextlib.suppress(FileNotFoundError):
            st = p.stat()
            entries.append((st.st_mtime_ns, st.st_size, p))
    total = sum(e[1] for e in entries)
    for _, nbytes, p in sorted(entries):
        if total + need <= _options.cache_max_bytes:
            break
        with contextlib.suppress(FileNotFoundError):
            p.unlink()  # a reader that has it open keeps reading (POSIX)
            count("evicted_bytes", nbytes)
        total -= nbytes


def _download(url: str, dest: Path, expect_size: int | None, expect_sha: str) -> int:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.part")
    h = hashlib.sha256()
    n = 0
    try:
        with filesystem(url).open(url, "rb", block_size=CHUNK, cache_type="none") as src, \
                open(tmp, "wb") as out:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                h.update(chunk)
                n += len(chunk)
        if expect_size is not None and n != expect_size:
            raise Corrupt(f"{redact(url)}: {n} bytes, manifest.json says {expect_size}")
        if expect_sha and h.hexdigest() != expect_sha:
            raise Corrupt(f"{redact(url)}: sha256 differs from manifest.json (a shard from another build?)")
        root = dest.parent
        with _cache_lock(root):
            _evict(root, n, dest)
            os.replace(tmp, dest)
            _touch(dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return n


def fetch(url: str, expect_size: int | None = None, expect_sha: str = "") -> Path:
    """A verified local copy of `url` in the cache (downloaded once, then reused while it fits)."""
    dest = cache_path(url)
    try:
        st = dest.stat()
        if expect_size is None or st.st_size == expect_size:
            _touch(dest)
            count("cache_hits")
            return dest
    except FileNotFoundError:
        pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    count("cache_misses")
    n = retrying(url, "download", lambda: _download(url, dest, expect_size, expect_sha))
    count("downloaded_bytes", n)
    return dest


def open_shard(loc: str | os.PathLike, expect_size: int | None = None, expect_sha: str = "") -> BinaryIO:
    """An open binary file of the shard at `loc`: the file itself, or its verified cached copy. Raises
    Unreachable (after the retries) or Corrupt for a URL; what `open` raises for a path."""
    if not is_url(loc):
        return open(local(loc), "rb")
    path = fetch(str(loc), expect_size, expect_sha)
    try:
        return open(path, "rb")
    except FileNotFoundError:  # evicted by another process between fetch and open: fetch again
        return open(fetch(str(loc), expect_size, expect_sha), "rb")


def fetch_tree(url: str, dest: Path) -> Path:
    """Copy the file or directory at `url` to `dest` (a tokenizer: small), once; returns dest."""
    if dest.exists():
        return dest
    fs = filesystem(url)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    info = retrying(url, "stat", lambda: fs.info(url))
    if info.get("type") == "directory":
        names = retrying(url, "list", lambda: fs.find(url))
        tmp.mkdir(parents=True, exist_ok=True)
        for name in names:
            rel = str(name).split(url.split("://", 1)[-1].rstrip("/") + "/", 1)[-1]
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            full = join(url, rel)
            target.write_bytes(read_bytes(full))
    else:
        tmp.write_bytes(read_bytes(url))
    with contextlib.suppress(OSError):
        os.replace(tmp, dest)  # a concurrent process may have put it there first
    return dest


def upload_tree(src: Path, url: str) -> None:
    """Copy the local directory `src` to `url` (shards build --out URL), retried per file."""
    fs = filesystem(url)
    files = sorted((p for p in src.rglob("*") if p.is_file()), key=lambda p: (p.name == "manifest.json", p))
    for path in files:  # manifest.json last: a half-uploaded set has none
        target = str(join(url, *path.relative_to(src).parts))
        retrying(target, "upload", lambda p=path, t=target: fs.put_file(str(p), t))
