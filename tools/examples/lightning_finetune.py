"""Training a small causal LM with PyTorch Lightning, with or without AtteNT selection.

A copyable example of `attent_scale.integrations.lightning.AttentCallback` (pip install
"attent-scale[lightning]"):

    python tools/examples/lightning_finetune.py --data rows.jsonl --out runs/pl --epochs 3
    python tools/examples/lightning_finetune.py --data rows.jsonl --out runs/pl --devices 2  # DDP over gloo
    python tools/examples/lightning_finetune.py --data rows.jsonl --out runs/pl_plain --no-attent

Rows of FILE.jsonl are {"prompt": ..., "response": ...} (loss on the response tokens only) or {"text": ...}.
Nothing is downloaded or trained beside the model: tokens are the UTF-8 bytes (vocab 259: 256 bytes, pad,
bos, eos) and the model is a tiny GPT-2 built from its config. The last --eval-rows rows are held out;
each rank validates its own share of them (strategy signal, the default teacher, reads their per-sample
losses). OUT gets Lightning's checkpoints (OUT/checkpoints, one per epoch), the teacher's selection.jsonl
and eval.json (the last validation loss, optimizer steps, planned steps). `--teacher-set key=value`
(repeatable) changes one field of the teacher's TeacherConfig, e.g. `--teacher-set strategy=hard`;
`--resume CKPT` continues a run from one of its checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from attent_scale.cli import exit_process
from attent_scale.errors import UserError
from attent_scale.integrations.sampler import PadCollator

PAD, BOS, EOS, VOCAB = 256, 257, 258, 259
IGNORE = -100


def read_rows(path: Path) -> list[dict[str, list[int]]]:
    """Token rows (bytes, bos ... eos; labels -100 on bos and the prompt); a bad line is a one-line error
    naming the file, the line and the key."""
    if not path.is_file():
        raise UserError(f"--data {path}: no such file")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise UserError(f"{path}:{lineno}: not JSON") from None
        keys = ("text",) if isinstance(row, dict) and "prompt" not in row else ("prompt", "response")
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in keys):
            raise UserError(f"{path}:{lineno}: rows need string keys 'prompt' and 'response', or 'text'")
        prompt = [BOS, *(row.get("prompt") or "").encode()]
        target = [*row.get("response", row.get("text", "")).encode(), EOS]
        rows.append({"input_ids": prompt + target, "labels": [IGNORE] * len(prompt) + target})
    return rows


def teacher_config(assignments: list[str]) -> Any:
    """The default teacher with `key=value` overrides (values parsed as YAML), checked like a config file."""
    from attent_scale.config import TeacherConfig
    from attent_scale.integrations import default_teacher_config

    cfg = default_teacher_config()
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or key not in TeacherConfig.__dataclass_fields__:
            raise UserError(f"--teacher-set {item!r}: expected KEY=VALUE with KEY a teacher field")
        cfg = replace(cfg, **{key: yaml.safe_load(value)})
    return cfg


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, type=Path, help="JSONL rows: prompt+response, or text")
    p.add_argument("--out", required=True, type=Path, help="output directory (Trainer default_root_dir)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=-1, help="a steps budget instead of --epochs")
    p.add_argument("--devices", type=int, default=1, help="CPU processes (Lightning's ddp over gloo)")
    p.add_argument("--batch-size", type=int, default=8, help="per device")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seq-len", type=int, default=128, help="rows are cut to this many tokens")
    p.add_argument("--eval-rows", type=int, default=16, help="held-out rows (the last ones)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-attent", action="store_true", help="plain Lightning (the baseline)")
    p.add_argument("--teacher-set", dest="teacher_set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", default=None, help="a checkpoint of this run to continue from")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [{k: v[:args.seq_len] for k, v in r.items()} for r in read_rows(args.data)]
    if len(rows) < args.eval_rows + 4:
        raise UserError(f"--data {args.data}: {len(rows)} rows, need --eval-rows + 4 = {args.eval_rows + 4}")
    import pytorch_lightning as pl
    from transformers import AutoModelForCausalLM, GPT2Config

    from attent_scale.integrations.lightning import AttentCallback, causal_lm_loss

    train_rows, val_rows = rows[:len(rows) - args.eval_rows], rows[len(rows) - args.eval_rows:]
    collate = PadCollator(PAD)
    attent = None if args.no_attent else AttentCallback(
        train_rows, batch_size=args.batch_size, collate_fn=collate, seed=args.seed,
        teacher_config=teacher_config(args.teacher_set))

    class TinyLM(pl.LightningModule):
        """A 2-layer GPT-2; training_step gives AttentCallback each row's loss (causal_lm_loss)."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(args.seed)
            self.lm = AutoModelForCausalLM.from_config(GPT2Config(
                vocab_size=VOCAB, n_positions=args.seq_len, n_embd=64, n_layer=2, n_head=4,
                bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD))

        def sample_losses(self, batch: dict[str, Any]) -> torch.Tensor:  # cycle mode's scoring pass
            return self._step(batch)["sample_losses"]

        def _step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            logits = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return causal_lm_loss(logits, batch)

        def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
            out = self._step(batch)
            self.log("train_loss", out["loss"], prog_bar=True)
            return out

        def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
            out = self._step(batch)
            self.log("val_loss", out["loss"], sync_dist=True, batch_size=batch["input_ids"].shape[0])
            return out

        def train_dataloader(self) -> Any:
            if attent is not None:
                return attent.train_dataloader()
            return torch.utils.data.DataLoader(train_rows, batch_size=args.batch_size, shuffle=True,
                                               collate_fn=collate)

        def val_dataloader(self) -> Any:  # each rank its own share: every row counted once over the ranks
            mine = val_rows[self.trainer.global_rank::self.trainer.world_size]
            return torch.utils.data.DataLoader(mine, batch_size=args.batch_size, collate_fn=collate)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=args.lr)
            total = attent.total_steps() if attent is not None else self.trainer.estimated_stepping_batches
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / max(1, total)))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    callbacks: list[Any] = [pl.callbacks.ModelCheckpoint(dirpath=args.out / "checkpoints", save_top_k=-1)]
    if attent is not None:
        callbacks.insert(0, attent)
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs if args.max_steps < 0 else -1, max_steps=args.max_steps,
        accumulate_grad_batches=args.grad_accum, use_distributed_sampler=attent is None,
        default_root_dir=str(args.out), callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(TinyLM(), ckpt_path=args.resume)
    if trainer.global_rank == 0:
        result = {"val_loss": float(trainer.callback_metrics["val_loss"]), "steps": trainer.global_step,
                  "planned_steps": attent.total_steps() if attent is not None else None,
                  "teacher": None if attent is None else asdict(attent.teacher_config)}
        (args.out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: result[k] for k in ("val_loss", "steps", "planned_steps")}))
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except UserError as exc:
        print(f"lightning_finetune: {exc}", file=sys.stderr)
        code = exc.exit_code
    exit_process(code)  # a DDP rank leaves without the C++ teardown (attent_scale.cli.exit_process)
