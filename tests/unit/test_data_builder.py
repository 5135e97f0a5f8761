"""Shard builder: byte-identical re-runs, dense ids, hash split, windows/EOS/padding, manifest content."""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest

from attent_scale.data import Manifest
from attent_scale.data.builder import build_shards, val_split_of
from attent_scale.data.corpus import Corpus
from attent_scale.data.tokenizer import Tokenizer

WORDS = [
    "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu",
    "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega", "def",
    "return", "if", "else", "for", "while", "class", "import",
]


def write_corpus(root: Path, n_docs: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = []
        for _ in range(rng.randint(1, 8)):
            indent = "    " * rng.randint(0, 2)
            lines.append(indent + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))))
        (root / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n")
    return root


def build(tmp: Path, out: str = "shards", **kw) -> Manifest:
    args = dict(seq_len=16, vocab_size=300, val_fraction=0.25, samples_per_shard=9, progress=False)
    args.update(kw)
    return build_shards([tmp / "corpus"], tmp / out, **args)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    tmp = tmp_path_factory.mktemp("builder")
    write_corpus(tmp / "corpus")
    return tmp, build(tmp)


def read_windows(m: Manifest, split: str) -> list[tuple[str, np.ndarray]]:
    out = []
    for s in m.splits[split]:
        with tarfile.open(m.shard_path(s)) as tf:
            for member in tf.getmembers():
                data = tf.extractfile(member).read()
                out.append((member.name, np.frombuffer(data, dtype=np.uint16)))
    return out


def test_rerun_is_byte_identical(built: tuple[Path, Manifest]) -> None:
    tmp, m1 = built
    m2 = build(tmp, out="again")
    names1 = sorted(p.name for p in m1.dir.iterdir())
    assert names1 == sorted(p.name for p in m2.dir.iterdir())
    assert any(n.startswith("val-") for n in names1)
    assert len([n for n in names1 if n.startswith("train-")]) > 2
    for name in names1:
        assert (m1.dir / name).read_bytes() == (m2.dir / name).read_bytes(), name
    with tarfile.open(m1.shard_path(m1.splits["train"][0])) as tf:
        info = tf.getmembers()[0]
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (0, 0, 0, "attent", "attent")
    assert not list(tmp.glob(".*tmp*")), "temp dir left behind"


def test_ids_dense_and_manifest_consistent(built: tuple[Path, Manifest]) -> None:
    _, m = built
    for split in ("train", "val"):
        windows = read_windows(m, split)
        keys = [name.split(".", 1)[0] for name, _ in windows]
        assert keys == [f"{i:010d}" for i in range(m.num_samples(split))]
        assert all(name.endswith(".tokens.u16") for name, _ in windows)
        expect_first = 0
        for s in m.splits[split]:
            assert s.first_id == expect_first and s.count <= 9
            expect_first += s.count
            path = m.shard_path(s)
            assert s.bytes == path.stat().st_size
            assert s.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert m.num_tokens(split) == sum(len(w) for _, w in windows)


def test_manifest_fields(built: tuple[Path, Manifest]) -> None:
    _, m = built
    raw = json.loads((m.dir / "manifest.json").read_text())
    assert raw["format_version"] == 1 and raw["seq_len"] == 16 and raw["vocab_size"] == 300
    assert raw["token_dtype"] == "uint16"
    assert m.tokenizer_path == m.dir / "tokenizer.model"
    assert raw["tokenizer"]["sha256"] == hashlib.sha256(m.tokenizer_path.read_bytes()).hexdigest()
    for split in ("train", "val"):
        for s in raw["splits"][split]["shards"]:
            assert set(s) == {"name", "first_id", "count", "bytes", "sha256", "tokens"}
    tk = Tokenizer(m.tokenizer_path)
    assert (m.eos_id, m.pad_id, m.vocab_size) == (tk.eos_id, tk.pad_id, tk.vocab_size)


def test_windows_eos_split_and_padding(built: tuple[Path, Manifest]) -> None:
    tmp, m = built
    tk = Tokenizer(m.tokenizer_path)
    docs = list(Corpus([tmp / "corpus"]))
    is_val = [val_split_of(d.text, 0.25) for d in docs]
    assert 0 < sum(is_val) < len(docs)
    # the split depends on the text only: the same text under another name lands in the same split
    assert all(val_split_of(d.text, 0.25) == v for d, v in zip(docs, is_val, strict=True))
    for split, want_val in (("train", False), ("val", True)):
        stream = []
        for d, v in zip(docs, is_val, strict=True):
            if v == want_val:
                stream += tk.encode(d.text) + [tk.eos_id]
        windows = [w for _, w in read_windows(m, split)]
        assert all(len(w) == m.seq_len + 1 for w in windows[:-1])
        assert 2 <= len(windows[-1]) <= m.seq_len + 1
        # windows overlap by one token: first window whole, then each adds seq_len new tokens
        rebuilt = list(windows[0]) + [int(t) for w in windows[1:] for t in w[1:]]
        assert rebuilt == stream
    assert m.eos_id in windows[0] or m.eos_id in np.concatenate(windows)


def test_newlines_and_indentation_survive_tokenizer(built: tuple[Path, Manifest]) -> None:
    _, m = built
    tk = Tokenizer(m.tokenizer_path)
    text = "def alpha\n    return beta\n\nclass gamma\n"
    assert tk.decode(tk.encode(text)) == text


def test_reused_tokenizer_jsonl_and_unigram(tmp_path: Path, built: tuple[Path, Manifest]) -> None:
    _, m = built
    rng = random.Random(1)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(30)), "n": i}) for i in range(30)]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "data.jsonl").write_text("\n".join(lines) + "\n")
    out = build_shards([tmp_path / "c"], tmp_path / "o", tokenizer=m.tokenizer_path, text_field="text",
                       glob="*.jsonl", seq_len=8, val_fraction=0.0, progress=False)
    assert out.tokenizer_path.read_bytes() == m.tokenizer_path.read_bytes()
    assert out.num_samples("train") > 0 and out.num_samples("val") == 0
    uni = build_shards([tmp_path / "c"], tmp_path / "u", text_field="text", model_type="unigram",
                       vocab_size=288, seq_len=8, progress=False)
    assert uni.vocab_size == 288


def test_embedded_stdlib_corpus_is_capped_and_skips_tests() -> None:
    c = Corpus(max_docs=3)
    assert c.embedded and len(list(c)) == 3
    for p in c.files:
        parts = set(p.parts)
        assert not parts & {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    assert [str(p) for p in c.files] == [str(p) for p in Corpus().files]
    capped = list(Corpus(max_bytes=50_000))
    assert sum(len(d.text.encode()) for d in capped) <= 50_000 or len(capped) == 1
