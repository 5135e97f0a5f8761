"""Every input format builds the shards plain JSONL of the same text builds; --val-input/--ref-input take
their split from their own input; bad inputs are one line naming the file and record."""

from __future__ import annotations

import gzip
import io
import json
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attent_scale.cli import main
from attent_scale.data import Manifest
from attent_scale.data.builder import build_shards
from attent_scale.data.corpus import Corpus
from attent_scale.data.readers import iter_records
from attent_scale.data.tokenizer import Tokenizer
from attent_scale.errors import UserError

WORDS = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "omega", "sigma", "import", "while",
         "lambda", "yield", "tau", "phi", "naïve", "größe", "λx"]


def texts(n: int = 40, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    return ["\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
                      for _ in range(rng.randint(1, 4))) for _ in range(n)]


DOCS = texts()


# ---------------------------------------------------------------------------------------- writers

def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(docs)))
    return path


def write_gz(path: Path, docs: list[str]) -> Path:
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in docs)
    return path


def write_zst(path: Path, docs: list[str]) -> Path:
    with pa.output_stream(str(path), compression="zstd") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in docs).encode())
    return path


def write_parquet(path: Path, docs: list[str], field: str = "text") -> Path:
    table = pa.table({"id": list(range(len(docs))), field: docs, "extra": ["x" * 50] * len(docs)})
    pq.write_table(table, path, row_group_size=7)  # several row groups
    return path


def write_arrow(path: Path, docs: list[str]) -> Path:
    table = pa.table({"text": docs})
    with pa.ipc.new_stream(str(path), table.schema) as w:
        for batch in table.to_batches(max_chunksize=9):
            w.write_batch(batch)
    return path


def write_hf(path: Path, docs: list[str]) -> Path:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))}).save_to_disk(
        str(path), num_shards=2)
    return path


def write_wds_txt(path: Path, docs: list[str]) -> Path:
    """What webdataset's TarWriter writes for {"__key__", "txt", "cls"} samples."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for i, t in enumerate(docs):
            w.write({"__key__": f"s{i:06d}", "txt": t, "cls": i % 3})
    return path


def write_wds_json(path: Path, docs: list[str]) -> Path:
    """A tar made by hand (gzip'd): per sample a .json member holding the text plus a binary member."""
    with tarfile.open(path, "w:gz") as tf:
        for i, t in enumerate(docs):
            for ext, data in (("json", json.dumps({"text": t, "n": i}).encode()), ("npy", b"\x93\x00\xff")):
                info = tarfile.TarInfo(f"shard/k{i:05d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


FORMATS = {
    "jsonl.gz": lambda d, docs: write_gz(d / "in.jsonl.gz", docs),
    "jsonl.zst": lambda d, docs: write_zst(d / "in.jsonl.zst", docs),
    "parquet": lambda d, docs: write_parquet(d / "in.parquet", docs),
    "arrow": lambda d, docs: write_arrow(d / "in.arrow", docs),
    "save_to_disk": lambda d, docs: write_hf(d / "ds", docs),
    "wds txt": lambda d, docs: write_wds_txt(d / "in.tar", docs),
    "wds json tgz": lambda d, docs: write_wds_json(d / "in.tar.gz", docs),
}


# ---------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def tok(tiny_shards: Path) -> Path:
    return tiny_shards / "tokenizer.model"


def build(inputs: list[Path], out: Path, tok: Path, **kw) -> Manifest:
    opts = dict(seq_len=16, tokenizer=tok, val_fraction=0.2, samples_per_shard=5, progress=False, workers=1)
    return build_shards(inputs, out, **{**opts, **kw})


def shard_hashes(m: Manifest) -> dict[str, list[str]]:
    return {s: [x.sha256 for x in shards] for s, shards in m.splits.items()}


def stream(m: Manifest, split: str) -> list[int]:
    """The split's token stream, rebuilt from its windows (stride seq_len, one token of overlap)."""
    windows = []
    for s in m.splits[split]:
        with tarfile.open(m.shard_path(s)) as tf:
            windows += [np.frombuffer(tf.extractfile(x).read(), dtype=np.uint16) for x in tf.getmembers()]
    return [int(t) for t in windows[0]] + [int(t) for w in windows[1:] for t in w[1:]] if windows else []


def encoded(tok: Path, docs: list[str]) -> list[int]:
    tk = Tokenizer(tok)
    return [t for d in docs for t in tk.encode(d) + [tk.eos_id]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tok: Path) -> Manifest:
    d = tmp_path_factory.mktemp("ref")
    return build([write_jsonl(d / "in.jsonl", DOCS)], d / "out", tok)


# ---------------------------------------------------------------------------------------- formats

@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_builds_the_shards_of_plain_jsonl(fmt: str, tmp_path: Path, tok: Path,
                                                      reference: Manifest) -> None:
    src = FORMATS[fmt](tmp_path, DOCS)
    assert [d.text for d in Corpus([src])] == DOCS
    m = build([src], tmp_path / "out", tok)
    assert m.num_samples("val") > 0
    for split in ("train", "val"):
        assert (m.num_samples(split), m.num_tokens(split)) == \
            (reference.num_samples(split), reference.num_tokens(split))
    assert shard_hashes(m) == shard_hashes(reference)


def test_directories_and_globs_of_mixed_formats(tmp_path: Path, tok: Path, reference: Manifest) -> None:
    d = tmp_path / "data"
    d.mkdir()
    parts = [DOCS[:10], DOCS[10:25], DOCS[25:]]  # names sort in this order
    write_gz(d / "a.jsonl.gz", parts[0])
    write_parquet(d / "b.parquet", parts[1])
    write_hf(d / "c_ds", parts[2])  # a save_to_disk directory inside: its .arrow files, not its metadata
    c = Corpus([d])
    assert [f.suffix for f in c.files] == [".gz", ".parquet", ".arrow", ".arrow"]
    assert shard_hashes(build([d], tmp_path / "dir", tok)) == shard_hashes(reference)
    pattern = str(d / "*.parquet")  # a glob the shell did not expand
    assert [x.text for x in Corpus([pattern])] == parts[1]


def test_text_field_and_records_for_other_fields(tmp_path: Path) -> None:
    src = write_parquet(tmp_path / "p.parquet", DOCS[:9], field="body")
    assert [d.text for d in Corpus([src], text_field="body")] == DOCS[:9]
    recs = list(iter_records(src))
    assert recs[8] == (f"{src}:row 8", {"id": 8, "body": DOCS[8], "extra": "x" * 50})
    tar = write_wds_txt(tmp_path / "w.tar", DOCS[:3])
    loc, rec = next(iter_records(tar))
    assert loc == f"{tar}:sample s000000" and rec["txt"] == rec["text"] == DOCS[0] and rec["cls"] == "0"
    lines = write_jsonl(tmp_path / "l.jsonl", DOCS[:3])
    assert [loc for loc, _ in iter_records(lines)] == [f"{lines}:{i}" for i in (1, 2, 3)]


def test_parquet_row_groups_split_across_workers(tmp_path: Path, tok: Path, monkeypatch) -> None:
    import attent_scale.data.builder as builder

    many = texts(300, seed=9)
    src = write_parquet(tmp_path / "big.parquet", many)
    c = Corpus([src])
    tasks = list(c.tasks(600, 4096))
    assert len(tasks) > 5 and all(t[0][2] is not None for t in tasks)
    assert [d.text for t in tasks for d in c.docs_of_task(t)] == many  # each row once, in order
    one = build([src], tmp_path / "one", tok)
    monkeypatch.setattr(builder, "CHUNK_BYTES", 600)
    assert shard_hashes(build([src], tmp_path / "two", tok, workers=2)) == shard_hashes(one)


# ---------------------------------------------------------------------------------------- given splits

def test_val_and_ref_inputs_are_exactly_their_documents(tmp_path: Path, tok: Path) -> None:
    train_docs, val_docs, ref_docs = DOCS[:24], DOCS[24:32], DOCS[32:]
    src = write_jsonl(tmp_path / "train.jsonl", train_docs)
    val = write_parquet(tmp_path / "val.parquet", val_docs)
    ref = write_wds_txt(tmp_path / "ref.tar", ref_docs)
    out = tmp_path / "out"
    assert main(["shards", "build", str(src), "-o", str(out), "--tokenizer", str(tok), "--seq-len", "16",
                 "--val-input", str(val), "--ref-input", str(ref), "--no-progress", "--workers", "1"]) == 0
    m = Manifest.load(out)
    assert set(m.splits) == {"train", "val", "ref"}
    assert stream(m, "val") == encoded(tok, val_docs)
    assert stream(m, "ref") == encoded(tok, ref_docs)
    assert stream(m, "train") == encoded(tok, train_docs)  # every input document, none hashed away
    assert m.raw["build"]["val_input"] and m.raw["build"]["ref_input"]
    assert m.raw["splits"]["val"]["documents"] == len(val_docs)
    # only --val-input: ref stays off, the inputs all train; the caps count the inputs only
    m2 = build([src], tmp_path / "v", tok, val_input=[val], max_docs=20, val_fraction=0.0)
    assert "ref" not in m2.splits and stream(m2, "val") == encoded(tok, val_docs)
    assert stream(m2, "train") == encoded(tok, train_docs[:20])


def test_val_input_with_parts_merges_to_the_one_process_build(tmp_path: Path, tok: Path) -> None:
    src = tmp_path / "train"
    src.mkdir()
    for i in range(4):
        write_jsonl(src / f"t{i}.jsonl", DOCS[i * 8 : i * 8 + 8])
    val = write_gz(tmp_path / "val.jsonl.gz", DOCS[32:])
    one = build([src], tmp_path / "one", tok, val_input=[val], val_fraction=0.0)
    parts = [build([src], tmp_path / f"p{i}", tok, val_input=[val], val_fraction=0.0, part=(i, 2))
             for i in range(2)]
    from attent_scale.data.builder import merge_parts

    merged = merge_parts(parts, tmp_path / "merged", workers=1)
    assert shard_hashes(merged) == shard_hashes(one)
    assert stream(one, "val") == encoded(tok, DOCS[32:])


# ---------------------------------------------------------------------------------------- bad input

def _bad_parquet(tmp_path: Path) -> Path:
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": ["a b", "c", None, "d"]}), path)
    return path


def _truncated(make, name: str, keep: float = 0.6):
    def go(tmp_path: Path) -> Path:
        path = make(tmp_path / name, texts(200))
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
        return path
    return go


def _dataset_dict(tmp_path: Path) -> Path:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": DOCS[:4]})
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    return tmp_path / "dd"


def _garbage(name: str):
    def go(tmp_path: Path) -> Path:
        (tmp_path / name).write_bytes(b"garbage, not this format at all\n" * 10)
        return tmp_path / name
    return go


BAD = [
    ("parquet missing field", lambda t: write_parquet(t / "m.parquet", DOCS[:5], field="body"),
     r".*m\.parquet:row 0: no field 'text' \(set --text-field\)$"),
    ("parquet null text", _bad_parquet, r".*n\.parquet:row 2: field 'text' is not a string \(null\)$"),
    ("parquet garbage", _garbage("g.parquet"), r".*g\.parquet: not a readable parquet file \("),
    ("arrow garbage", _garbage("g.arrow"), r".*g\.arrow:row 0: not a readable Arrow file \("),
    ("jsonl.gz truncated", _truncated(write_gz, "t.jsonl.gz"),
     r".*t\.jsonl\.gz:\d+: cannot decompress gzip \("),
    ("jsonl.zst garbage", _garbage("g.jsonl.zst"), r".*g\.jsonl\.zst:1: cannot decompress zstd \("),
    ("jsonl.gz bad line", lambda t: (t / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n[3]\n'))
     and t / "b.jsonl.gz", r".*b\.jsonl\.gz:2: not a JSON object \(a list\)"),
    ("tar truncated", _truncated(write_wds_txt, "t.tar", 0.5), r".*t\.tar: not a readable tar"),
    ("tar sample lacks text", lambda t: write_wds_json(t / "j.tgz", DOCS[:3]) and _retext(t / "j.tgz"),
     r".*j\.tgz:sample shard/k00000: no field 'text'"),
    ("unknown extension", _garbage("data.csv"), r".*data\.csv: unknown input format '\.csv' \(known: "),
    ("DatasetDict", _dataset_dict, r".*dd: a DatasetDict \(splits: train, test\); give one split's dir"),
]


def _retext(path: Path) -> Path:
    """The same tar with the .json members' field renamed: no sample has a text."""
    out = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=out, mode="w:gz") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.endswith(".json"):
                data = data.replace(b'"text"', b'"body"')
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    path.write_bytes(out.getvalue())
    return path


@pytest.mark.parametrize(("make", "pattern"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_naming_file_and_record(make, pattern: str, tmp_path: Path, tok: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    src = make(tmp_path)
    capsys.readouterr()  # what making the input printed (datasets' progress bars)
    out = tmp_path / "out"
    code = main(["shards", "build", str(src), "-o", str(out), "--tokenizer", str(tok), "--seq-len", "16",
                 "--no-progress", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.match("attent-scale: error: " + pattern, lines[0]), lines[0]
    assert not out.exists()


def test_bad_given_splits(tmp_path: Path, tok: Path) -> None:
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    cases = [
        (dict(val_input=[src]), r"a\.jsonl: given both in the inputs and --val-input"),
        (dict(val_input=[tmp_path / "nope.parquet"]), r"nope\.parquet: input file not found"),
        (dict(val_input=[str(tmp_path / "*.zzz")]), r"\*\.zzz: no input file matches"),
        (dict(val_input=[blank]), r"--val-input: \S+blank\.jsonl holds no non-blank document$"),
        (dict(val_input=[blank], val_fraction=0.3), r"--val-fraction 0\.3 with --val-input"),
        (dict(ref_input=[blank], ref_fraction=0.1), r"--ref-fraction 0\.1 with --ref-input"),
    ]
    for kw, pattern in cases:
        with pytest.raises(UserError, match=pattern):
            build([src], tmp_path / "o", tok, **{"val_fraction": 0.0, **kw})
        assert not (tmp_path / "o").exists()


def test_plain_text_and_text_field_jsonl_as_before(tmp_path: Path) -> None:
    """Plain text files stay one document each; with --text-field a file of another name is JSONL."""
    (tmp_path / "a.txt").write_text(DOCS[0])
    (tmp_path / "b.md").write_text(DOCS[1])
    assert [d.text for d in Corpus([tmp_path])] == DOCS[:2]
    lines = write_jsonl(tmp_path / "rows.json", DOCS[:3])  # HF's to_json writes JSON lines as .json
    assert [d.text for d in Corpus([lines], text_field="text")] == DOCS[:3]
