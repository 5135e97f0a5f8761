"""The Grafana dashboard's queries as tests evaluate them (with and without a live Prometheus)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "tools" / "ops" / "grafana" / "attent-scale.json"


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def fill(expr: str, job: str, rank: str = ".*") -> str:
    """Template variables as Grafana would fill them."""
    return (expr.replace("$__rate_interval", "1m").replace("$job", job).replace("$rank", rank))
