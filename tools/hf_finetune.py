"""LoRA fine-tuning of a small causal LM with Hugging Face `Trainer`, with or without AtteNT selection.

A copyable example of `attent_scale.integrations.hf.AttentTrainer` (pip install "attent-scale[hf]"):

    python tools/hf_finetune.py --data rows.jsonl --out runs/hf --epochs 3
    torchrun --nproc_per_node 2 tools/hf_finetune.py --data rows.jsonl --out runs/hf \\
        --deepspeed configs/deepspeed_zero3.json
    python tools/hf_finetune.py --data rows.jsonl --out runs/hf_plain --no-attent   # plain Trainer

Rows of FILE.jsonl are {"prompt": ..., "response": ...} (loss on the response tokens only) or {"text": ...}.
Nothing is downloaded: a SentencePiece BPE tokenizer is trained on the rows (OUT/tokenizer.model) and the
model is a tiny GPT-2 built from its config (or `--init-from DIR`, a local HF model directory). OUT gets
the Trainer's usual output (trainer_state.json with the selection metrics in log_history, checkpoints),
the teacher's selection.jsonl, eval.json (final eval loss) and, unless --no-save, the LoRA adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

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


def tokenize(rows: list[dict[str, str]], tok: Any, seq_len: int) -> list[dict[str, list[int]]]:
    """input_ids = [bos] prompt response [eos], cut at seq_len; labels -100 on bos and the prompt."""
    from attent_scale.data.tokenizer import BOS_ID

    out = []
    for row in rows:
        prompt = [BOS_ID] + tok.encode(row.get("prompt", ""))
        target = tok.encode(row["response"] if "response" in row else row["text"]) + [tok.eos_id]
        ids = (prompt + target)[:seq_len]
        labels = ([IGNORE] * len(prompt) + target)[:seq_len]
        if any(label != IGNORE for label in labels[1:]):  # a row with no target token teaches nothing
            out.append({"input_ids": ids, "labels": labels})
    return out


class Rows(torch.utils.data.Dataset):
    """A map-style dataset: AtteNT's sample id of a row is its index here."""

    def __init__(self, items: list[dict[str, list[int]]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


def build_tokenizer(rows: list[dict[str, str]], out: Path, vocab_size: int) -> Any:
    """Rank 0 trains the tokenizer on the rows; the others wait for the file."""
    import torch.distributed as dist

    from attent_scale.data.tokenizer import Tokenizer, train_tokenizer

    path = out / "tokenizer.model"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        docs = [SimpleNamespace(text="\n".join(r.values())) for r in rows]  # what train_tokenizer reads
        train_tokenizer(docs, path, vocab_size=vocab_size)
    if dist.is_initialized():
        dist.barrier()
    return Tokenizer(path)


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
    p.add_argument("--batch-size", type=int, default=8, help="per device")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=1000)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--no-lora", action="store_true", help="train every weight (e.g. to make a base model)")
    p.add_argument("--init-from", default=None, help="local HF model directory to start from")
    p.add_argument("--eval-steps", type=int, default=0, help="also evaluate every N steps (0 = per epoch)")
    p.add_argument("--no-save", action="store_true", help="write no checkpoints and no final weights")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config, Trainer, TrainingArguments

    from attent_scale.integrations.hf import AttentTrainer, init_deepspeed_comm

    if not 0 < args.eval_fraction < 1:
        raise UserError(f"--eval-fraction {args.eval_fraction}: must be in (0, 1)")
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
    tok = build_tokenizer(rows, args.out, args.vocab_size)
    items = tokenize(rows, tok, args.seq_len)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(items), generator=g).tolist()
    n_eval = max(1, int(len(items) * args.eval_fraction))
    train = Rows([items[i] for i in order[n_eval:]])
    evals = Rows([items[i] for i in order[:n_eval]])

    torch.manual_seed(args.seed)
    if args.init_from:
        model = AutoModelForCausalLM.from_pretrained(args.init_from)
    else:
        config = GPT2Config(vocab_size=tok.vocab_size, n_positions=args.seq_len, n_embd=128, n_layer=2,
                            n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=1, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        model = AutoModelForCausalLM.from_config(config)  # HF's own init, also under ZeRO-3
    if not args.no_lora:
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                                 target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                                 task_type="CAUSAL_LM"))
    cls = Trainer if args.no_attent else AttentTrainer
    trainer = cls(model=model, args=targs, train_dataset=train, eval_dataset=evals,
                  data_collator=PadCollator(tok.pad_id))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    final = trainer.evaluate()
    if not args.no_save:
        trainer.save_model(str(args.out / "final"))
    trainer.save_state()
    if trainer.is_world_process_zero():
        summary = {"eval_loss": final["eval_loss"], "train_seconds": seconds,
                   "steps": trainer.state.global_step,
                   "attent": not args.no_attent, "world_size": targs.world_size,
                   "train_samples": len(train), "eval_samples": len(evals)}
        (args.out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"hf_finetune: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
