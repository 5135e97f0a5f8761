"""Ops files without servers: target generator, shellcheck of launch scripts, dashboard vs live exporter."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dashboard import PANEL_UNIT, UNITS, dashboard, dashboard_exprs, expr_unit
from test_metrics import scrape

from attent_scale.config import MetricsConfig
from attent_scale.hostlist import expand_hostlist
from attent_scale.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [ROOT / "launch" / n for n in ("slurm_torchrun.sbatch", "slurm_srun.sbatch",
                                         "slurm_deepspeed.sbatch", "local.sh")]
TARGETS = [sys.executable, "-m", "attent_scale.ops.targets"]


@pytest.mark.parametrize(("text", "hosts"), [
    ("node1", ["node1"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a[1-2]-ib,b,c[9-10]", ["a1-ib", "a2-ib", "b", "c9", "c10"]),
    ("r[1-2]n[0-1]", ["r1n0", "r1n1", "r2n0", "r2n1"]),
])
def test_expand_hostlist(text: str, hosts: list[str]) -> None:
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("bad", ["a[1-2", "a]1", "a[x]", "a[3-1]"])
def test_expand_hostlist_rejects_bad_input(bad: str) -> None:
    with pytest.raises(ValueError):
        expand_hostlist(bad)


def test_write_targets_cli(tmp_path: Path) -> None:
    out = tmp_path / "sd" / "job.json"
    env = {"PATH": "/nonexistent", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*TARGETS, "--out", str(out), "--nodelist", "gpu[1-2]", "--ranks-per-node", "2",
                           "--base-port", "9500", "--slurm-job-id", "77"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    # no `job` label: Prometheus's job_name gives it, so `up{job=...}` lines up with the dashboard's $job
    assert json.loads(out.read_text()) == [
        {"targets": ["gpu1:9500", "gpu1:9501"], "labels": {"node": "gpu1", "slurm_job_id": "77"}},
        {"targets": ["gpu2:9500", "gpu2:9501"], "labels": {"node": "gpu2", "slurm_job_id": "77"}}]
    assert [p.name for p in out.parent.iterdir()] == ["job.json"]  # no temp file left behind
    # a configured Slurm's scontrol prints "x]" for "x[1-" with exit 0: the list is checked before asking it
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "x]"\n')
    fake.chmod(0o755)
    for path in ("/nonexistent", str(fake.parent)):
        bad = subprocess.run([*TARGETS, "--out", str(out), "--nodelist", "x[1-", "--ranks-per-node", "1"],
                             capture_output=True, text=True, env={**env, "PATH": path})
        assert bad.returncode == 2 and "unbalanced" in bad.stderr, path


def test_launch_scripts_are_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck not installed (Debian package shellcheck; .ci/run installs it)",
                    pytrace=False)
    proc = subprocess.run(["shellcheck", "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for script in SCRIPTS:
        text = script.read_text()
        assert "EDIT" in text and "ATTENT_VENV" in text, script
        if script.suffix == ".sbatch":
            assert "#SBATCH --signal=B:USR1@" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
            assert "#SBATCH --partition=" in text and "--gpus-per-node" in text


def test_dashboard_structure_and_metrics_exist_in_a_live_scrape() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"job", "slurm_job_id", "rank"} <= variables.keys()
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for word in ("phase", "overhead", "selected ratio", "loss", "tokens", "samples per second", "staleness",
                 "faults", "checkpoint", "per source", "dropped share", "dropped samples", "threshold"):
        assert word in titles, word
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
    with Metrics.create(MetricsConfig(enabled=True, port=0), rank=0, local_rank=0, node="n") as m:
        m.observe_sources([{"name": "data", "samples": 10, "selected": 4, "dropped": 6, "floor_added": 0,
                            "mean_loss": 2.5}])  # labelled by source: series exist once one is reported
        exported = {name for name, _ in scrape(m.port)}  # type: ignore[arg-type]
    used = {n for e in dashboard_exprs() for n in re.findall(r"\battent_[a-z_]+", e)}
    assert used, "no attent_ metric in the dashboard"
    assert not used - exported, f"dashboard uses metrics the exporter does not export: {used - exported}"
    # every query is filtered by the template variables
    for expr in dashboard_exprs():
        for sel in re.findall(r"attent_[a-z_]+(\{[^}]*\})?", expr):
            for var in ("job", "slurm_job_id", "rank"):
                assert f'{var}=~"${var}"' in sel, expr


def test_every_exported_series_has_a_unit_and_every_panel_one_axis_that_names_it() -> None:
    # Each query's unit is worked out from the metric names it reads (a histogram's _sum over its _count
    # is seconds, rate() of seconds is a share of wall time, of a token counter tokens/s, ...); a panel
    # shows one unit, the one its Grafana unit and axis label say: never counts beside a share, _sum
    # beside _count, tokens/s beside samples/s.
    with Metrics.create(MetricsConfig(enabled=True, port=0), rank=0, local_rank=0, node="n") as m:
        m.observe_sources([{"name": "data", "samples": 10, "selected": 4, "dropped": 6, "floor_added": 0,
                            "mean_loss": 2.5}])
        names = [name for name, _ in scrape(m.port)]  # type: ignore[arg-type]
    exported = {re.sub(r"_(bucket|sum|count)$", "", name) for name in names if not name.endswith("_created")}
    assert not exported - UNITS.keys(), f"exported without a declared unit: {exported - UNITS.keys()}"
    for name in exported:  # the name carries its unit (or, for a counter, what it counts)
        unit = UNITS[name]
        if unit in ("seconds", "nats", "ratio", "steps", "bytes"):
            assert name.removesuffix("_total").endswith(f"_{unit}"), name
    for panel in dashboard()["panels"]:
        units = {expr_unit(t["expr"]) for t in panel["targets"]}
        assert len(units) == 1, f"{panel['title']}: one axis holds {units}"
        (unit,) = units
        grafana, axis = PANEL_UNIT[unit]
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults["unit"] == grafana, (panel["title"], unit, defaults["unit"])
        label = defaults.get("custom", {}).get("axisLabel", "")
        assert label and (axis is None or label == axis), (panel["title"], unit, label)
        assert not panel["fieldConfig"]["overrides"], f"{panel['title']}: a second axis or unit"


def test_dashboard_units_reader_catches_the_old_mistakes() -> None:
    # the panels the issue found misleading, as they were: each reads as more than one unit
    sel = '{job=~"$job", slurm_job_id=~"$slurm_job_id", rank=~"$rank"}'
    assert {expr_unit(f"sum by (rank) (attent_checkpoint_seconds_sum{sel})"),
            expr_unit(f"sum by (rank) (attent_checkpoint_seconds_count{sel})")} == {"seconds", "events"}
    assert {expr_unit(f"max by (job) (attent_signal_dropped_ratio{sel})"),
            expr_unit(f"max by (reason) (attent_signal_dropped_samples{sel})")} == {"ratio", "samples"}
    assert {expr_unit(f"sum (rate(attent_tokens_trained_total{sel}[1m]))"),
            expr_unit(f"sum (rate(attent_samples_trained_total{sel}[1m]))")} == {"tokens/s", "samples/s"}
    assert expr_unit(f"sum by (rank, phase) (rate(attent_selection_seconds_sum{sel}[1m]))") == "ratio"
    assert PANEL_UNIT["ratio"][0] != "s"


def test_counters_are_read_through_rate_or_increase_never_raw() -> None:
    # a counter restarts at every process start: a raw counter plot jumps at every requeue
    for expr in dashboard_exprs():
        for name in re.findall(r"\battent_[a-z_]+_total\b", expr):
            assert re.search(rf"(rate|increase)\({name}\{{", expr), expr
    assert not any("attent_tokens_per_second" in e for e in dashboard_exprs())  # rate() of the counter
