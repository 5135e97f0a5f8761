"""The Grafana dashboard's queries as tests evaluate them (with and without a live Prometheus), and the
unit each query's result has, worked out from the metric names it reads."""

from __future__ import annotations

import json
import re

from attent_scale import assets

DASHBOARD = assets.path("ops", "grafana", "attent-scale.json")

# the unit of each exported series: what a panel's axis must say about it (counters: what they count)
UNITS = {
    "attent_selection_seconds": "seconds", "attent_step_seconds": "seconds",
    "attent_checkpoint_seconds": "seconds",
    "attent_selection_overhead_ratio": "ratio", "attent_selected_ratio": "ratio",
    "attent_kept_token_ratio": "ratio",
    "attent_signal_dropped_ratio": "ratio",
    "attent_score_staleness_steps": "steps",
    "attent_signal_dropped_samples": "samples", "attent_source_samples": "samples",
    "attent_source_selected_samples": "samples", "attent_source_dropped_samples": "samples",
    "attent_source_floor_added_samples": "samples",
    "attent_signal_threshold_nats": "nats", "attent_signal_loss_quantile_nats": "nats",
    "attent_train_loss_nats": "nats", "attent_val_loss_nats": "nats", "attent_source_mean_loss_nats": "nats",
    "attent_tokens_trained_total": "tokens", "attent_samples_scored_total": "samples",
    "attent_samples_trained_total": "samples",
    "attent_corrupt_samples_skipped_total": "count", "attent_corrupt_sample_ids_total": "count",
    "attent_nonfinite_losses_skipped_total": "count",
    "attent_collective_sent_bytes_total": "bytes",
    "attent_remote_read_retries_total": "count", "attent_remote_unreachable_urls_total": "count",
    "attent_remote_downloaded_bytes_total": "bytes", "attent_remote_cache_hits_total": "count",
}
# a query's unit -> (Grafana unit, axis label) its panel must show
PANEL_UNIT = {
    "ratio": ("percentunit", None), "seconds": ("s", "seconds"), "bytes/s": ("Bps", "bytes / s"),
    "nats": ("none", "nats"), "steps": ("none", "steps"), "samples": ("short", None),
    "tokens/s": ("short", "tokens / s"), "samples/s": ("short", "samples / s"),
    "count": ("short", None),
}
_AGG = re.compile(r"^(sum|max|min|avg) (?:by \([^)]*\) )?\((.*)\)$", re.S)
_FUNC = re.compile(r"^(rate|increase)\((.*)\[[^\]]+\]\)$", re.S)
_QUANTILE = re.compile(r"^histogram_quantile\([0-9.]+, (.*)\)$", re.S)
_SELECTOR = re.compile(r"^(attent_[a-z_]+)(\{[^}]*\})?$")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def fill(expr: str, job: str, rank: str = ".*", slurm_job_id: str = ".*") -> str:
    """Template variables as Grafana would fill them."""
    return (expr.replace("$__rate_interval", "1m").replace("$job", job).replace("$rank", rank)
            .replace("$slurm_job_id", slurm_job_id))


def _split_division(expr: str) -> tuple[str, str] | None:
    depth = 0
    for i, ch in enumerate(expr):
        depth += ch in "({["
        depth -= ch in ")}]"
        if ch == "/" and depth == 0:
            return expr[:i].strip(), expr[i + 1:].strip()
    return None


def expr_unit(expr: str) -> str:
    """The unit of a dashboard query's result: seconds, ratio, nats, tokens/s, ... (AssertionError for a
    form this reader does not know, or a metric without a declared unit)."""
    expr = expr.strip()
    parts = _split_division(expr)
    if parts:
        num, den = (expr_unit(p) for p in parts)
        if den == "events":  # a histogram's _sum / _count: the mean of what it observes
            return num
        assert num == den, f"{expr}: divides {num} by {den}"
        return "ratio"
    m = _QUANTILE.match(expr)
    if m:  # a quantile of a histogram's buckets (whatever their rate or increase): what it observes
        (name,) = set(re.findall(r"\b(attent_[a-z_]+)_bucket\b", m.group(1)))
        return UNITS[name]
    m = _AGG.match(expr)
    if m:
        return expr_unit(m.group(2))
    m = _FUNC.match(expr)
    if m:
        inner = expr_unit(m.group(2))
        if m.group(1) == "increase":
            return inner
        return {"seconds": "ratio", "events": "events/s"}.get(inner, f"{inner}/s")
    m = _SELECTOR.match(expr)
    assert m, f"not a form the unit reader knows: {expr}"
    name = m.group(1)
    for suffix, unit in (("_bucket", None), ("_sum", None), ("_count", "events")):
        if name.endswith(suffix) and name.removesuffix(suffix) in UNITS:
            return unit or UNITS[name.removesuffix(suffix)]
    assert name in UNITS, f"{name}: no unit declared in tests/helpers/dashboard.py"
    return UNITS[name]
