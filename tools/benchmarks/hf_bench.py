"""AtteNT through Hugging Face `Trainer` vs plain `Trainer` (LoRA): time to plain's final eval loss.

    python tools/benchmarks/hf_bench.py --out runs/hf_bench --seeds 3

Sequentially, one process each, OMP_NUM_THREADS=1 (a CPU clock: `time.process_time` of one thread):
  1. a base model, once: tools/examples/hf_finetune.py --no-lora --no-attent on corpus A (the embedded Python
     stdlib corpus cut into text rows), which also trains the tokenizer;
  2. for each seed: plain `Trainer` (--no-attent) and `AttentTrainer` LoRA fine-tuning on corpus B (English
     prose from /usr/share/doc/*/copyright), both from the base model and its tokenizer, evaluating the
     same held-out rows every --eval-steps steps (OUT/seedS/ARM/eval_curve.jsonl).
Both corpora are written by this script (OUT/corpus_a.jsonl, OUT/corpus_b.jsonl), so every machine has them.
Reported per seed and as mean ± sd: final eval loss per arm, train CPU seconds (evaluations excluded, the
AtteNT scoring pass included), CPU seconds to reach plain's final eval loss (linear interpolation on the
eval curve; "not reached" if never), speedup = plain's time to its own final loss / AtteNT's, samples
trained, and AtteNT's scoring share. Writes OUT/hf_bench.json and OUT/hf_bench.md; --reuse skips runs
whose eval.json exists.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
FINETUNE = REPO / "tools" / "examples" / "hf_finetune.py"
ARMS = ("plain", "attent")


def cut_rows(texts: list[str], chars: int) -> list[str]:
    """Each text cut into rows of about `chars` characters at line ends; blank and repeated rows dropped
    (licence texts recur across copyright files)."""
    rows, seen = [], set()
    for text in texts:
        piece: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            piece.append(line)
            size += len(line)
            if size >= chars:
                rows.append("".join(piece))
                piece, size = [], 0
        if size >= chars // 4:
            rows.append("".join(piece))
    out = []
    for row in rows:
        key = " ".join(row.split())
        if key and key not in seen:
            seen.add(key)
            out.append(row[: 2 * chars])
    return out


def corpus_a(chars: int) -> list[str]:
    from attent_scale.data.corpus import Corpus

    return cut_rows([doc.text for doc in Corpus([])], chars)


def corpus_b(chars: int) -> list[str]:
    texts = []
    for path in sorted(glob.glob("/usr/share/doc/*/copyright")):
        try:
            texts.append(Path(path).read_text(errors="replace"))
        except OSError:
            continue
    return cut_rows(texts, chars)


def write_rows(path: Path, rows: list[str], limit: int, seed: int = 0) -> int:
    """The first `limit` rows of a fixed shuffle (so a cap samples the whole corpus) as {"text": ...}."""
    import random

    rows = list(rows)
    random.Random(seed).shuffle(rows)
    rows = rows[:limit] if limit else rows
    if len(rows) < (limit or 1):
        raise SystemExit(f"hf_bench: {path.name}: only {len(rows)} rows, --rows asks for {limit}")
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return len(rows)


def time_to_target(curve: list[dict[str, float]], target: float, key: str = "cpu_seconds") -> float | None:
    """First `key` at which the eval loss reaches `target` (`attent_scale.bench.interpolate_target`: linear
    between the two eval points around the crossing; None if never)."""
    from attent_scale.bench import interpolate_target

    seconds, _ = interpolate_target([(p[key], 0.0, p["eval_loss"]) for p in curve], target)  # samples unused
    return None if seconds is None else float(seconds)


def read_curve(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(out: Path, args: list[str], reuse: bool, log: Path) -> dict[str, Any]:
    if reuse and (out / "eval.json").exists():
        print(f"hf_bench: reusing {out}", flush=True)
        return json.loads((out / "eval.json").read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(FINETUNE), "--out", str(out), *args]
    print("hf_bench:", " ".join(cmd), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise SystemExit(f"hf_bench: {out} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return json.loads((out / "eval.json").read_text())


def compare(plain: dict[str, Any], attent: dict[str, Any], plain_curve: list[dict[str, float]],
            attent_curve: list[dict[str, float]]) -> dict[str, Any]:
    """One seed's numbers: the target is plain's final eval loss; times are train CPU seconds."""
    target = plain["eval_loss"]
    t_plain = time_to_target(plain_curve, target)
    t_attent = time_to_target(attent_curve, target)
    phases = attent.get("selection_seconds_by_phase", {})
    return {
        "target_eval_loss": target,
        "plain_eval_loss": plain["eval_loss"], "attent_eval_loss": attent["eval_loss"],
        "plain_cpu_seconds": plain["cpu_seconds"], "attent_cpu_seconds": attent["cpu_seconds"],
        "plain_time_to_target": t_plain, "attent_time_to_target": t_attent,
        "speedup": (t_plain / t_attent) if t_plain and t_attent else None,
        "plain_samples": plain["samples_seen"], "attent_samples": attent["samples_seen"],
        "samples_fraction": attent["samples_seen"] / plain["samples_seen"],
        # the teacher's phases are wall seconds: a share of the arm's wall training time
        "attent_scoring_share": phases.get("score", 0.0) / attent["train_seconds"],
        "attent_selection_share": sum(phases.values()) / attent["train_seconds"],
    }


def mean_sd(values: list[float | None]) -> dict[str, Any]:
    got = [v for v in values if v is not None]
    sd = statistics.stdev(got) if len(got) > 1 else 0.0
    return {"mean": statistics.fmean(got) if got else None, "sd": sd, "n": len(got), "of": len(values)}


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "not reached"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    keys = ["plain_eval_loss", "attent_eval_loss", "plain_cpu_seconds", "attent_cpu_seconds",
            "plain_time_to_target", "attent_time_to_target", "speedup", "samples_fraction",
            "attent_scoring_share", "attent_selection_share"]
    seeds = report["seeds"]
    lines = [f"# hf_bench: AttentTrainer vs plain Trainer (LoRA, {report['settings']['epochs']} epochs)", "",
             f"Command: `{report['command']}`", "",
             "Times are train CPU seconds of one thread (evaluations excluded, the AtteNT scoring pass "
             "included); target = plain Trainer's final eval loss of the same seed.", "",
             "| metric | " + " | ".join(f"seed {s['seed']}" for s in seeds) + " | mean ± sd |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for key in keys:
        agg = report["summary"][key]
        cells = [fmt(s[key]) for s in seeds]
        mean = "not reached" if agg["mean"] is None else f"{agg['mean']:.3f} ± {agg['sd']:.3f}"
        if agg["n"] < agg["of"]:
            mean += f" ({agg['n']} of {agg['of']})"
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {mean} |")
    base = report["base"]
    lines += ["", f"Base model: eval loss {base['eval_loss']:.3f} on corpus A after {base['steps']} steps "
              f"({base['cpu_seconds']:.0f} CPU s). Rows: A {report['rows']['a']}, B {report['rows']['b']} "
              f"(eval {report['rows']['eval']})."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--arms", default="plain,attent", help="comma list of plain, attent")
    p.add_argument("--chars", type=int, default=400, help="characters per text row")
    p.add_argument("--rows-a", type=int, default=3000, help="corpus A rows for the base model (0 = all)")
    p.add_argument("--rows-b", type=int, default=1800, help="corpus B rows, eval rows included (0 = all)")
    p.add_argument("--eval-rows", type=int, default=300, help="held-out rows of B, evaluated in full")
    p.add_argument("--eval-steps", type=int, default=40)
    p.add_argument("--base-epochs", type=float, default=2)
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--teacher", dest="teacher", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to the AtteNT arm as --teacher-set KEY=VALUE (repeatable), e.g. mode=ledger")
    p.add_argument("--reuse", action="store_true", help="skip runs whose eval.json exists")
    p.add_argument("--base", type=Path, default=None,
                   help="use this base model run (OUT/base of an earlier hf_bench) instead of training one")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or any(a not in ARMS for a in arms):
        raise SystemExit(f"hf_bench: --arms {args.arms!r}: choose from {', '.join(ARMS)}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data_a, data_b = out / "corpus_a.jsonl", out / "corpus_b.jsonl"
    if not (args.reuse and data_a.exists()):
        write_rows(data_a, corpus_a(args.chars), args.rows_a)
    if not (args.reuse and data_b.exists()):
        write_rows(data_b, corpus_b(args.chars), args.rows_b)
    n_a = sum(1 for _ in data_a.open())
    n_b = sum(1 for _ in data_b.open())
    common = ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--lr", str(args.lr)]
    base_dir = args.base or out / "base"
    if args.base is not None:
        if not (base_dir / "eval.json").is_file() or not (base_dir / "final").is_dir():
            raise SystemExit(f"hf_bench: --base {base_dir}: no eval.json and final/ (the base of another "
                             "hf_bench OUT, e.g. OUT/base)")
        base = json.loads((base_dir / "eval.json").read_text())
    else:
        base_args = ["--data", str(data_a), "--no-lora", "--no-attent", "--epochs", str(args.base_epochs),
                     "--eval-rows", str(args.eval_rows), "--vocab-size", str(args.vocab_size), "--seed", "0"]
        base = run(base_dir, [*base_args, *common], args.reuse, out / "base.log")
    init = ["--init-from", str(base_dir / "final"), "--tokenizer", str(base_dir / "tokenizer.model")]
    seeds = []
    for seed in range(args.seeds):
        results: dict[str, Any] = {}
        for arm in arms:
            run_dir = out / f"seed{seed}" / arm
            teacher = [x for kv in args.teacher for x in ("--teacher-set", kv)]
            extra = ["--no-attent"] if arm == "plain" else teacher
            results[arm] = run(run_dir, ["--data", str(data_b), *init, "--seed", str(seed), "--no-save",
                                         "--epochs", str(args.epochs), "--eval-rows", str(args.eval_rows),
                                         "--eval-steps", str(args.eval_steps), *common, *extra],
                               args.reuse, run_dir.with_suffix(".log"))
        for arm in set(ARMS) - set(arms):  # the other arm from an earlier invocation, if there is one
            done = out / f"seed{seed}" / arm / "eval.json"
            if done.is_file():
                results[arm] = json.loads(done.read_text())
        if set(results) == set(ARMS):
            curves = {arm: read_curve(out / f"seed{seed}" / arm / "eval_curve.jsonl") for arm in ARMS}
            seeds.append({"seed": seed, **compare(results["plain"], results["attent"], curves["plain"],
                                                  curves["attent"])})
    keys = [k for k in (seeds[0] if seeds else {}) if k != "seed"]
    argv = argv if argv is not None else sys.argv[1:]
    report = {"command": " ".join(["python", "tools/benchmarks/hf_bench.py", *argv]),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "rows": {"a": n_a, "b": n_b, "eval": args.eval_rows}, "base": base, "seeds": seeds,
              "summary": {k: mean_sd([s[k] for s in seeds]) for k in keys}}
    (out / "hf_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    if seeds:
        text = markdown(report)
        (out / "hf_bench.md").write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
