"""Engine protocol, StepResult, the per-sample loss and the LR schedule shared by every engine."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attent_scale.config import RunConfig
from attent_scale.dist import collective_device, group_size

IGNORE_INDEX = -100
Batch = dict[str, torch.Tensor]
StepOutcome = tuple[float, torch.Tensor, float, bool]  # loss, per_sample (CPU), grad_norm, applied


@dataclass
class StepResult:
    """Outcome of one optimizer step over a rank's whole batch."""

    loss: float  # token-mean training loss over the rank's batch (before the update)
    per_sample: torch.Tensor  # [B] fp32, detached, on CPU: mean token CE per sequence
    lr: float  # learning rate used for this step
    grad_norm: float  # global grad norm before clipping (nan when skipped)
    skipped: bool  # non-finite loss or grad norm: no update was applied


@runtime_checkable
class Engine(Protocol):
    """What the trainer and the teacher rely on; every engine keeps its ranks in lockstep."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: Any
    total_steps: int  # the steps the LR schedule decays over; the trainer sets it from its plan

    def per_sample_loss(self, batch: Batch) -> torch.Tensor: ...
    def token_losses(self, batch: Batch) -> torch.Tensor: ...
    def score(self, batch: Batch) -> torch.Tensor: ...
    def train_step(self, batch: Batch, tokens: Any = None) -> StepResult: ...
    def evaluate(self, batches: Iterable[Batch], sample_hist: bool = False) -> float: ...
    def save(self, ckpt_dir: str | Path, tag: str) -> None: ...
    def load(self, ckpt_dir: str | Path, tag: str) -> None: ...
    def export(self, out_dir: str | Path, tokenizer_dir: Path | None = None) -> None: ...


def token_ce_sums(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 8192) -> torch.Tensor:
    """Sum of fp32 token cross-entropy per sequence over labels != -100 ([B] fp32, differentiable): the
    row sums of `token_ce` (its chunking: no [B, T, V] fp32 copy of the logits, each chunk recomputed in
    backward; fp32 logits go through one cross_entropy without a recompute)."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"per_sample_loss: logits {tuple(logits.shape)} vs labels {tuple(labels.shape)}")
    return token_ce(logits, labels, chunk_tokens).sum(dim=1)


def _chunk_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fp32 token CE [rows, T] of one chunk of rows (0 where the label is -100); only the chunk is upcast."""
    rows, t, v = logits.shape
    return F.cross_entropy(logits.reshape(rows * t, v).float(), labels.reshape(rows * t),
                           ignore_index=IGNORE_INDEX, reduction="none").view(rows, t)


def token_ce(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 8192) -> torch.Tensor:
    """Per-token fp32 cross-entropy [B, T] (differentiable), 0 where labels are -100 (padding, prompt tokens):
    rows of about `chunk_tokens` tokens are upcast one chunk at a time (no [B, T, V] fp32 copy of the
    logits) and, under autograd, recomputed in backward instead of keeping their fp32 log-softmax alive;
    fp32 logits go through one cross_entropy. The valid mask is `labels != -100`."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"token_ce: logits {tuple(logits.shape)} vs labels {tuple(labels.shape)}")
    b, t, _ = logits.shape
    grad = torch.is_grad_enabled() and logits.requires_grad
    if grad and logits.dtype == torch.float32:
        return _chunk_token_ce(logits, labels)
    rows = max(1, chunk_tokens // max(t, 1))
    parts = []
    for start in range(0, b, rows):
        lg, lb = logits[start:start + rows], labels[start:start + rows]
        parts.append(checkpoint(_chunk_token_ce, lg, lb, use_reentrant=False) if grad
                     else _chunk_token_ce(lg, lb))
    return torch.cat(parts) if parts else logits.new_zeros((0, t), dtype=torch.float32)


def masked_token_loss(token_losses: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor,
                      divisor: float) -> torch.Tensor:
    """sum over valid tokens of w * CE / `divisor`: a micro batch's share of the step's mean over kept
    tokens. `weights` [B, T] (1 kept, 0 masked out, or any weight); tokens whose label is -100 (padding,
    prompt) count nothing whatever their weight. `divisor` is the step's kept-token total (over all its
    micro batches: `step_kept_tokens`), so micro batches of 1 x B and k x B/k give the same gradient."""
    if weights.shape != token_losses.shape or labels.shape != token_losses.shape:
        raise ValueError(f"masked_token_loss: losses {tuple(token_losses.shape)}, weights "
                         f"{tuple(weights.shape)}, labels {tuple(labels.shape)}")
    valid = (labels != IGNORE_INDEX).to(token_losses.dtype)
    w = weights.to(token_losses.device, token_losses.dtype) * valid.to(token_losses.device)
    return (token_losses * w).sum() / max(float(divisor), 1.0)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 8192) -> torch.Tensor:
    """Mean token cross-entropy per sequence over labels != -100, in fp32; rows with no target give 0
    (`token_ce_sums` divided by each row's target count)."""
    total = token_ce_sums(logits, labels, chunk_tokens)
    counts = (labels != IGNORE_INDEX).sum(dim=1)
    return total / counts.clamp(min=1).to(total.dtype)


def token_counts(labels: torch.Tensor) -> torch.Tensor:
    """Valid target tokens per row (labels != -100)."""
    return (labels != IGNORE_INDEX).sum(dim=1)


def weighted_token_loss(per_sample: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor | None,
                        total_tokens: int) -> torch.Tensor:
    """sum_i w_i * CE_sum_i / total_tokens (w = 1 without weights): the token mean with per-sample weights.

    The divisor is the batch's unweighted token count, not sum_i w_i * tokens_i: a self-normalised mean
    would cancel the weights of a batch of one, and inverse-probability weights only make the pruned
    epoch's summed gradient an unbiased estimate of the full epoch's if they are not normalised away."""
    contrib = per_sample * tokens
    if weights is not None:
        contrib = contrib * weights.to(per_sample.device, per_sample.dtype)
    return contrib.sum() / total_tokens


def lr_lambda(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over `warmup_steps`, then cosine down to `min_lr_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig,
                   total_steps: Callable[[], int] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with warmup + cosine from `cfg.train`, decaying over `total_steps()` (read at every step: a
    plan may change it; default train.max_steps); stepped once per applied optimizer step."""
    t = cfg.train
    steps = total_steps or (lambda: t.max_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_lambda(
            s, warmup_steps=t.warmup_steps, max_steps=steps(), min_lr_ratio=t.min_lr_ratio
        ),
    )


def resume_lr(optimizer: Any, scheduler: Any, lr: float, rank: int) -> None:
    """After a checkpoint's optimizer and scheduler state are loaded (they carry the LR the checkpoint was
    written with): the schedule goes on from the config's train.lr, so a rerun that lowers it (after
    non-finite losses, say) gets it; one line on rank 0 when it changed. A scheduler of a DeepSpeed JSON's
    own is left as it is."""
    base = list(getattr(scheduler, "base_lrs", None) or [])
    if not base or all(b == lr for b in base):
        return
    for group, b in zip(optimizer.param_groups, base, strict=False):
        group["lr"] = lr * (group["lr"] / b if b else 1.0)  # the same point of the schedule
        group["initial_lr"] = lr
    scheduler.base_lrs = [lr] * len(base)
    log_rank0(rank, f"train.lr {base[0]:g} in the checkpoint, {lr:g} now: the LR schedule goes on from "
                    f"{lr:g}")


def make_adamw(params: Iterable[torch.nn.Parameter], cfg: RunConfig) -> torch.optim.AdamW:
    """torch AdamW over the trainable parameters; no weight decay on biases and norms (dim < 2)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if _ndim(p) >= 2]
    no_decay = [p for p in params if _ndim(p) < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2))


def _ndim(p: torch.Tensor) -> int:
    ds_shape = getattr(p, "ds_shape", None)  # ZeRO-3 partitioned parameter: its full shape
    return len(ds_shape) if ds_shape is not None else p.dim()


def split_micro(batch: Batch, n: int) -> tuple[list[Batch], int]:
    """Split a batch into exactly `n` micro batches along the rows (sizes differ by at most 1), and say how
    many hold real rows. A batch of b < n rows (an epoch's short last batch) gives b micro batches of one
    row followed by n - b filler micro batches: one row each with id -1, no target token (labels -100)
    and weight 0, so they add nothing to the loss or the gradient but every rank still runs the same `n`
    forwards and backwards (DeepSpeed counts `gradient_accumulation_steps` backwards per step; ZeRO-3 and
    FSDP ranks must run in lockstep). A full batch of micro * n rows gives n micro batches of `micro`."""
    b = batch["input_ids"].shape[0]
    if b == 0:
        raise ValueError("split_micro: empty batch (0 rows)")
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    parts = {k: torch.tensor_split(v, min(n, b)) for k, v in tensors.items()}
    micros = [{k: parts[k][i] for k in parts} for i in range(min(n, b))]
    if b < n:
        filler = _filler_row(tensors)
        micros += [filler] * (n - b)
    return micros, min(n, b)


def _filler_row(batch: Batch) -> Batch:
    """One row shaped like the batch's that contributes nothing: the first row's inputs (any valid
    tokens), no target token, id -1 (never observed by the teacher), weight 0."""
    row = {k: v[:1].clone() for k, v in batch.items()}
    row["labels"].fill_(IGNORE_INDEX)
    if "ids" in row:
        row["ids"].fill_(-1)
    if "weights" in row:
        row["weights"].zero_()
    return row


def resolve_dtype(
    mode: str, device: torch.device, bf16_supported: bool | None = None
) -> tuple[torch.dtype, str]:
    """Compute dtype for `engine.mixed_precision` and why: 'auto' is bf16 only on a CUDA device that
    supports it (`torch.cuda.is_bf16_supported()`), fp32 everywhere else."""
    if mode == "bf16":
        return torch.bfloat16, "mixed_precision bf16"
    if mode == "fp32":
        return torch.float32, "mixed_precision fp32"
    if device.type != "cuda":
        return torch.float32, f"mixed_precision auto: fp32 on {device.type}"
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    if bf16_supported:
        return torch.bfloat16, "mixed_precision auto: bf16 (supported by this CUDA device)"
    return torch.float32, "mixed_precision auto: fp32 (this CUDA device has no bf16 support)"


def log_rank0(rank: int, message: str) -> None:
    """One line on stderr from rank 0."""
    if rank == 0:
        print(f"attent-scale: {message}", file=sys.stderr, flush=True)


class BaseEngine:
    """The step logic every engine shares; subclasses supply forward, backward, the optimizer step,
    train/eval mode and state I/O.

    Host syncs: a training step copies its per-sample losses, loss and the skip decision to the host
    once (`_to_host`), after the last backward; nothing is read back per micro batch. `host_syncs`
    counts those copies (tools/benchmarks/bench_train.py reports it per step).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: Any = None

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.grad_accum = cfg.train.grad_accum_steps
        self.chunk_tokens = cfg.engine.loss_chunk_tokens
        self.steps_done = 0  # optimizer steps applied
        self.total_steps = cfg.train.max_steps  # the LR schedule's length until the trainer sets its plan
        self.host_syncs = 0  # device-to-host copies this engine waited for

    # --- hooks -------------------------------------------------------------------------------
    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro batch's loss; `last` is the final micro batch of the step."""
        raise NotImplementedError

    def _optimizer_step(self, loss: torch.Tensor, per_sample: torch.Tensor) -> StepOutcome:
        """Finish the step after the last micro batch, given the step's loss and per-sample losses on
        the device: returns (loss, per_sample on CPU, grad_norm, applied), with one host sync."""
        raise NotImplementedError

    def _set_train(self, mode: bool) -> None:
        raise NotImplementedError

    def current_lr(self) -> float:
        raise NotImplementedError

    # --- host <-> device ---------------------------------------------------------------------------
    def _to_device(self, batch: Batch) -> Batch:
        """The batch's tensors on the engine's device (ids stay on the host); pinned, non-blocking on CUDA."""
        if self.device.type != "cuda":
            return dict(batch)
        out: Batch = {}
        for key, value in batch.items():
            if key == "ids" or not isinstance(value, torch.Tensor) or value.device.type == "cuda":
                out[key] = value
                continue
            if not value.is_pinned():
                value = value.pin_memory()
            out[key] = value.to(self.device, non_blocking=True)
        return out

    def _to_host(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """fp32 CPU copies of a few device tensors with one sync: packed into one buffer and, on CUDA,
        copied non-blocking into pinned memory; returns flat views in the order given."""
        flat = [t.detach().reshape(-1).float() for t in tensors]
        packed = torch.cat(flat)
        if packed.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            torch.cuda.current_stream(packed.device).synchronize()
        else:
            host = packed.cpu()
        self.host_syncs += 1
        return list(host.split([f.numel() for f in flat]))

    # --- shared API ----------------------------------------------------------------------------
    def per_sample_loss(self, batch: Batch) -> torch.Tensor:
        """[B] fp32 mean token CE per sequence (forward under the current grad mode and module mode)."""
        batch = self._to_device(batch)
        logits = self._logits(batch["input_ids"].to(self.device))
        return per_sample_loss(logits, batch["labels"].to(self.device), self.chunk_tokens)

    def token_losses(self, batch: Batch) -> torch.Tensor:
        """Per-token loss without grad and without dropout: [B, T] fp32 on CPU, 0 where labels are -100
        (one host sync); what a reference or learner contributes to token-level learnability."""
        self._set_train(False)
        try:
            with torch.no_grad():
                batch = self._to_device(batch)
                logits = self._logits(batch["input_ids"].to(self.device))
                tl = token_ce(logits, batch["labels"].to(self.device), self.chunk_tokens)
                return self._to_host(tl)[0].view(tl.shape)
        finally:
            self._set_train(True)

    def score(self, batch: Batch) -> torch.Tensor:
        """Per-sample loss without grad and without dropout; [B] fp32 on CPU (one host sync)."""
        self._set_train(False)
        try:
            with torch.no_grad():
                return self._to_host(self.per_sample_loss(batch))[0]
        finally:
            self._set_train(True)

    def train_step(self, batch: Batch, tokens: Any = None) -> StepResult:
        """One optimizer step over the rank's batch, split into `grad_accum` micro batches.

        The objective is the token mean over the rank's whole batch (each micro batch contributes its
        CE sum divided by the batch's token count), so 1 x B and k x B/k give the same update; a batch
        shorter than `grad_accum` is topped up with filler micro batches that contribute nothing (see
        split_micro), so the update is the exact token mean over the rows it has. With
        `batch["weights"]` (per-sample loss weights) each sample's CE sum is scaled by its weight; the
        divisor stays the batch's token count (see weighted_token_loss). Losses stay on the device until
        the one host copy in `_optimizer_step`.

        `tokens` (teacher.unit token: teacher/token_step.TokenStep, every rank in lockstep): the objective is
        the mean token CE over the tokens it keeps in each micro batch (its `divisor` once per step, its
        `loss` per micro batch from this forward's token losses); the per-sample losses stay the full ones.
        """
        self._set_train(True)
        lr = self.current_lr()
        total_tokens = max(1, int(token_counts(batch["labels"]).sum()))  # host labels: no device sync
        micros, real = split_micro(self._to_device(batch), self.grad_accum)
        divisor = tokens.divisor([m["labels"] for m in micros]) if tokens is not None else 0.0
        per_sample: list[torch.Tensor] = []
        loss_sum: torch.Tensor | None = None
        for i, micro in enumerate(micros):
            if tokens is None:
                ps = self.per_sample_loss(micro)
                tok = token_counts(micro["labels"]).to(ps.device, ps.dtype)
                loss = weighted_token_loss(ps, tok, micro.get("weights"), total_tokens)
            else:
                loss, ps = self._token_loss(micro, tokens, divisor)
            self._backward(loss, last=i == len(micros) - 1)
            if i < real:  # filler micro batches (a short batch) return no per-sample loss
                per_sample.append(ps.detach())
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        assert loss_sum is not None
        loss_value, ps_host, grad_norm, applied = self._optimizer_step(loss_sum, torch.cat(per_sample))
        if applied:
            self.steps_done += 1
        return StepResult(loss_value, ps_host, lr, grad_norm, not applied)

    def _token_loss(self, micro: Batch, tokens: Any, divisor: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro batch under token selection: (its share of the step's masked loss, its per-sample
        losses over all its target tokens), from one training forward."""
        input_ids = micro["input_ids"].to(self.device)
        labels = micro["labels"].to(self.device)
        tl = token_ce(self._logits(input_ids), labels, self.chunk_tokens)
        ids = micro["ids"] if "ids" in micro else torch.arange(labels.shape[0])
        loss = tokens.loss(ids, input_ids, labels, tl, divisor, micro.get("weights"))
        counts = token_counts(labels).clamp(min=1).to(tl.dtype)
        return loss, tl.detach().sum(dim=1) / counts

    def evaluate(self, batches: Iterable[Batch], sample_hist: bool = False) -> float:
        """Token-mean loss over all batches of all ranks (every rank must pass the same count);
        sums stay on the device until the one all-reduce at the end. `sample_hist`: also the histogram of
        the per-sample losses over all ranks (`teacher.signals.histogram`, integer counts: the same on any
        world size) into `self.val_histogram`, one more all-reduce."""
        from attent_scale.teacher.signals import NUM_BINS, histogram

        self._set_train(False)
        acc = torch.zeros(2, dtype=torch.float64, device=self.device)
        hist = np.zeros(NUM_BINS, dtype=np.int64)
        try:
            with torch.no_grad():
                for batch in batches:
                    ps = self.per_sample_loss(batch)
                    tok = token_counts(batch["labels"]).to(ps.device, torch.float64)
                    acc += torch.stack([(ps.double() * tok).sum(), tok.sum()])
                    if sample_hist:
                        real = tok > 0
                        if "ids" in batch:
                            real &= batch["ids"].to(real.device) >= 0
                        hist += histogram(ps[real])
        finally:
            self._set_train(True)
        group = self.group
        acc = acc.to(collective_device(group))
        if group_size(group) > 1:
            dist.all_reduce(acc, group=group)
        if sample_hist:
            h = torch.from_numpy(hist).to(collective_device(group))
            if group_size(group) > 1:
                dist.all_reduce(h, group=group)
            self.val_histogram = h.cpu().numpy()
        ce_sum, n_tok = acc.tolist()
        self.host_syncs += 1
        return ce_sum / n_tok if n_tok > 0 else float("nan")
