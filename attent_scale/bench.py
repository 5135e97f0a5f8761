"""`attent-scale bench`: arms differing only in the teacher, run back to back; time-to-target vs uniform."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attent_scale import launcher
from attent_scale.config import add_override_argument
from attent_scale.errors import UserError
from attent_scale.runlog import read_jsonl, write_json

BASELINE = "uniform"
ORACLE = "oracle"  # uniform on the regime's clean twin (--oracle-data): what a perfect teacher could reach
RANDOM_MASK = "random-mask"  # token-unit arms' control: a random token mask of the arm's kept share
RESERVED = (BASELINE, ORACLE, "random-subset", "uniform-short", RANDOM_MASK)
BAR_DESC = "train"  # the trainer's tqdm description (train.py `_progress_bar`)
CLOCK_KEYS = {"wall": "train_seconds", "cpu": "train_cpu_seconds"}
DEFAULT_ARM = "attent"  # without --arms: one arm, the config's own teacher as it is
# keys that define the subset schedule; a random-subset control copies them and swaps the strategy
SCHEDULE_KEYS = (
    "mode",
    "ratio_schedule",
    "initial_ratio",
    "final_ratio",
    "total_cycles",
    "interval_schedule",
    "initial_interval",
    "max_interval",
    "warmup_epochs",
    "full_epochs_per_cycle",
    "online_ratio",
    "anneal_fraction",
)
# strategies whose ratio is a cap: a random control keeps the share the arm kept (known once it has run)
KEPT_SIZED = ("signal", "learn")
# --clock cpu: every arm runs on one thread (set here, not left to the caller's environment)
CPU_CLOCK_THREADS = 1
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ATTENT_NUM_THREADS")


@dataclass
class Arm:
    name: str
    overrides: dict[str, str] = field(default_factory=dict)
    role: str = "attent"  # attent | baseline | control
    text: str = ""  # the --arms value it came from, for messages

    def set_args(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.overrides.items()]


def parse_arm(text: str) -> Arm:
    """`name:key=value,key=value`; a key without a section means `teacher.<key>`."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name or name in (BASELINE, "random-subset", "uniform-short") or "/" in name:
        raise UserError(f"--arms {text!r}: arm name must be non-empty, without '/', and not a reserved name")
    overrides: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UserError(f"--arms {text!r}: {item!r} is not key=value")
        if "." in key and not key.startswith("teacher."):  # arms differ only in the teacher
            raise UserError(f"--arms {text!r}: {key} is not a teacher key; an arm changes only teacher.* "
                            "keys (a change for every arm goes in --set)")
        overrides[key if "." in key else f"teacher.{key}"] = value
    overrides.setdefault("teacher.mode", "cycle")
    if overrides["teacher.mode"] == "none":
        raise UserError(f"--arms {text!r}: teacher.mode=none is the '{BASELINE}' arm, added by itself")
    return Arm(name, overrides, text=text)


def default_arm(teacher: Any) -> Arm:
    """The arm run without --arms: the config's teacher unchanged (its mode and strategy made explicit so
    that the controls follow them); a config without a teacher has nothing to compare."""
    if teacher.mode == "none":
        raise UserError("bench: the config's teacher.mode is none (plain training, the "
                        f"'{BASELINE}' arm): set teacher.mode in the config or give --arms")
    return Arm(DEFAULT_ARM, {"teacher.mode": str(teacher.mode), "teacher.strategy": str(teacher.strategy)})


def random_control(arm: Arm, base: Any = None) -> Arm:
    """Random subset of the same size and schedule. For `prune` (weighted): a constant ratio equal to the
    kept fraction, every kept id weighted by N / k (1 / P(kept), the arm's rule) unless reweight=false.
    `base`: the bench's TeacherConfig, for prune keys the arm does not set."""
    schedule = {k: v for k, v in arm.overrides.items() if k.split(".", 1)[1] in SCHEDULE_KEYS}
    schedule["teacher.strategy"] = "random"
    if arm.overrides.get("teacher.strategy") == "prune":
        def get(key: str) -> float:
            return float(arm.overrides.get(f"teacher.{key}", getattr(base, key) if base is not None else 0.5))
        kept = 1.0 - get("prune_ratio") * (get("prune_quantile") or 0.5)
        schedule.update({"teacher.ratio_schedule": "constant", "teacher.initial_ratio": f"{kept:g}",
                         "teacher.final_ratio": f"{kept:g}"})
        reweight = arm.overrides.get("teacher.reweight", str(getattr(base, "reweight", True)).lower())
        schedule.pop("teacher.reweight", None)
        schedule["teacher.random_reweight"] = reweight
    if arm.overrides.get("teacher.strategy") in KEPT_SIZED:  # its size is known once the arm has run
        schedule.update({"teacher.ratio_schedule": "constant", "teacher.initial_ratio": "<kept>",
                         "teacher.final_ratio": "<kept>"})
    return Arm(f"random-subset[{arm.name}]", schedule, role="control")


def kept_share(runs: list[dict[str, Any]]) -> float:
    """Mean share of the ids a strategy-signal arm's selections kept, over its seeds and subset epochs
    (the size of its random control)."""
    shares = [r["n_selected"] / (r["n_selected"] + r["signal"]["dropped"]) for run in runs
              for r in run["selections"] if r.get("signal")]
    return round(statistics.fmean(shares), 4) if shares else 1.0


def data_sentence(name: str, runs: list[dict[str, Any]], paid: bool | None = None,
                  numbers: str = "") -> str | None:
    """The one sentence on which case the data is in, from arm `name`'s selection records. `paid`: whether
    the run's own numbers say the arm paid off (None: not known). The teacher's sentence is "<what it
    dropped>: <what that means>"; a meaning the numbers contradict (data with something to drop on a run
    that did not pay off, nothing to drop on one that did) is replaced by what the numbers say."""
    from attent_scale.teacher import learnability, signals

    records = [r for run in runs for r in run["selections"]]
    text = learnability.explain(records) or signals.explain(records)
    if text is None:
        return None
    seen, _, claim = text.rpartition(": ")  # the meaning is the last clause ("...: this data has ...")
    if not seen:
        seen, claim = claim, ""
    claims_gain = seen.startswith("the teacher dropped")  # a case is named only where something was dropped
    if paid is not None and claim and ((claims_gain and not paid) or (paid and seen.startswith(
            "the teacher kept") and "expect no speedup" in claim)):
        claim = ("yet it paid off on this run" if paid else "on this run that did not pay off") + (
            f" ({numbers})" if numbers else "")
    text = f"{seen}: {claim}" if claim else seen
    return f"{name}: {text[0].upper()}{text[1:]}."


# ---------------------------------------------------------------------------------------- oracle, masks

def check_reserved(arms: list[Arm]) -> None:
    """UserError for an --arms name that a bench arm of its own uses (uniform, oracle, the controls)."""
    for arm in arms:
        if arm.name in RESERVED or arm.name.startswith(tuple(f"{r}[" for r in RESERVED)):
            raise UserError(f"--arms {arm.name}: a reserved arm name ({', '.join(RESERVED)})")


def oracle_arm(data: str, steps: str = "uniform") -> Arm:
    """Uniform on the regime's clean twin `data` (the train split without the injected noise or copies,
    the same val split and tokenizer): what the noise costs uniform. `steps`: `uniform` (as many steps as
    uniform trained, LR decayed over them: the same compute on clean data) or `budget` (the bench's budget:
    an epoch budget trains fewer steps on a smaller twin, and short of convergence the missing steps cost
    more than the noise did: measured, the whole-document noise regime's oracle ended 0.10 above uniform)."""
    overrides = {"teacher.mode": "none", "data.dir": str(data)}
    if steps == "uniform":
        overrides.update({"train.max_steps": "<uniform-steps>", "train.max_epochs": "0",
                          "train.max_seconds": "0"})
    return Arm(ORACLE, overrides, role="oracle")


def check_oracle_data(data: str, oracle: str) -> None:
    """UserError unless `oracle` holds the same val split (shard by shard: samples, tokens, sha256) with
    the same tokenizer and sequence length as `data`: only then are the two arms' val losses comparable."""
    from attent_scale.data.manifest import Manifest

    a, b = Manifest.load(data, check_files=False), Manifest.load(oracle, check_files=False)
    if a.tokenizer_sha256 != b.tokenizer_sha256 or a.seq_len != b.seq_len:
        raise UserError(f"--oracle-data {oracle}: its tokenizer or seq_len is not --data {data}'s (build it "
                        f"with `shards build --tokenizer {data}/tokenizer.model` and the same --seq-len)")

    def val(m: Manifest) -> list[tuple[int, int, str]]:
        return [(info.count, info.tokens, info.sha256) for info in m.shards("val")]

    if val(a) != val(b):
        raise UserError(f"--oracle-data {oracle}: its val split is not --data {data}'s ({len(val(b))} val "
                        f"shards against {len(val(a))}, or other bytes; same --val-input for both)")


def is_token_arm(arm: Arm) -> bool:
    """An arm whose teacher selects tokens, not samples (teacher.unit: token)."""
    return arm.overrides.get("teacher.unit") == "token"


def mask_control(arm: Arm) -> Arm:
    """A token-unit arm's control: its schedule with a random token mask (teacher.strategy random) that
    keeps the share of target tokens the arm kept (teacher.token_ratio, sized once the arm has run)."""
    schedule = {k: v for k, v in arm.overrides.items() if k.split(".", 1)[1] in SCHEDULE_KEYS}
    schedule.update({"teacher.unit": "token", "teacher.strategy": "random", "teacher.token_ratio": "<kept>"})
    return Arm(f"{RANDOM_MASK}[{arm.name}]", schedule, role="control")


def kept_token_share(arm: Arm, runs: list[dict[str, Any]]) -> float:
    """The mean share of target tokens a token-unit arm kept over its seeds (summary.json
    `kept_token_share`), else its own teacher.token_ratio."""
    shares = [r["kept_token_share"] for r in runs if r.get("kept_token_share") is not None]
    if shares:
        return round(statistics.fmean(shares), 4)
    if "teacher.token_ratio" in arm.overrides:
        return float(arm.overrides["teacher.token_ratio"])
    raise UserError(f"bench arm {arm.name}: teacher.unit token, but its summary.json has no kept_token_share "
                    "and it sets no teacher.token_ratio: its random-mask control cannot be sized")


def token_sentence(name: str, runs: list[dict[str, Any]], paid: bool | None = None,
                   numbers: str = "") -> str | None:
    """A token-unit arm's sentence: the share of target tokens its loss kept (summary.json
    `kept_token_share`, mean over seeds), and whether that paid off on this run (None: not known)."""
    shares = [r["kept_token_share"] for r in runs if r.get("kept_token_share") is not None]
    if not shares:
        return None
    text = (f"{name}: The loss kept {100 * statistics.fmean(shares):.1f}% of the target tokens (teacher.unit "
            f"token; {RANDOM_MASK}[{name}] kept the same share at random)")
    if paid is not None:
        text += "; it paid off on this run" if paid else "; it did not pay off on this run"
        text += f" ({numbers})" if numbers else ""
    return text + "."


# ---------------------------------------------------------------------------------------- best val, gap

def best_point(curve: list[tuple[float, float, float]]) -> tuple[float | None, float | None]:
    """(the lowest val loss of a curve, the clock seconds of its first evaluation at that loss): what
    early stopping on val would have kept."""
    pts = [(loss, sec) for sec, _, loss in curve if loss is not None and math.isfinite(loss)]
    if not pts:
        return None, None
    best = min(loss for loss, _ in pts)
    return best, next(sec for loss, sec in pts if loss == best)


BEST_KEYS = ("best_val_loss", "uniform_best_val_loss", "uniform_best_seconds", "uniform_train_seconds",
             "time_to_best_seconds", "time_to_best_charged", "speedup_best_charged", "final_delta",
             "best_delta")


def add_best_val(scored: dict[str, Any], runs: list[dict[str, Any]],
                 baseline: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Judge against uniform's best val, not only its last (issue 29): per seed, uniform's best val loss
    and when it reached it (what early stopping gives), this arm's time to that loss with its reference
    charged and the speedup to it, its final-val delta against uniform's final and against uniform's best;
    then their means and spreads (`scored`: score_arm's result for `runs`, updated and returned)."""
    by_seed = {run["seed"]: run for run in runs}
    for p in scored["seeds"]:
        run, base = by_seed[p["seed"]], baseline[p["seed"]]
        u_best, u_sec = best_point(base["curve"])
        t = interpolate_target(run["curve"], u_best)[0] if u_best is not None else None
        charged = None if t is None else t + p.get("reference_seconds", 0.0)
        u_final = base["summary"]["final_val_loss"]
        p.update({
            "best_val_loss": best_point(run["curve"])[0],
            "uniform_best_val_loss": u_best,
            "uniform_best_seconds": u_sec,
            "uniform_final_val_loss": u_final,
            "uniform_train_seconds": base["clock_seconds"],
            "time_to_best_seconds": t,
            "time_to_best_charged": charged,
            "speedup_best_charged": (u_sec / charged) if (charged and u_sec is not None) else None,
            "final_delta": p["final_val_loss"] - u_final,
            "best_delta": None if u_best is None else p["final_val_loss"] - u_best,
        })
    for key in BEST_KEYS:
        scored[key], scored[f"{key}_std"] = _mean_spread([p[key] for p in scored["seeds"]])
    return scored


def oracle_gap(arms: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What the regime's noise costs uniform: uniform − oracle per seed, on the final val loss and on the
    best; the mean, the paired spread, uniform's own seed spread (std of its final val over seeds) and the
    gap in units of that spread. A regime judges a teacher only where `ratio` >= 3 (issue 29). Then each
    arm's `gap_recovered` per seed: (uniform final − arm final) / gap."""
    by = {a["name"]: a for a in arms}
    if ORACLE not in by or BASELINE not in by:
        return None
    u = {p["seed"]: p for p in by[BASELINE]["seeds"]}
    o = {p["seed"]: p for p in by[ORACLE]["seeds"]}
    seeds = sorted(u.keys() & o.keys())
    final = [u[s]["final_val_loss"] - o[s]["final_val_loss"] for s in seeds]
    best = [u[s]["best_val_loss"] - o[s]["best_val_loss"] for s in seeds
            if u[s].get("best_val_loss") is not None and o[s].get("best_val_loss") is not None]
    spread = statistics.stdev([u[s]["final_val_loss"] for s in seeds]) if len(seeds) > 1 else None
    mean, paired = _mean_spread(final)
    gap = {"seeds": seeds, "final": mean, "final_std": paired, "final_per_seed": final,
           "best": _mean_spread(best)[0] if len(best) == len(seeds) else None,
           "best_std": _mean_spread(best)[1] if len(best) == len(seeds) else None, "best_per_seed": best,
           "uniform_spread": spread, "ratio": (mean / spread) if (mean is not None and spread) else None}
    gap["judges"] = bool(gap["ratio"] is not None and gap["ratio"] >= 3 and min(final) > 0)
    per = dict(zip(seeds, final, strict=True))
    for a in arms:
        for p in a["seeds"]:
            g = per.get(p["seed"])
            p["gap_recovered"] = ((u[p["seed"]]["final_val_loss"] - p["final_val_loss"]) / g
                                  if g is not None and g > 0 else None)
        shares = [p["gap_recovered"] for p in a["seeds"]]
        a["gap_recovered"] = statistics.fmean(shares) if shares and None not in shares else None
        a["gap_recovered_min"] = min(shares) if shares and None not in shares else None
    return gap


def format_gap(gap: dict[str, Any] | None, arms: list[dict[str, Any]]) -> list[str]:
    """The lines above a regime's table: the oracle gap first, then uniform's best val (early stopping)."""
    lines = []
    if gap is not None:
        ratio = "—" if gap["ratio"] is None else f"{gap['ratio']:.1f}x"
        lines.append(
            f"oracle gap (uniform − oracle, final val): {_fmt(gap['final'], '+.4f')} ± "
            f"{_fmt(gap['final_std'], '.4f')} over {len(gap['seeds'])} seeds (per seed "
            f"{' / '.join(f'{g:+.4f}' for g in gap['final_per_seed'])}) = {ratio} uniform's seed spread "
            f"{_fmt(gap['uniform_spread'], '.4f')}; best val {_fmt(gap['best'], '+.4f')} ± "
            f"{_fmt(gap['best_std'], '.4f')}"
            + ("" if gap["judges"] else " — under 3x the spread: this regime cannot judge a teacher"))
    base = next((a for a in arms if a["name"] == BASELINE), None)
    if base is not None and base.get("uniform_best_val_loss") is not None:
        at = [p["uniform_best_seconds"] / p["uniform_train_seconds"] for p in base["seeds"]
              if p.get("uniform_best_seconds") is not None and p.get("uniform_train_seconds")]
        lines.append(
            f"uniform's best val (what early stopping gives): {base['uniform_best_val_loss']:.4f} ± "
            f"{_fmt(base['uniform_best_val_loss_std'], '.4f')}, reached at "
            f"{' / '.join(f'{x:.2f}' for x in at)} of its time; final {base['final_val_loss']:.4f}")
    return lines


def verdict(a: dict[str, Any], controls: list[dict[str, Any]]) -> tuple[bool, str]:
    """(wins, the verdict line's reason) of one arm from all three numbers: the time to uniform's best val
    (its reference charged), the final val against uniform's final and best, and the controls. An arm wins
    where it beats every control on final val AND either reaches uniform's best val sooner than uniform
    did (`faster`) or ends below uniform's best within uniform's time (`better`)."""
    above = [c for c in controls if a["final_val_loss"] > c["final_val_loss"]]
    speed = a.get("speedup_best_charged")
    faster = speed is not None and speed > 1.0
    t_best, u_time = a.get("time_to_best_charged"), a.get("uniform_train_seconds")
    better = (a.get("best_delta") is not None and a["best_delta"] < 0 and t_best is not None
              and u_time is not None and t_best <= u_time)
    parts = []
    if speed is None:
        parts.append("never reaches uniform's best val" if a.get("time_to_best_seconds") is None
                     else "reaches uniform's best val")
    else:
        parts.append(f"reaches uniform's best val at {1 / speed:.2f}x uniform's time to it")
    parts.append(f"ends {_fmt(a.get('final_delta'), '+.4f')} vs uniform's final, "
                 f"{_fmt(a.get('best_delta'), '+.4f')} vs its best")
    for c in controls:
        parts.append(f"{'above' if c in above else 'below'} {c['name']} "
                     f"({a['final_val_loss'] - c['final_val_loss']:+.4f})")
    wins = bool(not above and (faster or better))
    how = " and ".join(w for w, ok in (("faster", faster), ("better", better)) if ok)
    return wins, (f"wins ({how})" if wins else "no") + ": " + "; ".join(parts)


def interpolate_target(
    points: list[tuple[float, float, float]], target: float
) -> tuple[float | None, float | None]:
    """First (seconds, samples) where the val-loss curve reaches `target`, linear between evaluations."""
    prev = None
    for seconds, samples, loss in points:
        if loss is not None and loss <= target:
            if prev is None or prev[2] is None or prev[2] == loss:
                return seconds, samples
            frac = (prev[2] - target) / (prev[2] - loss)
            return prev[0] + frac * (seconds - prev[0]), prev[1] + frac * (samples - prev[1])
        prev = (seconds, samples, loss)
    return None, None


def budget_overrides(args: argparse.Namespace) -> list[str]:
    """One budget for every arm: steps, epochs (the paper's unit; subset epochs are shorter) or seconds."""
    sets = []
    if getattr(args, "budget_steps", 0):
        sets.append(f"train.max_steps={args.budget_steps}")
    if getattr(args, "budget_epochs", 0):
        sets += [f"train.max_epochs={args.budget_epochs}", "train.max_steps=1000000000"]
    if args.budget_seconds:
        sets += [f"train.max_seconds={args.budget_seconds}", "train.max_steps=1000000000"]
    return sets


def run_with_bar(cmd: list[str], log_path: Path, label: str, env: dict[str, str] | None = None) -> int:
    """Run one arm's trainer: its output goes to `log_path`, its progress bar to this terminal as `label`.

    The trainer draws a tqdm bar on stderr (ATTENT_PROGRESS=1); its frames are relayed under the arm's
    label, live when stderr is a terminal, else once at the end. Every other line goes to the log.
    """
    live = sys.stderr.isatty()
    width = shutil.get_terminal_size().columns - 1
    last = ""
    with log_path.open("w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, env={**(env or os.environ), "ATTENT_PROGRESS": "1"}, stdout=log,
                                stderr=subprocess.PIPE)
        assert proc.stderr is not None
        try:
            pending = b""
            for chunk in iter(lambda: proc.stderr.read1(65536), b""):
                *pieces, pending = re.split(rb"[\r\n]", pending + chunk)
                for piece in pieces:
                    text = piece.decode(errors="replace")
                    if text.startswith(f"{BAR_DESC}:"):
                        last = label + text[len(BAR_DESC):]
                        if live:
                            sys.stderr.write("\r" + last[:width].ljust(width))
                            sys.stderr.flush()
                    elif text:
                        log.write(text + "\n")
            if pending:
                log.write(pending.decode(errors="replace") + "\n")
        finally:  # interrupted or failed while relaying: do not leave the trainer running
            if proc.poll() is None:
                proc.terminate()
        code = proc.wait()
    if last:
        sys.stderr.write(("\r" + last[:width].ljust(width) if live else last) + "\n")
        sys.stderr.flush()
    return code


def arm_sets(arm: Arm, seed: int, args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The `--set` overrides one arm's run gets on top of the base config."""
    sets = [
        f"run_dir={run_dir}",
        f"seed={seed}",
        f"data.dir={args.data}",
        "checkpoint.resume=false",
        *args.overrides,
        *budget_overrides(args),
        *arm.set_args(),  # last: a control's own budget (uniform-short) wins
    ]
    if args.init_from:
        sets.append(f"model.init_from={Path(args.init_from) / 'export' / 'model'}")
    return sets


def check_args(args: argparse.Namespace) -> None:
    """The counts and budgets a bench needs, before anything runs: one line naming the flag."""
    for flag, value in (("--seeds", args.seeds), ("--budget-steps", args.budget_steps or 1),
                        ("--budget-epochs", args.budget_epochs or 1)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    if args.budget_seconds < 0 or args.budget_seconds != args.budget_seconds:
        raise UserError(f"--budget-seconds {args.budget_seconds}: must be positive")


def check_arm_configs(arms: list[Arm], args: argparse.Namespace, out_dir: Path) -> None:
    """Every arm's run config (base config, --set, budget, the arm's keys) loads, before the first run:
    a bad key or value is one line naming the arm, not an arm that fails after the others trained."""
    from attent_scale.config import load_config

    for arm in arms:
        try:
            load_config(args.config, arm_sets(arm, args.seed, args, out_dir / arm.name / "check"))
        except UserError as exc:
            if not arm.text:  # no --arms value of its own: the base config, --set or a budget is wrong
                raise
            raise UserError(f"--arms {arm.text!r}: {exc}") from None


def arm_command(
    arm: Arm, seed: int, args: argparse.Namespace, out_dir: Path
) -> tuple[Path, list[str], list[str]]:
    """One arm's run for one seed: its run dir, the trainer command and that command's `--set` list."""
    run_dir = out_dir / arm.name / f"seed-{seed}"
    sets = arm_sets(arm, seed, args, run_dir)
    cmd = [*launcher.command(launcher=args.launcher), "--config", str(args.config)]
    for s in sets:
        cmd += ["--set", s]
    return run_dir, cmd, sets


def run_arm(arm: Arm, seed: int, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Run one arm for one seed as its own process; return what the run directory says."""
    run_dir, cmd, _ = arm_command(arm, seed, args, out_dir)
    stamp = run_dir / "bench-command.json"
    t0 = time.perf_counter()
    # --reuse: a finished run of the very same command is read back instead of trained again
    reusable = (args.reuse and (run_dir / "summary.json").exists() and stamp.exists()
                and json.loads(stamp.read_text()) == cmd[1:])
    label = f"{arm.name} seed {seed}"
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "bench.log").open("a") as log:  # the commands go to the log, not the terminal
        log.write(f"{label}{' (reused)' if reusable else ''}: {shlex.join(cmd)}\n")
    if not reusable:
        run_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if args.clock == "cpu":  # multi-threaded phases would count their CPU time once per thread
            env.update({name: str(CPU_CLOCK_THREADS) for name in THREAD_ENV})
        code = run_with_bar(cmd, run_dir / "train.log", label, env)
        if code != 0:
            tail = "\n".join((run_dir / "train.log").read_text(errors="replace").splitlines()[-15:])
            raise UserError(f"bench arm {arm.name} (seed {seed}) exited with {code} "
                            f"(log: {run_dir / 'train.log'}):\n{tail}")
        stamp.write_text(json.dumps(cmd[1:]))
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"{label}: {summary['steps']} steps, {summary['samples_trained']} samples, "
          f"{summary['train_seconds']:.1f} s training, final val loss {summary['final_val_loss']:.4f}"
          f"{' (reused)' if reusable else ''}", file=sys.stderr, flush=True)
    evals = read_jsonl(run_dir / "eval.jsonl")
    steps = read_jsonl(run_dir / "metrics.jsonl")
    sel_path = run_dir / "selection.jsonl"
    return {
        "selections": read_jsonl(sel_path) if sel_path.exists() else [],
        "seed": seed,
        "summary": summary,
        "process_seconds": time.perf_counter() - t0,
        # time axis: wall seconds, or process CPU seconds (--clock cpu) on a machine shared with other work
        "curve": [(e[CLOCK_KEYS[args.clock]], e["samples_trained"], e["val_loss"]) for e in evals],
        "clock_seconds": summary[CLOCK_KEYS[args.clock]],
        "threads": summary.get("torch_threads"),
        "ratio": [(m["step"], m.get("selected_ratio", 1.0)) for m in steps],
        "reference_seconds": reference_seconds(run_dir, args.clock),
        # teacher.unit token: the share of target tokens its loss kept (its random-mask control's size)
        "kept_token_share": summary.get("kept_token_share"),
    }


def reference_seconds(run_dir: Path, clock: str) -> float:
    """One-time cost of the run's reference model (teacher.score=excess, strategies learn and rho) on
    `clock`: its training plus its scoring passes, from the `<reference>.cost.json` that `attent-scale
    score` or `attent-scale reference fit` writes; 0 without a reference."""
    import yaml

    cfg_path = run_dir / "config.yaml"
    teacher = (yaml.safe_load(cfg_path.read_text()) or {}).get("teacher", {}) if cfg_path.exists() else {}
    uses = teacher.get("score") == "excess" or (teacher.get("mode") != "none"
                                                and teacher.get("strategy") in ("learn", "rho"))
    if not uses or not teacher.get("reference"):
        return 0.0
    cost_path = Path(f"{teacher['reference']}.cost.json")
    if not cost_path.exists():
        raise UserError(f"{cost_path}: missing; bench charges the reference's cost from it (rerun "
                        "`attent-scale score`)")
    cost = json.loads(cost_path.read_text())
    if clock == "cpu":
        return float(cost.get("train_cpu_seconds", 0.0)) + float(cost["score_cpu_seconds"])
    return float(cost.get("train_seconds", 0.0)) + float(cost["score_seconds"])


def _mean_spread(values: list[float | None]) -> tuple[float | None, float | None]:
    real = [v for v in values if v is not None]
    if len(real) != len(values) or not real:
        return None, None
    return statistics.fmean(real), (statistics.stdev(real) if len(real) > 1 else 0.0)


def score_arm(
    name: str, role: str, runs: list[dict[str, Any]], baseline: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """Per-seed time-to-target against the same seed's baseline, then mean and spread over seeds."""
    per_seed = []
    for run in runs:
        base = baseline[run["seed"]]
        target = base["summary"]["final_val_loss"]
        t_arm, s_arm = interpolate_target(run["curve"], target)
        t_base, _ = interpolate_target(base["curve"], target)
        s = run["summary"]
        ref_s = run.get("reference_seconds", 0.0)
        per_seed.append(
            {
                # the reference's one-time cost, and the speedup with it charged in full to this run
                # (`speedup` leaves it out: amortized over the many runs one reference serves)
                "reference_seconds": ref_s,
                "speedup_charged": (t_base / (t_arm + ref_s)) if (t_arm and t_base) else None,
                "seed": run["seed"],
                "target_val_loss": target,
                "final_val_loss": s["final_val_loss"],
                "time_to_target_seconds": t_arm,
                "samples_to_target": s_arm,
                "speedup": (t_base / t_arm) if (t_arm and t_base) else None,
                "selection_fraction": s["selection_seconds"] / s["train_seconds"]
                if s["train_seconds"]
                else 0.0,
                "selection_seconds": s["selection_seconds"],
                "train_seconds": run["clock_seconds"],
                "wall_seconds": s["wall_seconds"],
                "samples_trained": s["samples_trained"],
                "steps": s["steps"],
                "threads": run.get("threads"),
            }
        )
    out: dict[str, Any] = {"name": name, "role": role, "seeds": per_seed}
    for key in (
        "final_val_loss",
        "time_to_target_seconds",
        "samples_to_target",
        "speedup",
        "speedup_charged",
        "reference_seconds",
        "selection_fraction",
        "train_seconds",
        "wall_seconds",
        "samples_trained",
        "steps",
    ):
        mean, spread = _mean_spread([p[key] for p in per_seed])
        out[key] = mean
        out[f"{key}_std"] = spread
    out["val_loss_delta"] = (
        out["final_val_loss"] - statistics.fmean(p["target_val_loss"] for p in per_seed)
        if out["final_val_loss"] is not None
        else None
    )
    out["reached_target"] = sum(p["time_to_target_seconds"] is not None for p in per_seed)
    return out


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def format_table(arms: list[dict[str, Any]], gap: dict[str, Any] | None = None) -> str:
    """The terminal table: the oracle gap and uniform's best val first, then one row per arm (`to best`:
    seconds to uniform's best val, the reference charged; `gap %`: the share of the oracle gap recovered)."""
    head = (
        f"{'arm':34} {'final val':>14} {'Δ val':>8} {'Δ best':>8} {'train s':>9} {'to best s':>10} "
        f"{'x best':>7} {'to target s':>12} {'speedup':>8} {'samples':>9} {'select %':>8} {'ref s':>7} "
        f"{'charged':>8} {'gap %':>6}"
    )
    lines = [*format_gap(gap, arms), head, "-" * len(head)]
    for a in arms:
        val = f"{_fmt(a['final_val_loss'], '.4f')}±{_fmt(a['final_val_loss_std'], '.3f')}"
        lines.append(
            f"{a['name'][:34]:34} {val:>14} {_fmt(a['val_loss_delta'], '+.4f'):>8} "
            f"{_fmt(a.get('best_delta'), '+.4f'):>8} {_fmt(a['train_seconds'], '.1f'):>9} "
            f"{_fmt(a.get('time_to_best_charged'), '.1f'):>10} "
            f"{_fmt(a.get('speedup_best_charged'), '.2f'):>7} "
            f"{_fmt(a['time_to_target_seconds'], '.1f'):>12} "
            f"{_fmt(a['speedup'], '.2f'):>8} {_fmt(a['samples_trained'], '.0f'):>9} "
            f"{_fmt(_pct(a['selection_fraction']), '.1f'):>8}"
            f" {_fmt(a.get('reference_seconds'), '.1f'):>7} {_fmt(a.get('speedup_charged'), '.2f'):>8}"
            f" {_fmt(_pct(a.get('gap_recovered')), '.0f'):>6}"
        )
    return "\n".join(lines)


def format_markdown(arms: list[dict[str, Any]], clock: str, gap: dict[str, Any] | None = None) -> str:
    """The same numbers as a Markdown table (bench.md), for READMEs and notes, the oracle gap first."""
    lines = [f"{line}  " for line in format_gap(gap, arms)]
    if lines:
        lines.append("")
    lines += [f"| arm | final val loss | Δ vs uniform | train s ({clock}) | to target s | speedup | "
              "reached | samples | selection % | wins | reference s | speedup charged | "
              "Δ vs uniform's best | to uniform's best s (charged) | speedup to best | gap recovered | "
              "verdict |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in arms:
        wins = {True: "yes", False: "no"}.get(a.get("wins"), "")
        lines.append(
            f"| {a['name']} | {_fmt(a['final_val_loss'], '.4f')} ± {_fmt(a['final_val_loss_std'], '.4f')} | "
            f"{_fmt(a['val_loss_delta'], '+.4f')} | {_fmt(a['train_seconds'], '.1f')} | "
            f"{_fmt(a['time_to_target_seconds'], '.1f')} | {_fmt(a['speedup'], '.2f')} | "
            f"{a['reached_target']}/{len(a['seeds'])} | {_fmt(a['samples_trained'], '.0f')} | "
            f"{_fmt(_pct(a['selection_fraction']), '.1f')} | {wins} | "
            f"{_fmt(a.get('reference_seconds'), '.1f')} | {_fmt(a.get('speedup_charged'), '.2f')} | "
            f"{_fmt(a.get('best_delta'), '+.4f')} | {_fmt(a.get('time_to_best_charged'), '.1f')} | "
            f"{_fmt(a.get('speedup_best_charged'), '.2f')} | {_fmt(_pct(a.get('gap_recovered')), '.0f')}"
            f"{'%' if a.get('gap_recovered') is not None else ''} | {a.get('verdict', '')} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict[str, Any]]], out_dir: Path, clock: str = "wall") -> list[Path]:
    """val_loss.png and selected_ratio.png in `out_dir`; none (and one line saying so) without matplotlib:
    the tables and bench.json carry the numbers."""
    from attent_scale.extras import available, install_hint

    if not available("matplotlib"):
        print(f"plots: none written (matplotlib is not installed: {install_hint('matplotlib')})", flush=True)
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, runs in results.items():
        run = runs[0]
        xs_t = [p[0] for p in run["curve"]]
        xs_s = [p[1] for p in run["curve"]]
        ys = [p[2] for p in run["curve"]]
        axes[0].plot(xs_t, ys, marker=".", label=name)
        axes[1].plot(xs_s, ys, marker=".", label=name)
    axes[0].set_xlabel(f"training seconds, {clock} clock (selection included)")
    axes[1].set_xlabel("samples trained")
    for ax in axes:
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "val_loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in results.items():
        pts = runs[0]["ratio"]
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("selected ratio")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "selected_ratio.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def dry_run(plan: list[Arm], seeds: list[int], args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """--dry-run: each planned run's trainer command, its config checked as the trainer loads it (a bad key
    or value is the one-line error it would be), the data's manifest and --init-from's export looked up;
    nothing is trained or written."""
    from attent_scale.config import load_config
    from attent_scale.data import Manifest

    Manifest.load(args.data)
    if args.init_from and not (Path(args.init_from) / "export" / "model").is_dir():
        raise UserError(f"--init-from {args.init_from}: no export/model in it (a run with checkpoint.export)")
    runs = []
    for arm in plan:
        for seed in seeds:
            run_dir, cmd, sets = arm_command(arm, seed, args, out_dir)
            # a signal arm's control keeps the share the arm kept, known once it has run: checked at 0.5;
            # the oracle trains as many steps as uniform did (--oracle-steps uniform): checked at 1
            try:
                load_config(args.config, [s.replace("<kept>", "0.5").replace("<uniform-steps>", "1")
                                          for s in sets])
            except UserError as exc:
                raise UserError(f"bench --dry-run: arm {arm.name}: {exc}") from None
            print(f"{arm.name} seed {seed}: {shlex.join(cmd)}", flush=True)
            runs.append({"arm": arm.name, "role": arm.role, "seed": seed, "run_dir": str(run_dir),
                         "cmd": cmd})
    print(f"bench --dry-run: {len(runs)} runs planned ({len(plan)} arms x {len(seeds)} seeds), every config "
          "checked, nothing trained; a uniform-short control per distinct step count of the AtteNT arms "
          "follows once they have run")
    return {"planned": runs}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    out_dir = Path(args.out)
    from attent_scale.config import load_config

    check_args(args)
    base_teacher = load_config(args.config, args.overrides).teacher
    gap_only = getattr(args, "gap_only", False)  # the regime's oracle gap first, before judging a teacher
    attent_arms = [parse_arm(a) for a in args.arms] if args.arms else [] if gap_only else [
        default_arm(base_teacher)]
    check_reserved(attent_arms)
    names = [a.name for a in attent_arms]
    if len(set(names)) != len(names):
        raise UserError(f"--arms: duplicate arm names in {names}")
    check_arm_configs([Arm(BASELINE, {"teacher.mode": "none"}, role="baseline"), *attent_arms], args, out_dir)
    seeds = list(range(args.seed, args.seed + args.seeds))
    oracle_data = getattr(args, "oracle_data", None)
    if oracle_data:
        check_oracle_data(args.data, oracle_data)
    if gap_only:
        if not oracle_data:
            raise UserError("bench --gap-only: needs --oracle-data (the gap is uniform − oracle)")
        attent_arms = []

    plan: list[Arm] = [Arm(BASELINE, {"teacher.mode": "none"}, role="baseline")]
    if oracle_data:
        plan.append(oracle_arm(oracle_data, getattr(args, "oracle_steps", "uniform")))
    controls: dict[tuple, Arm] = {}
    # a random arm given already controls its schedule
    given = {tuple(sorted(a.overrides.items())): a for a in attent_arms}
    control_of: dict[str, str] = {}  # arm -> its random control's name (arms with one schedule share it)
    for arm in attent_arms:
        plan.append(arm)
        if is_token_arm(arm):  # sized by its own arm's kept token share: never shared
            ctl = mask_control(arm)
            control_of[arm.name] = controls.setdefault((("arm", arm.name),), ctl).name
        elif arm.overrides.get("teacher.strategy") != "random" and arm.overrides["teacher.mode"] != "online":
            ctl = random_control(arm, base_teacher)
            key = tuple(sorted(ctl.overrides.items()))
            if arm.overrides.get("teacher.strategy") in KEPT_SIZED:  # sized by its own arm: never shared
                key += (("arm", arm.name),)
            control_of[arm.name] = given[key].name if key in given else controls.setdefault(key, ctl).name
    plan += [ctl for key, ctl in controls.items() if key not in given]
    if getattr(args, "dry_run", False):
        return dry_run(plan, seeds, args, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    results: dict[str, list[dict[str, Any]]] = {}
    roles: dict[str, str] = {}
    source = {ctl: arm for arm, ctl in control_of.items()}
    by_name = {a.name: a for a in attent_arms}
    for arm in plan:
        if arm.overrides.get("teacher.token_ratio") == "<kept>":  # a token arm's mask: its kept share
            src = source[arm.name]
            arm.overrides["teacher.token_ratio"] = f"{kept_token_share(by_name[src], results[src]):g}"
        if arm.overrides.get("teacher.initial_ratio") == "<kept>":  # a signal arm's control: its kept share
            kept = f"{kept_share(results[source[arm.name]]):g}"
            arm.overrides.update({"teacher.initial_ratio": kept, "teacher.final_ratio": kept})
        if arm.overrides.get("train.max_steps") == "<uniform-steps>":  # --oracle-steps uniform
            steps = round(statistics.fmean(r["summary"]["steps"] for r in results[BASELINE]))
            arm.overrides["train.max_steps"] = str(steps)
        results[arm.name] = [run_arm(arm, seed, args, out_dir) for seed in seeds]
        roles[arm.name] = arm.role
    # uniform-short: all data for as many steps as each AtteNT arm trained (seed mean), LR decayed over them
    full_steps = statistics.fmean(r["summary"]["steps"] for r in results[BASELINE])
    short_steps = sorted(
        {round(statistics.fmean(r["summary"]["steps"] for r in results[a.name])) for a in attent_arms}
    )
    for steps in short_steps:
        if steps >= full_steps:
            continue
        arm = Arm(
            f"uniform-short[{steps}]",
            {"teacher.mode": "none", "train.max_steps": str(steps), "train.max_epochs": "0",
             "train.max_seconds": "0"},
            role="control",
        )
        results[arm.name] = [run_arm(arm, seed, args, out_dir) for seed in seeds]
        roles[arm.name] = arm.role

    baseline = {r["seed"]: r for r in results[BASELINE]}
    arms = [add_best_val(score_arm(name, roles[name], runs, baseline), runs, baseline)
            for name, runs in results.items()]
    gap = oracle_gap(arms)
    _judge(arms, control_of)
    report = {
        "target_val_loss": statistics.fmean(r["summary"]["final_val_loss"] for r in results[BASELINE]),
        # what early stopping gives uniform, and the regime's oracle gap (None without --oracle-data)
        "uniform_best_val_loss": arms[0]["uniform_best_val_loss"],
        "oracle_gap": gap,
        "oracle_data": str(oracle_data) if oracle_data else None,
        "seeds": seeds,
        "config": str(args.config), "clock": args.clock,
        # threads each arm's training ran on (torch intra-op), pinned to 1 under --clock cpu
        "threads": sorted({p["threads"] for a in arms for p in a["seeds"] if p.get("threads") is not None}),
        "data": str(args.data),
        "arms": arms,
    }
    write_json(out_dir / "bench.json", report)
    (out_dir / "bench.md").write_text(format_markdown(arms, args.clock, gap))
    plots = plot(results, out_dir, args.clock)
    judged = {a["name"]: a for a in arms}
    sentences = [t for a in attent_arms if (t := (token_sentence if is_token_arm(a) else data_sentence)(
        a.name, results[a.name], paid=judged[a.name]["wins"], numbers=outcome_numbers(judged[a.name])))
        is not None]
    report["data_case"] = sentences
    report["verdicts"] = [f"{a['name']}: {a['verdict']}" for a in arms if a["role"] == "attent"]
    write_json(out_dir / "bench.json", report)
    print(format_table(arms, gap))
    print(f"\n{', '.join(['bench.json', *(p.name for p in plots)])} in {out_dir}")
    for line in report["verdicts"]:
        print(line)
    for text in sentences:  # the last word: which case the data is in
        print(text)
    return report


def outcome_numbers(a: dict[str, Any]) -> str:
    """What an arm's run measured, for its data sentence: final val against uniform's final and best."""
    return (f"it ended {_fmt(a.get('final_delta'), '+.3f')} against uniform's final val and "
            f"{_fmt(a.get('best_delta'), '+.3f')} against its best")


def _judge(arms: list[dict[str, Any]], control_of: dict[str, str]) -> None:
    """Each AtteNT arm's `wins` and `verdict` (`verdict`: uniform's best val, the time to it with the
    reference charged, the final val) against its controls: its random subset (`control_of`, shared by
    arms with the same schedule; a token-unit arm's random mask) and the uniform-short nearest its steps."""
    by_name = {a["name"]: a for a in arms}
    shorts = [a for a in arms if a["name"].startswith("uniform-short")]
    for a in arms:
        if a["role"] != "attent":
            continue
        ctl = by_name.get(control_of.get(a["name"], ""))
        short = min(shorts, key=lambda s: abs((s["steps"] or 0) - (a["steps"] or 0))) if shorts else None
        a["random_control"] = ctl["name"] if ctl is not None else None
        a["uniform_short"] = short["name"] if short is not None else None
        a["wins"], a["verdict"] = verdict(a, [c for c in (ctl, short) if c is not None])


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="time-to-quality benchmark: AtteNT arms against uniform and controls"
    )
    p.add_argument("--data", required=True, help="manifest directory (shards build output), or its URL")
    p.add_argument("--config", required=True, help="base run config; arms change only teacher keys")
    p.add_argument(
        "--arms",
        action="append",
        metavar="NAME:KEY=VALUE,...",
        help=f"an AtteNT arm (repeatable); default: one arm {DEFAULT_ARM!r}, the config's teacher as it is",
    )
    p.add_argument("--seeds", type=int, default=1, help="number of seeds per arm")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-steps", type=int, default=0, help="optimizer steps per arm")
    budget.add_argument("--budget-epochs", type=int, default=0,
                        help="epochs per arm; AtteNT's subset epochs are shorter, so it trains fewer steps")
    budget.add_argument("--budget-seconds", type=float, default=0.0, help="training seconds per arm")
    p.add_argument("--clock", choices=sorted(CLOCK_KEYS), default="wall",
                   help="time axis: wall seconds, or process CPU seconds (fair on a shared machine)")
    p.add_argument("--reuse", action="store_true",
                   help="read back arms already run with the very same command instead of training again")
    p.add_argument(
        "--init-from", default=None, help="run dir of a pretraining run whose export starts every arm"
    )
    add_override_argument(p, "override applied to every arm (repeatable)")
    p.add_argument(
        "--launcher", default=None, help="e.g. 'torchrun --nproc-per-node 2' (default: one process)"
    )
    p.add_argument("--out", default="runs/bench", help="output directory")
    p.add_argument("--dry-run", action="store_true",
                   help="print every planned run's command after checking its config; train nothing")
    p.add_argument("--oracle-data", default=None, metavar="DIR",
                   help="the regime's clean twin (shards of its train split without the injected noise or "
                        "copies, the same val split and tokenizer): adds the arm 'oracle', uniform on it, "
                        "and the oracle gap each arm is judged by (tools/ablations/regimes.py writes its "
                        "input)")
    p.add_argument("--gap-only", action="store_true",
                   help="run uniform and the oracle only: the regime's oracle gap (a later bench --reuse "
                        "with the arms reads both back)")
    p.add_argument("--oracle-steps", choices=("uniform", "budget"), default="uniform",
                   help="the oracle's budget: as many steps as uniform trained (the same compute on clean "
                        "data), or the bench's (an epoch budget trains fewer steps on a smaller twin)")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    run_bench(args)
    return 0
