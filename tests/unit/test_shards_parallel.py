"""Parallel and multi-part shard builds give the bytes of a one-process build; the held-out ref split."""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest

from attent_scale.cli import main
from attent_scale.data import Manifest
from attent_scale.data.builder import build_shards, shard_layout, split_of
from attent_scale.data.corpus import Corpus
from attent_scale.data.tokenizer import Tokenizer
from attent_scale.errors import UserError

WORDS = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "omega", "sigma", "import", "while",
         "lambda", "yield", "tau", "phi"]


def corpus(root: Path, n: int = 36) -> Path:
    rng = random.Random(5)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
                 for _ in range(rng.randint(1, 9))]
        (root / f"d{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return root


def digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


OPTS = ["--seq-len", "16", "--samples-per-shard", "7", "--val-fraction", "0.15", "--ref-fraction", "0.2",
        "--no-progress"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("parallel")
    src = corpus(tmp / "src")
    out = tmp / "w1"
    assert main(["shards", "build", str(src), "-o", str(out), "--vocab-size", "300", "--workers", "1",
                 *OPTS]) == 0
    return src, out


def test_workers_2_is_byte_identical(one_process: tuple[Path, Path], tmp_path: Path) -> None:
    src, w1 = one_process
    assert main(["shards", "build", str(src), "-o", str(tmp_path / "w2"), "--vocab-size", "300",
                 "--workers", "2", *OPTS]) == 0
    d1 = digest(w1)
    assert d1 == digest(tmp_path / "w2")
    assert sum(n.startswith("train-") for n in d1) > 3 and any(n.startswith("ref-") for n in d1)
    assert (w1 / "manifest.json").read_bytes() == (tmp_path / "w2" / "manifest.json").read_bytes()


def test_parts_merge_is_byte_identical(one_process: tuple[Path, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    src, w1 = one_process
    tok = str(w1 / "tokenizer.model")
    whole = tmp_path / "whole"
    assert main(["shards", "build", str(src), "-o", str(whole), "--tokenizer", tok, "--workers", "1",
                 *OPTS]) == 0
    parts = []
    for i in (2, 0, 1):  # machines finish in any order
        part = tmp_path / f"part{i}"
        assert main(["shards", "build", str(src), "-o", str(part), "--tokenizer", tok, "--part", f"{i}/3",
                     "--workers", "2" if i == 1 else "1", *OPTS]) == 0
        parts.append(str(part))
    merged = tmp_path / "merged"
    assert main(["shards", "merge", *parts, "-o", str(merged), "--workers", "2"]) == 0
    assert digest(merged) == digest(whole)
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (merged, whole)]
    assert manifests[0] == manifests[1]
    capsys.readouterr()
    # a missing part, or parts built with other settings, are one-line errors naming what is wrong
    assert main(["shards", "merge", *parts[:2], "-o", str(tmp_path / "m2")]) == 2
    assert "need parts 0..2 of 3" in capsys.readouterr().err
    other = tmp_path / "other"
    assert main(["shards", "build", str(src), "-o", str(other), "--tokenizer", tok, "--part", "1/3",
                 *[("0.3" if a == "0.15" else a) for a in OPTS]]) == 0
    capsys.readouterr()
    assert main(["shards", "merge", parts[0], str(other), parts[2], "-o", str(tmp_path / "m3")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "part.json" in err[0] and "val_fraction" in err[0], err
    assert main(["shards", "build", str(src), "-o", str(tmp_path / "p"), "--part", "0/2", *OPTS]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()


def read_windows(m: Manifest, split: str) -> list[np.ndarray]:
    out = []
    for s in m.splits[split]:
        with tarfile.open(m.shard_path(s)) as tf:
            out += [np.frombuffer(tf.extractfile(x).read(), dtype=np.uint16) for x in tf.getmembers()]
    return out


def test_ref_split_is_held_out_and_deterministic(one_process: tuple[Path, Path], tmp_path: Path) -> None:
    src, w1 = one_process
    m = Manifest.load(w1)
    assert set(m.splits) == {"train", "val", "ref"} and m.num_samples("ref") > 0
    assert m.raw["build"]["ref_fraction"] == 0.2
    docs = list(Corpus([src]))
    splits = [split_of(d.text, 0.15, 0.2) for d in docs]
    assert {"train", "val", "ref"} == set(splits)
    tk = Tokenizer(m.tokenizer_path)
    for split in ("train", "val", "ref"):
        stream = [t for d, s in zip(docs, splits, strict=True) if s == split
                  for t in tk.encode(d.text) + [tk.eos_id]]
        w = read_windows(m, split)
        assert list(w[0]) + [int(t) for x in w[1:] for t in x[1:]] == stream  # each doc in exactly one split
    # adding a ref split moves train documents only: val is byte-identical to a build without ref
    no_ref = build_shards([src], tmp_path / "noref", seq_len=16, tokenizer=m.tokenizer_path,
                          val_fraction=0.15, samples_per_shard=7, progress=False, workers=1)
    assert "ref" not in no_ref.splits and "ref_fraction" not in no_ref.raw["build"]
    assert [s.sha256 for s in no_ref.splits["val"]] == [s.sha256 for s in m.splits["val"]]
    moved = [split_of(d.text, 0.15, 0.0) for d in docs]
    assert all(a == b or (a == "train" and b == "ref") for a, b in zip(moved, splits, strict=True))


def test_shard_layout_matches_limits() -> None:
    # 4 full windows of 17 uint16 tokens (tar cost 1024 bytes each) and a 5-token tail (cost 1024)
    assert shard_layout(16 * 4 + 5, 16, 2, 1e9, 3) == [(0, 3), (3, 2)]
    assert shard_layout(16 * 4 + 5, 16, 2, 2048, 100) == [(0, 2), (2, 2), (4, 1)]
    assert shard_layout(16 * 4 + 1, 16, 2, 1e9, 100) == [(0, 4)]  # a 1-token tail is no window
    assert shard_layout(1, 16, 2, 1e9, 100) == []


def jsonl_corpus(path: Path, n: int = 400, bad_line: int | None = None) -> Path:
    """One JSONL file of n rows (CRLF endings on some, U+2028 inside a string, blank lines between)."""
    rng = random.Random(11)
    lines = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
        if i % 17 == 3:
            text += "\u2028" + rng.choice(WORDS)  # JSON allows it raw; it is not a line end in JSONL
        line = json.dumps({"text": text, "n": i}, ensure_ascii=False)
        lines.append("{not json" if bad_line == len(lines) + 1 else line)
        if i % 23 == 5:
            lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(line + ("\r\n" if k % 5 == 0 else "\n") for k, line in enumerate(lines))
    path.write_bytes(body.encode())
    return path


def test_large_jsonl_splits_into_byte_ranges_read_by_workers(tmp_path: Path, monkeypatch) -> None:
    src = jsonl_corpus(tmp_path / "src" / "rows.jsonl")
    c = Corpus([src], text_field="text")
    whole = [d.text for d in c.docs_in(src)]
    tasks = list(c.tasks(997, 4096))
    assert len(tasks) > 10 and all(len(t) == 1 and t[0][2] is not None for t in tasks)
    assert [d.text for t in tasks for d in c.docs_of_task(t)] == whole  # every line once, in order
    assert len(whole) == 400 and sum("\u2028" in t for t in whole) == 24

    # the in-order path (a cap that cuts nothing) against ranges of ~1 kB read by 2 workers
    opts = dict(seq_len=16, vocab_size=300, val_fraction=0.15, samples_per_shard=7, text_field="text",
                progress=False)
    build_shards([src], tmp_path / "ordered", max_bytes=10**12, workers=1, **opts)
    tok = tmp_path / "ordered" / "tokenizer.model"
    build_shards([src], tmp_path / "ordered2", tokenizer=tok, max_bytes=10**12, workers=1, **opts)
    import attent_scale.data.builder as builder

    monkeypatch.setattr(builder, "CHUNK_BYTES", 997)
    build_shards([src], tmp_path / "ranges", tokenizer=tok, workers=2, **opts)
    assert digest(tmp_path / "ordered2") == digest(tmp_path / "ranges")


def test_bad_line_in_a_byte_range_names_its_line(tmp_path: Path, monkeypatch) -> None:
    src = jsonl_corpus(tmp_path / "rows.jsonl", bad_line=301)
    import attent_scale.data.builder as builder

    monkeypatch.setattr(builder, "CHUNK_BYTES", 997)
    tok = build_shards([corpus(tmp_path / "tok")], tmp_path / "tok-out", seq_len=16, vocab_size=300,
                       progress=False, workers=1)
    with pytest.raises(UserError, match=r"rows\.jsonl:301: invalid JSON"):
        build_shards([src], tmp_path / "o", tokenizer=tok.tokenizer_path, seq_len=16, text_field="text",
                     progress=False, workers=2)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not UTF-8 text \(byte 28\)"):
        build_shards([bad], tmp_path / "o2", tokenizer=tok.tokenizer_path, seq_len=16, text_field="text",
                     progress=False, workers=2)
