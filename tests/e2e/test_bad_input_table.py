"""Bad inputs from outside, one table row each: (name, make the input, expected exit, first stderr line).

A row's `make(ctx)` builds the bad input under ctx.tmp and returns the `attent-scale` arguments. Rows run
in this process through `cli.main` (fast: no interpreter start), or as a subprocess with `proc=True` (runs
that train). The check: exit code, `first` (a regex, re.match) against the first line of stderr (or, with
`noisy=True`, the first `attent-scale: error:` line, for runs whose warnings come first), no traceback,
and the optional `after(ctx)` (e.g. nothing left behind). A new case is one `Case(...)` line.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import procs
import pytest
import yaml

from attent_scale import cli

REPO = Path(__file__).resolve().parents[2]
ERR = E = r"attent-scale: error: "  # E: short, for the table rows


@dataclass
class Ctx:
    """What a row's builder gets: a fresh directory, the session's tiny shards, pytest's monkeypatch."""

    tmp: Path
    tiny_shards: Path
    monkeypatch: pytest.MonkeyPatch

    def shards(self, edit: Callable[[dict], None] | None = None) -> Path:
        """A private copy of the tiny shards; `edit(manifest_dict)` changes its manifest.json."""
        out = self.tmp / "shards"
        if not out.exists():
            shutil.copytree(self.tiny_shards, out, ignore=shutil.ignore_patterns(".attent-verified*"))
        if edit is not None:
            path = out / "manifest.json"
            m = json.loads(path.read_text())
            edit(m)
            path.write_text(json.dumps(m))
        return out

    def train(self, shards: Path, *sets: str) -> list[str]:
        """`train` arguments for a 4-step tiny run on `shards` (no selection, no eval until the end)."""
        sys.path.insert(0, str(REPO / "tests" / "helpers"))
        from train_runner import tiny_run_config

        cfg = tiny_run_config(self.tmp / "run", shards, teacher={"mode": "none"},
                              train={"max_steps": 4}, eval={"every_steps": 0, "max_batches": 1},
                              checkpoint={"export": True})
        path = self.tmp / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return ["train", "--config", str(path), *[a for s in sets for a in ("--set", s)]]

    def build(self, *inputs: str, extra: tuple[str, ...] = ()) -> list[str]:
        return ["shards", "build", *inputs, "-o", str(self.tmp / "out"), "--seq-len", "16",
                "--vocab-size", "300", "--no-progress", "--workers", "1", *extra]


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Ctx], list[str]]
    exit: int
    first: str
    proc: bool = False
    noisy: bool = False
    after: Callable[[Ctx], None] | None = None


# ---- builders of bad inputs ----------------------------------------------------------------------------

GOOD = [json.dumps({"text": f"document {i} says hello world, and more words {i * 7}"}).encode()
        for i in range(200)]


def jsonl(ctx: Ctx, bad: bytes, at: int = 100) -> str:
    """A JSONL file of 200 good rows with `bad` as line `at + 1` (at 200: a last line without newline)."""
    rest = b"\n" + b"\n".join(GOOD[at:]) + b"\n" if at < len(GOOD) else b""
    data = b"\n".join(GOOD[:at]) + b"\n" + bad + rest
    path = ctx.tmp / "in.jsonl"
    path.write_bytes(data)
    return str(path)


def bad_tokenizer(ctx: Ctx) -> list[str]:
    (ctx.tmp / "bad.model").write_bytes(b"not a sentencepiece model")
    return txt("--tokenizer", "TMP/bad.model")(ctx)


def no_tmp_left(ctx: Ctx) -> None:
    left = [p.name for p in ctx.tmp.iterdir() if ".tmp-" in p.name or p.name == "out"]
    assert not left, left


def disk_full(ctx: Ctx) -> list[str]:
    """ENOSPC while a shard is written, simulated in-process: the shard file is half written, then the
    write fails as it does on a full disk."""
    from attent_scale.data import builder

    def full(task: Any) -> Any:
        path = Path(task.out) / f"{task.split}-{task.index:06d}.tar"
        path.write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    ctx.monkeypatch.setattr(builder, "_write_shard", full)
    return txt("--tokenizer", TOK)(ctx)


def unreadable_shard(ctx: Ctx) -> list[str]:
    """`inspect --verify` on a shard this user may not read (root reads everything: patched in-process)."""
    shards = ctx.shards()
    target = shards / "train-000001.tar"
    real_open = open

    def guarded(file: Any, *a: Any, **k: Any) -> Any:
        if str(file) == str(target):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *a, **k)

    ctx.monkeypatch.setattr("builtins.open", guarded)
    return ["shards", "inspect", "--verify", str(shards)]


def special_shard(kind: str) -> Callable[[Ctx], Path]:
    def make(ctx: Ctx) -> Path:
        shards = ctx.shards()
        target = shards / "train-000002.tar"
        target.unlink()
        if kind == "fifo":
            os.mkfifo(target)
        else:
            target.mkdir()
        return shards
    return make


def rewrite(name: str, change: Callable[[bytes], bytes]) -> Callable[[Ctx], Path]:
    def make(ctx: Ctx) -> Path:
        shards = ctx.shards()
        path = shards / name
        path.write_bytes(change(path.read_bytes()))
        return shards
    return make


def flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def flip_byte(data: bytes) -> bytes:
    """Same size, other content: a token inside the first sample."""
    return data[:600] + bytes([data[600] ^ 1]) + data[601:]


def other_build(ctx: Ctx) -> Path:
    """A train shard copied in from a build with another tokenizer, padded to the manifest's size."""
    shards = ctx.shards()
    sys.path.insert(0, str(REPO / "tests" / "helpers"))
    from conftest import write_text_corpus

    from attent_scale.data.builder import build_shards

    other = ctx.tmp / "other"
    build_shards([write_text_corpus(ctx.tmp / "c2")], other, seq_len=32, vocab_size=600, val_fraction=0.15,
                 samples_per_shard=100, progress=False, workers=1)
    shutil.copyfile(other / "train-000000.tar", shards / "train-000000.tar")
    size = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["shards"][0]["bytes"]
    with open(shards / "train-000000.tar", "r+b") as f:
        f.truncate(size)
    return shards


def last_count_halved(m: dict) -> None:
    """The last train shard's count halved, and the split's num_samples with it (ids stay dense)."""
    split = m["splits"]["train"]
    cut = split["shards"][-1]["count"] // 2
    split["shards"][-1]["count"] -= cut
    split["num_samples"] -= cut


def inflate(m: dict) -> None:
    m["splits"]["train"]["num_samples"] += 1000


def vocab_100(m: dict) -> None:
    m["vocab_size"] = 100


def no_export(ctx: Ctx) -> None:
    assert not (ctx.tmp / "run" / "export").exists()
    assert not (ctx.tmp / "run" / "summary.json").exists()


def text_input(ctx: Ctx) -> None:
    (ctx.tmp / "in.txt").write_text("hello world, a short text document for the tokenizer\n" * 50)


def jl(bad: bytes, at: int = 100, *extra: str) -> Callable[[Ctx], list[str]]:
    """`shards build --text-field text` on a JSONL file with one bad line (see `jsonl`)."""
    def make(c: Ctx) -> list[str]:
        tok = [a.replace("TINY", str(c.tiny_shards)) for a in extra]
        return c.build(jsonl(c, bad, at), extra=("--text-field", "text", *tok))
    return make


def txt(*extra: str) -> Callable[[Ctx], list[str]]:
    """`shards build` on a small text file; TMP and TINY in `extra` stand for ctx.tmp and the tiny shards."""
    def make(c: Ctx) -> list[str]:
        text_input(c)
        args = [a.replace("TMP", str(c.tmp)).replace("TINY", str(c.tiny_shards)) for a in extra]
        return c.build(str(c.tmp / "in.txt"), extra=tuple(args))
    return make


def made(name: str, write: Callable[[Path], Any], *extra: str) -> Callable[[Ctx], list[str]]:
    """`shards build` on the file `write(path)` makes as ctx.tmp/NAME; TMP in `extra` stands for ctx.tmp."""
    def make(c: Ctx) -> list[str]:
        write(c.tmp / name)
        return c.build(str(c.tmp / name), extra=tuple(a.replace("TMP", str(c.tmp)) for a in extra))
    return make


def parquet_body(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["alpha beta"] * 20}), path)


def gzip_cut(path: Path) -> None:
    import gzip

    data = gzip.compress(b"".join(b'{"text": "row %d of some text"}\n' % i for i in range(2000)))
    path.write_bytes(data[: len(data) // 2])


def inspect(make: Callable[[Ctx], Path], *flags: str) -> Callable[[Ctx], list[str]]:
    return lambda c: ["shards", "inspect", *flags, str(make(c))]


def train(make: Callable[[Ctx], Path] | None, *sets: str) -> Callable[[Ctx], list[str]]:
    return lambda c: c.train(make(c) if make else c.tiny_shards, *sets)


def edited(edit: Callable[[dict], None]) -> Callable[[Ctx], Path]:
    return lambda c: c.shards(edit)


def output_is_a_file(c: Ctx) -> list[str]:
    (c.tmp / "out").write_text("x")
    return txt()(c)


def txt_dir(c: Ctx, n: int = 20) -> Path:
    """A directory of `n` small .txt documents (ctx.tmp/in)."""
    d = c.tmp / "in"
    d.mkdir(exist_ok=True)
    for i in range(n):
        (d / f"d{i:02d}.txt").write_text(f"document {i} holds a few plain words, and more words {i * 7}\n")
    return d


def inputs_kept(c: Ctx) -> None:
    assert sorted(p.name for p in (c.tmp / "in").iterdir()) == [f"d{i:02d}.txt" for i in range(20)]


def out_is_input_dir(c: Ctx) -> list[str]:
    d = txt_dir(c)
    return ["shards", "build", str(d), "-o", str(d), "--overwrite", "--seq-len", "16", "--tokenizer",
            str(c.tiny_shards / "tokenizer.model"), "--no-progress", "--workers", "1"]


def out_holds(*names: str, earlier: bool = False) -> Callable[[Ctx], Path]:
    """ctx.tmp/out holding `names` (files a user put there), on top of an earlier build with `earlier`."""
    def make(c: Ctx) -> Path:
        out = c.tmp / "out"
        if earlier:
            shutil.copytree(c.tiny_shards, out)
        out.mkdir(exist_ok=True)
        for name in names:
            (out / name).write_text("the user's own file")
        return out
    return make


def kept(*names: str) -> Callable[[Ctx], None]:
    def check(c: Ctx) -> None:
        for name in names:
            assert (c.tmp / "out" / name).read_text() == "the user's own file", name
        assert not [p.name for p in c.tmp.iterdir() if p.name.startswith(".out.")]
    return check


def over(holds: Callable[[Ctx], Path], *extra: str) -> Callable[[Ctx], list[str]]:
    """`shards build` (with --tokenizer TINY) into a prepared ctx.tmp/out."""
    def make(c: Ctx) -> list[str]:
        holds(c)
        return txt("--tokenizer", "TINY/tokenizer.model", *extra)(c)
    return make


def merge_into_part(c: Ctx) -> list[str]:
    """`shards merge P -o P --overwrite`: a part directory is the merge's input."""
    text_input(c)
    part = c.tmp / "p0"
    assert cli.main(["shards", "build", str(c.tmp / "in.txt"), "-o", str(part), "--part", "0/1", "--seq-len",
                     "16", "--tokenizer", str(c.tiny_shards / "tokenizer.model"), "--no-progress"]) == 0
    return ["shards", "merge", str(part), "-o", str(part), "--overwrite", "--workers", "1"]


def blank_jsonl(texts: tuple[str, ...] = ("", "   ", "\n\n", "\t \n")) -> Callable[[Path], Any]:
    return lambda p: p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def val_input_blank(c: Ctx) -> list[str]:
    text_input(c)
    blank_jsonl()(c.tmp / "val.jsonl")
    return c.build(str(c.tmp / "in.txt"), extra=("--val-input", str(c.tmp / "val.jsonl"), "--tokenizer",
                                                 str(c.tiny_shards / "tokenizer.model")))


DEEP = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def deep_gz(path: Path) -> None:
    import gzip

    path.write_bytes(gzip.compress(b'{"text": "a b c"}\n' + DEEP + b"\n"))


def bench(*args: str) -> Callable[[Ctx], list[str]]:
    """`bench` on the tiny shards with the tiny run config; nothing may run (no OUT made) when it refuses."""
    def make(c: Ctx) -> list[str]:
        config = c.train(c.tiny_shards)[2]
        return ["bench", "--data", str(c.tiny_shards), "--config", config, "--out", str(c.tmp / "bench"),
                *args]
    return make


def no_val(c: Ctx) -> Path:
    """A real shard set without a val split (--val-fraction 0), built from a small text file."""
    text_input(c)
    out = c.tmp / "noval"
    assert cli.main(["shards", "build", str(c.tmp / "in.txt"), "-o", str(out), "--seq-len", "16",
                     "--val-fraction", "0", "--tokenizer", str(c.tiny_shards / "tokenizer.model"),
                     "--no-progress", "--workers", "1"]) == 0
    return out


SIGNAL = ("teacher.mode=ledger", "teacher.strategy=signal", "teacher.ratio_schedule=constant",
          "eval.every_steps=2", "train.micro_batch_size=4")


def resumed_on(other: Callable[[Ctx], Path]) -> Callable[[Ctx], list[str]]:
    """A 4-step run with checkpoints on a private copy of the tiny shards (a subprocess), then `train` of
    the same run_dir with data.dir=other(ctx): a resume on data of another size."""
    def make(c: Ctx) -> list[str]:
        sys.path.insert(0, str(REPO / "tests" / "helpers"))
        from train_runner import run_train

        argv = c.train(c.shards())
        cfg = yaml.safe_load(Path(argv[2]).read_text())
        cfg["checkpoint"]["every_steps"] = 2
        Path(argv[2]).write_text(yaml.safe_dump(cfg))
        done = run_train(cfg)
        assert done.returncode == 0, done.stderr[-3000:]
        return [*argv, "--set", f"data.dir={other(c)}"]
    return make


def rebuilt_in_place(c: Ctx) -> Path:
    """The run's shard directory itself, rebuilt from other text (the same path, other samples)."""
    text_input(c)
    assert cli.main(["shards", "build", str(c.tmp / "in.txt"), "-o", str(c.tmp / "shards"), "--overwrite",
                     "--seq-len", "32", "--tokenizer", str(c.tiny_shards / "tokenizer.model"),
                     "--no-progress", "--workers", "1"]) == 0
    return c.tmp / "shards"


def nothing_ran(ctx: Ctx) -> None:
    assert not (ctx.tmp / "bench").exists()


CUT, TOK = b'{"text": "abc', "TINY/tokenizer.model"
REFUSED = r"checkpoint \S+/step-00000004: resume refused, changed since it was written: "
CORRUPT = r"data\.dir .*: \d+ of \d+ training samples are corrupt .* over data\.max_corrupt_fraction 0\.01"

CASES = [
    # 13, 22: reader errors while the tokenizer trains keep FILE:LINE
    Case("jsonl cut last line", jl(CUT, 200), 2, E + r"\S+jsonl:201: invalid JSON \("),
    Case("jsonl line not an object", jl(b"[1, 2]"), 2, E + r"\S+jsonl:101: not a JSON object \(a list\)"),
    Case("jsonl later row lacks field", jl(b'{"body": "x"}'), 2, E + r"\S+jsonl:101: no field 'text'"),
    Case("jsonl not UTF-8", jl(b'{"text": "\xff\xfe"}'), 2, E + r"\S+jsonl:101: not UTF-8 text \(byte \d+\)"),
    Case("jsonl text not str", jl(b'{"text": 5}'), 2, E + r"\S+jsonl:101: field 'text' is not a string"),
    Case("jsonl cut last line, --tokenizer", jl(CUT, 200, "--tokenizer", TOK), 2,
         E + r"\S+jsonl:201: invalid JSON \("),
    # issue 20.5: the other input formats name FILE:row N / FILE:LINE too; an unknown ending is one line
    Case("parquet row lacks field", made("p.parquet", parquet_body), 2,
         E + r"\S+p\.parquet:row 0: no field 'text' \(set --text-field\)"),
    Case("jsonl.gz truncated", made("t.jsonl.gz", gzip_cut), 2,
         E + r"\S+t\.jsonl\.gz:\d+: cannot decompress gzip"),
    Case("unknown input ending", made("data.csv", lambda p: p.write_text("a,b\n")), 2,
         E + r"\S+data\.csv: unknown input format '\.csv' \(known: "),
    Case("--val-input is an input", made("in.jsonl", lambda p: p.write_text('{"text": "a"}\n'),
                                         "--val-input", "TMP/in.jsonl", "--val-fraction", "0"), 2,
         E + r"\S+in\.jsonl: given both in the inputs and --val-input"),
    # 24: a bad --tokenizer under the user's name, not the temp copy's
    Case("bad --tokenizer", bad_tokenizer, 2, E + r"\S*/bad\.model: cannot load sentencepiece model",
         after=no_tmp_left),
    Case("--tokenizer a directory", txt("--tokenizer", "TMP"), 2, E + r".*: tokenizer is not a regular file"),
    Case("input not found", lambda c: c.build("no.txt"), 2, E + r".*no\.txt: input file not found"),
    Case("output is a file", output_is_a_file, 2, E + r".*out: output exists and is not a directory"),
    Case("input is a FIFO", lambda c: (os.mkfifo(c.tmp / "f"), c.build(str(c.tmp / "f")))[1], 2,
         E + r".*f: input is not a regular file or directory"),
    # 23 (build half): a full disk is one line and leaves no partial temp directory
    Case("disk full during build", disk_full, 2,
         E + r".*out: cannot write: No space left on device; nothing written", after=no_tmp_left),
    # issue 30: --overwrite replaces only what an earlier build wrote, never an input or a user's file
    Case("build --out is the input dir", out_is_input_dir, 2,
         E + r"\S+/in: --out holds the input file \S+/in/d00\.txt; a build never writes over its inputs "
         r"\(choose another --out\)", after=inputs_kept),
    Case("build --overwrite, out holds a user's files", over(out_holds("notes.md", "a.txt"), "--overwrite"),
         2,
         E + r"\S+/out: --overwrite replaces only a shard set a build wrote there; this directory has no "
         r"manifest\.json and holds 2 other file\(s\): a\.txt, notes\.md \(move them, or choose another "
         r"--out\)", after=kept("notes.md", "a.txt")),
    Case("build --overwrite, earlier build plus a user's file",
         over(out_holds("keep.txt", earlier=True), "--overwrite"), 2,
         E + r"\S+/out: --overwrite replaces only a shard set a build wrote there; this directory also holds "
         r"1 other file\(s\): keep\.txt \(move them, or choose another --out\)", after=kept("keep.txt")),
    Case("build, out holds a user's files", over(out_holds("notes.md")), 2,
         E + r"\S+/out: output directory is not empty and holds no shard set \(notes\.md\); choose another "
         r"--out", after=kept("notes.md")),
    Case("merge --out is its part dir", merge_into_part, 2,
         E + r"\S+/p0: --out holds the input \S+/p0; a build never writes over its inputs"),
    # issue 30: blank documents are one rule for every input format; a split of nothing but blanks is refused
    Case("jsonl whitespace-only documents", lambda c: made("in.jsonl", blank_jsonl())(c) + [
        "--tokenizer", str(c.tiny_shards / "tokenizer.model")], 2,
         E + r"empty corpus: \S+in\.jsonl holds no non-blank document \(4 blank: empty or whitespace only\)"),
    Case("jsonl whitespace-only documents, no --tokenizer", made("in.jsonl", blank_jsonl()), 2,
         E + r"empty corpus: \S+in\.jsonl holds no non-blank document \(4 blank: empty or whitespace only\)"),
    Case("whitespace-only --val-input", val_input_blank, 2,
         E + r"--val-input: \S+val\.jsonl holds no non-blank document \(4 blank: empty or whitespace only\)"),
    # issue 30: a JSON value nested too deep, a line sentencepiece cannot learn from
    Case("jsonl line nested 100000 deep", jl(DEEP), 2, E + r"\S+jsonl:101: invalid JSON \(nested too deep"),
    Case("jsonl line nested 100000 deep, 2 workers",
         lambda c: jl(DEEP, 100, "--tokenizer", TOK)(c) + ["--workers", "2"], 2,
         E + r"\S+jsonl:101: invalid JSON \(nested too deep"),
    Case("jsonl.gz line nested 100000 deep", made("d.jsonl.gz", deep_gz), 2,
         E + r"\S+d\.jsonl\.gz:2: invalid JSON \(nested too deep to parse\)"),
    Case("config YAML nested 100000 deep", lambda c: ((c.tmp / "c.yaml").write_bytes(b"train: " + DEEP[9:-1]),
                                                      ["train", "--config", str(c.tmp / "c.yaml")])[1], 2,
         E + r"config file \S+c\.yaml: invalid YAML: nested too deep to parse"),
    Case("--set value nested 50000 deep", train(None, "train=" + "[" * 50_000 + "]" * 50_000), 2,
         E + r"--set train: value '\[+'\.\.\. is nested too deep to parse"),
    Case("manifest.json nested 100000 deep", inspect(rewrite("manifest.json", lambda _: DEEP)), 2,
         E + r"\S+manifest\.json: cannot read manifest: its JSON is nested too deep to parse"),
    Case("empty jsonl, no --tokenizer", made("empty.jsonl", lambda p: p.write_text("")), 2,
         E + r"empty corpus: \S+empty\.jsonl holds no non-blank document$"),
    Case("jsonl one 30 MB line, no --tokenizer", made("in.jsonl", lambda p: p.write_text(
        json.dumps({"text": "ab cd " * 5_000_000}) + "\n")), 2,
         E + r"\S+in\.jsonl: no line of text sentencepiece can train a tokenizer on: 1 line\(s\) over "
         r"\d+ bytes, which it skips \(the longest, 30000000 bytes, at \S+in\.jsonl:1\); break the text into "
         r"lines, or pass --tokenizer"),
    # issue 30: bench arms change only teacher keys; every arm's config is checked before the first run
    Case("bench arm changes train.lr", bench("--arms", "a:train.lr=0.1"), 2,
         E + r"--arms 'a:train\.lr=0\.1': train\.lr is not a teacher key; an arm changes only teacher\.\* "
         r"keys \(a change for every arm goes in --set\)", after=nothing_ran),
    Case("bench arm changes model", bench("--arms", "a:strategy=hard,model.config.n_layer=9"), 2,
         E + r"--arms 'a:strategy=hard,model\.config\.n_layer=9': model\.config\.n_layer is not a teacher "
         r"key", after=nothing_ran),
    Case("bench arm unknown teacher key", bench("--arms", "a:stratgy=hard"), 2,
         E + r"--arms 'a:stratgy=hard': unknown config key 'teacher\.stratgy' \(did you mean "
         r"'teacher\.strategy'\?\)", after=nothing_ran),
    Case("bench arm bad teacher value", bench("--arms", "a:initial_ratio=2"), 2,
         E + r"--arms 'a:initial_ratio=2': config key 'teacher\.initial_ratio': 2", after=nothing_ran),
    Case("bench --seeds 0", bench("--seeds", "0"), 2, E + r"--seeds 0: must be at least 1$",
         after=nothing_ran),
    Case("bench --seeds -1", bench("--seeds", "-1"), 2, E + r"--seeds -1: must be at least 1$",
         after=nothing_ran),
    Case("bench --budget-steps -5", bench("--budget-steps", "-5"), 2,
         E + r"--budget-steps -5: must be at least 1$", after=nothing_ran),
    Case("bench --budget-seconds -1", bench("--budget-seconds", "-1"), 2,
         E + r"--budget-seconds -1(\.0)?: must be positive$", after=nothing_ran),
    Case("bench --set bad for every arm", bench("--set", "train.lr=abc"), 2,
         E + r"config key 'train\.lr': expected a number", after=nothing_ran),
    # issue 30: a teacher that needs val losses, on data without a val split, stops before training
    Case("train signal with an empty val split", train(no_val, *SIGNAL), 2,
         E + r"config key 'teacher\.strategy': 'signal' judges samples by their val losses, but data\.dir "
         r"\S+/noval has no val samples \(split 'val' is empty\); rebuild the shards with --val-fraction > 0 "
         r"or --val-input, or choose another teacher\.strategy", noisy=True, after=no_export),
    # issue 30: a resume on other data names data.dir (was: "teacher state has num_samples=N, this run has M")
    Case("train resumed on another data.dir", resumed_on(no_val), 2,
         E + REFUSED + r"data\.dir '\S+' -> '\S+/noval' \(split 'train': \d+ samples when written, 97 now\) "
         r"\(use another run_dir, or checkpoint\.resume=false\)", noisy=True),
    Case("train resumed on data.dir rebuilt in place", resumed_on(rebuilt_in_place), 2,
         E + REFUSED + r"data\.dir '\S+/shards' rebuilt since \(split 'train': \d+ samples when written, \d+ "
         r"now\)", noisy=True),
    # 24: inspect
    Case("inspect --verify unreadable shard", unreadable_shard, 1,
         r"BAD train/train-000001\.tar: unreadable \(Permission denied\)"),
    Case("inspect --verify inflated num_samples", inspect(edited(inflate), "--verify"), 1,
         r"BAD split 'train' num_samples \d+ != \d+ in its shard list"),
    Case("inspect inflated num_samples", inspect(edited(inflate)), 2,
         E + r".*manifest\.json: split 'train' num_samples \d+ != \d+"),
    Case("inspect FIFO shard", inspect(special_shard("fifo")), 2,
         E + r".*train-000002\.tar: shard listed in .* is a FIFO, not a regular file"),
    Case("inspect directory shard", inspect(special_shard("dir")), 2,
         E + r".*train-000002\.tar: shard listed in .* is a directory, not a regular file"),
    Case("verify FIFO shard", inspect(special_shard("fifo"), "--verify"), 1,
         r"BAD train/train-000002\.tar: a FIFO, not a regular file"),
    Case("manifest field of the wrong type", inspect(edited(lambda m: m["splits"]["train"]["shards"][0]
                                                        .update(count="abc"))), 2,
         E + r".*manifest\.json: split 'train' shard 'train-000000\.tar': a field has the wrong type"),
    Case("manifest splits not a mapping", inspect(edited(lambda m: m.update(splits="x"))), 2,
         E + r".*manifest\.json: invalid manifest \(AttributeError"),
    Case("manifest shard name escapes", inspect(edited(lambda m: m["splits"]["train"]["shards"][0]
                                                   .update(name="../x.tar"))), 2,
         E + r".*manifest\.json: split 'train' shard name '\.\./x\.tar' is not a file name"),
    Case("manifest seq_len 0", inspect(edited(lambda m: m.update(seq_len=0))), 2,
         E + r".*manifest\.json: seq_len 0 / vocab_size \d+: need >= 2 / >= 1"),
    # 17: train checks what the manifest promises
    Case("train shard same size other content", train(rewrite("train-000003.tar", flip_byte)), 2,
         E + r".*train-000003\.tar: sha256 differs from manifest\.json"),
    Case("train shard from another build", train(other_build), 2,
         E + r".*train-000000\.tar: sha256 differs from manifest\.json"),
    Case("train truncated shard", train(rewrite("train-000001.tar", lambda d: d[:5000])), 2,
         E + r".*train-000001\.tar: 5000 bytes, .*manifest\.json says \d+"),
    Case("train garbage val shard", train(rewrite("val-000000.tar", lambda d: os.urandom(len(d)))), 2,
         E + r".*val-000000\.tar: sha256 differs"),
    Case("train other tokenizer", train(rewrite("tokenizer.model", flip_last)), 2,
         E + r".*tokenizer\.model: sha256 differs from .*manifest\.json"),
    Case("train shard count edited", train(edited(last_count_halved)), 2,
         E + r".*train-\d+\.tar: holds \d+ samples, manifest\.json says \d+"),
    Case("train split num_samples inflated", train(edited(inflate)), 2,
         E + r".*manifest\.json: split 'train' num_samples"),
    Case("train FIFO shard", train(special_shard("fifo")), 2,
         E + r".*train-000002\.tar: shard listed in .* is a FIFO, not a regular file"),
    Case("train max_corrupt_fraction out of range", train(None, "data.max_corrupt_fraction=2"), 2,
         E + r"config key 'data.max_corrupt_fraction': 2(\.0)? must be in \[0, 1\]"),
    # folded in from test_bad_input.py
    Case("train model shorter than seq_len", train(None, "model.config.n_positions=16"), 2,
         E + r"config key 'model.config.n_positions'"),
    # 16: a run that trains on nothing stops with one line, and never exports
    Case("train all corrupt", train(edited(vocab_100)), 2, E + CORRUPT, noisy=True, after=no_export),
    # checkpoint and run-directory faults (more in test_checkpoint_faults.py), metrics config
    Case("train run_dir is a file", lambda c: ((c.tmp / "afile").write_text("x"),
                                               c.train(c.tiny_shards, f"run_dir={c.tmp / 'afile'}"))[1], 2,
         E + r"run_dir \S+/afile: exists and is not a directory"),
    Case("train metrics.address unresolvable", train(None, "metrics.enabled=true", "metrics.address=x..y"), 2,
         E + r"config key 'metrics\.address': cannot resolve 'x\.\.y'", noisy=True),
    Case("train nothing, budget disabled", train(edited(vocab_100), "data.max_corrupt_fraction=1.0"), 2,
         E + r"data\.dir .*: no sample trained in 4 steps .*nothing exported", noisy=True, after=no_export),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, tiny_shards: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture) -> None:
    ctx = Ctx(tmp_path, tiny_shards, monkeypatch)
    argv = case.make(ctx)
    if case.proc:
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        p = procs.run([sys.executable, "-m", "attent_scale", *argv], cwd=REPO, env=env,
                      capture_output=True, text=True, timeout=240)
        code, out, err = p.returncode, p.stdout, p.stderr
    else:
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            for sig, handler in handlers.items():  # a trainer in this process sets its own
                signal.signal(sig, handler)
        monkeypatch.undo()
        out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if case.first.startswith("BAD"):
        lines = [line for line in out.splitlines() if line.startswith("BAD")]
    elif case.noisy:
        lines = [line for line in lines if line.startswith(ERR)]
    assert code == case.exit, f"exit {code}, wanted {case.exit}\n{out[-2000:]}\n{err[-3000:]}"
    assert lines and re.match(case.first, lines[0]), f"{lines[:1]} !~ {case.first!r}\n{err[-3000:]}"
    if case.noisy:
        assert len(lines) == 1, lines
    if case.after is not None:
        case.after(ctx)


# ---- faults that are not one-shot inputs ----------------------------------------------------------------

def test_sigterm_during_build_removes_its_temp_dir(tmp_path: Path) -> None:
    """21: SIGTERM (as a scheduler sends it) mid-build cleans up like SIGINT: one line, exit 143."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "attent_scale", "shards", "build", "-o", str(out),
                          "--seq-len", "64", "--vocab-size", "2000", "--max-bytes", "20000000",
                          "--no-progress", "--workers", "2"],
                         cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".out.tmp-*")) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(tmp_path.glob(".out.tmp-*")), "the build never made its temp directory"
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 143, err
    assert err.strip().splitlines()[-1] == f"{ERR}SIGTERM: stopped, nothing written", err
    assert "Traceback" not in err
    assert sorted(q.name for q in tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def _build_proc(out: Path, max_bytes: int, workers: int = 1) -> subprocess.Popen:
    """A build of the embedded stdlib corpus into OUT in a child process (slow enough to catch mid-way)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "attent_scale", "shards", "build", "-o", str(out),
                             "--seq-len", "64", "--vocab-size", "2000", "--max-bytes", str(max_bytes),
                             "--no-progress", "--workers", str(workers)],
                            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)


def _wait_for_temp(p: subprocess.Popen, parent: Path) -> Path:
    deadline = time.monotonic() + 120
    while not list(parent.glob(".out.tmp-*")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    found = list(parent.glob(".out.tmp-*"))
    assert found, "the build never made its temp directory"
    return found[0]


def small_build(tmp: Path, out: Path, tiny_shards: Path) -> list[str]:
    (tmp / "in.txt").write_text("hello world, a short text document for the tokenizer\n" * 50)
    return ["shards", "build", str(tmp / "in.txt"), "-o", str(out), "--seq-len", "16", "--tokenizer",
            str(tiny_shards / "tokenizer.model"), "--no-progress", "--workers", "1"]


def test_two_builds_into_one_out(tmp_path: Path, tiny_shards: Path, capsys: pytest.CaptureFixture) -> None:
    """Two builds into one --out at once: the second stops at once with one line naming the first, which
    finishes; nothing of either is lost silently."""
    out = tmp_path / "out"
    first = _build_proc(out, 3_000_000)
    try:
        _wait_for_temp(first, tmp_path)
        assert cli.main(small_build(tmp_path, out, tiny_shards)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        busy = E + r"\S+/out: another build \(pid \d+ on \S+\) is writing this output now; wait for it to "
        assert len(err) == 1 and re.match(busy + "finish, or choose another --out", err[0]), err
        assert f"pid {first.pid} " in err[0]
        _, first_err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, first_err
    assert json.loads((out / "manifest.json").read_text())["build"]["corpus"] == "embedded stdlib corpus"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["in.txt", "out"]


def test_killed_build_leaves_temp_the_next_build_removes(tmp_path: Path, tiny_shards: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """kill -9 mid-build leaves its .out.tmp-PID (nothing can clean up); the next build into that --out
    proves the builder is gone (it holds the lock), removes the directory and says so in one line."""
    out = tmp_path / "out"
    p = _build_proc(out, 20_000_000)
    try:
        tmp = _wait_for_temp(p, tmp_path)
        time.sleep(0.5)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
    finally:
        p.kill()
    assert tmp.is_dir()
    assert cli.main(small_build(tmp_path, out, tiny_shards)) == 0
    err = capsys.readouterr().err
    said = (rf"^attent-scale: removed {re.escape(str(tmp))}: the temp directory of a build into "
            rf"{re.escape(str(out))} that stopped without cleaning up \(pid {p.pid}\)$")
    assert re.search(said, err, re.M), err
    assert sorted(q.name for q in tmp_path.iterdir()) == ["in.txt", "out"]


def _workers(pid: int) -> list[int]:
    """The spawn worker processes of process `pid` (its resource tracker not among them)."""
    kids = [int(x) for t in Path(f"/proc/{pid}/task").iterdir() for x in (t / "children").read_text().split()]
    cmd = {k: Path(f"/proc/{k}/cmdline").read_bytes() for k in kids if Path(f"/proc/{k}").exists()}
    return [k for k, c in cmd.items() if b"spawn_main" in c and b"resource_tracker" not in c]


def test_build_worker_killed_is_one_line(tmp_path: Path) -> None:
    """A worker killed mid-build (the out-of-memory killer, kill -9): the build stops with one line and
    leaves nothing, instead of waiting forever for the task the dead worker held."""
    out = tmp_path / "out"
    p = _build_proc(out, 6_000_000, workers=2)
    try:
        deadline = time.monotonic() + 300
        while p.poll() is None and time.monotonic() < deadline and not (
                list(tmp_path.glob(".out.tmp-*/.part/tokens/*.bin")) and _workers(p.pid)):
            time.sleep(0.2)
        assert p.poll() is None, "the build finished before a worker could be killed"
        os.kill(_workers(p.pid)[0], signal.SIGKILL)
        _, err = p.communicate(timeout=300)
    finally:
        p.kill()
    lines = err.strip().splitlines()
    assert p.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert re.match(E + r"shards build: a worker process died \(killed: out of memory\?\); nothing written "
                    r"\(rerun; with fewer --workers if memory is short\)$", lines[-1]), lines
    assert sorted(q.name for q in tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_stale_temp_with_foreign_files_is_kept(tmp_path: Path, tiny_shards: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """A directory named like a dead build's temp that holds anything a build does not write is left."""
    out = tmp_path / "out"
    odd = tmp_path / ".out.tmp-999999999"
    odd.mkdir()
    (odd / "thesis.tex").write_text("mine")
    assert cli.main(small_build(tmp_path, out, tiny_shards)) == 0
    assert (odd / "thesis.tex").read_text() == "mine"
    assert f"attent-scale: warning: {odd} looks like a dead build's temp directory" in capsys.readouterr().err


def test_blank_documents_are_skipped_and_counted_in_every_format(tmp_path: Path, tiny_shards: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """One rule for JSONL, parquet and plain text: a blank document (empty, whitespace only) is not
    stored, and the manifest and the build's report count it; the shards are those of the same inputs
    without the blanks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def inputs(root: Path, blanks: bool) -> list[str]:
        root.mkdir()
        extra = ["", "  \n\t "] if blanks else []
        rows = [json.loads(g)["text"] for g in GOOD[:60]]
        (root / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows[:30] + extra))
        pq.write_table(pa.table({"text": rows[30:50] + (["\n\n"] if blanks else [])}), root / "b.parquet")
        (root / "txt").mkdir()
        for i, t in enumerate(rows[50:]):
            (root / "txt" / f"{i}.txt").write_text(t)
        if blanks:
            (root / "txt" / "z.txt").write_text(" \n")
        return [str(root / "a.jsonl"), str(root / "b.parquet"), str(root / "txt")]

    args = ["--seq-len", "16", "--tokenizer", str(tiny_shards / "tokenizer.model"), "--val-fraction", "0.3",
            "--no-progress", "--workers", "1"]
    for name, blanks in (("o1", False), ("o2", True)):
        capsys.readouterr()
        argv = ["shards", "build", *inputs(tmp_path / f"in-{name}", blanks), "-o", str(tmp_path / name)]
        assert cli.main([*argv, *args]) == 0
    report = capsys.readouterr().out
    m1, m2 = (json.loads((tmp_path / o / "manifest.json").read_text()) for o in ("o1", "o2"))
    blank = {s: v.get("blank_documents", 0) for s, v in m2["splits"].items()}
    assert sum(blank.values()) == 4, blank
    said = r"^blank documents skipped \(empty or whitespace only\): (train|val) \d"
    assert re.search(said, report, re.M), report
    for split in ("train", "val"):
        assert [s["sha256"] for s in m1["splits"][split]["shards"]] == \
            [s["sha256"] for s in m2["splits"][split]["shards"]]
        assert "blank_documents" not in m1["splits"][split]


def test_long_lines_the_tokenizer_skips_are_counted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """sentencepiece skips lines over 4192 bytes while it trains: the build says how many, and where."""
    ctx = Ctx(tmp_path, tmp_path, pytest.MonkeyPatch())
    argv = jl(json.dumps({"text": "word " * 2000}).encode(), 200)(ctx)
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    said = (r"^attent-scale: warning: tokenizer training: 1 line\(s\) over 4192 bytes, which it skips \(the "
            r"longest, 10000 bytes, at \S+in\.jsonl:201\); it learned from the other 200 line\(s\)$")
    assert re.search(said, err, re.M), err


@pytest.mark.parametrize("size", [4, 24, 1000, 100_000, 1_000_000, 3_000_000, 60_000_000])
def test_truncated_gguf_is_one_line(size: int, tmp_path: Path, tiny_shards: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    """model.init_from a .gguf cut at SIZE bytes (a partial download): whatever the gguf reader raises
    (struct.error, a reshape ValueError, ...), train stops with one line naming the file, before any
    weights load."""
    from attent_scale.errors import UserError
    from attent_scale.models import smollm2_gguf

    try:
        whole = smollm2_gguf()
    except UserError as exc:
        pytest.skip(str(exc))
    cut = tmp_path / "cut.gguf"
    with open(whole, "rb") as f:
        cut.write_bytes(f.read(size))
    ctx = Ctx(tmp_path, tiny_shards, pytest.MonkeyPatch())
    assert cli.main(ctx.train(tiny_shards, f"model.init_from={cut}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert len(err) == 1 and re.match(E + rf"config key 'model\.init_from': {re.escape(str(cut))}: not a "
                                      rf"readable \.gguf file \(.+; {size} bytes: truncated or damaged\?\)$",
                                      err[0]), err


@pytest.mark.parametrize(("engine", "nproc"), [("local", 1), ("fsdp", 2)])
def test_disk_full_at_export_keeps_the_checkpoint(engine: str, nproc: int, tmp_path: Path,
                                                  tiny_shards: Path) -> None:
    """The disk fills up during the export (after the last checkpoint): every rank stops with one line
    naming the checkpoint that holds the trained weights; no half-written export, no temp directory, no
    summary, exit 2, no rank left waiting. Rerun with space, the same command exports from it."""
    sys.path.insert(0, str(REPO / "tests" / "helpers"))
    from train_runner import run_train, tiny_run_config

    from attent_scale import launcher

    run_dir = tmp_path / "run"
    cfg = tiny_run_config(run_dir, tiny_shards, engine, teacher={"mode": "none"}, train={"max_steps": 4},
                          eval={"every_steps": 0, "max_batches": 1},
                          checkpoint={"export": True, "every_steps": 2})
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "helpers"), str(REPO)]),
           "ATTENT_EXPORT_FSIZE": str(16 * 1024)}
    fault = launcher.command(("-m", "export_fault", "train"), nproc=nproc)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run([*fault, "--config", str(cfg_path)], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert not re.search(r'File ".*attent_scale/', proc.stderr), proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(ERR)]
    assert errors and all(e == errors[0] for e in errors), proc.stderr[-3000:]
    step4 = run_dir / "checkpoints" / "step-00000004"
    said = (E + rf"export {re.escape(str(run_dir / 'export'))}: write failed on rank 0: disk full \(File too "
            rf"large\); nothing of it written; the trained weights are in checkpoint {re.escape(str(step4))} "
            r"\(free space, then rerun the same command: it resumes there and exports\)$")
    assert re.match(said, errors[0]), errors
    if nproc == 1:
        assert proc.returncode == 2
    assert (step4 / "COMPLETE").is_file()
    assert not (run_dir / "export").exists() and not (run_dir / "summary.json").exists()
    assert not [q.name for q in run_dir.iterdir() if q.name.startswith(".export")]

    again = run_train(cfg, nproc=nproc, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / "export" / "model" / "model.safetensors").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4


def test_export_replaces_only_an_earlier_export(tmp_path: Path) -> None:
    """The export writer swaps in a whole export (export.json last), replaces only the entries an earlier
    export.json lists, leaves a user's files alone, and on a failed write leaves everything as it was."""
    from attent_scale.export import write_export

    out = tmp_path / "export"
    (out / "model").mkdir(parents=True)
    (out / "model" / "old.safetensors").write_text("old")
    (out / "export.json").write_text(json.dumps({"dirs": ["model"]}))
    (out / "notes.txt").write_text("mine")

    def new(tmp: Path) -> None:
        (tmp / "model").mkdir()
        (tmp / "model" / "new.safetensors").write_text("new")
        (tmp / "export.json").write_text(json.dumps({"dirs": ["model"]}))

    def full(tmp: Path) -> None:
        (tmp / "model").mkdir()
        (tmp / "model" / "half.safetensors").write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def blocked(tmp: Path) -> None:
        new(tmp)
        (tmp / "notes.txt").write_text("ours")

    def tree() -> dict[str, str]:
        return {str(q.relative_to(tmp_path)): q.read_text() for q in tmp_path.rglob("*") if q.is_file()}

    before = tree()
    assert write_export(out, full) == "disk full (No space left on device)"
    assert tree() == before
    in_the_way = "notes.txt in the way there (not written by an earlier export: move it)"
    assert write_export(out, blocked) == in_the_way
    assert tree() == before
    assert write_export(out, new) is None
    assert tree() == {"export/model/new.safetensors": "new", "export/export.json": '{"dirs": ["model"]}',
                      "export/notes.txt": "mine"}
    assert sorted(q.name for q in tmp_path.iterdir()) == ["export"]


def test_nonfinite_stop_sets_aside_the_checkpoints_that_hold_its_weights(tmp_path: Path,
                                                                         tiny_shards: Path) -> None:
    """A run resumed with train.lr=1e10 diverges: the stop names the steps, sets aside the checkpoint that
    holds the weights that gave them (a non-finite step changes nothing) and names the one a rerun resumes;
    the rerun with a sane train.lr resumes there, not from the poisoned one, and finishes."""
    sys.path.insert(0, str(REPO / "tests" / "helpers"))
    from train_runner import run_train, tiny_run_config

    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    cfg = tiny_run_config(run_dir, tiny_shards, teacher={"mode": "none"},
                          train={"max_steps": 4, "max_nonfinite_in_row": 2},
                          eval={"every_steps": 0, "max_batches": 1},
                          checkpoint={"every_steps": 1, "keep_last": 3})
    first = run_train(cfg)
    assert first.returncode == 0, first.stderr[-3000:]
    cfg["train"].update(max_steps=12, lr=1e10)
    bad = run_train(cfg)
    errors = [line for line in bad.stderr.splitlines() if line.startswith(ERR)]
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    said = (E + r"2 non-finite training steps \(loss or gradient norm\) in a row at steps 6-7; "
            r"step-00000005 holds the weights that gave them, set aside \(COMPLETE renamed NONFINITE: never "
            rf"resumed\); a rerun resumes from {re.escape(str(ckpts / 'step-00000004'))}, the last "
            r"checkpoint before them \(lower train\.lr\?\)$")
    assert len(errors) == 1 and re.match(said, errors[0]), errors
    assert "attent-scale: train.lr 0.003 in the checkpoint, 1e+10 now: the LR schedule goes on from 1e+10" \
        in bad.stderr, bad.stderr[-3000:]  # a changed train.lr applies on resume (it was silently ignored)
    poisoned = ckpts / "step-00000005"
    assert (poisoned / "NONFINITE").is_file() and not (poisoned / "COMPLETE").exists()
    assert sorted(q.name for q in ckpts.iterdir()) == ["step-00000003", "step-00000004", "step-00000005"]

    cfg["train"].update(max_steps=8, lr=3e-3)
    again = run_train(cfg)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step-00000004" in again.stderr and "step-00000005" not in again.stderr, again.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8


def test_corruption_budget_stops_both_ranks_together(tmp_path: Path, tiny_shards: Path) -> None:
    """16 on 2 ranks (FSDP, gloo): every sample corrupt; the in-loop check (an all-reduce every
    stop_check_every steps) stops both ranks at the same step with the one line; nothing exported."""
    sys.path.insert(0, str(REPO / "tests" / "helpers"))
    from train_runner import run_train, tiny_run_config

    ctx = Ctx(tmp_path, tiny_shards, pytest.MonkeyPatch())
    shards = ctx.shards(vocab_100)
    cfg = tiny_run_config(tmp_path / "run", shards, "fsdp", teacher={"mode": "none"},
                          train={"max_steps": 8, "stop_check_every": 2},
                          eval={"every_steps": 0, "max_batches": 1},
                          checkpoint={"export": True})
    p = run_train(cfg, nproc=2, timeout=240)
    errors = [line for line in p.stderr.splitlines() if line.startswith(ERR)]
    assert p.returncode != 0 and errors, p.stderr[-3000:]
    assert all(re.match(E + CORRUPT, line) and "at step 2," in line for line in errors), errors
    # torchrun prints its own ChildFailedError traceback for any failed rank; the ranks print none
    assert not re.search(r'File ".*attent_scale/', p.stderr), p.stderr[-3000:]
    # (both ranks decide at the same all-reduce; torchrun may stop the second before it prints)
    no_export(ctx)


def test_damaged_shard_stops_both_ranks_at_start(tmp_path: Path, tiny_shards: Path) -> None:
    """17 on 2 ranks: the ranks hash disjoint shards; the one that finds the damage names it, the other
    learns of it in the same all-reduce; both exit 2 before training, none hangs."""
    sys.path.insert(0, str(REPO / "tests" / "helpers"))
    from train_runner import run_train, tiny_run_config

    ctx = Ctx(tmp_path, tiny_shards, pytest.MonkeyPatch())
    shards = rewrite("train-000003.tar", flip_byte)(ctx)
    cfg = tiny_run_config(tmp_path / "run", shards, "fsdp", teacher={"mode": "none"})
    p = run_train(cfg, nproc=2, timeout=240)
    errors = [line for line in p.stderr.splitlines() if line.startswith(ERR)]
    assert p.returncode != 0 and errors, p.stderr[-3000:]
    named = E + r".*train-000003\.tar: (sha256 differs|content is not what)"
    assert all(re.match(named, e) for e in errors), errors
    assert not re.search(r'File ".*attent_scale/', p.stderr), p.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
