"""AttentCallback: a PyTorch Lightning callback whose epochs train on the AtteNT teacher's global selection.

It translates Lightning's hooks into the teacher session every trainer holds (teacher/session.py): the
fit's setup (`TeacherSession.build`), an epoch's start (`begin_epoch`, a scoring pass where the mode needs
one), each batch's loss weights, each optimizer step's end (`after_step`, the one anneal rule), validation
(strategy signal's val losses) and the checkpoints (every rank's teacher state inside Lightning's file).

    attent = AttentCallback(train_dataset, batch_size=8, collate_fn=PadCollator(0), teacher_config=cfg)
    trainer = pl.Trainer(callbacks=[attent], use_distributed_sampler=False, strategy="ddp", devices=2)
    trainer.fit(module, train_dataloaders=attent.train_dataloader())

The module's `training_step` returns `{"loss": loss, "sample_losses": [B]}` (each row's unweighted loss;
`causal_lm_loss` gives both for a causal LM) and applies `batch[WEIGHTS_KEY]` when a weighted selection
puts it there; cycle mode scores with the module's `sample_losses(batch) -> [B]`; strategy signal reads the
`"sample_losses"` of `validation_step`'s dict. Batches carry their sample ids under `batch[ID_KEY]`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from attent_scale.checkpoint import join_tensors, split_tensors
from attent_scale.config import TeacherConfig, validate_teacher
from attent_scale.dist import initialized, side_group
from attent_scale.engines.base import IGNORE_INDEX, token_ce_sums, token_counts, weighted_token_loss
from attent_scale.errors import UserError
from attent_scale.extras import require
from attent_scale.integrations.sampler import ID_KEY, AttentBatchSampler, IdCollator, IndexedDataset
from attent_scale.runlog import count_lines, truncate_lines
from attent_scale.teacher import Batching, Budget, Selection, TeacherSession
from attent_scale.teacher.session import default_teacher_config, score_share
from attent_scale.teacher.signals import NUM_BINS, histogram
from attent_scale.train_state import Progress

pl = require("pytorch_lightning", "AttentCallback (attent_scale.integrations.lightning)")

WEIGHTS_KEY = "attent_weights"  # per-row loss weights [B], in a batch of a weighted selection only
STATE_KEY = "attent"  # the checkpoint entry: every rank's teacher state
RECORDS = "selection.jsonl"  # in the Trainer's default_root_dir, written by rank 0


def causal_lm_loss(logits: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """training_step's dict for a causal LM: "loss", the token mean of the fp32 CE over `batch["labels"]`
    shifted left (-100: no target), each row's CE sum scaled by `batch[WEIGHTS_KEY]` when present
    (engines.base.weighted_token_loss), and "sample_losses", each row's unweighted mean token CE."""
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX).to(logits.device)
    sums, counts = token_ce_sums(logits, targets), token_counts(targets)
    per_sample = sums / counts.clamp(min=1).to(sums.dtype)
    loss = weighted_token_loss(per_sample, counts.to(sums.dtype), batch.get(WEIGHTS_KEY),
                               counts.sum().clamp(min=1))
    return {"loss": loss, "sample_losses": per_sample.detach()}


class _Scorer:
    """The scoring pass (teacher/session.py:Scorer): this rank's padded share of the dataset's ids
    (`score_share`), collated like training batches, scored by the module's `sample_losses` without grad."""

    def __init__(self, cb: AttentCallback, trainer: Any, module: Any) -> None:
        self.cb, self.trainer, self.module = cb, trainer, module

    def batches(self, skip: Selection | None, step: int) -> Iterator[dict[str, Any]]:
        cb, n = self.cb, len(self.cb.dataset)
        mine = score_share(skip, n, self.trainer.global_rank, self.trainer.world_size)
        rest = np.arange(n) if skip is None else np.flatnonzero(~skip.mask(np.arange(n)))
        filler = int(rest[0]) if rest.shape[0] else 0  # a filler row's input: any real sample
        was_training = self.module.training
        self.module.eval()
        try:
            for start in range(0, mine.shape[0], cb.score_batch_size):
                ids = mine[start:start + cb.score_batch_size]
                batch = cb.collate_fn([cb.dataset[int(i) if i >= 0 else filler] for i in ids])
                yield {"ids": torch.from_numpy(ids.copy()), "inputs": batch}
        finally:
            self.module.train(was_training)

    def losses(self, batch: dict[str, Any]) -> torch.Tensor:
        inputs = self.trainer.strategy.batch_to_device(batch["inputs"])
        with torch.no_grad():
            return self.module.sample_losses(inputs).detach().float().reshape(-1).cpu()


class AttentCallback(pl.Callback):
    """AtteNT example selection for a LightningModule (module docstring for the contract). Arguments:

    - `train_dataset`: any map-style dataset; its indices are the sample ids. `batch_size` per rank and
      `collate_fn` (rows -> a dict batch) as a DataLoader would take them; `train_dataloader()` builds it.
    - `teacher_config`: `attent_scale.config.TeacherConfig` (default: `default_teacher_config()`, strategy
      signal, which needs validation); modes cycle and ledger; checked like a YAML one.
    - `reference`: losses per id for `teacher.score: excess`; `seed`: the epochs' order and draws.
    The Trainer must get `use_distributed_sampler=False` (the sampler is rank-aware already). Its budget
    is the teacher's: `max_steps` (a steps budget) or `max_epochs`; size the LR schedule with
    `total_steps()` (subset epochs are shorter than Lightning's estimate)."""

    def __init__(self, train_dataset: Any, *, batch_size: int, collate_fn: Callable[[list[Any]], Any],
                 teacher_config: TeacherConfig | None = None, reference: Any = None, seed: int = 0,
                 drop_last: bool = False, score_batch_size: int | None = None) -> None:
        if not hasattr(train_dataset, "__len__"):
            raise UserError("AttentCallback: train_dataset must be a map-style dataset with __len__")
        teacher_config = teacher_config if teacher_config is not None else default_teacher_config()
        validate_teacher(teacher_config, reference_given=reference is not None)
        if teacher_config.unit != "sample":
            raise UserError(f"AttentCallback: teacher.unit {teacher_config.unit!r}: the Lightning "
                            "integration selects samples only; use unit 'sample' (AttentTrainer or "
                            "attent-scale train select tokens)")
        if teacher_config.mode not in ("cycle", "ledger"):
            raise UserError(f"AttentCallback: teacher.mode {teacher_config.mode!r}: use 'cycle' or 'ledger' "
                            "(online rebalances each step; none is a plain Lightning run)")
        self.dataset, self.collate_fn, self.teacher_config = train_dataset, collate_fn, teacher_config
        self.reference, self.seed = reference, int(seed)
        self.score_batch_size = int(score_batch_size or batch_size)
        self.sampler = AttentBatchSampler(len(train_dataset), batch_size, rank=0, world_size=1, seed=seed,
                                          drop_last=drop_last)
        self.session: TeacherSession | None = None
        self.counts = Progress()  # this rank's samples trained and dropped by rank equalisation
        self._begun = -1  # the epoch whose start ran
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # this step's (ids, losses)
        self._step_at_start = 0
        self._val_hist: np.ndarray | None = None

    def train_dataloader(self, **kwargs: Any) -> DataLoader:
        """The training DataLoader (DataLoader keywords such as num_workers pass through): this rank's
        batches of the epoch's selection, each with its ids under ID_KEY."""
        return DataLoader(IndexedDataset(self.dataset), batch_sampler=self.sampler,
                          collate_fn=IdCollator(self.collate_fn), **kwargs)

    def total_steps(self) -> int:
        """Optimizer steps the run takes under the teacher's plan (the LR schedule's length; after setup)."""
        if self.session is None:
            raise RuntimeError("AttentCallback.total_steps: call it once the fit has begun "
                               "(e.g. in configure_optimizers)")
        return max(1, self.session.total_steps())

    # ------------------------------------------------------------------ setup and epochs

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Collective: the session for this fit (teacher, reference, an epoch budget's anneal plan)."""
        if stage != "fit":
            return
        connector = trainer._accelerator_connector
        if getattr(connector, "use_distributed_sampler", False) and trainer.world_size > 1:
            raise UserError("AttentCallback: pass Trainer(use_distributed_sampler=False): the AtteNT sampler "
                            "deals each rank its share of the selection itself")
        rank, world = trainer.global_rank, trainer.world_size
        self.sampler.rank, self.sampler.world_size = rank, world
        steps_budget = trainer.max_steps is not None and trainer.max_steps > 0
        budget = Budget(epochs=0 if steps_budget else float(trainer.max_epochs or 1),
                        max_steps=trainer.max_steps if steps_budget else 0)
        records = Path(trainer.default_root_dir) / RECORDS
        batching = Batching(world, self.sampler.batch_size, trainer.accumulate_grad_batches,
                            drop_last=self.sampler.drop_last)
        self.session = TeacherSession.build(
            self.teacher_config, num_samples=len(self.dataset), seed=self.seed, batching=batching,
            budget=budget, group=side_group(), record_path=records if rank == 0 else None,
            split="train_dataset", reference=self.reference)
        self.counts, self._begun = Progress(), -1

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_rank == 0 and trainer.ckpt_path is None:  # a resume truncated them instead
            records = Path(trainer.default_root_dir) / RECORDS
            records.parent.mkdir(parents=True, exist_ok=True)
            records.unlink(missing_ok=True)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.session.wants_val and trainer.global_rank == 0 and not trainer.val_dataloaders:
            print("attent-scale: warning: AttentCallback: teacher.strategy 'signal' without validation keeps "
                  "every sample", file=sys.stderr)
        if trainer.ckpt_path is not None and self.session.state.epoch == trainer.current_epoch:
            self._start_epoch(trainer, pl_module, resumed=True)  # Lightning skips on_train_epoch_start

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self._begun != trainer.current_epoch:
            self._start_epoch(trainer, pl_module, resumed=False)

    def _start_epoch(self, trainer: Any, pl_module: Any, *, resumed: bool) -> None:
        """Collective: the session's epoch start (a checkpoint's epoch keeps its selection and skips the
        batches it trained); the sampler gets the selection and Lightning re-reads the loader's length."""
        epoch, step, session = trainer.current_epoch, trainer.global_step, self.session
        self._begun = epoch
        self.sampler.set_epoch(epoch)
        start = session.begin_epoch(epoch, step, _Scorer(self, trainer, pl_module), resumed=resumed)
        self.sampler.set_selection(start.selection)
        self.sampler.skip = session.resume_point(step)[1] * trainer.accumulate_grad_batches if resumed else 0
        if not resumed:
            self.counts.dropped_samples += self.sampler.dropped
            if len(self.sampler) == 0:
                raise UserError(f"AttentCallback: epoch {epoch} selects {start.selected} of "
                                f"{start.num_samples} samples, too few for {trainer.world_size} ranks x "
                                f"batch {self.sampler.batch_size}")
            logs = {"attent/selected_ratio": start.ratio, "attent/selected": float(start.selected),
                    "attent/selection_seconds": sum(start.phase_seconds.values())}
            pl_module.log_dict(logs, on_step=False, on_epoch=True, sync_dist=True)  # equal on all ranks
        # Lightning sized the epoch from the loader before this hook: have it take the loader again
        trainer.fit_loop._combined_loader = None
        trainer.fit_loop.setup_data()

    # ------------------------------------------------------------------ every step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """The batch's loss weights under the epoch's selection (only in a weighted epoch)."""
        if not self._pending:
            self._step_at_start = trainer.global_step
        weights = self.session.loss_weights(batch[ID_KEY])
        if weights is not None:
            batch[WEIGHTS_KEY] = weights

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Buffer the micro batch's per-sample losses; after an optimizer step, hand the step's to the
        session (`after_step`) and apply the one anneal rule, which may end the subset epoch here."""
        if not isinstance(outputs, dict) or "sample_losses" not in outputs:
            raise UserError("AttentCallback: training_step must return a dict with 'loss' and "
                            "'sample_losses' (each row's loss, [B]; see causal_lm_loss)")
        ids = batch[ID_KEY]
        self._pending.append((ids, outputs["sample_losses"]))
        self.counts.samples_trained += int(ids.shape[0])
        if trainer.global_step == self._step_at_start:
            return  # accumulating: no optimizer step yet
        pending, self._pending = self._pending, []
        ids = torch.cat([i.reshape(-1).to(torch.int64) for i, _ in pending]).cpu()
        losses = torch.cat([v.detach().reshape(-1) for _, v in pending]).float().cpu()
        self.session.after_step(ids, losses, self._step_at_start)
        if self.session.anneal_cut(trainer.global_step):
            trainer.fit_loop.epoch_loop.batch_progress.is_last_batch = True  # the epoch ends at this step

    # ------------------------------------------------------------------ strategy signal's val losses

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        wanted = self.session is not None and self.session.wants_val and not trainer.sanity_checking
        self._val_hist = np.zeros(NUM_BINS, dtype=np.int64) if wanted else None

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if self._val_hist is None:
            return
        if not isinstance(outputs, dict) or "sample_losses" not in outputs:
            raise UserError("AttentCallback: teacher.strategy 'signal' needs validation_step to return a "
                            "dict with 'sample_losses' (each row's loss, [B])")
        self._val_hist += histogram(outputs["sample_losses"].detach().float().reshape(-1).cpu())

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Collective: this evaluation's per-sample val loss histogram, summed over the ranks (each rank
        counts the val rows its own loader gave), to the teacher."""
        if self._val_hist is not None:
            hist, self._val_hist = self._val_hist, None
            self.session.observe_val(hist, trainer.global_step, summed=False)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Collective (Lightning dumps a checkpoint on every rank): every rank's session state and counts
        gathered into the file rank 0 writes, as tensors (it loads with weights_only=True)."""
        records = count_lines(Path(trainer.default_root_dir) / RECORDS) if trainer.global_rank == 0 else 0
        mine = split_tensors({**self.session.state_dict(), "progress": self.counts.state_dict()})
        every = [mine]
        if initialized() and trainer.world_size > 1:
            every = [None] * trainer.world_size
            dist.all_gather_object(every, mine, group=self.session.group)
        checkpoint[STATE_KEY] = {"world_size": trainer.world_size, "record_lines": records,
                                 "ranks": [{"rest": rest, "tensors": tensors} for rest, tensors in every]}

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """This rank's session state from a checkpoint of the same world size."""
        entry = checkpoint.get(STATE_KEY)
        if entry is None:
            raise UserError("AttentCallback: the checkpoint has no AtteNT teacher state (written without "
                            "AttentCallback?)")
        if entry["world_size"] != trainer.world_size:
            raise UserError(f"AttentCallback: the checkpoint was written by {entry['world_size']} ranks, "
                            f"this run has {trainer.world_size}")
        mine = entry["ranks"][trainer.global_rank]
        state = join_tensors(mine["rest"], mine["tensors"])
        self.session.load_state_dict(state)
        self.counts = Progress.from_state(state["progress"])
        if trainer.global_rank == 0:
            truncate_lines(Path(trainer.default_root_dir) / RECORDS, int(entry["record_lines"]))
