"""Run totals: one typed record (and the one home of `PHASES`) that metrics.jsonl, Prometheus and summary.json
read as views."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# the selection phases, in the order every record, histogram and summary lists them
PHASES: tuple[str, ...] = ("score", "collective", "select", "share", "rebalance")


def _counter(attr: str) -> dict[str, str]:
    """Field metadata: a cumulative number that Prometheus counter `attr` follows by its deltas."""
    return {"counter": attr}


def _gauge(attr: str) -> dict[str, str]:
    """Field metadata: a level that Prometheus gauge `attr` shows."""
    return {"gauge": attr}


@dataclass
class RunTotals:
    """This rank's cumulative numbers at one moment (counts are this rank's own; summary.json sums them)."""

    steps: int = 0
    epoch: int = 0
    samples_trained: int = field(default=0, metadata=_counter("samples_trained"))
    tokens_trained: int = field(default=0, metadata=_counter("tokens_trained"))
    samples_scored: int = field(default=0, metadata=_counter("samples_scored"))
    selection_seconds_by_phase: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    collective_bytes: int = field(default=0, metadata=_counter("collective_bytes"))
    nonfinite_losses: int = 0
    nonfinite_skipped: int = field(default=0, metadata=_counter("nonfinite_skipped"))
    online_dropped_batches: int = 0
    corrupt_samples: int = field(default=0, metadata=_counter("corrupt_samples"))
    corrupt_ids: int = field(default=0, metadata=_counter("corrupt_ids"))  # distinct on this rank
    dropped_samples: int = 0
    # shards read from a URL (data/remote.py): this process's retries, URLs given up on, downloads, hits
    remote_retries: int = field(default=0, metadata=_counter("remote_retries"))
    remote_unreachable: int = field(default=0, metadata=_counter("remote_unreachable"))
    remote_downloaded_bytes: int = field(default=0, metadata=_counter("remote_downloaded_bytes"))
    remote_cache_hits: int = field(default=0, metadata=_counter("remote_cache_hits"))
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0
    eval_seconds: float = 0.0
    eval_cpu_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    wall_seconds: float = 0.0
    selected_ratio: float = field(default=1.0, metadata=_gauge("selected_ratio"))
    staleness_median: float = field(default=0.0, metadata=_gauge("staleness"))
    # teacher.unit token: kept target tokens / target tokens over the run, every rank's (None: unit sample)
    kept_token_share: float | None = field(default=None, metadata=_gauge("kept_token_ratio"))
    train_loss: float = field(default=float("nan"), metadata=_gauge("train_loss"))
    val_loss: float = field(default=float("nan"), metadata=_gauge("val_loss"))

    @property
    def selection_seconds(self) -> float:
        return sum(self.selection_seconds_by_phase.values())

    @property
    def selection_fraction(self) -> float:
        return self.selection_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Every field plus the derived selection seconds and fraction (the keys Metrics.update reads)."""
        out = dataclasses.asdict(self)
        out["selection_seconds"] = self.selection_seconds
        out["selection_fraction"] = self.selection_fraction
        return out

    def metrics_row(self, *, world: int, loss: float, lr: float, grad_norm: float,
                    tokens_per_second: float) -> dict[str, Any]:
        """One metrics.jsonl line: this step's numbers beside the job's running totals."""
        return {
            "step": self.steps,
            "epoch": self.epoch,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_second": tokens_per_second,
            "samples_trained": self.samples_trained * world,  # equal shares on every rank
            "samples_scored": self.samples_scored,
            "selection_seconds": self.selection_seconds,
            "selected_ratio": self.selected_ratio,
            **({} if self.kept_token_share is None else {"kept_token_share": self.kept_token_share}),
            "train_seconds": self.train_seconds,
            "wall_seconds": self.wall_seconds,
        }

    def summary(self, *, job: Mapping[str, Any], summed: Mapping[str, int], corrupt_ids: int,
                per_rank: list[dict[str, Any]]) -> dict[str, Any]:
        """summary.json: `job` (world size, engine, ...) first, then the totals with the counts in `summed`
        (samples_trained, tokens_trained, samples_scored, corrupt_samples) summed over ranks and
        `corrupt_ids` distinct over ranks, then every rank's own row."""
        return {
            **job,
            "steps": self.steps,
            "epochs_started": self.epoch + 1,
            "samples_trained": int(summed["samples_trained"]),
            "tokens_trained": int(summed["tokens_trained"]),
            "samples_scored": int(summed["samples_scored"]),
            "corrupt_samples": int(summed["corrupt_samples"]),
            "corrupt_ids": corrupt_ids,
            "dropped_samples": self.dropped_samples,
            "nonfinite_skipped": self.nonfinite_skipped,
            "nonfinite_losses": self.nonfinite_losses,
            "online_dropped_batches": self.online_dropped_batches,
            "final_train_loss": self.train_loss,
            "final_val_loss": self.val_loss,
            "wall_seconds": self.wall_seconds,
            "train_seconds": self.train_seconds,
            "train_cpu_seconds": self.train_cpu_seconds,
            "eval_seconds": self.eval_seconds,
            "eval_cpu_seconds": self.eval_cpu_seconds,
            "checkpoint_seconds": self.checkpoint_seconds,
            "selection_seconds": self.selection_seconds,
            "selection_seconds_by_phase": dict(self.selection_seconds_by_phase),
            "selection_fraction": self.selection_fraction,
            "collective_bytes": self.collective_bytes,
            **{k: int(summed[k]) for k in REMOTE_KEYS if k in summed},
            "last_selected_ratio": self.selected_ratio,
            "kept_token_share": self.kept_token_share,
            "per_rank": per_rank,
        }

    def rank_row(self) -> list[float]:
        """The numbers summary.json lists per rank, flat (all-gathered once at the end); see `rank_entry`."""
        return [*(self.selection_seconds_by_phase[p] for p in PHASES), self.samples_trained,
                self.samples_scored, self.selection_seconds]

    @staticmethod
    def rank_entry(rank: int, row: list[float]) -> dict[str, Any]:
        """One rank's summary.json entry from its `rank_row`."""
        n = len(PHASES)
        return {"rank": rank, "selection_seconds_by_phase": dict(zip(PHASES, row[:n], strict=True)),
                "samples_trained": row[n], "samples_scored": row[n + 1], "selection_seconds": row[n + 2]}


REMOTE_KEYS: tuple[str, ...] = ("remote_retries", "remote_unreachable", "remote_downloaded_bytes",
                                 "remote_cache_hits")


def remote_totals(stats: Mapping[str, int]) -> dict[str, int]:
    """The RunTotals fields of data.remote.stats() (retries, unreachable, downloaded_bytes, cache_hits)."""
    return {k: int(stats.get(k.removeprefix("remote_"), 0)) for k in REMOTE_KEYS}


def prometheus_fields(kind: str) -> dict[str, str]:
    """RunTotals field -> the Prometheus attribute of `kind` ("counter" or "gauge") that shows it."""
    return {f.name: f.metadata[kind] for f in dataclasses.fields(RunTotals) if kind in f.metadata}


def teacher_totals(stats: Mapping[str, Any], **known: Any) -> dict[str, Any]:
    """The totals a Teacher's `stats` give (scored samples, bytes, non-finite scores, phase seconds,
    staleness), plus the `known` fields of the caller (RunTotals field names): what every trainer, ours
    and integrations/hf.py's, reports from its teacher."""
    unknown = set(known) - {f.name for f in dataclasses.fields(RunTotals)}
    if unknown:
        raise TypeError(f"not RunTotals fields: {sorted(unknown)}")
    return {
        "samples_scored": int(stats.get("samples_scored", 0)),
        "collective_bytes": int(stats.get("bytes_sent", 0)),
        "nonfinite_losses": int(stats.get("nonfinite", 0)),
        "selection_seconds_by_phase": {p: float(stats.get(f"seconds_{p}", 0.0)) for p in PHASES},
        "staleness_median": float(stats.get("last_staleness_median") or 0),
        **known,
    }
