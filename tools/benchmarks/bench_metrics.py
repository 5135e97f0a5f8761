"""Measure the metrics exporter's cost: ms per scrape of a populated exporter and the per-step API cost."""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request

from prometheus_client import generate_latest

from attent_scale.config import MetricsConfig
from attent_scale.metrics import PHASES, Metrics


def populate(m: Metrics, steps: int) -> dict[str, object]:
    """Feed ``steps`` steps the way the trainer does; returns the last totals."""
    totals: dict[str, object] = {}
    for step in range(1, steps + 1):
        totals = {"samples_trained": 16 * step, "samples_scored": 32 * step, "collective_bytes": 4096 * step,
                  "corrupt_samples": step // 100, "nonfinite_skipped": 0, "wall_seconds": 0.1 * step,
                  "selection_seconds_by_phase": {p: 0.001 * step for p in PHASES},
                  "selected_ratio": 0.5, "staleness_median": 3.0, "train_loss": 3.0, "val_loss": 3.1,
                  "tokens_trained": 2048 * step}
        m.observe_step(0.1, 3.0)
        m.update(totals)
        if step % 50 == 0:
            m.observe_selection({"score": 0.01, "collective": 0.002}, 0.5, 3.0)
            m.observe_checkpoint(1.0)
    return totals


def bench(steps: int, scrapes: int, interval: float) -> dict[str, float]:
    m = Metrics.create(MetricsConfig(enabled=True, port=0), rank=0, local_rank=0, node="bench")
    assert isinstance(m, Metrics) and m.port is not None
    try:
        populate(m, 100)  # warm up
        t0 = time.perf_counter()
        totals = populate(m, steps)
        per_step_us = (time.perf_counter() - t0) / steps * 1e6  # observe_step + update per step
        gen = []
        for _ in range(scrapes):
            t = time.perf_counter()
            body = generate_latest(m.registry)
            gen.append((time.perf_counter() - t) * 1e3)
        http = []
        for i in range(scrapes):
            t = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=10) as resp:
                resp.read()
            http.append((time.perf_counter() - t) * 1e3)
            if interval and i < 3:  # a few at the real interval, then back to back
                time.sleep(interval)
        # per-step cost while a scraper thread hits the exporter every 10 ms (100x a 1 s interval)
        stop = threading.Event()

        def scraper() -> None:
            while not stop.wait(0.01):
                with urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=10) as resp:
                    resp.read()

        thread = threading.Thread(target=scraper, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        populate(m, steps)
        per_step_scraped_us = (time.perf_counter() - t0) / steps * 1e6
        stop.set()
        thread.join()
        del totals
        return {
            "series_bytes": len(body),
            "generate_ms_median": statistics.median(gen),
            "scrape_http_ms_median": statistics.median(http),
            "scrape_http_ms_p95": sorted(http)[int(0.95 * (len(http) - 1))],
            "api_us_per_step": per_step_us,
            "api_us_per_step_while_scraped_every_10ms": per_step_scraped_us,
            "scrape_core_fraction_at_interval": statistics.median(http) / 1e3 / interval if interval else 0.0,
        }
    finally:
        m.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--scrapes", type=int, default=200)
    p.add_argument("--interval", type=float, default=1.0, help="scrape interval the fraction refers to (s)")
    p.add_argument("--step-ms", type=float, default=100.0,
                   help="a training step's wall time, for the percentages")
    args = p.parse_args(argv)
    r = bench(args.steps, args.scrapes, args.interval)
    r["overhead_pct_of_step"] = 100 * (r["api_us_per_step"] / 1e3) / args.step_ms
    r["overhead_pct_total_at_interval"] = (r["overhead_pct_of_step"]
                                           + 100 * r["scrape_core_fraction_at_interval"])
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
