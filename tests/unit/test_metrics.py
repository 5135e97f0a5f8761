"""Per-rank Prometheus exporter: real HTTP scrapes checked for names, labels, totals, disabled mode, ports."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from attent_scale.config import MetricsConfig
from attent_scale.errors import UserError
from attent_scale.metrics import PHASES, Metrics, NullMetrics

CONTRACT = {
    "attent_selection_seconds", "attent_selection_overhead_ratio", "attent_selected_ratio",
    "attent_kept_token_ratio",
    "attent_samples_scored_total", "attent_samples_trained_total", "attent_train_loss_nats",
    "attent_val_loss_nats", "attent_score_staleness_steps", "attent_collective_sent_bytes_total",
    "attent_corrupt_samples_skipped_total", "attent_nonfinite_losses_skipped_total",
    "attent_checkpoint_seconds", "attent_step_seconds", "attent_tokens_trained_total",
    "attent_remote_read_retries_total", "attent_remote_unreachable_urls_total",
    "attent_remote_downloaded_bytes_total", "attent_remote_cache_hits_total",
}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape the exporter at loopback `port`: {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    hits = [v for (n, lab), v in samples.items() if n == name and all(dict(lab).get(k) == x
                                                                         for k, x in labels.items())]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def cfg(**kw: object) -> MetricsConfig:
    return MetricsConfig(**{"enabled": True, "port": 0, **kw})  # type: ignore[arg-type]


def test_names_labels_and_totals_agree_with_summary() -> None:
    m = Metrics.create(cfg(), rank=3, local_rank=1, node="n7", slurm_job_id="77")
    try:
        assert isinstance(m, Metrics) and m.port
        m.observe_step(0.2, train_loss=2.5)
        m.observe_selection({"score": 0.5, "collective": 0.1}, selected_ratio=0.4, staleness_median=3)
        m.update({"samples_trained": 10, "samples_scored": 7, "selection_seconds_by_phase":
                  {"score": 0.5, "collective": 0.1}})
        m.observe_eval(2.7)
        m.observe_checkpoint(1.5)
        summary = {"samples_trained": 40, "tokens_trained": 1280, "samples_scored": 70, "corrupt_samples": 2,
                   "nonfinite_skipped": 1, "collective_bytes": 4096, "wall_seconds": 10.0,
                   "selected_ratio": 0.6, "kept_token_share": 0.625, "remote_retries": 3,
                   "remote_unreachable": 1,
                   "remote_downloaded_bytes": 5000, "remote_cache_hits": 9,
                   "selection_seconds_by_phase": {"score": 1.25, "collective": 0.25, "select": 0.5,
                                                  "share": 0.0, "rebalance": 0.0}}
        m.update(summary)
        s = scrape(m.port)
        names = {n for n, _ in s}
        for name in CONTRACT:
            assert name in names or f"{name}_sum" in names, name
        for (name, lab) in s:
            if name.startswith("attent_"):
                assert {"slurm_job_id": "77", "rank": "3", "node": "n7"}.items() <= dict(lab).items(), name
                assert "job" not in dict(lab), name  # Prometheus's scrape job sets it
        # a rate is never exported beside its counter (Grafana takes rate() of the counter)
        assert not any(n.endswith("_per_second") for n in names)
        assert "attent_dropped_samples" not in names and "attent_train_loss" not in names  # old names
        assert value(s, "attent_samples_trained_total") == 40
        assert value(s, "attent_samples_scored_total") == 70
        assert value(s, "attent_tokens_trained_total") == 1280
        assert value(s, "attent_corrupt_samples_skipped_total") == 2
        assert value(s, "attent_nonfinite_losses_skipped_total") == 1
        assert value(s, "attent_collective_sent_bytes_total") == 4096
        assert value(s, "attent_remote_read_retries_total") == 3
        assert value(s, "attent_remote_unreachable_urls_total") == 1
        assert value(s, "attent_remote_downloaded_bytes_total") == 5000
        assert value(s, "attent_remote_cache_hits_total") == 9
        for phase in PHASES:
            got = value(s, "attent_selection_seconds_sum", phase=phase)
            assert got == pytest.approx(summary["selection_seconds_by_phase"][phase])  # type: ignore[index]
        assert value(s, "attent_selection_seconds_count", phase="score") == 2  # observe_selection + delta
        assert value(s, "attent_selection_overhead_ratio") == pytest.approx(0.2)
        assert value(s, "attent_selected_ratio") == 0.6
        assert value(s, "attent_kept_token_ratio") == 0.625
        assert value(s, "attent_score_staleness_steps") == 3
        assert value(s, "attent_train_loss_nats") == 2.5 and value(s, "attent_val_loss_nats") == 2.7
        assert value(s, "attent_step_seconds_count") == 1
        assert value(s, "attent_checkpoint_seconds_sum") == 1.5
    finally:
        m.close()
    m.close()  # idempotent


def test_restored_totals_are_exported_before_the_first_scrape(monkeypatch: pytest.MonkeyPatch) -> None:
    # a resumed run's counters must never read 0 between the exporter's start and the first step: Prometheus
    # would take the drop for a reset and increase() would count the restored totals twice
    from attent_scale.totals import RunTotals

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    tot = RunTotals(samples_trained=96, tokens_trained=3072, corrupt_samples=2)
    with Metrics.create(cfg(), rank=0, local_rank=0, node="n", totals=tot) as m:
        s = scrape(m.port)  # type: ignore[arg-type]
        assert value(s, "attent_samples_trained_total") == 96
        assert value(s, "attent_tokens_trained_total") == 3072
        assert value(s, "attent_corrupt_samples_skipped_total") == 2
        assert value(s, "attent_samples_trained_total", slurm_job_id="4242") == 96


def test_resume_first_update_carries_restored_totals() -> None:
    with Metrics.create(cfg(), rank=0, local_rank=0, node="n") as m:
        m.update({"samples_trained": 100, "selection_seconds_by_phase": {"score": 2.0}})
        m.update({"samples_trained": 100})  # no change, no double count
        s = scrape(m.port)  # type: ignore[arg-type]
        assert value(s, "attent_samples_trained_total") == 100
        assert value(s, "attent_selection_seconds_sum", phase="score") == 2.0


def test_tokens_trained_counts_each_ranks_own_tokens_so_the_sum_is_the_jobs() -> None:
    # the counter holds the rank's own tokens, so sums and rates of it add up to the job's
    ranks = [Metrics.create(cfg(port=0), rank=r, local_rank=r, node="n") for r in range(2)]
    try:
        for m, mine in zip(ranks, (300, 340), strict=True):
            m.observe_step(1.0)
            m.update({"tokens_trained": mine})
        scrapes = [scrape(m.port) for m in ranks]  # type: ignore[arg-type]
        assert sum(value(s, "attent_tokens_trained_total") for s in scrapes) == 640
        ranks[0].update({"tokens_trained": 600})  # cumulative: the counter advances by the delta
        assert value(scrape(ranks[0].port), "attent_tokens_trained_total") == 600  # type: ignore[arg-type]
    finally:
        for m in ranks:
            m.close()


@pytest.mark.parametrize("address", ["no-such-host.invalid", "a" * 300, "x..y", ""])
def test_unresolvable_address_is_one_line_naming_the_key(address: str) -> None:
    with pytest.raises(UserError, match=r"^config key 'metrics.address': cannot resolve ") as err:
        Metrics.create(cfg(address=address), rank=0, local_rank=0, node="n")
    assert "\n" not in str(err.value) and repr(address) in str(err.value)


def test_every_interface_address_warns_once(capsys: pytest.CaptureFixture[str]) -> None:
    for rank in range(2):
        with Metrics.create(cfg(address="0.0.0.0"), rank=rank, local_rank=rank, node="n") as m:
            assert scrape(m.port)  # type: ignore[arg-type]
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["attent-scale: warning: metrics.address=0.0.0.0: the exporters are unauthenticated "
                     "and listen on every interface; bind the cluster interface instead "
                     "(metrics.address: auto)"]
    with Metrics.create(cfg(address="127.0.0.1"), rank=0, local_rank=0, node="n"):
        pass
    assert capsys.readouterr().err == ""


def test_auto_address_binds_the_cluster_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    from attent_scale import dist as adist

    ifaces = adist._ipv4_ifaces()
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("ATTENT_SOCKET_IFNAME", raising=False)
    monkeypatch.setattr(adist, "_ipv4_ifaces", lambda: {**ifaces, "clu0": "127.0.0.9"})
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "clu0,eth1")  # what set_socket_ifname picked for gloo
    with Metrics.create(cfg(address="auto"), rank=0, local_rank=0, node="n") as m:
        assert m._server.server_address[0] == "127.0.0.9"  # type: ignore[attr-defined]
        with urllib.request.urlopen(f"http://127.0.0.9:{m.port}/metrics", timeout=10) as resp:
            assert b"attent_train_loss" in resp.read()
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    monkeypatch.setattr(adist, "route_iface", lambda master: "clu0")  # one host: the route to the master
    with Metrics.create(cfg(address="auto"), rank=0, local_rank=0, node="n") as m:
        assert m._server.server_address[0] == "127.0.0.9"  # type: ignore[attr-defined]


def test_disabled_is_a_noop_with_the_same_methods() -> None:
    m = Metrics.create(MetricsConfig(enabled=False), rank=0, local_rank=0, node="n")
    assert type(m) is NullMetrics and m.port is None
    m.update({"samples_trained": 1})
    m.observe_step(0.1, 1.0)
    m.observe_selection({"score": 1.0}, 0.5, 1.0)
    m.observe_eval(1.0)
    m.observe_checkpoint(1.0)
    m.close()
    public = {n for n in dir(Metrics) if not n.startswith("_") and callable(getattr(Metrics, n))}
    assert public - {"create"} <= {n for n in dir(NullMetrics) if not n.startswith("_")}


def test_port_in_use_is_a_clear_error_or_falls_back() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} .*already in use"):
            Metrics.create(cfg(port=port), rank=0, local_rank=0, node="n")
        with Metrics.create(cfg(port=port, port_fallback=True), rank=0, local_rank=0, node="n") as m:
            assert m.port is not None and m.port > port
            assert scrape(m.port)


def test_local_rank_offsets_the_port_and_exporters_are_independent() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1]
    a = Metrics.create(cfg(port=base, port_fallback=True), rank=0, local_rank=0, node="n")
    b = Metrics.create(cfg(port=base, port_fallback=True), rank=1, local_rank=1, node="n")
    try:
        assert a.port is not None and b.port is not None
        assert a.port >= base and b.port >= base + 1 and a.port != b.port
        a.update({"samples_trained": 5})
        b.update({"samples_trained": 9})
        assert value(scrape(a.port), "attent_samples_trained_total", rank="0") == 5  # type: ignore[arg-type]
        assert value(scrape(b.port), "attent_samples_trained_total", rank="1") == 9  # type: ignore[arg-type]
    finally:
        a.close()
        b.close()
