"""data/remote.py against a real HTTP server in this process: the cache's cap and LRU eviction, sha256
checks on download, retries counted and printed, unreachable URLs named without their credentials."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from attent_scale.data import remote
from attent_scale.errors import UserError


class _Files(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    fail_next: dict[str, int] = {}  # path -> how many more requests answer 503
    seen: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        self.seen.append(f"{self.command} {path}")
        if self.fail_next.get(path, 0) > 0:
            self.fail_next[path] -= 1
            self.send_error(503)
            return
        data = self.files.get(path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self._answer(True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(False)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Path]:
    before = remote.options()
    remote.configure(remote.Options(cache_dir=str(tmp_path), cache_max_bytes=2500, retries=3, backoff=0.01,
                                    timeout=5))
    remote.take_stats()
    remote._gave_up = False  # no earlier test's give-up shortens this one's retries (Options.fail_fast)
    _Files.files.clear()
    _Files.fail_next.clear()
    _Files.seen.clear()
    yield tmp_path
    remote.configure(before)
    remote.take_stats()


def test_names_urls_and_redacts_credentials() -> None:
    assert remote.is_url("s3://b/x") and remote.is_url("https://h/x") and not remote.is_url("/data/x")
    assert not remote.is_url("file:///data/x") and remote.local("file:///data/x") == Path("/data/x")
    assert remote.join("s3://b/set/", "train-000000.tar") == "s3://b/set/train-000000.tar"
    assert remote.join("/data/set", "m.json") == Path("/data/set/m.json")
    text = "get https://alice:s3cret@h.example/set/x.tar?X-Amz-Signature=abc&t=1 failed; s3://b/c ok"
    assert remote.redact(text) == "get https://***@h.example/set/x.tar?*** failed; s3://b/c ok"
    with pytest.raises(UserError, match=r"ftp://h/x: URL scheme 'ftp' not supported"):
        remote.is_url("ftp://h/x")


def test_the_cache_keeps_the_most_recently_used_shards_under_its_cap(server: str, cache: Path) -> None:
    for name in "abcd":
        _Files.files[f"/set/{name}.tar"] = name.encode() * 1000
    for name in "abc":  # 3000 bytes > 2500: a goes
        remote.fetch(f"{server}/set/{name}.tar", 1000)
    held = sorted(p.name.split("-", 1)[1] for p in (cache / "shards").glob("*.tar"))
    assert held == ["b.tar", "c.tar"]
    with remote.open_shard(f"{server}/set/b.tar", 1000) as f:  # a hit: b is now the most recent
        assert f.read() == b"b" * 1000
    remote.fetch(f"{server}/set/d.tar", 1000)  # c is the least recently used now
    held = sorted(p.name.split("-", 1)[1] for p in (cache / "shards").glob("*.tar"))
    assert held == ["b.tar", "d.tar"]
    s = remote.stats()
    got = (s["downloaded_bytes"], s["cache_hits"], s["cache_misses"], s["evicted_bytes"])
    assert got == (4000, 1, 4, 2000)
    assert sum(1 for r in _Files.seen if r.startswith("GET /set/b.tar")) == 1  # downloaded once


def test_a_download_that_is_not_what_the_manifest_says_is_not_cached(server: str, cache: Path) -> None:
    _Files.files["/set/x.tar"] = b"x" * 100
    with pytest.raises(remote.Corrupt, match="sha256 differs"):
        remote.fetch(f"{server}/set/x.tar", 100, hashlib.sha256(b"other").hexdigest())
    with pytest.raises(remote.Corrupt, match="100 bytes, manifest.json says 99"):
        remote.fetch(f"{server}/set/x.tar", 99)
    assert not list((cache / "shards").glob("*"))
    assert remote.stats()["retries"] == 0  # a wrong object is not retried


def test_transient_errors_are_retried_with_backoff_and_counted(server: str, cache: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    _Files.files["/set/y.tar"] = b"y" * 10
    _Files.fail_next["/set/y.tar"] = 4  # fsspec's http info() tries HEAD, then GET: two requests a try
    path = remote.fetch(f"{server}/set/y.tar", 10, hashlib.sha256(b"y" * 10).hexdigest())
    assert path.read_bytes() == b"y" * 10
    assert remote.stats()["retries"] == 2 and remote.stats()["unreachable"] == 0
    err = capsys.readouterr().err
    assert err.count("/set/y.tar: download failed") == 2 and "retry 2/3 in 0.0s" in err


def test_an_unreachable_url_is_named_without_its_credentials(server: str, cache: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    _Files.files["/set/z.tar"] = b"z"
    _Files.fail_next["/set/z.tar"] = 100
    url = server.replace("http://", "http://alice:s3cret@") + "/set/z.tar?token=t0psecret"
    with pytest.raises(remote.Unreachable) as info:
        remote.fetch(url, 1)
    assert info.value.attempts == 4 and remote.stats()["retries"] == 3
    assert remote.stats()["unreachable"] == 1
    assert str(info.value).startswith("http://***@127.0.0.1:")
    assert "/set/z.tar?***: unreachable after 4 attempt(s)" in str(info.value)
    everything = str(info.value) + capsys.readouterr().err + " ".join(p.name for p in cache.rglob("*"))
    assert "s3cret" not in everything and "t0psecret" not in everything
    remote._gave_up = False
    with pytest.raises(remote.Unreachable, match="after 1 attempt"):  # missing: not retried
        remote.fetch(f"{server}/set/missing.tar")
    assert remote.stats()["retries"] == 3


def test_after_one_url_is_given_up_on_later_reads_try_once(server: str, cache: Path) -> None:
    """The job stops at the ranks' next agreement anyway: reads still due until then cost no backoff."""
    _Files.files["/set/a.tar"] = _Files.files["/set/b.tar"] = b"a"
    _Files.fail_next.update({"/set/a.tar": 100, "/set/b.tar": 100})
    with pytest.raises(remote.Unreachable, match="after 4 attempt"):
        remote.fetch(f"{server}/set/a.tar", 1)
    with pytest.raises(remote.Unreachable, match="after 1 attempt"):
        remote.fetch(f"{server}/set/b.tar", 1)
    remote.configure(remote.Options(cache_dir=str(cache), retries=3, backoff=0.01, fail_fast=False))
    with pytest.raises(remote.Unreachable, match="after 4 attempt"):  # data.skip_unreachable: retry each
        remote.fetch(f"{server}/set/b.tar", 1)


def test_a_stream_counts_each_download_once_also_through_a_worker(server: str, cache: Path,
                                                                  tiny_shards: Path) -> None:
    """A shard set at an http URL: the train split read in this process, then val in a DataLoader
    worker (forked after this process had counted its own downloads): every shard downloaded once,
    the bytes counted once; a second epoch reads from the cache."""
    from attent_scale.data import Manifest, ShardStream

    remote.configure(remote.Options(cache_dir=str(cache), retries=1, backoff=0.01))
    for p in tiny_shards.iterdir():
        if p.is_file():
            _Files.files[f"/tiny/{p.name}"] = p.read_bytes()
    local = Manifest.load(tiny_shards)
    url = f"{server}/tiny"
    train = ShardStream(url, "train", batch_size=64)
    ids = sorted(i for b in train for i in b["ids"].tolist())
    assert ids == list(range(local.num_samples("train")))
    val = ShardStream(url, "val", batch_size=64, num_workers=1)
    assert sum(len(b["ids"]) for b in val) == local.num_samples("val")
    shard_bytes = sum(s.bytes for split in local.splits.values() for s in split)
    assert remote.stats()["downloaded_bytes"] == shard_bytes
    before = remote.stats()["cache_hits"]
    train.set_epoch(1)
    assert sum(len(b["ids"]) for b in train) == len(ids)
    assert remote.stats()["cache_hits"] - before == len(local.shards("train"))
    assert remote.stats()["downloaded_bytes"] == shard_bytes
