"""One Lightning run with AttentCallback on a tiny GPT-2 and hf_worker's rows, for the Lightning tests.

Usage: python tests/helpers/lightning_worker.py SPEC.json (or under torchrun: Lightning joins its ranks).
Every rank appends to OUT/losses.rank{r}.jsonl what the teacher session got after each step (ids, losses,
step), OUT/weights.rank{r}.jsonl the loss weights every batch asked for (epoch, ids, weights),
OUT/ids.rank{r}.jsonl the ids each optimizer step trained, OUT/epochs.rank{r}.jsonl each epoch's
selection hash and, with `val`, OUT/vals.rank{r}.jsonl the val histograms the teacher got; rank 0 writes
OUT/selection.jsonl (the teacher's records) and OUT/done.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[2]


def launch(tmp: Path, name: str, nproc: int, fails: bool = False, **spec: Any) -> Path:
    """Run this worker on `nproc` real ranks (torchrun, gloo, Lightning's ddp strategy; one rank: plain
    python) with SPEC `spec` (batch 8 unless given); returns OUT (tmp/name). It must exit non-zero if
    `fails`, else 0; OUT/stderr.txt holds its stderr."""
    import procs
    from servers import free_port

    from attent_scale import launcher

    out = tmp / name
    ddp = {"strategy": "ddp"} if nproc > 1 else {}
    spec = {"out": str(out), "batch": 8, "devices": nproc, **ddp, **spec}
    spec_path = tmp / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd: Any = [sys.executable, __file__, str(spec_path)]
    if nproc > 1:
        port = f"--master_port={free_port(1)}"
        cmd = launcher.command((__file__, str(spec_path)), nproc, rendezvous=(port,), torchrun=True)
    proc = procs.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stderr.txt").write_text(proc.stderr)
    assert (proc.returncode != 0) == fails, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def main(spec: dict[str, Any]) -> None:
    import pytorch_lightning as pl
    from hf_worker import VOCAB, ToyPairs
    from transformers import AutoModelForCausalLM, GPT2Config

    from attent_scale.config import TeacherConfig
    from attent_scale.integrations.lightning import ID_KEY, AttentCallback, causal_lm_loss
    from attent_scale.integrations.sampler import PadCollator
    from attent_scale.teacher import Selection, Teacher, TeacherSession

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    data = ToyPairs()
    n = len(data)
    reference = None
    if spec.get("reference"):  # test_cross_trainer._reference_losses
        reference = np.random.default_rng(7).uniform(0.0, 3.0, n).astype(np.float32)
    attent = AttentCallback(data, batch_size=spec["batch"], collate_fn=PadCollator(0),
                            teacher_config=TeacherConfig(**spec["teacher"]), reference=reference, seed=0)

    class TinyLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            self.lm = AutoModelForCausalLM.from_config(config)

        def _logits(self, batch: dict[str, Any]) -> torch.Tensor:
            return self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

        def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
            return causal_lm_loss(self._logits(batch), batch)

        def sample_losses(self, batch: dict[str, Any]) -> torch.Tensor:
            return causal_lm_loss(self._logits(batch), batch)["sample_losses"]


        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.0)
            total = attent.total_steps()
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class ValidatedLM(TinyLM):
        """With `val` held-out rows (another seed), validated at every epoch's end, each rank its share."""

        def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
            return causal_lm_loss(self._logits(batch), batch)

        def val_dataloader(self) -> Any:
            rows, t = ToyPairs(spec["val"], seed=1), self.trainer
            mine = torch.utils.data.Subset(rows, range(t.global_rank, len(rows), t.world_size))
            return torch.utils.data.DataLoader(mine, batch_size=8, collate_fn=PadCollator(0))

    def append(name: str, row: dict[str, Any], rank: int) -> None:
        with (out / f"{name}.rank{rank}.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")

    after_step, loss_weights = TeacherSession.after_step, TeacherSession.loss_weights

    def recording_after_step(self: TeacherSession, ids: Any, losses: Any, step: int) -> None:
        append("losses", {"step": step, "ids": ids.tolist(), "losses": losses.tolist()}, self.teacher.rank)
        after_step(self, ids, losses, step)

    def recording_weights(self: TeacherSession, ids: torch.Tensor) -> Any:
        w = loss_weights(self, ids)
        got = [1.0] * len(ids) if w is None else w.tolist()
        append("weights", {"epoch": self.state.epoch, "ids": ids.tolist(), "w": got}, self.teacher.rank)
        return w

    TeacherSession.after_step, TeacherSession.loss_weights = recording_after_step, recording_weights
    observe_val = Teacher.observe_val

    def recording_val(self: Teacher, hist: Any, step: int) -> None:  # the histogram summed over ranks
        append("vals", {"step": step, "hist": np.asarray(hist).tolist()}, self.rank)
        observe_val(self, hist, step)

    Teacher.observe_val = recording_val

    class Recorder(pl.Callback):
        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            bits = attent.session.state.bits
            sha = None if bits is None else Selection(bits, n).sha256
            append("epochs", {"epoch": trainer.current_epoch, "step": trainer.global_step, "sha256": sha},
                   trainer.global_rank)

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            append("ids", {"epoch": trainer.current_epoch, "step": trainer.global_step,
                           "ids": batch[ID_KEY].tolist()}, trainer.global_rank)

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, idx: int) -> None:
            if trainer.global_step == spec.get("stop_after_step"):
                trainer.should_stop = True

    callbacks: list[Any] = [attent, Recorder()]
    if spec.get("save_every"):
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1,
                                                      every_n_train_steps=spec["save_every"]))
    trainer = pl.Trainer(accelerator="cpu", devices=spec.get("devices", "auto"),
                         strategy=spec.get("strategy", "auto"),
                         max_epochs=spec.get("epochs", 4), max_steps=spec.get("max_steps", -1),
                         accumulate_grad_batches=spec.get("accum", 1), use_distributed_sampler=False,
                         default_root_dir=str(out), callbacks=callbacks, logger=False,
                         enable_checkpointing=bool(spec.get("save_every")), enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, deterministic=True)
    module = ValidatedLM() if spec.get("val") else TinyLM()
    trainer.fit(module, train_dataloaders=attent.train_dataloader(), ckpt_path=spec.get("resume"))
    if trainer.global_rank == 0:
        (out / "done.json").write_text(json.dumps({"global_step": trainer.global_step,
                                                   "total_steps": attent.total_steps()}))


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
