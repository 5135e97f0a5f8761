"""Stress the END of short 2-rank training runs: many runs, a watchdog, every process's stacks on a hang.

Usage: python tools/ops/stress_end.py [--runs 40] [--engines fsdp,zero3] [--modes cycle,ledger]
           [--metrics on,off] [--scrape] [--burners 0] [--parallel 1] [--steps 12] [--deadline 240]
           [--out /tmp/stress_end] [--set key=value ...]

Each run is `torchrun --nproc-per-node 2` of `attent-scale train` (gloo on CPU; ZeRO-3 with
DS_ACCELERATOR=cpu) on a tiny model and shard set, shaped like the run that hung in issue 31 (eval
every_steps 0, so the final eval starts the val stream's DataLoader worker at the end; metrics linger 3 s;
export on). The combinations (engine x mode x metrics) are taken in turn. `--scrape` polls every rank's
exporter while the run is live (what Prometheus does), `--burners N` keeps N busy-loop processes on the
CPUs, `--set` adds config overrides to every run (e.g. train.end_timeout_seconds=60).

The ranks run through this file (`rank` mode): faulthandler is registered on SIGUSR2 into
run_dir/../stacks.txt, inherited by the DataLoader workers a rank forks. A run still alive after
`--deadline` seconds is a hang: for every process of the run (found by a marker in its environment,
tests/helpers/procs.py: torchrun starts each rank in a session of its own, out of a process group's reach) the
harness appends a header, sends SIGUSR2 and waits for the dump (plus `py-spy dump --native` when py-spy
is on PATH), then kills them all. Each rank's innermost attent_scale frame of its main thread is
where it stood.

Prints one row per run as it ends, then a table: runs, ok, failed, ended by the end deadline, hangs, and
for the hangs where each rank stopped. The load while measuring (os.getloadavg before and after, CPUs) is
printed with it: these counts depend on load, they are not timings. Exit status 1 when a run hung or
failed (a failed run never reached the end under test), 0 otherwise.
"""

from __future__ import annotations

import argparse
import faulthandler
import http.client
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "helpers"))
import procs  # noqa: E402  the tests' launcher: marked processes, killed whole

SEQ = 32

CONFIG = """\
run_dir: {run_dir}
seed: {seed}
data: {{dir: {data}, num_workers: {workers}, shuffle_buffer: 64}}
model:
  config: {{model_type: gpt2, n_layer: 1, n_embd: 32, n_head: 2, n_positions: {seq},
            resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}}
engine: {engine}
teacher: {{mode: {mode}, strategy: soft, total_cycles: 4, warmup_epochs: 1, initial_interval: 1,
          max_interval: 2, full_epochs_per_cycle: 1}}
train: {{max_steps: {steps}, micro_batch_size: 8, lr: 0.002, warmup_steps: 2, log_every: 1,
         stop_check_every: {stop_every}}}
eval: {{every_steps: 0, max_batches: 2, batch_size: 16}}
checkpoint: {{every_steps: {ckpt}, keep_last: 1, resume: false, export: true}}
metrics: {{enabled: {metrics}, linger_seconds: {linger}, port: {port}, port_fallback: true,
          address: 127.0.0.1}}
"""

ENGINES = {
    "fsdp": "{name: fsdp}",
    "zero3": "{{name: deepspeed, deepspeed_config: {}}}".format(REPO / "configs" / "deepspeed_zero3.json"),
}


# ------------------------------------------------------------------ rank mode (runs inside each rank)
def rank_main(argv: list[str]) -> None:
    """One rank: faulthandler on SIGUSR2 (all threads, appended to $STRESS_STACKS), then the CLI."""
    path = os.environ.get("STRESS_STACKS")
    if path:
        out = open(path, "a", buffering=1)  # noqa: SIM115  kept open for the process's life (and forks)
        faulthandler.register(signal.SIGUSR2, file=out, all_threads=True, chain=False)
    sys.path.insert(0, str(REPO))
    from attent_scale.cli import run

    run(argv)


# ------------------------------------------------------------------ the harness
@dataclass
class Result:
    index: int
    combo: str
    status: str  # ok | failed | end-deadline | hang
    seconds: float
    rc: int | None
    where: dict[str, str] = field(default_factory=dict)  # process label -> innermost frame
    files: str = ""  # which end-of-run files exist
    log_tail: str = ""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_data(out: Path) -> Path:
    data = out / "shards"
    if (data / "manifest.json").exists():
        return data
    cmd = [sys.executable, "-m", "attent_scale", "shards", "build", "-o", str(data), "--seq-len", str(SEQ),
           "--vocab-size", "400", "--max-bytes", "36000", "--samples-per-shard", "64", "--val-fraction",
           "0.2", "--no-progress", "--overwrite"]
    subprocess.run(cmd, check=True, cwd=REPO, env=child_env(), timeout=600, stdout=subprocess.DEVNULL)
    return data


def child_env(**extra: str) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO),
            "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


def _environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(kv.split("=", 1) for kv in pairs if "=" in kv)


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def label(pid: int) -> str | None:
    """'rank R', 'rank R worker PID' (a DataLoader worker: its parent is a rank), or None for a launcher
    (local.sh, torchrun: no RANK in its environment)."""
    try:
        rank = _environ(pid).get("RANK")
        parent_rank = _environ(_ppid(pid)).get("RANK") if rank is not None else None
    except OSError:
        return None
    if rank is None:
        return None
    return f"rank {rank} worker {pid}" if parent_rank is not None else f"rank {rank}"


FRAME = re.compile(r'File "([^"]+)", line (\d+) in (\S+)')


def innermost(dump: str) -> str:
    """From one faulthandler dump: the main thread's (the last block's) innermost attent_scale frame, and
    its innermost frame when that is elsewhere."""
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", dump.strip())
    main = blocks[-1] if blocks else ""
    frames = FRAME.findall(main)
    if not frames:
        return "?"
    def short(f: tuple[str, str, str]) -> str:
        path = f[0].split("attent_scale/", 1)[-1] if "attent_scale/" in f[0] else Path(f[0]).name
        return f"{path}:{f[1]} {f[2]}"
    ours = [f for f in frames if "attent_scale/" in f[0]]
    top = short(frames[0])
    if not ours:
        return top
    inner = short(ours[0])
    chain = " < ".join(short(f) for f in ours[:4])
    return chain if inner == top else f"{top} | {chain}"


def spy_innermost(dump: str) -> str:
    """From a py-spy dump: the main thread's first Python frame, and its innermost attent_scale frame."""
    main = dump.split('"MainThread"', 1)[-1].split("\nThread ", 1)[0]
    frames = re.findall(r"^\s+(\S+) \(([^)]+:\d+)\)$", main, re.M)
    if not frames:
        return "?"
    top = f"{frames[0][1].rsplit('/', 1)[-1]} {frames[0][0]}"
    ours = [f"{loc.split('attent_scale/', 1)[-1]} {fn}" for fn, loc in frames if "attent_scale/" in loc]
    return top if not ours else f"{top} | {' < '.join(ours[:4])}"


def dump_stacks(tag: str, stacks: Path, faulthandler_registered: bool) -> dict[str, str]:
    """Every rank and worker of the run dumps its stacks into `stacks` (a header each): faulthandler on
    SIGUSR2 where the rank registered it, and py-spy (Python and native frames) when it is on PATH;
    returns label -> where the main thread stood."""
    where: dict[str, str] = {}
    spy = shutil.which("py-spy")
    for pid, _ in procs.marked(procs.PROC, tag):
        name = label(pid)
        if name is None:
            continue
        if faulthandler_registered:
            start = stacks.stat().st_size if stacks.exists() else 0
            with open(stacks, "a") as f:
                f.write(f"\n===== {name} (pid {pid}) faulthandler\n")
            try:
                os.kill(pid, signal.SIGUSR2)
            except ProcessLookupError:
                continue
            time.sleep(1.5)
            text = stacks.read_text(errors="replace")[start:]
            where[name] = innermost(text.split("faulthandler\n", 1)[-1])
        if spy:
            res = subprocess.run([spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True,
                                 timeout=60)
            with open(stacks, "a") as f:
                f.write(f"\n===== {name} (pid {pid}) py-spy dump --native\n{res.stdout}{res.stderr}")
            if name not in where:
                where[name] = spy_innermost(res.stdout)
    return where


def end_files(run_dir: Path, steps: int) -> str:
    """Which end-of-run files exist: last step logged, final eval, summary."""
    def last(path: Path) -> int:
        try:
            lines = path.read_text().splitlines()
            return int(json.loads(lines[-1])["step"]) if lines else -1
        except (OSError, ValueError, KeyError, IndexError):
            return -1
    marks = [f"step {last(run_dir / 'metrics.jsonl')}"]
    marks.append("eval" if last(run_dir / "eval.jsonl") == steps else "no-eval")
    marks.append("export" if (run_dir / "export").is_dir() else "no-export")
    marks.append("summary" if (run_dir / "summary.json").exists() else "no-summary")
    return " ".join(marks)


PROMETHEUS_HEADERS = {  # what Prometheus 2.x sends with a scrape
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
              "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
    "X-Prometheus-Scrape-Timeout-Seconds": "1",
}


class Scraper(threading.Thread):
    """Polls the exporters on ports [base, base + 2) every 0.2 s while `stop` is unset, asking what
    Prometheus asks for (OpenMetrics, gzip)."""

    def __init__(self, base: int) -> None:
        super().__init__(daemon=True)
        self.base, self.stop, self.hits = base, threading.Event(), 0

    def run(self) -> None:
        while not self.stop.wait(0.2):
            for port in (self.base, self.base + 1):
                try:
                    url = f"http://127.0.0.1:{port}/metrics"
                    req = urllib.request.Request(url, headers=PROMETHEUS_HEADERS)
                    with urllib.request.urlopen(req, timeout=2) as r:
                        r.read()
                    self.hits += 1
                except (OSError, http.client.HTTPException):  # not up yet, gone, or a TCP self-connect
                    pass


def one_run(i: int, combo: tuple[str, str, str], args: argparse.Namespace, data: Path) -> Result:
    engine, mode, metrics = combo
    name = f"{engine}-{mode}-metrics_{metrics}"
    work = args.out / f"run{i:04d}-{name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run_dir = work / "run"
    port = free_port()
    ckpt = args.steps if args.checkpoint else 0
    (work / "config.yaml").write_text(CONFIG.format(
        run_dir=run_dir, seed=i, data=data, workers=args.num_workers, seq=SEQ, engine=ENGINES[engine],
        mode=mode, steps=args.steps, ckpt=ckpt, metrics="true" if metrics == "on" else "false",
        linger=args.linger, port=port, stop_every=args.stop_check_every))
    stacks = work / "stacks.txt"
    if args.local_sh:  # as the failing test ran it: torchrun with SIGINT/SIGUSR1 ignored; stacks by py-spy
        cmd = [str(REPO / "launch" / "local.sh"), str(work / "config.yaml")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "--max-restarts=0", str(Path(__file__).resolve()), "rank", "train", "--config",
               str(work / "config.yaml")]
    for kv in args.set:
        cmd += ["--set", kv]
    log = open(work / "log.txt", "w")  # noqa: SIM115  closed below
    t0 = time.monotonic()
    env = child_env(STRESS_STACKS=str(stacks), ATTENT_NPROC="2", ATTENT_METRICS_PORT=str(port),
                    ATTENT_METRICS="1" if metrics == "on" else "0", ATTENT_JOB=f"stress-{i}")
    # marked (ATTENT_TEST_PROC): torchrun starts each rank in a session of its own, out of a group's reach
    proc = procs.start(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    scraper = Scraper(port) if args.scrape and metrics == "on" else None
    if scraper:
        scraper.start()
    where: dict[str, str] = {}
    try:
        rc = proc.wait(timeout=args.deadline)
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        rc, status = None, "hang"
        where = dump_stacks(proc.tag, stacks, faulthandler_registered=not args.local_sh)
    finally:
        if scraper:
            scraper.stop.set()
        procs.kill(proc.tag)  # the launcher, the ranks and their DataLoader workers
        proc.wait()
        log.close()
    seconds = time.monotonic() - t0
    text = (work / "log.txt").read_text(errors="replace")
    if status == "failed" and "did not end within train.end_timeout_seconds" in text:
        status = "end-deadline"
        lines = re.finditer(r"attent-scale: (rank \d+): end of run: .*", text)
        where = {m.group(1): m.group(0).split(": end of run: ", 1)[1] for m in lines}
    result = Result(i, name, status, seconds, rc, where, end_files(run_dir, args.steps),
                    "\n".join(text.splitlines()[-15:]))
    if status == "ok" and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


class Burners:
    """N busy-loop processes (their own session), stopped by pid at exit."""

    def __init__(self, n: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
                      for _ in range(n)]

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--engines", default="fsdp,zero3")
    parser.add_argument("--modes", default="cycle,ledger")
    parser.add_argument("--metrics", default="on,off", help="on, off or on,off")
    parser.add_argument("--scrape", action="store_true", help="poll the exporters while runs are live")
    parser.add_argument("--burners", type=int, default=0, help="busy-loop processes beside the runs")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stop-check-every", type=int, default=10, help="train.stop_check_every")
    parser.add_argument("--num-workers", type=int, default=0, help="data.num_workers of every run")
    parser.add_argument("--checkpoint", action="store_true", help="a checkpoint at the last step too")
    parser.add_argument("--linger", type=float, default=3.0, help="metrics.linger_seconds")
    parser.add_argument("--deadline", type=float, default=240.0, help="seconds before a run is a hang")
    parser.add_argument("--out", type=Path, default=Path("/tmp/stress_end"))
    parser.add_argument("--set", action="append", default=[], help="config override for every run")
    parser.add_argument("--local-sh", action="store_true",
                        help="launch through launch/local.sh (stacks by py-spy only)")
    parser.add_argument("--keep", action="store_true", help="keep the run dirs of runs that ended well")
    args = parser.parse_args(argv)
    for engine in args.engines.split(","):
        if engine not in ENGINES:
            parser.error(f"--engines: {engine!r} is not one of {sorted(ENGINES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    data = build_data(args.out)
    combos = list(itertools.product(args.engines.split(","), args.modes.split(","), args.metrics.split(",")))
    load0, t0 = os.getloadavg(), time.monotonic()
    burners = Burners(args.burners)
    results: list[Result] = []
    lock = threading.Lock()
    todo = iter(range(args.runs))

    def worker() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            r = one_run(i, combos[i % len(combos)], args, data)
            with lock:
                results.append(r)
                extra = "; ".join(f"{k}: {v}" for k, v in sorted(r.where.items()))
                print(f"run {r.index:4d} {r.combo:28s} {r.status:12s} {r.seconds:6.1f} s rc {r.rc}  "
                      f"[{r.files}] {extra}", flush=True)
                if r.status == "failed":
                    print("    " + r.log_tail.replace("\n", "\n    "), flush=True)

    try:
        threads = [threading.Thread(target=worker) for _ in range(max(1, args.parallel))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        burners.stop()
    load1 = os.getloadavg()
    print(f"\n{len(results)} runs in {time.monotonic() - t0:.0f} s; {os.cpu_count()} CPUs, load average "
          f"(1/5/15 min) {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f} at start, "
          f"{load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} at end; burners {args.burners}, parallel "
          f"{args.parallel}, scrape {args.scrape}, steps {args.steps}, deadline {args.deadline:.0f} s")
    print(f"{'combination':28s} {'runs':>5s} {'ok':>5s} {'failed':>7s} {'end-deadline':>13s} {'hangs':>6s}")
    for combo in sorted({r.combo for r in results}):
        rows = [r for r in results if r.combo == combo]
        n = Counter(r.status for r in rows)
        print(f"{combo:28s} {len(rows):5d} {n['ok']:5d} {n['failed']:7d} {n['end-deadline']:13d} "
              f"{n['hang']:6d}")
    n = Counter(r.status for r in results)
    print(f"{'all':28s} {len(results):5d} {n['ok']:5d} {n['failed']:7d} {n['end-deadline']:13d} "
          f"{n['hang']:6d}")
    stops = [r for r in results if r.status in ("hang", "end-deadline")]
    if stops:
        print("\nwhere they stopped (stacks: OUT/runNNNN-*/stacks.txt, logs: log.txt):")
        for r in stops:
            print(f"  run {r.index} {r.combo} {r.status} [{r.files}]")
            for who, frame in sorted(r.where.items()):
                print(f"    {who}: {frame}")
    return 1 if n["hang"] or n["failed"] else 0  # a run that failed never reached the end under test


if __name__ == "__main__":
    if sys.argv[1:2] == ["rank"]:
        rank_main(sys.argv[2:])
    else:
        sys.exit(main())
