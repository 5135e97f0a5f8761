"""Per-seed markdown table of a `bench.json`: each arm's final val loss, time and time to target per seed,
and, paired by seed, whether it ends below its random control and the nearest uniform-short.

    python tools/benchmarks/bench_seeds.py runs/selection-ablation/stdlib/bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def _per_seed(values: list[Any], spec: str) -> str:
    return " / ".join("not reached" if v is None else format(v, spec) for v in values)


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def _below(seeds: list[dict[str, Any]], control: dict[str, Any] | None) -> str:
    """In how many seeds the arm ends below `control` (paired by seed); empty without a control."""
    if control is None:
        return ""
    c = {s["seed"]: s["final_val_loss"] for s in control["seeds"]}
    return f"{sum(s['final_val_loss'] < c[s['seed']] for s in seeds)}/{len(seeds)}"


def table(report: dict[str, Any]) -> str:
    arms = report["arms"]
    by = {a["name"]: a for a in arms}
    uni = {s["seed"]: s for s in by["uniform"]["seeds"]}
    head = ("| arm | final val (mean ± sd) | per seed | Δ vs uniform | train CPU s | time / uniform | "
            "to uniform's final val / uniform's | charged (+ reference) | steps | selection % | "
            "below random control | below uniform-short |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for a in arms:
        seeds = a["seeds"]
        vals = [s["final_val_loss"] for s in seeds]
        times = [_ratio(s["train_seconds"], uni[s["seed"]]["train_seconds"]) for s in seeds]
        to_target = [_ratio(s["time_to_target_seconds"], uni[s["seed"]]["time_to_target_seconds"])
                     for s in seeds]
        charged = [None if not s.get("speedup_charged") else 1 / s["speedup_charged"] for s in seeds]
        # the controls bench judged the arm against (bench.json names them)
        short = by.get(a.get("uniform_short") or "")
        beat_ctl = _below(seeds, by.get(a.get("random_control") or ""))
        beat_short = f"{_below(seeds, short)} ({short['name']})" if short is not None else ""
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(
            f"| {a['name']} | {statistics.fmean(vals):.4f} ± {sd:.4f} | {_per_seed(vals, '.4f')} | "
            f"{a['val_loss_delta']:+.4f} | {a['train_seconds']:.1f} | {_per_seed(times, '.2f')} | "
            f"{_per_seed(to_target, '.2f')} | "
            f"{_per_seed(charged, '.2f') if a.get('reference_seconds') else ''} | "
            f"{a['steps']:.0f} | {100 * a['selection_fraction']:.1f} | {beat_ctl} | {beat_short} |"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench_json", type=Path)
    print(table(json.loads(p.parse_args().bench_json.read_text())))


if __name__ == "__main__":
    main()
