"""`attent-scale shards build|inspect`: bad input gives one error line and exit 2; --verify finds damage."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from attent_scale.cli import main

WORDS = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "omega", "sigma", "import", "while"]


def corpus(root: Path, n: int = 30) -> Path:
    rng = random.Random(3)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"d{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(60)) + "\n")
    return root


def build_args(src: Path, out: Path, *extra: str) -> list[str]:
    return ["shards", "build", str(src), "-o", str(out), "--seq-len", "16", "--vocab-size", "300",
            "--samples-per-shard", "20", "--val-fraction", "0.2", "--no-progress", *extra]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("cli")
    src = corpus(tmp / "src")
    assert main(build_args(src, tmp / "shards")) == 0
    return src, tmp / "shards"


def expect_user_error(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attent-scale: error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])


def no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_build_and_inspect_ok(built: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, shards = built
    assert main(["shards", "inspect", str(shards)]) == 0
    out = capsys.readouterr().out
    assert "train:" in out and "val:" in out and "doc tokens" in out and "window tokens" in out
    assert "doc tokens histogram: " in out
    assert main(["shards", "inspect", str(shards), "--verify"]) == 0
    assert "0 problem(s)" in capsys.readouterr().out


def test_bad_inputs_exit_2(
    tmp_path: Path, built: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src, shards = built
    out = tmp_path / "out"
    expect_user_error(capsys, build_args(tmp_path / "nope.txt", out), "nope.txt", "not found")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf8 \xc3")
    expect_user_error(capsys, build_args(bad, out), "bad.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n\n")
    expect_user_error(capsys, build_args(empty, out), "empty corpus")
    expect_user_error(capsys, build_args(tmp_path / "empty", out, "--glob", "*.md"), "empty corpus")
    expect_user_error(capsys, build_args(src, out, "--seq-len", "1"), "--seq-len 1")
    big = build_args(src, out, "--vocab-size", "60000")
    expect_user_error(capsys, big, "--vocab-size 60000", "too large")
    expect_user_error(capsys, build_args(src, shards), str(shards), "--overwrite")
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"body": "alpha beta"}\n')
    expect_user_error(capsys, build_args(jsonl, out, "--text-field", "text"), "x.jsonl:1", "'text'")
    assert not out.exists()
    no_leftovers(tmp_path)
    no_leftovers(shards.parent)
    expect_user_error(capsys, ["shards", "inspect", str(empty)], "manifest.json", "not found")


def test_overwrite_replaces_atomically(tmp_path: Path, built: tuple[Path, Path],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """--overwrite replaces an earlier build's files (and only those: a user's file stops it)."""
    src, _ = built
    out = tmp_path / "o"
    assert main(build_args(src, out, "--samples-per-shard", "5")) == 0
    many = {p.name for p in out.iterdir()}
    (out / ".attent-verified.json").write_text("{}")  # a training run's cache beside the shards
    assert main(build_args(src, out, "--overwrite")) == 0
    now = {p.name for p in out.iterdir()}
    assert len(now) < len(many) and (out / "manifest.json").is_file()  # fewer shards: none left over
    no_leftovers(tmp_path)
    (out / "stale.txt").write_text("x")
    expect_user_error(capsys, build_args(src, out, "--overwrite"), str(out), "stale.txt", "--overwrite")
    assert (out / "stale.txt").read_text() == "x" and {p.name for p in out.iterdir()} == now | {"stale.txt"}
    no_leftovers(tmp_path)


def test_missing_shard_is_user_error(tmp_path: Path, built: tuple[Path, Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = built
    out = tmp_path / "o"
    assert main(build_args(src, out)) == 0
    (out / "train-000001.tar").unlink()
    expect_user_error(capsys, ["shards", "inspect", str(out)], "train-000001.tar", "missing")
    assert main(["shards", "inspect", str(out), "--verify"]) == 1
    assert "BAD train/train-000001.tar: missing" in capsys.readouterr().out


def test_verify_lists_corrupt_and_truncated_shards(tmp_path: Path, built: tuple[Path, Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = built
    out = tmp_path / "o"
    assert main(build_args(src, out)) == 0
    capsys.readouterr()
    flipped = out / "train-000000.tar"
    data = bytearray(flipped.read_bytes())
    data[512] ^= 0xFF  # first byte of the first sample's payload
    flipped.write_bytes(bytes(data))
    truncated = out / "train-000002.tar"
    truncated.write_bytes(truncated.read_bytes()[:3000])
    assert main(["shards", "inspect", str(out), "--verify"]) == 1
    bad = [line for line in capsys.readouterr().out.splitlines() if line.startswith("BAD ")]
    assert "BAD train/train-000000.tar: sha256 mismatch" in bad
    assert any("train-000002.tar: unreadable" in line for line in bad)
    assert any("train-000002.tar:" in line and "missing" in line for line in bad)
    assert not any("train-000001.tar" in line for line in bad)


def test_console_exit_code_2_in_subprocess(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "attent_scale", "shards", "inspect", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("attent-scale: error:") and "manifest.json" in r.stderr
