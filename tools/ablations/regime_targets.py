"""Issue 21's targets, seed by seed, from the bench.json files of signal_regimes.sh (OUT/dup, noise, clean).

    python tools/ablations/regime_targets.py runs/signal-regimes/stdlib [--arm signal] [--raw hard]

dup: the arm reaches that seed's uniform final val loss within 0.6x uniform's training time and ends below
its random subset and uniform-short; noise: it ends below uniform, the raw-loss arm and its random subset;
clean: it ends within +0.01 of uniform in <= 1.02x uniform's time. Each row also says what the arm dropped
(mean share per selection, and the share of its drops that were copies, noise or swapped responses, from
OUT/data-REGIME's kinds.json and the arm's selection bits). A regime whose bench.json is missing is skipped.
Prints one row per regime and seed and a last line with how many targets held; exit 0 either way (a
benchmark, not a test).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import regimes  # noqa: E402  (the sibling tool: kinds of samples, dropped ids of a selection.jsonl)

DUP_TIME, CLEAN_LOSS, CLEAN_TIME = 0.6, 0.01, 1.02


def _arm(bench: dict[str, Any], name: str) -> dict[str, Any]:
    for arm in bench["arms"]:
        if arm["name"] == name:
            return arm
    raise SystemExit(f"regime_targets: no arm {name!r} in bench.json (arms: "
                     f"{', '.join(a['name'] for a in bench['arms'])})")


def _by_seed(bench: dict[str, Any], name: str) -> dict[int, dict[str, Any]]:
    return {int(s["seed"]): s for s in _arm(bench, name)["seeds"]}


def dropped_kinds(kinds: np.ndarray, selection: Path) -> str:
    """'dropped D% per selection, C% of them copy|noise' of one run's selection.jsonl (its selection bits)."""
    safe = np.isin(kinds, regimes.SAFE_KINDS)
    shares, n_drop, n_safe = [], 0, 0
    for _, ids in regimes.dropped_ids(selection, len(kinds)):
        shares.append(len(ids) / len(kinds))
        n_drop, n_safe = n_drop + len(ids), n_safe + int(safe[ids].sum())
    share = f"{100 * n_safe / n_drop:.0f}%" if n_drop else "none"
    return f"dropped {100 * float(np.mean(shares)):.1f}% per selection, copy|noise {share} of them"


def check(regime: str, bench: dict[str, Any], arm: str, raw: str, run_dir: Path | None = None
          ) -> list[tuple[int, str, bool]]:
    """(seed, one-line account, target held) per seed of one regime; `run_dir` (OUT) adds what was dropped."""
    kinds = None
    if run_dir is not None and (run_dir / f"data-{regime}" / "kinds.json").is_file():
        data = run_dir / f"data-{regime}"
        kinds = regimes.kinds_of_samples(data / "shards", data / "kinds.json")
    uni, sig = _by_seed(bench, "uniform"), _by_seed(bench, arm)
    controls = _arm(bench, arm)
    rnd, short = _by_seed(bench, controls["random_control"]), _by_seed(bench, controls["uniform_short"])
    rows = []
    for seed in sorted(sig):
        u, s, r, sh = uni[seed], sig[seed], rnd[seed], short[seed]
        d = s["final_val_loss"] - u["final_val_loss"]
        ratio = s["train_seconds"] / u["train_seconds"]
        base = (f"{regime:5s} seed {seed}: uniform {u['final_val_loss']:.4f} in {u['train_seconds']:.1f}s, "
                f"{arm} {s['final_val_loss']:.4f} ({d:+.4f}) in {ratio:.3f}x, "
                f"random {r['final_val_loss']:.4f}, short {sh['final_val_loss']:.4f}")
        if regime == "dup":
            t = s["time_to_target_seconds"]
            frac = t / u["train_seconds"] if t is not None else None
            ok = frac is not None and frac <= DUP_TIME and s["final_val_loss"] < min(
                r["final_val_loss"], sh["final_val_loss"])
            base += f"; reached uniform's final at {'never' if frac is None else f'{frac:.2f}x'}"
        elif regime == "noise":
            h = _by_seed(bench, raw)[seed]
            ok = s["final_val_loss"] < min(u["final_val_loss"], h["final_val_loss"], r["final_val_loss"])
            base += f", {raw} {h['final_val_loss']:.4f}"
        else:
            ok = d <= CLEAN_LOSS and s["train_seconds"] <= CLEAN_TIME * u["train_seconds"]
        sel = run_dir / regime / arm / f"seed-{seed}" / "selection.jsonl" if run_dir is not None else None
        if kinds is not None and sel is not None and sel.is_file():
            with contextlib.suppress(regimes.RegimeError):  # no selection bits (teacher.record_bits off)
                base += "; " + dropped_kinds(kinds, sel)
        rows.append((seed, base, ok))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="the signal_regimes.sh output directory (holds dup/, noise/, clean/)")
    p.add_argument("--arm", default="signal", help="the arm held to the targets")
    p.add_argument("--raw", default="hard", help="the raw-loss arm of the noise target")
    args = p.parse_args(argv)
    held = total = 0
    for regime in ("dup", "noise", "clean"):
        path = Path(args.out) / regime / "bench.json"
        if not path.is_file():
            print(f"{regime}: no {path}, skipped")
            continue
        for _, line, ok in check(regime, json.loads(path.read_text()), args.arm, args.raw,
                                 Path(args.out)):
            print(f"{'held' if ok else 'MISSED'}  {line}")
            held, total = held + ok, total + 1
    print(f"{held} of {total} seed targets held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
