"""One AttentTrainer / Trainer run on a tiny LoRA GPT-2 and synthetic data, for the HF integration tests.

Usage: python tests/helpers/hf_worker.py SPEC.json (or under torchrun). Rank 0 writes OUT/log_history.json;
every rank writes OUT/losses.rank{r}.jsonl (the per-sample losses the teacher recorded),
OUT/pending.rank{r}.jsonl (the ledger's pending observations at each step's start) and
OUT/epochs.rank{r}.jsonl (each epoch's selection hash) when the teacher is on, and with `val` (that many
held-out rows) OUT/val.rank{r}.jsonl (the teacher's val histogram after each evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

VOCAB, N_SAMPLES = 64, 64


class ToyPairs(torch.utils.data.Dataset):
    """Deterministic prompt+response rows of varying length; labels are -100 on the prompt."""

    def __init__(self, n: int = N_SAMPLES, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for i in range(n):
            length = int(torch.randint(8, 24, (1,), generator=g))
            prompt = int(torch.randint(2, 6, (1,), generator=g))
            # a learnable pattern (a step of i % 5 + 1) plus noise on some rows, so losses differ a lot
            start = int(torch.randint(1, VOCAB, (1,), generator=g))
            ids = [(start + k * (i % 5 + 1)) % (VOCAB - 1) + 1 for k in range(length)]
            if i % 3 == 0:
                ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
            labels = [-100] * prompt + ids[prompt:]
            self.rows.append({"input_ids": ids, "labels": labels})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]


DS_ZERO3 = {
    "zero_optimization": {"stage": 3, "overlap_comm": False, "stage3_param_persistence_threshold": 0,
                          "stage3_gather_16bit_weights_on_model_save": True},
    "zero_allow_untested_optimizer": True,
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": False},
    "steps_per_print": 10**9,
}


def hard_teacher_config(mode: str = "cycle") -> Any:
    """The teacher of the hard-selection runs: the default's schedule with strategy hard (the ids of
    highest loss, the ratio rising 0.2 -> 0.8 on a cosine), by default in cycle mode, so that the runs
    exercise the collective scoring pass too."""
    from attent_scale.integrations.hf import default_teacher_config

    return dataclasses.replace(default_teacher_config(), mode=mode, strategy="hard", ratio_schedule="cosine")


def main(spec: dict[str, Any]) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config, Trainer, TrainerCallback, TrainingArguments

    from attent_scale.config import TeacherConfig
    from attent_scale.integrations.hf import AttentTrainer, default_teacher_config
    from attent_scale.integrations.sampler import PadCollator
    from attent_scale.teacher import Selection

    out = Path(spec["out"])
    args = TrainingArguments(
        output_dir=str(out), num_train_epochs=spec.get("epochs", 3), max_steps=spec.get("max_steps", -1),
        per_device_train_batch_size=spec["batch"], per_device_eval_batch_size=8,
        gradient_accumulation_steps=spec.get("ga", 1), learning_rate=spec.get("lr", 3e-3),
        lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_strategy="steps" if spec.get("save_steps") else "no",
        save_steps=spec.get("save_steps") or 500, seed=0, report_to=[], disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0,
        train_sampling_strategy=spec.get("sampling", "random"),
        deepspeed=DS_ZERO3 if spec.get("deepspeed") else None,
        eval_strategy=spec.get("eval_strategy", "steps" if spec.get("val") else "no"),
        eval_steps=spec.get("eval_steps"), eval_on_start=spec.get("eval_on_start", False),
    )
    _ = args.device  # joins the process group before the model is built
    if spec.get("deepspeed"):
        from attent_scale.integrations.hf import init_deepspeed_comm

        init_deepspeed_comm()  # zero.Init reads the world size from deepspeed.comm
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = AutoModelForCausalLM.from_config(config)  # zero.Init under ZeRO-3 (args created first)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0,
                                             fan_in_fan_out=True, task_type="CAUSAL_LM"))
    data: Any = ToyPairs()
    if spec.get("subset_order") is not None:  # plain-Trainer reference: a fixed order, sequential sampler
        data = torch.utils.data.Subset(data, spec["subset_order"])

    class Stop(TrainerCallback):
        def on_step_end(self, _args: Any, state: Any, control: Any, **_: Any) -> Any:
            if state.global_step == spec.get("stop_after_step"):
                control.should_training_stop = True
            return control

        def on_train_end(self, *_: Any, **__: Any) -> None:
            if spec.get("metrics_port"):  # scrape our own exporter while it is still up
                import urllib.request

                url = f"http://127.0.0.1:{spec['metrics_port']}/metrics"
                (out / "metrics.prom").write_text(urllib.request.urlopen(url, timeout=10).read().decode())

    rank = int(os.environ.get("RANK", "0"))
    if spec.get("exchange_every"):  # ledger exchanges every few optimizer steps instead of 64
        import attent_scale.teacher.teacher as teacher_module

        teacher_module.EXCHANGE_EVERY = spec["exchange_every"]

    class Pending(TrainerCallback):
        """OUT/pending.rank{r}.jsonl: the ledger's pending observations at the start of every step."""

        def on_step_begin(self, _args: Any, state: Any, control: Any, **_: Any) -> Any:
            teacher = getattr(trainer, "teacher", None)
            if teacher is not None:
                with (out / f"pending.rank{rank}.jsonl").open("a") as f:
                    f.write(json.dumps({"step": state.global_step, "pending": teacher.ledger.pending}) + "\n")
            return control

    kwargs: dict[str, Any] = {"model": model, "args": args, "train_dataset": data,
                              "data_collator": PadCollator(0), "callbacks": [Stop(), Pending()]}
    if spec.get("val"):  # held-out rows of the same kind (another seed)
        kwargs["eval_dataset"] = ToyPairs(spec["val"], seed=1)
    if spec.get("plain"):
        trainer: Any = Trainer(**kwargs)
    else:
        losses_file = (out / f"losses.rank{rank}.jsonl").open("a")

        class Recording(AttentTrainer):
            def attent_losses_hook(self, ids: Any, losses: Any, step: int, kind: str) -> None:
                rec = {"kind": kind, "step": step, "ids": ids.tolist(), "losses": losses.tolist()}
                losses_file.write(json.dumps(rec) + "\n")
                losses_file.flush()

            def _begin_epoch(self, epoch: int, model: Any) -> None:
                super()._begin_epoch(epoch, model)
                bits = self.session.state.bits
                sha = None if bits is None else Selection(bits, N_SAMPLES).sha256
                row = {"epoch": epoch, "step": self.state.global_step, "sha256": sha}
                with (out / f"epochs.rank{rank}.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")

            def evaluate(self, *args: Any, **kw: Any) -> Any:
                metrics = super().evaluate(*args, **kw)
                t = self.teacher
                if t is not None and t.val_step == self.state.global_step:
                    with (out / f"val.rank{rank}.jsonl").open("a") as f:
                        f.write(json.dumps({"step": t.val_step, "hist": t.val_hist.tolist(),
                                            "eval_loss": metrics.get("eval_loss")}) + "\n")
                return metrics

        teacher = hard_teacher_config()
        if spec.get("teacher") == "default":
            teacher = default_teacher_config()
        elif spec.get("teacher") is not None:
            teacher = TeacherConfig(**spec["teacher"])
        teacher = dataclasses.replace(teacher, **spec.get("teacher_set", {}))
        metrics = None
        if spec.get("metrics_port"):
            from attent_scale.config import MetricsConfig

            metrics = MetricsConfig(enabled=True, port=spec["metrics_port"])
        trainer = Recording(**kwargs, teacher_config=teacher, metrics_config=metrics)
    trainer.train(resume_from_checkpoint=spec.get("resume") or None)
    if rank == 0:
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history))


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
    from attent_scale.cli import exit_process

    exit_process(0, group_used=True)  # no C++ teardown after the group (attent_scale.cli.exit_process)
