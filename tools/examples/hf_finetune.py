"""LoRA fine-tuning of a small causal LM with Hugging Face `Trainer`, with or without AtteNT selection.

A copyable example of `attent_scale.integrations.hf.AttentTrainer` (pip install "attent-scale[hf]"):

    python tools/examples/hf_finetune.py --data rows.jsonl --out runs/hf --epochs 3
    torchrun --nproc_per_node 2 tools/examples/hf_finetune.py --data rows.jsonl --out runs/hf \\
        --deepspeed configs/deepspeed_zero3.json
    python tools/examples/hf_finetune.py --data rows.jsonl --out runs/hf_plain --no-attent   # plain Trainer

Rows of FILE.jsonl are {"prompt": ..., "response": ...} (loss on the response tokens only) or {"text": ...}.
Nothing is downloaded: a SentencePiece BPE tokenizer is trained on the rows (or `--tokenizer FILE` is
used) and copied to OUT/tokenizer.model; the model is a tiny GPT-2 built from its config, or `--init-from
DIR`, a local HF model directory such as OUT/final of a `--no-lora` run. A model started from DIR needs
the tokenizer its token ids came from: `--tokenizer`, else DIR/tokenizer.model or DIR/../tokenizer.model
(both written by this tool), else a one-line error. OUT gets the Trainer's usual output (trainer_state.json
with the selection metrics in log_history, checkpoints), the teacher's selection.jsonl, eval.json (final
eval loss, train CPU seconds), eval_curve.jsonl (one line per evaluation during training) and, unless
--no-save, OUT/final (the LoRA adapter, or with --no-lora a model directory `--init-from` accepts, both
with tokenizer.model). `--teacher-set key=value` (repeatable) changes one field of the AtteNT teacher's
TeacherConfig, e.g. `--teacher-set mode=ledger`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from attent_scale.cli import exit_process
from attent_scale.errors import UserError
from attent_scale.integrations.sampler import PadCollator

IGNORE = -100


def read_rows(path: Path, max_samples: int) -> list[dict[str, str]]:
    """Rows with prompt+response or text; a bad line is a one-line error naming file, line and key."""
    if not path.is_file():
        raise UserError(f"--data {path}: no such file")
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            except RecursionError:
                raise UserError(f"{path}:{lineno}: not JSON (nested too deep to parse)") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object")
            keys = ("text",) if "text" in row and "prompt" not in row else ("prompt", "response")
            for key in keys:
                if not isinstance(row.get(key), str):
                    raise UserError(f"{path}:{lineno}: key '{key}' must be a string "
                                    "(rows need 'prompt' and 'response', or 'text')")
            rows.append({k: row[k] for k in keys})
            if max_samples and len(rows) >= max_samples:
                break
    if len(rows) < 4:
        raise UserError(f"--data {path}: {len(rows)} rows, need at least 4")
    return rows


def tokenize(rows: list[dict[str, str]], tok: Any, seq_len: int) -> tuple[list[dict[str, list[int]]], int]:
    """input_ids = [bos] prompt response [eos], cut at seq_len; labels -100 on bos and the prompt. Returns
    the items and how many rows were dropped: their prompt fills seq_len (no target token left)."""
    from attent_scale.data.tokenizer import BOS_ID

    out = []
    for row in rows:
        prompt = [BOS_ID] + tok.encode(row.get("prompt", ""))
        target = tok.encode(row["response"] if "response" in row else row["text"]) + [tok.eos_id]
        ids = (prompt + target)[:seq_len]
        labels = ([IGNORE] * len(prompt) + target)[:seq_len]
        if any(label != IGNORE for label in labels[1:]):  # a row with no target token teaches nothing
            out.append({"input_ids": ids, "labels": labels})
    return out, len(rows) - len(out)


def split_eval(n_items: int, n_rows: int, args: argparse.Namespace) -> int:
    """How many usable rows are held out: --eval-rows, else --eval-fraction of them; at least one of each
    side, or a one-line error naming the flag that decides (and --seq-len when it left no row)."""
    if n_items == 0:
        raise UserError(f"--seq-len {args.seq_len}: every row's prompt fills it ({n_rows} rows in "
                        f"{args.data}, no response token left); raise --seq-len or shorten the prompts")
    dropped = f" ({n_rows - n_items} more dropped: the prompt fills --seq-len {args.seq_len})" \
        if n_items < n_rows else ""
    if args.eval_rows:
        if args.eval_rows >= n_items:
            raise UserError(f"--eval-rows {args.eval_rows}: only {n_items} usable rows in {args.data}, and "
                            f"training needs one{dropped}")
        return args.eval_rows
    n_eval = max(1, int(n_items * args.eval_fraction))
    if n_eval >= n_items:
        raise UserError(f"--eval-fraction {args.eval_fraction}: leaves no training row of the {n_items} "
                        f"usable rows in {args.data}{dropped}")
    return n_eval


def check_args(args: argparse.Namespace) -> None:
    """Every count and size flag in range, before anything loads: one line naming the flag."""
    for flag, value, low, note in (("--eval-rows", args.eval_rows, 0, " (0: --eval-fraction decides)"),
                                   ("--max-samples", args.max_samples, 0, " (0: all rows)"),
                                   ("--eval-steps", args.eval_steps, 0, " (0: per epoch)")):
        if value < low:
            raise UserError(f"{flag} {value}: must be >= {low}{note}")
    for flag, value, low in (("--seq-len", args.seq_len, 2), ("--batch-size", args.batch_size, 1),
                             ("--grad-accum", args.grad_accum, 1), ("--lora-r", args.lora_r, 1),
                             ("--vocab-size", args.vocab_size, 16)):
        if value < low:
            raise UserError(f"{flag} {value}: must be at least {low}")
    for flag, value in (("--epochs", args.epochs), ("--lr", args.lr)):
        if not value > 0:
            raise UserError(f"{flag} {value}: must be positive")
    if not 0 < args.eval_fraction < 1:
        raise UserError(f"--eval-fraction {args.eval_fraction}: must be in (0, 1)")


class Rows(torch.utils.data.Dataset):
    """A map-style dataset: AtteNT's sample id of a row is its index here."""

    def __init__(self, items: list[dict[str, list[int]]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


def tokenizer_source(tokenizer: Path | None, init_from: str | None) -> Path | None:
    """The SentencePiece model to use (None: train one on the rows). A model started from --init-from
    needs the tokenizer its ids came from: --tokenizer, else one beside the model or in its run dir."""
    if tokenizer is not None:
        if not tokenizer.is_file():
            raise UserError(f"--tokenizer {tokenizer}: no such file")
        return tokenizer
    if init_from is None:
        return None
    for candidate in (Path(init_from) / "tokenizer.model", Path(init_from).parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise UserError(f"--init-from {init_from}: no tokenizer.model in it or its parent; pass --tokenizer FILE "
                    "(the SentencePiece model the base model was trained with)")


def build_tokenizer(rows: list[dict[str, str]], out: Path, vocab_size: int, source: Path | None) -> Any:
    """Rank 0 copies `source` or trains a tokenizer on the rows into OUT/tokenizer.model; the others wait."""
    import torch.distributed as dist

    from attent_scale.data.tokenizer import Tokenizer, train_tokenizer

    path = out / "tokenizer.model"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        if source is None:
            docs = [SimpleNamespace(text="\n".join(r.values())) for r in rows]  # what train_tokenizer reads
            train_tokenizer(docs, path, vocab_size=vocab_size)
        elif source.resolve() != path.resolve():
            shutil.copyfile(source, path)
    if dist.is_initialized():
        dist.barrier()
    return Tokenizer(path)


def teacher_config(assignments: list[str]) -> Any:
    """The default teacher (`default_teacher_config()`) with `key=value` overrides (values parsed as YAML,
    checked like the `teacher:` section of a run config)."""
    from attent_scale.config import apply_override, config_from_dict
    from attent_scale.integrations.hf import default_teacher_config

    raw: dict[str, Any] = {"teacher": asdict(default_teacher_config())}
    for assignment in assignments:
        apply_override(raw, f"teacher.{assignment}")
    return config_from_dict(raw).teacher


class EvalClock:
    """Process CPU (and wall) seconds of training: started before `train()`, paused inside every
    `evaluate()` (the AtteNT scoring pass is not an evaluation and is counted). Each evaluation during
    training appends {step, epoch, samples_seen, eval_loss, cpu_seconds, wall_seconds} to `curve`
    (rank 0), timed at the moment the evaluation began."""

    def __init__(self, curve: Path | None, world_size: int) -> None:
        self.curve, self.world_size = curve, world_size
        self.cpu0 = self.wall0 = 0.0
        self.eval_cpu = self.eval_wall = 0.0  # spent inside evaluate() so far
        self.at_eval: tuple[float, float] | None = None  # process_time, perf_counter when it began
        self.samples = 0  # this rank's training samples so far
        self.training = False
        self.last_step = -1  # step of the last curve point

    def start(self) -> None:
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()
        self.eval_cpu = self.eval_wall = 0.0
        self.samples, self.training, self.last_step = 0, True, -1

    def stop(self) -> tuple[float, float]:
        """CPU and wall seconds of training, evaluations excluded."""
        self.training = False
        return self.train_seconds(time.process_time(), time.perf_counter())

    def train_seconds(self, cpu: float, wall: float) -> tuple[float, float]:
        return cpu - self.cpu0 - self.eval_cpu, wall - self.wall0 - self.eval_wall

    def pause(self) -> None:
        self.at_eval = (time.process_time(), time.perf_counter())

    def resume(self) -> None:
        if self.at_eval is not None:
            self.eval_cpu += time.process_time() - self.at_eval[0]
            self.eval_wall += time.perf_counter() - self.at_eval[1]
            self.at_eval = None

    def record(self, state: Any, metrics: dict[str, float]) -> None:
        if self.curve is None or self.at_eval is None or "eval_loss" not in metrics:
            return
        if state.global_step == self.last_step:  # the final evaluate() right after a step's own
            return
        self.last_step = state.global_step
        cpu, wall = self.train_seconds(*self.at_eval)
        seen = self.samples * self.world_size
        rec = {"step": state.global_step, "epoch": state.epoch, "samples_seen": seen,
               "eval_loss": metrics["eval_loss"], "cpu_seconds": cpu, "wall_seconds": wall}
        with self.curve.open("a") as f:
            f.write(json.dumps(rec) + "\n")


def timed(cls: type, clock: EvalClock) -> type:
    """`cls` (Trainer or AttentTrainer) whose evaluate() is excluded from `clock` and whose training steps
    count samples; the curve point is written by on_evaluate, inside evaluate()."""
    from transformers import TrainerCallback

    class Curve(TrainerCallback):
        def on_evaluate(self, _args: Any, state: Any, _control: Any, metrics: Any = None, **_: Any) -> None:
            if state.is_world_process_zero and clock.training:
                clock.record(state, metrics or {})

    class Timed(cls):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.add_callback(Curve())

        def evaluate(self, *args: Any, **kwargs: Any) -> Any:
            clock.pause()
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                clock.resume()

        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            clock.samples += int(inputs["input_ids"].shape[0])
            return super().training_step(model, inputs, *args, **kwargs)

    Timed.__name__ = Timed.__qualname__ = f"Timed{cls.__name__}"
    return Timed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="JSONL rows: prompt+response, or text")
    p.add_argument("--out", required=True, type=Path, help="output directory (Trainer output_dir)")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--max-samples", type=int, default=0, help="use the first N rows (0 = all)")
    p.add_argument("--no-attent", action="store_true", help="plain transformers.Trainer (the baseline)")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON (e.g. configs/deepspeed_zero3.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-fraction", type=float, default=0.1, help="held-out rows for the eval loss")
    p.add_argument("--eval-rows", type=int, default=0, help="held-out rows (overrides --eval-fraction)")
    p.add_argument("--batch-size", type=int, default=8, help="per device")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=1000)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--no-lora", action="store_true", help="train every weight (e.g. to make a base model)")
    p.add_argument("--init-from", default=None, help="local HF model directory to start from")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="SentencePiece model to use instead of training one on the rows")
    p.add_argument("--teacher-set", dest="teacher_set", action="append", default=[], metavar="KEY=VALUE",
                   help="change one TeacherConfig field of the AtteNT teacher (repeatable)")
    p.add_argument("--eval-steps", type=int, default=0, help="also evaluate every N steps (0 = per epoch)")
    p.add_argument("--no-save", action="store_true", help="write no checkpoints and no final weights")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config, Trainer, TrainingArguments

    from attent_scale.integrations.hf import AttentTrainer, init_deepspeed_comm

    teacher = None if args.no_attent else teacher_config(args.teacher_set)
    tok_source = tokenizer_source(args.tokenizer, args.init_from)
    rows = read_rows(args.data, args.max_samples)
    args.out.mkdir(parents=True, exist_ok=True)
    targs = TrainingArguments(
        output_dir=str(args.out), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0,
        logging_steps=5, eval_strategy="steps" if args.eval_steps else "epoch",
        eval_steps=args.eval_steps or None, save_strategy="no" if args.no_save else "epoch",
        save_total_limit=2, seed=args.seed, data_seed=args.seed, report_to=[], deepspeed=args.deepspeed,
        dataloader_num_workers=0, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )
    _ = targs.device  # joins the process group before the model is built
    if args.deepspeed:
        init_deepspeed_comm()  # so that zero.Init (in from_config) partitions over every rank
    tok = build_tokenizer(rows, args.out, args.vocab_size, tok_source)
    items, dropped = tokenize(rows, tok, args.seq_len)
    n_eval = split_eval(len(items), len(rows), args)
    if dropped and targs.process_index == 0:
        print(f"hf_finetune: {dropped} of {len(rows)} rows dropped: the prompt fills --seq-len "
              f"{args.seq_len} (no response token left)", file=sys.stderr, flush=True)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(items), generator=g).tolist()
    train = Rows([items[i] for i in order[n_eval:]])
    evals = Rows([items[i] for i in order[:n_eval]])

    torch.manual_seed(args.seed)
    if args.init_from:
        model = AutoModelForCausalLM.from_pretrained(args.init_from)
        if model.config.vocab_size < tok.vocab_size:
            raise UserError(f"--init-from {args.init_from}: vocab_size {model.config.vocab_size} is below "
                            f"the tokenizer's {tok.vocab_size} (another tokenizer? pass --tokenizer)")
        positions = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
        if args.seq_len > positions:
            raise UserError(f"--seq-len {args.seq_len}: the --init-from model has {positions} positions")
    else:
        config = GPT2Config(vocab_size=tok.vocab_size, n_positions=args.seq_len, n_embd=128, n_layer=2,
                            n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=1, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        model = AutoModelForCausalLM.from_config(config)  # HF's own init, also under ZeRO-3
    if not args.no_lora:
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                                 target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                                 task_type="CAUSAL_LM"))
    curve = args.out / "eval_curve.jsonl" if targs.process_index == 0 else None
    if curve is not None:
        curve.unlink(missing_ok=True)
    clock = EvalClock(curve, targs.world_size)
    kwargs: dict[str, Any] = {} if args.no_attent else {"teacher_config": teacher}
    trainer = timed(Trainer if args.no_attent else AttentTrainer, clock)(
        model=model, args=targs, train_dataset=train, eval_dataset=evals,
        data_collator=PadCollator(tok.pad_id), **kwargs)
    clock.start()
    trainer.train()
    final = trainer.evaluate()  # still on the clock (paused): the curve's last point
    cpu_seconds, seconds = clock.stop()
    if not args.no_save:
        trainer.save_model(str(args.out / "final"))
        if trainer.is_world_process_zero():
            shutil.copyfile(args.out / "tokenizer.model", args.out / "final" / "tokenizer.model")
    trainer.save_state()
    if trainer.is_world_process_zero():
        summary = {"eval_loss": final["eval_loss"], "train_seconds": seconds, "cpu_seconds": cpu_seconds,
                   "steps": trainer.state.global_step, "samples_seen": clock.samples * targs.world_size,
                   "attent": not args.no_attent, "world_size": targs.world_size,
                   "train_samples": len(train), "eval_samples": len(evals),
                   "torch_threads": torch.get_num_threads()}
        if not args.no_attent:
            totals = trainer.attent_totals()
            summary["selection_seconds_by_phase"] = totals.get("selection_seconds_by_phase", {})
            summary["teacher"] = asdict(teacher)
        (args.out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code = main()
    except UserError as exc:
        print(f"hf_finetune: {exc}", file=sys.stderr)
        code = exc.exit_code
    # under torchrun: leave without the interpreter's C++ teardown, where a gloo rank can abort after
    # a finished run (see attent_scale.cli.exit_process); a single process exits as usual
    exit_process(code)
