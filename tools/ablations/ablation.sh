#!/usr/bin/env bash
# The paper's ablation on our corpus (docs/benchmarks.md): hard/soft/random x ratio schedule (cosine,
# incremental) x interval schedule (fixed, incremental), plus ledger and online modes, against uniform
# and the controls, 6-epoch budget, demo-size model, 3 seeds. Usage: tools/ablations/ablation.sh [SEEDS] [OUT] [FIRST]
# Seeds can run as separate invocations (FIRST=1, FIRST=2) in parallel; a last run with all seeds reuses them.
set -euo pipefail
seeds=${1:-3}
out=${2:-runs/ablation/bench}
first=${3:-0}
shards=runs/ablation/shards
# shellcheck source=tools/ablations/bench_common.sh
source "$(dirname "$0")/bench_common.sh"
export OMP_NUM_THREADS=1  # one thread per run: with --clock cpu the timing is fair on a shared machine
if [ ! -f "$shards/manifest.json" ]; then
  attent shards build -o "$shards" --seq-len 128 --vocab-size 2000 --max-bytes 900000 --val-fraction 0.08
fi
arms=()
for strategy in hard soft random; do
  for ratio in cosine incremental; do
    for interval in fixed incremental; do
      arms+=(--arms "${strategy}-${ratio:0:3}-${interval:0:3}:strategy=${strategy},ratio_schedule=${ratio},interval_schedule=${interval}")
    done
  done
done
arms+=(--arms "ledger-soft:mode=ledger,strategy=soft,ratio_schedule=incremental")
arms+=(--arms "online-hard:mode=online,strategy=hard,online_ratio=0.5")
# beyond the paper: no scoring passes with hard keys, and cycles that rescore only stale ids
arms+=(--arms "ledger-hard:mode=ledger,strategy=hard,ratio_schedule=incremental")
arms+=(--arms "hard-cos-fix-stale:strategy=hard,ratio_schedule=cosine,interval_schedule=fixed,rescore=stale")
attent bench --data "$shards" --config "$repo"/configs/ablation.yaml --budget-epochs 6 --seeds "$seeds" --seed "$first" --clock cpu \
  --reuse --out "$out" --set checkpoint.export=false "${arms[@]}"
