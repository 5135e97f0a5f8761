"""tools/benchmarks/hf_bench.py's time-to-target arithmetic; tools/examples/hf_finetune.py's --tokenizer and
--init-from."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import procs
import pytest

REPO = Path(__file__).resolve().parents[2]


def _tool(name: str):  # noqa: ANN202 - a module
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _curve(points: list[tuple[float, float]]) -> list[dict[str, float]]:
    return [{"cpu_seconds": t, "eval_loss": loss} for t, loss in points]


def test_time_to_target_interpolates_first_crossing() -> None:
    ttt = _tool("hf_bench").time_to_target
    curve = _curve([(10, 4.0), (20, 3.0), (30, 2.0), (40, 2.5), (50, 1.5)])
    assert ttt(curve, 3.5) == pytest.approx(15.0)
    assert ttt(curve, 2.0) == pytest.approx(30.0)  # exactly on a point
    assert ttt(curve, 2.2) == pytest.approx(28.0)  # the first crossing, not the one after the bump at 40
    assert ttt(curve, 1.75) == pytest.approx(47.5)  # from (40, 2.5) to (50, 1.5)
    assert ttt(curve, 5.0) == 10.0  # already below at the first evaluation: its time
    assert ttt(curve, 1.0) is None  # never reached


def test_compare_speedup_is_plain_time_over_attent_time() -> None:
    bench = _tool("hf_bench")
    plain = {"eval_loss": 2.0, "cpu_seconds": 100.0, "train_seconds": 110.0, "samples_seen": 300}
    attent = {"eval_loss": 1.9, "cpu_seconds": 70.0, "train_seconds": 80.0, "samples_seen": 180,
              "selection_seconds_by_phase": {"score": 8.0, "select": 2.0}}
    # plain reaches its own final loss first at 90 s (the last point is a repeat of it)
    pc = _curve([(30, 3.0), (60, 2.5), (90, 2.0), (100, 2.0)])
    ac = _curve([(20, 2.8), (40, 2.2), (60, 1.8), (70, 1.9)])
    got = bench.compare(plain, attent, pc, ac)
    assert got["plain_time_to_target"] == pytest.approx(90.0)
    assert got["attent_time_to_target"] == pytest.approx(50.0)
    assert got["speedup"] == pytest.approx(1.8)
    assert got["samples_fraction"] == pytest.approx(0.6)
    assert got["attent_scoring_share"] == pytest.approx(0.1)
    assert got["attent_selection_share"] == pytest.approx(0.125)
    assert bench.compare(plain, attent, pc, _curve([(70, 2.1)]))["speedup"] is None


def test_cut_rows_drops_repeats_and_blank() -> None:
    rows = _tool("hf_bench").cut_rows(["a line\n" * 10, "a line\n" * 10, "\n\n\n", "other\n" * 3], 20)
    assert len(rows) == len(set(rows)) and all(r.strip() for r in rows)
    assert any("other" in r for r in rows)


def _finetune(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = REPO / "tools" / "examples" / "hf_finetune.py"
    return procs.run([sys.executable, str(script), *args], env=env,
                     capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_tokenizer_and_init_from(tmp_path: Path) -> None:
    """--tokenizer FILE is the tokenizer used (not one trained on the rows); a --no-lora run's final/ is a
    base model --init-from loads, with its tokenizer found beside it; a base without one is refused."""
    from attent_scale.data.tokenizer import Tokenizer, train_tokenizer

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    docs = [SimpleNamespace(text=" ".join(words[(i + k) % len(words)] for k in range(12))) for i in range(60)]
    given = tmp_path / "given.model"
    train_tokenizer(docs, given, vocab_size=300)
    data = tmp_path / "rows.jsonl"
    lines = [json.dumps({"prompt": d.text[:20], "response": d.text[20:]}) + "\n" for d in docs]
    data.write_text("".join(lines))
    small = ["--data", str(data), "--epochs", "1", "--seq-len", "32", "--batch-size", "8", "--eval-rows", "8"]

    base = tmp_path / "base"
    proc = _finetune(*small, "--out", str(base), "--tokenizer", str(given), "--no-lora", "--no-attent")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (base / "tokenizer.model").read_bytes() == given.read_bytes()
    assert (base / "final" / "tokenizer.model").read_bytes() == given.read_bytes()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base / "final")
    assert model.config.vocab_size == Tokenizer(given).vocab_size  # the model was built for that tokenizer

    tuned = tmp_path / "tuned"
    proc = _finetune(*small, "--out", str(tuned), "--init-from", str(base / "final"), "--no-save",
                     "--eval-steps", "2", "--teacher-set", "initial_ratio=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tuned / "tokenizer.model").read_bytes() == given.read_bytes()  # found beside the base model
    summary = json.loads((tuned / "eval.json").read_text())
    assert summary["teacher"]["initial_ratio"] == 0.5 and summary["cpu_seconds"] > 0
    curve = [json.loads(line) for line in (tuned / "eval_curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in curve] == sorted({p["step"] for p in curve}) and len(curve) >= 2
    assert curve[-1]["eval_loss"] == pytest.approx(summary["eval_loss"])
    assert curve[-1]["cpu_seconds"] == pytest.approx(summary["cpu_seconds"], rel=0.05)

    bare = tmp_path / "bare"
    model.save_pretrained(bare / "model")
    proc = _finetune(*small, "--out", str(tmp_path / "x"), "--init-from", str(bare / "model"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "--tokenizer" in proc.stderr
    proc = _finetune(*small, "--out", str(tmp_path / "y"), "--teacher-set", "mode=sideways")
    assert proc.returncode == 2 and "teacher.mode" in proc.stderr


@pytest.fixture(scope="module")
def given_tok(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SentencePiece model for rows of any size (training one on 4 rows fails on its vocabulary)."""
    from attent_scale.data.tokenizer import train_tokenizer

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "word"]
    docs = [SimpleNamespace(text=" ".join(words[(i + k) % len(words)] for k in range(12))) for i in range(60)]
    return str(train_tokenizer(docs, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=300))


def _rows(path: Path, prompts: list[str]) -> Path:
    rows = [json.dumps({"prompt": p, "response": "delta epsilon zeta"}) + "\n" for p in prompts]
    path.write_text("".join(rows))
    return path


@pytest.mark.parametrize(("args", "first"), [
    (["--eval-rows", "-3"], r"--eval-rows -3: must be >= 0 \(0: --eval-fraction decides\)$"),
    (["--max-samples", "-1"], r"--max-samples -1: must be >= 0 \(0: all rows\)$"),
    (["--seq-len", "1"], r"--seq-len 1: must be at least 2$"),
    (["--batch-size", "0"], r"--batch-size 0: must be at least 1$"),
    (["--epochs", "0"], r"--epochs 0(\.0)?: must be positive$"),
    (["--eval-rows", "40"], r"--eval-rows 40: only 40 usable rows in \S+rows\.jsonl, and training needs "
                            r"one$"),
])
def test_finetune_bad_arguments_are_one_line(tmp_path: Path, given_tok: str, args: list[str],
                                             first: str) -> None:
    data = _rows(tmp_path / "rows.jsonl", ["alpha beta gamma"] * 40)
    proc = _finetune("--data", str(data), "--out", str(tmp_path / "o"), "--seq-len", "32", "--tokenizer",
                     given_tok, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.match("hf_finetune: " + first, lines[0]), lines


def test_finetune_rows_whose_prompt_fills_seq_len(tmp_path: Path, given_tok: str) -> None:
    """A row whose prompt fills --seq-len has no response token to learn: each one is counted in one line;
    when every row is such a row the error names --seq-len, not --eval-rows."""
    long = "word " * 40
    data = _rows(tmp_path / "rows.jsonl", [long] * 40)
    proc = _finetune("--data", str(data), "--out", str(tmp_path / "a"), "--seq-len", "16", "--eval-rows", "2",
                     "--tokenizer", given_tok)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert re.match(r"hf_finetune: --seq-len 16: every row's prompt fills it \(40 rows in \S+rows\.jsonl, no "
                    r"response token left\); raise --seq-len or shorten the prompts$", lines[0]), lines

    data = _rows(tmp_path / "rows.jsonl", [long] * 3 + ["short?"])
    proc = _finetune("--data", str(data), "--out", str(tmp_path / "a"), "--seq-len", "16", "--tokenizer",
                     given_tok)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert re.match(r"hf_finetune: --eval-fraction 0\.1: leaves no training row of the 1 usable rows in "
                    r"\S+rows\.jsonl \(3 more dropped: the prompt fills --seq-len 16\)$", lines[0]), lines

    data = _rows(tmp_path / "rows.jsonl", [long] * 5 + ["short?"] * 11)
    proc = _finetune("--data", str(data), "--out", str(tmp_path / "b"), "--seq-len", "16", "--eval-rows", "2",
                     "--epochs", "1", "--batch-size", "4", "--no-save", "--no-attent", "--tokenizer",
                     given_tok)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^hf_finetune: 5 of 16 rows dropped: the prompt fills --seq-len 16 \(no response token "
                     r"left\)$", proc.stderr, re.M), proc.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["train_samples"] == 11 - 2
