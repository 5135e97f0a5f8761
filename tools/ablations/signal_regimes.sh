#!/usr/bin/env bash
# Issue 21's regime comparison of the selection signals (docs/teacher.md "What is safe to drop"): the
# quarter-size model of bench_common.sh on a dup, noise and clean corpus built by regimes.py, 6-epoch
# budget, CPU clock, ledger mode. Arms: strategy signal (teacher.signal $SIGNAL, default gap+learn) and the
# raw-loss `hard` default, against uniform, random subsets (a signal arm's of its own kept size) and
# uniform-short. Every selection record carries its bits (teacher.record_bits), so `regimes.py kinds
# --selection` tells the dropped share by kind.
# Usage: tools/ablations/signal_regimes.sh [CORPUS] [SEEDS] [OUT] [extra bench args...]
set -euo pipefail
corpus=${1:-stdlib}
seeds=${2:-1}
out=${3:-runs/signal-regimes/$corpus}
# shellcheck source=tools/ablations/bench_common.sh
source "$(dirname "$0")/bench_common.sh"
sig=mode=ledger,strategy=signal,ratio_schedule=constant,initial_ratio=0.2,record_bits=true
for regime in dup noise clean; do
  data=$out/data-$regime
  if [ ! -f "$data/shards/manifest.json" ]; then
    rate=0.4 bytes=160000 copies=16
    [ "$regime" = dup ] || { rate=0.15; bytes=400000; }
    # ATTENT_TINY: less train text than the tiny build's cap (`regimes.py kinds` needs all of it built)
    [ "$tiny" = 1 ] && { bytes=20000; copies=4; }
    "$py" "$repo"/tools/ablations/regimes.py --regime "$regime" --rate "$rate" --max-copies "$copies" \
      --corpus "$corpus" --max-bytes "$bytes" --seed 0 --out "$data"
    attent shards build "$data/train.jsonl" --val-input "$data/val.jsonl" -o "$data/shards" --seq-len 64 \
      --vocab-size 1000 --no-progress
  fi
  attent bench --data "$data/shards" --config "$repo"/configs/ablation.yaml --budget-epochs 6 --seeds "$seeds" \
    --clock cpu --reuse --out "$out/$regime" --set checkpoint.export=false --set eval.every_steps=50 \
    --set eval.max_batches=0 "${quarter_model[@]}" \
    --arms "signal:$sig,signal=${SIGNAL:-gap+learn}" \
    --arms "hard:mode=ledger,strategy=hard,ratio_schedule=cosine,record_bits=true" "${@:4}"
  if [ "$tiny" = 1 ]; then  # bench --dry-run trained no arm: what the regime's samples are instead
    echo "$regime: ATTENT_TINY, no arm's selection to read (bench --dry-run); kinds of the train samples:"
    "$py" "$repo"/tools/ablations/regimes.py kinds "$data/shards" "$data/kinds.json"
    continue
  fi
  for arm in signal hard; do
    echo "$regime $arm:"
    "$py" "$repo"/tools/ablations/regimes.py kinds "$data/shards" "$data/kinds.json" \
      --selection "$out/$regime/$arm/seed-0/selection.jsonl"
  done
done
"$py" "$repo"/tools/ablations/regime_targets.py "$out"  # issue 21's targets, seed by seed
