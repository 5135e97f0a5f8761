"""AttentTrainer: a `transformers.Trainer` whose epochs train on the AtteNT teacher's global selection.

It translates Trainer's hooks into the teacher session every trainer holds (teacher/session.py): an epoch's
start (`_run_epoch`), each micro batch's loss weights and per-sample losses (`compute_loss`), each optimizer
step's end (a callback), evaluation (`evaluate`), the step plan (`set_initial_training_values`) and the
checkpoints (`_save_checkpoint`, `_init_training_state`)."""

from __future__ import annotations

import math
import os
import socket
import sys
import weakref
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

try:
    from transformers import Trainer, TrainerCallback
except ImportError:  # the usual cause: no accelerate, which transformers names obscurely
    from attent_scale.extras import require

    require("accelerate", "AttentTrainer (attent_scale.integrations.hf)")
    raise
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, seed_worker

from attent_scale.checkpoint import load_state, save_state
from attent_scale.config import MetricsConfig, TeacherConfig, validate_teacher
from attent_scale.dist import group_size, initialized, side_group
from attent_scale.dist import init_deepspeed_comm as dist_init_deepspeed_comm
from attent_scale.engines.base import IGNORE_INDEX, per_sample_loss, token_ce, token_ce_sums, token_counts
from attent_scale.errors import UserError
from attent_scale.integrations.sampler import ID_KEY, AttentBatchSampler, IdCollator, IndexedDataset
from attent_scale.metrics import Metrics, NullMetrics
from attent_scale.runlog import count_lines, truncate_lines
from attent_scale.teacher import Batching, Budget, Selection, SelectionState, Teacher, TeacherSession
from attent_scale.teacher.session import default_teacher_config, score_share
from attent_scale.teacher.signals import NUM_BINS, histogram
from attent_scale.train_state import Progress

STATE_DIR = "attent"  # inside each checkpoint-N folder: rank{r}.safetensors + rank{r}.json
RECORDS = "selection.jsonl"  # in output_dir, written by rank 0: the same records as `attent-scale train`
LossFn = Callable[[Any, dict[str, Any]], torch.Tensor]


def causal_lm_per_sample(outputs: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """Per-sequence loss of a causal LM: mean fp32 token CE over the shifted targets != -100 (padding and
    prompt tokens labelled -100 are excluded); `shift_labels` is used as is when the collator gives it."""
    logits = outputs["logits"]
    targets = causal_lm_targets(logits, inputs)
    return per_sample_loss(logits.detach(), targets)


def causal_lm_targets(logits: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
    """The causal LM's targets aligned with `logits` [B, T, V]: `shift_labels` as given, else `labels`
    shifted left by one with -100 in the last position (as transformers' ForCausalLMLoss does: no slice,
    so no copy, of the logits)."""
    if inputs.get("shift_labels") is not None:
        return inputs["shift_labels"]
    labels = inputs.get("labels")
    if labels is None or logits.dim() != 3 or labels.shape != logits.shape[:2]:
        got = None if labels is None else tuple(labels.shape)
        raise UserError(f"AttentTrainer: per-sample loss needs causal-LM logits [B, T, V] and labels [B, T] "
                        f"(got logits {tuple(logits.shape)}, labels {got}); pass per_sample_loss_fn=")
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _shifted_targets(batch: dict[str, Any]) -> torch.Tensor:
    """A collated training batch's causal-LM targets without the logits (for counting them): `shift_labels`
    as given, else `labels` shifted left by one, -100 last (as `causal_lm_targets`); none: an empty one."""
    if batch.get("shift_labels") is not None:
        return batch["shift_labels"]
    labels = batch.get("labels")
    if labels is None:
        return torch.zeros(0, dtype=torch.int64)
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def init_deepspeed_comm() -> None:
    """Point deepspeed.comm at the torch process group already joined (accelerate does not on CPU runs),
    so that `zero.Init` in `from_config` sees the real world size. Call after `training_args.device`."""
    if initialized():
        dist_init_deepspeed_comm(verbose=False)


class _AfterStep(TrainerCallback):
    """After every optimizer step: the step's per-sample losses to the teacher session (one host copy, the
    every-few-steps ledger exchange) and the anneal rule, which may end the epoch here."""

    def __init__(self, trainer: AttentTrainer) -> None:
        self._trainer = weakref.ref(trainer)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        trainer = self._trainer()
        if trainer is not None and trainer.attent_enabled and trainer.session is not None:
            trainer._after_step(control)
        return control


class _Scorer:
    """AttentTrainer's scoring pass (teacher/session.py:Scorer): this rank's padded share of the dataset's
    indices (`score_share`), collated as Trainer collates training batches, scored by the model in eval
    mode without grad."""

    def __init__(self, trainer: AttentTrainer, model: Any) -> None:
        self.trainer, self.model, self.step = trainer, model, 0

    def batches(self, skip: Selection | None, step: int) -> Iterator[dict[str, Any]]:
        t = self.trainer
        dataset, collate = t._score_data
        n = len(t.train_dataset)
        mine = score_share(skip, n, t._rank, t._world)
        rest = np.arange(n) if skip is None else np.flatnonzero(~skip.mask(np.arange(n)))
        filler = int(rest[0]) if rest.shape[0] else 0  # a filler row's input: any real sample
        bs = max(1, t.args.per_device_eval_batch_size)
        self.step = step
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, mine.shape[0], bs):
                ids = mine[start:start + bs]
                batch = collate([dataset[int(i) if i >= 0 else filler] for i in ids])
                yield {"ids": torch.from_numpy(ids.copy()), "inputs": batch}
        finally:
            self.model.train(was_training)

    def losses(self, batch: dict[str, Any]) -> torch.Tensor:
        t = self.trainer
        inputs = t._prepare_inputs(dict(batch["inputs"]))
        view = dict(inputs)
        for key in ("labels", "shift_labels", ID_KEY):
            inputs.pop(key, None)
        losses = t.per_sample_loss_fn(self.model(**inputs), view).float().cpu()
        real = batch["ids"] >= 0
        t.attent_losses_hook(batch["ids"][real], losses[real], self.step, "score")
        return losses


class AttentTrainer(Trainer):
    """`Trainer` with AtteNT example selection. Use it exactly like `Trainer`; extra keyword arguments:

    - `teacher_config`: `attent_scale.config.TeacherConfig` (default: `default_teacher_config()`);
      modes `cycle` and `ledger` select, `none` trains like `Trainer` (its own sampler); `online` is refused.
    - `metrics_config`: `MetricsConfig` for our Prometheus exporter (off by default).
    - `per_sample_loss_fn(outputs, inputs) -> [B]`: per-sample loss for non-causal-LM models.
    - `reference`: reference losses for `teacher.score: excess`, one per index of `train_dataset` (an
      array, or an object with `losses(ids)`); without it, `teacher.reference` names a scores file.

    Strategy signal (the default) takes its val losses from `evaluate()` on `eval_dataset`: pass one and
    an `eval_strategy` ("epoch" or "steps"); without evaluation it keeps every sample (a warning says so).

    The teacher config is checked like a YAML one (UserError naming the key). Weighted selections (prune
    with reweight, random with random_reweight) weight each sample's token CE sum in the loss, as
    `attent-scale train` does; they need the built-in causal-LM loss.

    Sample ids are the indices of `train_dataset` (any map-style dataset). Each epoch every rank gets the
    same number of equally sized batches of the selected indices; the selection is the same on every rank
    and for any world size; selection metrics go to `log()` and `output_dir/selection.jsonl`, and each
    checkpoint holds every rank's teacher state under `checkpoint-N/attent/`.
    """

    def __init__(self, *args: Any, teacher_config: TeacherConfig | None = None,
                 metrics_config: MetricsConfig | None = None, per_sample_loss_fn: LossFn | None = None,
                 reference: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher_config = teacher_config if teacher_config is not None else default_teacher_config()
        validate_teacher(self.teacher_config, reference_given=reference is not None)
        mode = self.teacher_config.mode
        if mode == "online":
            raise UserError("AttentTrainer: teacher mode 'online' needs per-step rebalancing that Trainer "
                            "cannot do; use mode 'cycle' or 'ledger'")
        t = self.teacher_config
        self.attent_enabled = mode in ("cycle", "ledger") or t.unit == "token"
        self.per_sample_loss_fn = per_sample_loss_fn or causal_lm_per_sample
        weighs = (t.strategy == "prune" and t.reweight) or (t.strategy == "random" and t.random_reweight)
        own_loss = per_sample_loss_fn is not None or self.label_smoother is not None \
            or self.compute_loss_func is not None
        if self.attent_enabled and weighs and own_loss:
            raise UserError(f"AttentTrainer: teacher.strategy {t.strategy!r} weights the loss per sample, "
                            "which needs the built-in causal-LM loss (no per_sample_loss_fn, label "
                            "smoothing or compute_loss_func)")
        if t.unit == "token" and own_loss:
            raise UserError("AttentTrainer: teacher.unit token masks tokens out of the loss, which needs the "
                            "built-in causal-LM loss (no per_sample_loss_fn, label smoothing or "
                            "compute_loss_func)")
        if t.unit == "token":
            self.loss_is_scaled_for_ga = True  # each micro batch's loss is its share of the step's token mean
        self._token_reference: Any = None  # teacher.unit token, strategy hard: built once, on first train()
        self._token_divisor = 0.0  # the current step's kept-token divisor (get_batch_samples)
        self._reference_arg = reference
        self.session: TeacherSession | None = None
        self.counts = Progress()  # this rank's samples trained and dropped by rank equalisation
        self._ids: torch.Tensor | None = None
        self._sampler: AttentBatchSampler | None = None
        self._score_data: tuple[Any, Callable[[list[Any]], Any]] | None = None
        self._metrics: NullMetrics = NullMetrics()
        self._metrics_config = metrics_config
        # this step's (ids, per-sample losses, step) per micro batch, on the device until the step's flush
        self._step_losses: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self._val_hist: np.ndarray | None = None  # strategy signal: this rank's counts while evaluating
        if self.attent_enabled:
            self.add_callback(_AfterStep(self))
            if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
                raise UserError("AttentTrainer: train_dataset must be a map-style dataset with __len__ "
                                "(sample ids are its indices)")
            self._group = side_group()  # the teacher talks over CPU tensors
            self._new_session()

    # ------------------------------------------------------------------ setup

    @property
    def _rank(self) -> int:
        return dist.get_rank() if initialized() else 0

    @property
    def _world(self) -> int:
        return group_size()

    @property
    def _seed(self) -> int:
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed

    @property
    def teacher(self) -> Teacher | None:
        """The session's teacher (None with the teacher off)."""
        return self.session.teacher if self.session is not None else None

    def _batching(self) -> Batching:
        """How this run's epochs cut into optimizer steps per rank (the sampler's batches, accumulated)."""
        return Batching(self._world, self._train_batch_size, self.args.gradient_accumulation_steps,
                        drop_last=self.args.dataloader_drop_last)

    def _new_session(self) -> None:
        n, args = len(self.train_dataset), self.args
        steps_budget = args.max_steps > 0  # else an epoch budget, which anneals by plan
        budget = Budget(epochs=0 if steps_budget else args.num_train_epochs,
                        max_steps=args.max_steps if steps_budget else 0)
        records = Path(args.output_dir) / RECORDS if self._rank == 0 else None
        self.session = TeacherSession.build(self.teacher_config, num_samples=n, seed=self._seed,
                                            batching=self._batching(), budget=budget, group=self._group,
                                            record_path=records, split="train_dataset",
                                            reference=self._reference_arg)
        self.counts = Progress()
        self._sampler = AttentBatchSampler(n, self._train_batch_size, rank=self._rank, world_size=self._world,
                                           seed=self._seed, drop_last=args.dataloader_drop_last)

    @property
    def _signal(self) -> bool:
        return self.session is not None and self.session.wants_val

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        if self.attent_enabled:
            self._new_session()
            if self._signal and self._rank == 0 and (self.eval_dataset is None
                                                     or self.args.eval_strategy == "no"):
                print("attent-scale: warning: AttentTrainer: teacher.strategy 'signal' without evaluation "
                      "(eval_dataset and eval_strategy 'steps' or 'epoch') keeps every sample",
                      file=sys.stderr)
            if not resume_from_checkpoint and self._rank == 0:
                (Path(self.args.output_dir) / RECORDS).unlink(missing_ok=True)
        if self._metrics_config is not None and isinstance(self._metrics, NullMetrics):
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            self._metrics = Metrics.create(self._metrics_config, rank=self._rank, local_rank=local_rank,
                                           node=os.environ.get("SLURMD_NODENAME") or socket.gethostname())
        if self.attent_enabled and self.session.tokens is not None:
            self._attach_token_reference()
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._metrics.update(self.attent_totals())
            self._metrics.close()
            self._metrics = NullMetrics()

    def _attach_token_reference(self) -> None:
        """teacher.unit token with strategy hard: the online reference of teacher.token_reference beside the
        model (a frozen model on the training device, or a LoRA reference adapter on the peft model; not
        under DeepSpeed, whose partitioned peft model cannot take a second adapter here)."""
        tokens = self.session.tokens
        if tokens.strategy != "hard":
            return
        if self._token_reference is None:
            from attent_scale.engines.reference import open_token_reference

            peft = None if self.is_deepspeed_enabled else self.model
            self._token_reference = open_token_reference(
                self.teacher_config.token_reference, device=self.args.device, peft_model=peft,
                where="AttentTrainer without DeepSpeed")
        tokens.reference = self._token_reference

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device) -> tuple:
        """Trainer's step of micro batches; with teacher.unit token also the step's kept-token divisor
        (a collective over the step's target counts: every rank fetches one step at a time)."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        tokens = self.session.tokens if self.attent_enabled and self.session is not None else None
        if tokens is not None:
            self._token_divisor = tokens.divisor([_shifted_targets(b) for b in batches])
        return batches, num_items

    def get_train_dataloader(self) -> DataLoader:
        """Trainer's loader, but batches come from this rank's AttentBatchSampler and carry the indices."""
        if not self.attent_enabled:
            return super().get_train_dataloader()
        dataset = self.train_dataset
        try:
            import datasets

            is_hf = isinstance(dataset, datasets.Dataset)
        except ImportError:
            is_hf = False
        if is_hf:
            dataset = self._remove_unused_columns(dataset, description="training")
            collate = self.data_collator
        else:
            collate = self._get_collator_with_removed_columns(self.data_collator, description="training")
        self._score_data = (dataset, collate)
        self._sampler.batch_size = self._train_batch_size
        self.session.batching = self._batching()  # the step plan follows the loader's batch size
        args = self.args
        params: dict[str, Any] = {
            "batch_sampler": self._sampler,
            "collate_fn": IdCollator(collate),
            "num_workers": args.dataloader_num_workers,
            "pin_memory": args.dataloader_pin_memory,
            "persistent_workers": args.dataloader_persistent_workers,
            "worker_init_fn": partial(seed_worker, num_workers=args.dataloader_num_workers,
                                      rank=args.process_index),
        }
        if args.dataloader_num_workers > 0:
            params["prefetch_factor"] = args.dataloader_prefetch_factor
            params["multiprocessing_context"] = args.dataloader_multiprocessing_context
        loader = self.accelerator.prepare(DataLoader(IndexedDataset(dataset), **params))
        # The sampler is rank-aware already: make accelerate's BatchSamplerShard a passthrough (as Trainer
        # does for its BatchRebalanceSampler); batch_size=None keeps it from padding a short last batch.
        shard = getattr(loader, "batch_sampler", None)
        if shard is not None and getattr(shard, "batch_sampler", None) is self._sampler:
            shard.num_processes, shard.process_index, shard.batch_size = 1, 0, None
        return loader

    # ------------------------------------------------------------------ epochs and steps

    def set_initial_training_values(self, args: Any, dataloader: DataLoader) -> tuple:
        """Trainer's values, with max_steps (the LR schedule's length) and the epoch count taken from the
        teacher's plan: subset epochs are shorter, and each arm's LR must decay over its own budget."""
        values = list(super().set_initial_training_values(args, dataloader))
        if not self.attent_enabled:
            return tuple(values)
        if args.max_steps > 0:
            values[0] = self.session.planned_epochs()
        else:
            values[0], values[6] = math.ceil(args.num_train_epochs), self.session.total_steps()
        values[6] = max(1, values[6])
        return tuple(values)

    def _init_training_state(self, max_steps: int, num_update_steps_per_epoch: int, num_train_epochs: int,
                             resume_from_checkpoint: str | None, trial: Any) -> tuple[int, int]:
        epochs_trained, steps_in_epoch = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial)
        if not self.attent_enabled or resume_from_checkpoint is None:
            return epochs_trained, steps_in_epoch
        self.counts = load_attent_state(
            resume_from_checkpoint, self.session, rank=self._rank, world=self._world,
            num_samples=len(self.train_dataset), accum=self.args.gradient_accumulation_steps,
            records=Path(self.args.output_dir) / RECORDS)
        # Epochs have different lengths: where the run stands comes from our state, not global_step alone.
        epoch, done = self.session.resume_point(self.state.global_step)
        return epoch, 0 if self.args.ignore_data_skip else done * self.args.gradient_accumulation_steps

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        if not self.attent_enabled:
            return super()._run_epoch(*args, **kwargs)
        if args or "epoch" not in kwargs:
            raise RuntimeError("AttentTrainer: this transformers version calls _run_epoch differently; "
                               "install the versions of the attent-scale[hf] extra")
        self._begin_epoch(kwargs["epoch"], kwargs["model"])
        batches = len(self._sampler)
        kwargs["steps_in_epoch"] = batches
        kwargs["num_update_steps_per_epoch"] = math.ceil(batches / self.args.gradient_accumulation_steps)
        return super()._run_epoch(*args, **kwargs)

    def _begin_epoch(self, epoch: int, model: Any) -> None:
        """Collective: the session's epoch start (a checkpoint's epoch keeps its selection); the sampler
        gets the epoch's subset, Trainer.log and the metrics the selection event."""
        self._sampler.set_epoch(epoch)
        resumed = self.session.state.epoch == epoch  # resumed inside this epoch
        start = self.session.begin_epoch(epoch, self.state.global_step, _Scorer(self, model), resumed=resumed)
        self._sampler.set_selection(start.selection)
        if resumed:
            return
        self.counts.dropped_samples += self._sampler.dropped
        if len(self._sampler) == 0:
            raise UserError(f"AttentTrainer: epoch {epoch} selects {start.selected} of {start.num_samples} "
                            f"samples, too few for {self._world} ranks x batch {self._sampler.batch_size}")
        start.report(self._metrics)
        self._metrics.update(self.attent_totals())
        logs = {
            "attent/epoch": epoch,
            "attent/selected_ratio": start.ratio,
            "attent/selected": start.selected,
            "attent/selection_seconds": sum(start.phase_seconds.values()),
            "attent/samples_scored": int(self.teacher.stats["samples_scored"]),
            "attent/dropped_samples": self.counts.dropped_samples,
        }
        if start.staleness_median is not None:
            logs["attent/staleness_median"] = start.staleness_median
        if start.weighted:
            logs["attent/weight"] = start.selection.weight
        self.log(logs)

    def _after_step(self, control: Any) -> None:
        """The end of an optimizer step: its losses to the session (`after_step`), then the one anneal rule;
        a subset epoch the anneal point ends stops here (a checkpoint of this step resumes at the next)."""
        self._flush_losses()
        if self.session.anneal_cut(self.state.global_step):
            control.should_epoch_stop = True

    def attent_totals(self) -> dict[str, Any]:
        """This rank's cumulative teacher numbers (RunTotals fields, as our own trainer reports them)."""
        if self.session is None:
            return {}
        from attent_scale.totals import teacher_totals

        tokens = self.session.tokens
        return teacher_totals(self.teacher.stats, samples_trained=self.counts.samples_trained,
                              selected_ratio=self.session.state.ratio,
                              kept_token_share=None if tokens is None else tokens.share)

    # ------------------------------------------------------------------ losses

    def attent_losses_hook(self, ids: torch.Tensor, losses: torch.Tensor, step: int, kind: str) -> None:
        """Called with every per-sample loss the teacher records (kind "train" or "score"); a no-op, for
        subclasses that want to inspect or log them."""

    def training_step(self, model: Any, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        self._ids = inputs.pop(ID_KEY, None) if self.attent_enabled else None
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._ids = None

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """In training, one token cross-entropy per micro batch gives both Trainer's loss (the token sum
        over `num_items_in_batch`, as transformers' causal-LM loss) and the per-sample losses for the
        teacher, which stay on the device until the step's one flush. With a custom `per_sample_loss_fn`,
        a label smoother or `compute_loss_func`, Trainer computes its own loss and the per-sample losses
        are taken from the same forward's outputs."""
        ids = self._ids
        if ids is None and self._val_hist is not None:
            return self._eval_loss(model, inputs, return_outputs, num_items_in_batch)
        if ids is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        view = dict(inputs)  # Trainer may pop the labels
        weights = self.session.loss_weights(ids)
        if self._one_ce_pass(inputs):
            loss, outputs, losses = self._causal_lm_loss(model, inputs, num_items_in_batch, weights)
        else:
            if self.session.tokens is not None:
                raise UserError("AttentTrainer: teacher.unit token needs the built-in causal-LM loss (labels "
                                "in the batch, no sequence parallelism)")
            if weights is not None:
                raise UserError("AttentTrainer: this epoch's selection weights the loss per sample, which "
                                "needs the built-in causal-LM loss (labels in the batch, no sequence "
                                "parallelism)")
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            with torch.no_grad():
                losses = self.per_sample_loss_fn(outputs, view).detach().float()
        self._step_losses.append((ids, losses, self.state.global_step))  # ids may be on the device too
        self.counts.samples_trained += int(ids.shape[0])
        return (loss, outputs) if return_outputs else loss

    def _eval_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool,
                   num_items_in_batch: Any) -> Any:
        """Trainer's own eval loss, unchanged; the batch's per-sample losses (the training ones' function on
        the same outputs) are counted into this evaluation's histogram."""
        view = dict(inputs)  # Trainer may pop the labels
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        with torch.no_grad():
            losses = self.per_sample_loss_fn(outputs, view).detach().float().reshape(-1).cpu()
        real = self._real_eval_rows(losses.shape[0])
        if self.per_sample_loss_fn is causal_lm_per_sample:  # rows without a target, as engines' evaluate
            real &= token_counts(causal_lm_targets(outputs["logits"], view)).cpu() > 0
        self._val_hist += histogram(losses[real])
        return (loss, outputs) if return_outputs else loss

    def _real_eval_rows(self, rows: int) -> torch.Tensor:
        """Which of this rank's eval rows are not padding: on several ranks accelerate tops the last batches
        up with repeats, which gather_for_metrics (so Trainer's eval loss) cuts off at the dataset's
        remainder of the ranks' total batch; the same rule here, so the counts match one rank's."""
        real = torch.ones(rows, dtype=torch.bool)
        state, acc = self.accelerator.gradient_state, self.accelerator
        if acc.num_processes > 1 and state.end_of_dataloader and state.remainder > 0:
            real = torch.arange(rows) + acc.process_index * rows < state.remainder
        return real

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Trainer.evaluate; with strategy signal an evaluation of `eval_dataset` (all of its sets) also
        hands the teacher the histogram of its per-sample losses, summed over ranks (one all-reduce)."""
        if not self._signal or eval_dataset is not None or self._val_hist is not None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        self._val_hist = np.zeros(NUM_BINS, dtype=np.int64)
        try:
            metrics = super().evaluate(None, ignore_keys, metric_key_prefix)
            hist = torch.from_numpy(self._val_hist)
        finally:
            self._val_hist = None
        self.session.observe_val(hist.numpy(), self.state.global_step, summed=False)
        return metrics

    def _one_ce_pass(self, inputs: dict[str, Any]) -> bool:
        """Our causal-LM loss applies: default per-sample loss, Trainer's plain loss, targets present."""
        pc = getattr(self.accelerator, "parallelism_config", None)
        sequence_parallel = pc is not None and getattr(pc, "sp_enabled", False)
        return (self.per_sample_loss_fn is causal_lm_per_sample and self.label_smoother is None
                and self.compute_loss_func is None and not sequence_parallel
                and (inputs.get("labels") is not None or inputs.get("shift_labels") is not None))

    def _causal_lm_loss(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any,
                        weights: torch.Tensor | None = None) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """(Trainer's loss, outputs, per-sample losses) from one forward without labels and one fp32
        chunked token CE over its logits. The loss is transformers' ForCausalLMLoss: the token sum over
        `num_items_in_batch` when Trainer counted it (so the accumulated step is the exact token mean
        over all its micro batches, a short one included), else the micro batch's token mean. With
        `weights`, each sample's token CE sum is scaled by its weight and the divisor stays the unweighted
        token count (engines.base.weighted_token_loss); the per-sample losses stay unweighted."""
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        outputs = model(**model_inputs)
        logits = outputs["logits"]
        targets = causal_lm_targets(logits, inputs).to(logits.device)
        tokens = self.session.tokens if self.session is not None else None
        if tokens is not None and self._ids is not None:  # teacher.unit token (teacher/token_step.py)
            tl = token_ce(logits, targets)
            loss = tokens.loss(self._ids, inputs["input_ids"], targets, tl, self._token_divisor, weights)
            counts = token_counts(targets).clamp(min=1).to(tl.dtype)
            return loss, outputs, tl.detach().sum(dim=1) / counts
        sums = token_ce_sums(logits, targets)
        counts = token_counts(targets)
        contrib = sums if weights is None else sums * weights.to(sums.device, sums.dtype)
        if num_items_in_batch is not None:
            loss = contrib.sum() / num_items_in_batch
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs:
                # as Trainer.compute_loss: num_items_in_batch is summed over the ranks, gradients averaged
                tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                n_gpu = self.args.n_gpu
                loss = loss * (self.accelerator.num_processes // tp if n_gpu <= 1 else n_gpu)
        else:
            loss = contrib.sum() / counts.sum().clamp(min=1)
        losses = sums.detach() / counts.clamp(min=1).to(sums.dtype)
        return loss, outputs, losses

    def _flush_losses(self) -> None:
        """The step's buffered ids and per-sample losses to the host (one copy each) and into the session,
        which observes them and exchanges pending observations when due."""
        pending, self._step_losses = self._step_losses, []
        step = pending[0][2] if pending else self.state.global_step - 1  # the step that computed them
        ids = torch.cat([i.reshape(-1).to(torch.int64) for i, _, _ in pending]).cpu() if pending \
            else torch.zeros(0, dtype=torch.int64)
        losses = torch.cat([v.reshape(-1) for _, v, _ in pending]).float().cpu() if pending \
            else torch.zeros(0, dtype=torch.float32)
        if pending:
            self.attent_losses_hook(ids, losses, step, "train")
        self.session.after_step(ids, losses, step)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        tokens = self.session.tokens if self.session is not None else None
        if "loss" in logs and tokens is not None:  # teacher.unit token: kept / target tokens so far
            logs["attent/kept_token_share"] = tokens.share
        if "loss" in logs:
            self._metrics.update({"train_loss": logs["loss"], **self.attent_totals()})
        if "eval_loss" in logs:
            self._metrics.observe_eval(logs["eval_loss"])
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.attent_enabled:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            save_attent_state(Path(self._get_output_dir(trial=trial)) / folder, self.session, self.counts,
                              rank=self._rank, world=self._world,
                              records=Path(self.args.output_dir) / RECORDS)
        super()._save_checkpoint(model, trial)


def save_attent_state(folder: Path, session: Any, counts: Progress, *, rank: int, world: int,
                      records: Path) -> None:
    """This rank's teacher session and counts beside a Trainer checkpoint `folder` (before it, so a
    checkpoint with trainer_state.json always has it); rank 0 also notes how many lines `records` has."""
    out = folder / STATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    lines = count_lines(records) if rank == 0 else 0
    state = {**session.state_dict(), "progress": counts.state_dict(), "record_lines": lines,
             "world_size": world}
    save_state(out / f"rank{rank}", state)


def load_attent_state(checkpoint: str, session: Any, *, rank: int, world: int, num_samples: int, accum: int,
                      records: Path) -> Progress:
    """The session's state from a Trainer checkpoint (refused in one line when absent or written by another
    number of ranks); rank 0 cuts `records` back to the checkpoint's lines. Returns the counts."""
    stem = Path(checkpoint) / STATE_DIR / f"rank{rank}"
    if not stem.with_suffix(".json").exists():
        raise UserError(f"{stem}.json: no AtteNT teacher state in this checkpoint (written by plain "
                        "Trainer, or by a run with a different number of ranks?)")
    state = _upgrade(load_state(stem), num_samples, accum)
    if state["world_size"] != world:
        raise UserError(f"{stem}.json: written by {state['world_size']} ranks, this run has {world}")
    session.load_state_dict(state)
    if rank == 0:
        truncate_lines(records, int(state["record_lines"]))
    return Progress.from_state(state["progress"])


def _upgrade(state: dict[str, Any], num_samples: int, accum: int) -> dict[str, Any]:
    """An AttentTrainer checkpoint state in today's entries: one written before the teacher session (the
    selection and the counts in one "progress" entry) is re-cut."""
    if "selection" in state:
        return state
    old = state["progress"]
    bits = old["selection_bits"]
    selection = SelectionState(
        epoch=int(old["epoch"]), start_step=int(old["epoch_start_step"]),
        steps=math.ceil(int(old["epoch_batches"]) / accum), bits=bits, weight_bits=old["weight_bits"],
        weight=float(old["weight"]),
        ratio=1.0 if bits is None else Selection(np.asarray(bits), num_samples).count / max(1, num_samples))
    progress = {k: int(old[k]) for k in ("samples_trained", "dropped_samples")}
    return {**state, "selection": selection.state_dict(), "progress": progress,
            "record_lines": int(old.get("record_lines", 0))}
