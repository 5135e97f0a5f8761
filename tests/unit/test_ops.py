"""Ops files without servers: target generator, shellcheck of launch scripts, dashboard vs live exporter."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dashboard import DASHBOARD, dashboard_exprs
from test_metrics import scrape

from attent_scale.config import MetricsConfig
from attent_scale.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "ops" / "prometheus"))
import write_targets  # noqa: E402

SCRIPTS = [ROOT / "launch" / n for n in ("slurm_torchrun.sbatch", "slurm_deepspeed.sbatch", "local.sh")]


@pytest.mark.parametrize(("text", "hosts"), [
    ("node1", ["node1"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a[1-2]-ib,b,c[9-10]", ["a1-ib", "a2-ib", "b", "c9", "c10"]),
    ("r[1-2]n[0-1]", ["r1n0", "r1n1", "r2n0", "r2n1"]),
])
def test_expand_hostlist(text: str, hosts: list[str]) -> None:
    assert write_targets.expand_hostlist(text) == hosts


@pytest.mark.parametrize("bad", ["a[1-2", "a]1", "a[x]", "a[3-1]"])
def test_expand_hostlist_rejects_bad_input(bad: str) -> None:
    with pytest.raises(ValueError):
        write_targets.expand_hostlist(bad)


def test_write_targets_cli(tmp_path: Path) -> None:
    out = tmp_path / "sd" / "job.json"
    script = ROOT / "tools/ops/prometheus/write_targets.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(out),
                           "--nodelist", "gpu[1-2]", "--ranks-per-node", "2", "--base-port", "9500",
                           "--job", "77"], capture_output=True, text=True, env={"PATH": "/nonexistent"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text()) == [
        {"targets": ["gpu1:9500", "gpu1:9501"], "labels": {"job": "77", "node": "gpu1"}},
        {"targets": ["gpu2:9500", "gpu2:9501"], "labels": {"job": "77", "node": "gpu2"}}]
    assert [p.name for p in out.parent.iterdir()] == ["job.json"]  # no temp file left behind
    # a configured Slurm's scontrol prints "x]" for "x[1-" with exit 0: the list is checked before asking it
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "x]"\n')
    fake.chmod(0o755)
    for path in ("/nonexistent", str(fake.parent)):
        bad = subprocess.run([sys.executable, str(ROOT / "tools/ops/prometheus/write_targets.py"), "--out",
                              str(out), "--nodelist", "x[1-", "--ranks-per-node", "1"], capture_output=True,
                             text=True, env={"PATH": path})
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
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"job", "rank"} <= variables.keys()
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for word in ("phase", "overhead", "selected ratio", "loss", "throughput", "staleness", "faults",
                 "checkpoint", "per source", "dropped", "threshold"):
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
            assert 'job=~"$job"' in sel and 'rank=~"$rank"' in sel, expr


def test_throughput_panel_rates_the_per_rank_token_counter_not_a_sum_of_job_wide_gauges() -> None:
    # attent_tokens_per_second is each rank's estimate of the whole job's rate: summed over ranks it
    # would read world x the real rate; the counter holds each rank's own tokens, so its rates add up
    dash = json.loads(DASHBOARD.read_text())
    panel = next(p for p in dash["panels"] if p["title"] == "Throughput")
    exprs = [t["expr"] for t in panel["targets"]]
    assert any(e.startswith("sum by (job) (rate(attent_tokens_trained_total{") for e in exprs), exprs
    for expr in dashboard_exprs():
        assert not re.search(r"\bsum\b[^(]*\([^()]*attent_tokens_per_second", expr), expr
