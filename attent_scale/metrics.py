"""Prometheus exporter per rank: the metric names, labels and the API the trainer feeds them through.

One exporter per process, listening on ``cfg.address:cfg.port + local_rank`` (``auto``: this host's address
on the cluster interface, see ``dist.cluster_address``) with its own private
``CollectorRegistry`` (so several exporters can live in one process, e.g. in tests). Every series carries
the labels ``rank``, ``node`` and ``slurm_job_id`` (``$SLURM_JOB_ID``, empty outside Slurm, which Prometheus
reads as no label), set once at start. The exporter never sets ``job``: that is the scrape config's
``job_name`` (tools/ops/prometheus/prometheus.yml), so ``up{job=...}`` and the series of one scrape job
carry the same ``job``. Names carry their unit (``_seconds``, ``_bytes``, ``_nats``, ``_ratio``; counters
end in ``_total`` and say what they count); a rate is never exported, Grafana takes ``rate()`` of the
counter.

API (the trainer calls only these; ``Metrics.create`` returns a no-op ``NullMetrics`` with the same
methods when ``cfg.enabled`` is false)::

    m = Metrics.create(cfg.metrics, rank=rank, local_rank=local_rank, node=socket.gethostname(),
                       totals=None)                   # the restored totals of a resumed run, exported
                                                      # before the first scrape (no drop to 0)
    m.port                                            # actual port (None when disabled)
    m.update(totals)                                  # CUMULATIVE numbers: a totals.RunTotals (or a dict
                                                      # of some of its fields)
    m.observe_step(seconds, train_loss)
    m.observe_selection(phase_seconds={}, selected_ratio=None, staleness_median=None)
    m.observe_sources(sources)                        # a selection record's "sources" (per source)
    m.observe_eval(val_loss)
    m.observe_checkpoint(seconds)
    m.close()                                         # waits metrics.linger_seconds first

``update(totals)`` reads these keys (all optional, missing ones are left alone; unknown keys ignored):
``samples_trained``, ``samples_scored``, ``corrupt_samples``, ``corrupt_ids`` (distinct per rank: their
sum over ranks can exceed summary.json's global distinct count), ``nonfinite_skipped``, ``collective_bytes``,
``remote_retries``, ``remote_unreachable``, ``remote_downloaded_bytes``, ``remote_cache_hits`` (shard URLs),
``tokens_trained`` (this rank's own target tokens)
(cumulative counts: each counter advances by the delta since the last call, so after a final ``update``
with the numbers written to summary.json a scrape agrees with summary.json by construction, also after
a resume, where the first call carries the restored totals), ``selection_seconds_by_phase``
({phase: cumulative seconds}; the part not yet observed through ``observe_selection`` is observed into
the ``attent_selection_seconds`` histogram, so its ``_sum`` equals the total), ``wall_seconds``
(cumulative training wall time; overhead ratio = sum of phase seconds / wall_seconds), and the gauges
``selected_ratio``, ``kept_token_share``, ``staleness_median``, ``train_loss``, ``val_loss``.

``observe_selection(phase_seconds)`` takes the *increments* of those same per-phase seconds (one
selection event); it is optional — a trainer that only calls ``update`` gets one histogram observation
per phase per ``update`` call with the time spent since the previous call.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from attent_scale.config import MetricsConfig
from attent_scale.errors import UserError
from attent_scale.totals import PHASES, RunTotals, prometheus_fields

CONST_LABELS: tuple[str, ...] = ("slurm_job_id", "rank", "node")
FALLBACK_TRIES = 100  # ports tried after the configured one when port_fallback is on
ALL_INTERFACES = ("0.0.0.0", "::")  # metrics.address values that listen on every interface
AUTO = "auto"  # metrics.address: the cluster interface the job's sockets use (the sbatch scripts' default)

# RunTotals field -> counter attribute (counters advance by the delta of these cumulative numbers)
COUNTER_KEYS: dict[str, str] = prometheus_fields("counter")
# RunTotals field -> gauge attribute
GAUGE_KEYS: dict[str, str] = prometheus_fields("gauge")

_SELECTION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_CKPT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_EPS = 1e-9


def bind_address(address: str, rank: int = 0) -> str:
    """The address to listen on: `address` itself, or for `auto` this host's address on the cluster
    interface (dist.cluster_address), loopback with one warning where the host has none."""
    if address != AUTO:
        return address
    from attent_scale.dist import cluster_address

    found = cluster_address()
    if found is None:
        if rank == 0:
            print("attent-scale: warning: metrics.address=auto: no non-loopback IPv4 interface here; "
                  "the exporters listen on 127.0.0.1", file=sys.stderr, flush=True)
        return "127.0.0.1"
    return found


def check_address(address: str) -> None:
    """`metrics.address` must resolve on this host: else one line naming the key and the value."""
    try:
        socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as exc:  # an over-long label is a UnicodeError (idna)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserError(f"config key 'metrics.address': cannot resolve {address!r} ({reason})") from None


class NullMetrics:
    """Metrics switched off: every method is a no-op; ``port`` is None."""

    port: int | None = None

    def update(self, totals: RunTotals | Mapping[str, Any]) -> None:
        """Take the cumulative totals (a RunTotals, or a mapping of some of its fields); see the module
        docstring."""

    def observe_step(self, seconds: float, train_loss: float | None = None) -> None:
        """Record one optimizer step: its wall seconds and its train loss (nats)."""

    def observe_selection(self, phase_seconds: Mapping[str, float] | None = None,
                          selected_ratio: float | None = None,
                          staleness_median: float | None = None) -> None:
        """Record one selection event: per-phase seconds (increments), the ratio chosen, staleness."""

    def observe_sources(self, sources: list[Mapping[str, Any]]) -> None:
        """Record what the last selection kept of each source (teacher/floors.py:source_report)."""

    def observe_signal(self, signal: Mapping[str, Any]) -> None:
        """Record what one strategy-signal selection dropped (the record's "signal" entry)."""

    def observe_eval(self, val_loss: float) -> None:
        """Record a held-out evaluation."""

    def observe_checkpoint(self, seconds: float) -> None:
        """Record the wall seconds one checkpoint save took."""

    def close(self) -> None:
        """Stop the exporter (idempotent)."""

    def __enter__(self) -> NullMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Metrics(NullMetrics):
    """A live exporter for one rank; build it with ``Metrics.create``."""

    def __init__(self, *, rank: int, node: str, slurm_job_id: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {"slurm_job_id": slurm_job_id, "rank": str(rank), "node": node}
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port = None
        self._last: dict[str, float] = {}
        self.linger_seconds = 0.0
        self._phase_observed: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._phase_total: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._define()

    # ---- metric definitions (the names are the contract; the dashboard relies on them)
    def _define(self) -> None:
        reg, names, lab = self.registry, list(CONST_LABELS), self.labels

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, names, registry=reg).labels(**lab)

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, names, registry=reg).labels(**lab)

        def gauge_by(name: str, doc: str, *extra: str) -> Any:
            """A gauge with labels beyond the rank's (reason, rule, source): `.labels(**lab, ...)` each."""
            return Gauge(name, doc, [*names, *extra], registry=reg)

        self._selection = Histogram(
            "attent_selection_seconds", "Seconds spent selecting, by phase (score/collective/select/"
            "share/rebalance)", [*names, "phase"], registry=reg, buckets=_SELECTION_BUCKETS)
        self.selection = {p: self._selection.labels(**lab, phase=p) for p in PHASES}
        self.overhead_ratio = gauge("attent_selection_overhead_ratio",
                                    "Selection seconds (all phases) / training wall seconds")
        self.selected_ratio = gauge("attent_selected_ratio", "Fraction of samples the last selection kept")
        self.kept_token_ratio = gauge("attent_kept_token_ratio", "teacher.unit token: share of the target "
                                      "tokens the token selection kept over the run (0 otherwise)")
        self.staleness = gauge("attent_score_staleness_steps",
                               "Median age in steps of the scores the last selection used")
        self.dropped_ratio = gauge("attent_signal_dropped_ratio",
                                   "Share of the observed samples the last signal selection dropped")
        self.dropped = gauge_by("attent_signal_dropped_samples", "Samples the last signal selection dropped, "
                                "by reason (memorized/learned/unlearnable; capped: candidates kept by the "
                                "ratio cap)", "reason")
        self.signal_threshold = gauge_by("attent_signal_threshold_nats", "Cut points of the last signal "
                                         "selection's rule (memorized/learned/unlearnable/min_fall/excess)",
                                         "rule")
        self.signal_quantile = gauge_by("attent_signal_loss_quantile_nats", "Quantiles of the per-sample "
                                        "losses at the last signal selection: of=train (ledger), val (last "
                                        "val pass), fall (previous - last train loss)", "of", "q")
        # every series exists from the start (0 until a signal selection): the dashboard has data in any run
        for reason in ("memorized", "learned", "unlearnable", "capped"):
            self.dropped.labels(**lab, reason=reason)
        for rule in ("memorized", "learned", "unlearnable", "min_fall", "excess"):
            self.signal_threshold.labels(**lab, rule=rule)
        for of in ("train", "val", "fall"):
            for q in ("q05", "q25", "q50", "q75", "q95"):
                self.signal_quantile.labels(**lab, of=of, q=q)
        self.train_loss = gauge("attent_train_loss_nats", "Train loss of the last step (mean token "
                                "cross-entropy, nats)")
        self.val_loss = gauge("attent_val_loss_nats", "Held-out validation loss of the last evaluation "
                              "(nats)")
        self.tokens_trained = counter("attent_tokens_trained", "Target tokens this rank trained on (its "
                                      "rate() is the rank's token throughput; summed over ranks, the job's)")
        self.samples_scored = counter("attent_samples_scored", "Samples scored by the teacher")
        self.samples_trained = counter("attent_samples_trained", "Samples trained on")
        self.corrupt_samples = counter("attent_corrupt_samples_skipped",
                                       "Corrupt samples replaced by filler and skipped")
        self.corrupt_ids = counter("attent_corrupt_sample_ids",
                                   "Distinct corrupt sample ids this rank met (excluded from selection)")
        self.nonfinite_skipped = counter("attent_nonfinite_losses_skipped",
                                         "Steps or scores skipped because of a non-finite loss")
        self.collective_bytes = counter("attent_collective_sent_bytes",
                                        "Bytes this rank sent in selection collectives")
        self.remote_retries = counter("attent_remote_read_retries",
                                      "Reads of a shard URL retried after a transient error")
        self.remote_unreachable = counter("attent_remote_unreachable_urls",
                                          "Shard URLs given up on after the retries (or missing)")
        self.remote_downloaded_bytes = counter("attent_remote_downloaded_bytes",
                                               "Bytes of shards downloaded into the local cache")
        self.remote_cache_hits = counter("attent_remote_cache_hits",
                                         "Shard opens served from the local cache")
        # per source of a blend (a plain data.dir is one source): gauges of the last selection, label
        # `source` = data.sources[*].name (a handful of values, never an id)
        self.source_gauges = {
            "samples": gauge_by("attent_source_samples", "Training ids of the source (after weights)",
                                "source"),
            "selected": gauge_by("attent_source_selected_samples", "Ids of the source the last selection "
                                 "kept", "source"),
            "dropped": gauge_by("attent_source_dropped_samples", "Ids of the source the last selection "
                                "dropped", "source"),
            "floor_added": gauge_by("attent_source_floor_added_samples",
                                    "Ids the source's floor added to the last selection", "source"),
            "mean_loss": gauge_by("attent_source_mean_loss_nats", "Mean last observed loss over the source's "
                                  "ids at the last selection (nats)", "source"),
        }
        self.step_seconds = Histogram("attent_step_seconds", "Wall seconds per optimizer step", names,
                                      registry=reg, buckets=_STEP_BUCKETS).labels(**lab)
        self.checkpoint_seconds = Histogram("attent_checkpoint_seconds", "Wall seconds per checkpoint save",
                                            names, registry=reg, buckets=_CKPT_BUCKETS).labels(**lab)

    @classmethod
    def create(cls, cfg: MetricsConfig, *, rank: int, local_rank: int, node: str | None = None,
               slurm_job_id: str | None = None, totals: RunTotals | Mapping[str, Any] | None = None,
               ) -> NullMetrics:
        """Start this rank's exporter on ``cfg.port + local_rank`` (a NullMetrics when disabled).
        ``slurm_job_id`` None: ``$SLURM_JOB_ID`` (or none); ``totals``: exported before the server starts,
        so a resumed run's counters go on from the restored totals and never read 0 in between (which
        Prometheus would take for a counter reset)."""
        if not cfg.enabled:
            return NullMetrics()
        address = bind_address(cfg.address, rank)
        check_address(address)
        if address in ALL_INTERFACES and rank == 0:
            print(f"attent-scale: warning: metrics.address={address}: the exporters are unauthenticated "
                  "and listen on every interface; bind the cluster interface instead (metrics.address: "
                  "auto)", file=sys.stderr, flush=True)
        if slurm_job_id is None:
            slurm_job_id = os.environ.get("SLURM_JOB_ID", "")
        metrics = cls(rank=rank, node=node or socket.gethostname(), slurm_job_id=slurm_job_id)
        metrics.linger_seconds = cfg.linger_seconds
        if totals is not None:
            metrics.update(totals)
        metrics._serve(address, cfg.port + local_rank if cfg.port else 0, cfg.port_fallback)
        return metrics

    def _serve(self, address: str, port: int, fallback: bool) -> None:
        tries = FALLBACK_TRIES + 1 if fallback and port else 1
        for candidate in range(port, min(port + tries, 65536)) if port else [0]:
            try:
                self._server, self._thread = start_http_server(candidate, addr=address,
                                                               registry=self.registry)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise UserError(f"metrics exporter: cannot listen on {address}:{candidate} "
                                    f"(metrics.address / metrics.port: {exc.strerror or exc})") from None
                if not fallback:
                    raise UserError(f"metrics exporter: port {candidate} on {address} is already in use "
                                    "(set metrics.port to a free port or metrics.port_fallback: true)"
                                    ) from None
                continue
            self.port = int(self._server.server_address[1])
            return
        raise UserError(f"metrics exporter: no free port in {port}..{port + tries - 1} on {address}")

    # ---- the trainer's API
    def update(self, totals: RunTotals | Mapping[str, Any]) -> None:
        if isinstance(totals, RunTotals):
            totals = totals.as_dict()
        with self._lock:
            for key, attr in COUNTER_KEYS.items():
                value = totals.get(key)
                if value is None:
                    continue
                value = float(value)
                delta = value - self._last.get(key, 0.0)
                if delta > 0:
                    getattr(self, attr).inc(delta)
                self._last[key] = value
            phases = totals.get("selection_seconds_by_phase") or {}
            for phase, seconds in phases.items():
                if phase not in self.selection:
                    continue
                self._phase_total[phase] = float(seconds)
                delta = float(seconds) - self._phase_observed[phase]
                if delta > _EPS:
                    self.selection[phase].observe(delta)
                    self._phase_observed[phase] = float(seconds)
            wall = totals.get("wall_seconds")
            if wall:
                self.overhead_ratio.set(sum(self._phase_total.values()) / float(wall))
            for key, attr in GAUGE_KEYS.items():
                value = totals.get(key)
                if value is not None:
                    getattr(self, attr).set(float(value))

    def observe_step(self, seconds: float, train_loss: float | None = None) -> None:
        self.step_seconds.observe(seconds)
        if train_loss is not None:
            self.train_loss.set(train_loss)

    def observe_selection(self, phase_seconds: Mapping[str, float] | None = None,
                          selected_ratio: float | None = None,
                          staleness_median: float | None = None) -> None:
        with self._lock:
            for phase, seconds in (phase_seconds or {}).items():
                if phase in self.selection and seconds > 0:
                    self.selection[phase].observe(seconds)
                    self._phase_observed[phase] += float(seconds)
        if selected_ratio is not None:
            self.selected_ratio.set(selected_ratio)
        if staleness_median is not None:
            self.staleness.set(staleness_median)

    def observe_sources(self, sources: list[Mapping[str, Any]]) -> None:
        for row in sources:
            for key, gauge in self.source_gauges.items():
                value = row.get(key)
                if value is not None:
                    gauge.labels(**self.labels, source=str(row["name"])).set(float(value))

    def observe_signal(self, signal: Mapping[str, Any]) -> None:
        lab = self.labels
        self.dropped_ratio.set(float(signal.get("dropped_share") or 0.0))
        for reason in ("memorized", "learned", "unlearnable", "capped"):
            self.dropped.labels(**lab, reason=reason).set(float((signal.get("reasons") or {}).get(reason, 0)))
        for rule, value in (signal.get("thresholds") or {}).items():
            self.signal_threshold.labels(**lab, rule=rule).set(float(value))
        for of, key in (("train", "loss"), ("val", "val"), ("fall", "fall")):
            for q, value in (signal.get(key) or {}).items():
                if q.startswith("q"):
                    self.signal_quantile.labels(**lab, of=of, q=q).set(float(value))

    def observe_eval(self, val_loss: float) -> None:
        self.val_loss.set(val_loss)

    def observe_checkpoint(self, seconds: float) -> None:
        self.checkpoint_seconds.observe(seconds)

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            time.sleep(self.linger_seconds)  # metrics.linger_seconds: let Prometheus take a last scrape
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
