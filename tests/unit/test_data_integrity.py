"""The train-start shard check: hashed once and cached by (path, size, mtime); old manifests still load."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from attent_scale.data import integrity
from attent_scale.data.integrity import CACHE_NAME, check_shards
from attent_scale.data.manifest import Manifest
from attent_scale.errors import UserError


@pytest.fixture
def shards(tmp_path: Path, tiny_shards: Path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(tiny_shards, out, ignore=shutil.ignore_patterns(CACHE_NAME))
    return out


def test_contents_are_hashed_once_then_cached_until_mtime_changes(shards: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[str] = []
    real = integrity._content_problem
    monkeypatch.setattr(integrity, "_content_problem", lambda p, s, m: hashed.append(p.name) or real(p, s, m))
    m = Manifest.load(shards)
    check_shards(m, tmp_path / "run")
    n = sum(len(v) for v in m.splits.values())
    assert len(hashed) == n and (shards / CACHE_NAME).is_file()
    hashed.clear()
    check_shards(Manifest.load(shards), tmp_path / "run")
    assert hashed == []  # sizes only
    target = shards / "train-000001.tar"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    check_shards(Manifest.load(shards), tmp_path / "run")
    assert hashed == ["train-000001.tar"]


def test_same_size_damage_after_caching_is_caught_by_its_new_mtime(shards: Path, tmp_path: Path) -> None:
    check_shards(Manifest.load(shards), tmp_path / "run")
    target = shards / "train-000002.tar"
    data = bytearray(target.read_bytes())
    data[700] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"train-000002\.tar: sha256 differs from manifest\.json"):
        check_shards(Manifest.load(shards), tmp_path / "run")


def test_read_only_shard_dir_caches_in_the_run_dir(shards: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == shards else real(p, mode))
    check_shards(Manifest.load(shards), tmp_path / "run")
    assert not (shards / CACHE_NAME).exists() and (tmp_path / "run" / CACHE_NAME).is_file()


def test_old_manifest_without_hashes_loads_with_one_note(shards: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    path = shards / "manifest.json"
    m = json.loads(path.read_text())
    for split in m["splits"].values():
        del split["num_samples"]
        for s in split["shards"]:
            del s["sha256"]
    path.write_text(json.dumps(m))
    check_shards(Manifest.load(shards), tmp_path / "run")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "record no sha256 (an older build)" in err[0], err
