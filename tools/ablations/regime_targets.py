"""Issue 21's or issue 29's targets, seed by seed, from the bench.json files of signal_regimes.sh (OUT/dup,
noise, clean) or learn_regimes.sh / learn_smollm2.sh (OUT/span, dup, noise, clean, constrained, repeats,
swapped).

    python tools/ablations/regime_targets.py runs/signal-regimes/stdlib [--arm signal] [--raw hard]
    python tools/ablations/regime_targets.py runs/learn-regimes/stdlib --issue 29 [--arm signal --arm learn]

Issue 21 (the default):
dup: the arm reaches that seed's uniform final val loss within 0.6x uniform's training time and ends below
its random subset and uniform-short; noise: it ends below uniform, the raw-loss arm and its random subset;
clean: it ends within +0.01 of uniform in <= 1.02x uniform's time. Each row also says what the arm dropped
(mean share per selection, and the share of its drops that were copies, noise or swapped responses, from
OUT/data-REGIME's kinds.json and the arm's selection bits). A regime whose bench.json is missing is skipped.
Prints one row per regime and seed and a last line with how many targets held; exit 0 either way (a
benchmark, not a test).

Issue 29 (`--issue 29`): each regime's oracle gap first (uniform − oracle, its seed spread and the ratio:
a regime judges a teacher only at >= 3x), then per arm and seed, with the reference's seconds charged:
swapped (SFT): recovers >= 2/3 of the oracle's gain at <= 1.0x uniform's time; span (and noise): ends below
uniform by >= 3x uniform's seed spread and below its random control (the random mask of a token arm) at
<= 1.1x uniform's time; dup: reaches uniform's final val at <= 0.6x its time and beats both controls;
constrained: reaches uniform's best val at <= 0.8x uniform's time to it; repeats: within +0.01 of uniform
(or a win) and its bench sentence names no case its numbers contradict; clean: within +0.01 at <= 1.05x.
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
# issue 29's targets
GAP_SHARE, SWAP_TIME, SPAN_SPREADS, SPAN_TIME, BEST_TIME, CLEAN29_TIME = 2 / 3, 1.0, 3.0, 1.1, 0.8, 1.05
REGIMES_29 = ("span", "swapped", "dup", "noise", "constrained", "repeats", "clean")


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


def gap_line(regime: str, bench: dict[str, Any]) -> str:
    """The regime's oracle gap in one line (bench.json `oracle_gap`), or why there is none."""
    gap = bench.get("oracle_gap")
    if not gap:
        return f"{regime:11s} no oracle (no clean twin: uniform is the reference)"
    ratio = "—" if gap["ratio"] is None else f"{gap['ratio']:.1f}x"
    per = " / ".join(f"{g:+.4f}" for g in gap["final_per_seed"])
    spread = "—" if gap["uniform_spread"] is None else f"{gap['uniform_spread']:.4f}"
    verdict = "judges a teacher" if gap["judges"] else "CANNOT judge a teacher (under 3x the spread)"
    return (f"{regime:11s} oracle gap {gap['final']:+.4f} (per seed {per}; paired sd "
            f"{gap['final_std'] or 0:.4f}) = {ratio} uniform's seed spread {spread}: {verdict}")


def _charged(p: dict[str, Any]) -> float:
    return float(p["train_seconds"]) + float(p.get("reference_seconds") or 0.0)


def check29(regime: str, bench: dict[str, Any], arm: str) -> list[tuple[int, str, bool]]:
    """(seed, one-line account, target held) per seed of `arm` in one regime, issue 29's target."""
    uni, sig = _by_seed(bench, "uniform"), _by_seed(bench, arm)
    meta = _arm(bench, arm)
    rnd = _by_seed(bench, meta["random_control"]) if meta.get("random_control") else {}
    short = _by_seed(bench, meta["uniform_short"]) if meta.get("uniform_short") else {}
    finals = [uni[s]["final_val_loss"] for s in sorted(uni)]
    spread = float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0
    said = " ".join(t for t in bench.get("data_case", []) if t.startswith(f"{arm}: "))
    rows = []
    for seed in sorted(sig):
        u, s = uni[seed], sig[seed]
        d = s["final_val_loss"] - u["final_val_loss"]
        ratio = _charged(s) / u["train_seconds"]
        line = (f"{regime:11s} {arm} seed {seed}: {s['final_val_loss']:.4f} ({d:+.4f} vs uniform "
                f"{u['final_val_loss']:.4f}) at {ratio:.3f}x uniform's time (charged)")
        ctl = [c[seed]["final_val_loss"] for c in (rnd, short) if seed in c]
        below_ctl = all(s["final_val_loss"] < c for c in ctl)
        if regime == "swapped":
            g = s.get("gap_recovered")
            ok = g is not None and g >= GAP_SHARE and ratio <= SWAP_TIME
            line += f"; recovered {'—' if g is None else f'{100 * g:.0f}%'} of the oracle gap"
        elif regime in ("span", "noise"):
            r = rnd.get(seed)
            ok = (d <= -SPAN_SPREADS * spread and r is not None and s["final_val_loss"] < r["final_val_loss"]
                  and ratio <= SPAN_TIME)
            r_val = "—" if r is None else f"{r['final_val_loss']:.4f}"
            line += (f"; {SPAN_SPREADS:g}x uniform's spread = {SPAN_SPREADS * spread:.4f}; "
                     f"{meta.get('random_control')} {r_val}")
        elif regime == "dup":
            t = s.get("time_to_target_seconds")
            frac = None if t is None else (t + float(s.get("reference_seconds") or 0.0)) / u["train_seconds"]
            ok = frac is not None and frac <= DUP_TIME and bool(ctl) and below_ctl
            at = "never" if frac is None else f"{frac:.2f}x"
            line += f"; uniform's final at {at}, below both controls: {below_ctl}"
        elif regime == "constrained":
            sp = s.get("speedup_best_charged")
            ok = sp is not None and 1 / sp <= BEST_TIME
            line += (f"; uniform's best {s.get('uniform_best_val_loss') or float('nan'):.4f} reached at "
                     f"{'never' if sp is None else f'{1 / sp:.2f}x'} uniform's time to it")
        elif regime == "repeats":
            contradicts = bool(said) and "to drop" in said and not meta.get("wins")
            ok = (d <= CLEAN_LOSS or bool(meta.get("wins"))) and not contradicts
            line += f"; sentence {'CONTRADICTS the numbers' if contradicts else 'consistent'}"
        else:  # clean
            ok = d <= CLEAN_LOSS and ratio <= CLEAN29_TIME
        rows.append((seed, line, ok))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="the signal_regimes.sh / learn_regimes.sh output directory (holds REGIME/)")
    p.add_argument("--arm", action="append", default=None,
                   help="the arm held to the targets (repeatable with --issue 29; default signal)")
    p.add_argument("--raw", default="hard", help="issue 21: the raw-loss arm of the noise target")
    p.add_argument("--issue", type=int, choices=(21, 29), default=21, help="whose targets")
    args = p.parse_args(argv)
    arms = args.arm or ["signal"]
    if args.issue == 29:
        return main29(Path(args.out), arms)
    args.arm = arms[0]
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


def main29(out: Path, arms: list[str]) -> int:
    """Issue 29: every regime's oracle gap first, then each arm's target seed by seed."""
    benches = {}
    for regime in REGIMES_29:
        path = out / regime / "bench.json"
        if path.is_file():
            benches[regime] = json.loads(path.read_text())
    if not benches:
        print(f"no REGIME/bench.json under {out} (regimes: {', '.join(REGIMES_29)})")
        return 0
    for regime, bench in benches.items():
        print(gap_line(regime, bench))
    held = total = 0
    for regime, bench in benches.items():
        for arm in arms:
            if arm not in {a["name"] for a in bench["arms"]}:
                print(f"{regime:11s} {arm}: not in this bench, skipped")
                continue
            for _, line, ok in check29(regime, bench, arm):
                print(f"{'held' if ok else 'MISSED'}  {line}")
                held, total = held + ok, total + 1
    print(f"{held} of {total} seed targets held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
