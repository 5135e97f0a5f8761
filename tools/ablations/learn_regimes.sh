#!/usr/bin/env bash
# Issue 29 items 1-2 on the regimes of regimes.py (dup, noise, clean; the same inputs as signal_regimes.sh):
# per regime one cross-fitted reference (`attent-scale reference fit`, REF_ARGS: the quarter model, one
# epoch of its folds, early-stopped on val), then a bench of the learnability strategies against uniform,
# the default (`signal`) and the controls, the reference's CPU seconds charged (`ref s`, `charged`). Arms:
# learn (ledger, the reference rule, both tails, the ratio 0.2 a cap), rho (RHO-LOSS: cycle mode, a scoring
# pass every epoch, 70% kept by learner - reference), signal (the default). Then what each arm dropped by
# kind (seed 0). REGIMES picks and orders the built ones; EXTRA="name=DIR ..." adds regimes built elsewhere
# (DIR/shards; DIR/kinds.json optional).
# Usage: tools/ablations/learn_regimes.sh [CORPUS] [SEEDS] [OUT] [extra bench args...]
set -euo pipefail
corpus=${1:-stdlib}
seeds=${2:-1}
out=${3:-runs/learn-regimes/$corpus}
# shellcheck source=tools/ablations/bench_common.sh
source "$(dirname "$0")/bench_common.sh"
ref_args=(${REF_ARGS:---set reference.epochs=1 --set reference.eval_every_steps=35
          --set reference.early_stop_patience=1})
regimes=()
for regime in ${REGIMES:-dup noise clean}; do
  data=$out/data-$regime
  if [ ! -f "$data/shards/manifest.json" ]; then
    rate=0.4 bytes=160000
    [ "$regime" = dup ] || { rate=0.15; bytes=400000; }
    python tools/ablations/regimes.py --regime "$regime" --rate "$rate" --max-copies 16 --corpus "$corpus" \
      --max-bytes "$bytes" --seed 0 --out "$data"
    attent-scale shards build "$data/train.jsonl" --val-input "$data/val.jsonl" -o "$data/shards" --seq-len 64 \
      --vocab-size 1000 --no-progress
  fi
  regimes+=("$regime=$data")
done
for extra in ${EXTRA:-}; do regimes+=("$extra"); done
sig=mode=ledger,strategy=signal,ratio_schedule=constant,initial_ratio=0.2,record_bits=true
for entry in "${regimes[@]}"; do
  regime=${entry%%=*} data=${entry#*=}
  ref=$out/$regime/reference
  attent-scale reference fit --config configs/ablation.yaml --data "$data/shards" --out "$ref" --reuse \
    --set eval.max_batches=0 "${quarter_model[@]}" "${ref_args[@]}"
  scores=$ref/scores-train.safetensors
  attent-scale bench --data "$data/shards" --config configs/ablation.yaml --budget-epochs 6 --seeds "$seeds" \
    --clock cpu --reuse --out "$out/$regime" --set checkpoint.export=false --set eval.every_steps=50 \
    --set eval.max_batches=0 "${quarter_model[@]}" \
    --arms "learn:mode=ledger,strategy=learn,warmup_epochs=0,ratio_schedule=constant,initial_ratio=0.2,learn_tails=both,reference=$scores,record_bits=true" \
    --arms "rho:mode=cycle,strategy=rho,rescore=all,warmup_epochs=1,ratio_schedule=constant,initial_ratio=0.7,interval_schedule=fixed,initial_interval=1,max_interval=1,full_epochs_per_cycle=0,reference=$scores,record_bits=true" \
    --arms "signal:$sig" "${@:4}"
  if [ -f "$data/kinds.json" ]; then
    for arm in learn rho signal; do
      echo "$regime $arm:"
      python tools/ablations/regimes.py kinds "$data/shards" "$data/kinds.json" \
        --selection "$out/$regime/$arm/seed-0/selection.jsonl"
    done
  fi
done
