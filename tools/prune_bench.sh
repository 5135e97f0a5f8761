#!/usr/bin/env bash
# Issue 9 benchmark (docs/benchmarks.md): unbiased pruning from free scores (+ anneal) against uniform, the
# current default (hard-cos-fix-stale) and the automatic controls, CPU clock (bench pins each arm to one
# thread), 3 seeds, two corpora: the embedded stdlib sources and English prose (/usr/share/doc/*/copyright).
# The model is a quarter of the ablation's (width 64, sequence 64, vocab 1000) so that 3 seeds of every arm fit
# a shared 2-core machine. Usage: tools/prune_bench.sh CORPUS [SEEDS] [OUT] [--arms ...]  (stdlib | prose)
set -euo pipefail
corpus=${1:?stdlib or prose}
seeds=${2:-3}
out=${3:-runs/prune-bench/$corpus}
shards=runs/prune-bench/shards-$corpus
if [ ! -f "$shards/manifest.json" ]; then
  # ~1000 training windows; the stdlib corpus has large documents, hence its larger byte cap
  if [ "$corpus" = stdlib ]; then src=(--max-bytes 450000); else src=(/usr/share/doc --glob copyright --max-bytes 320000); fi
  # val >= 500 windows (all evaluated): 40% of the documents
  attent-scale shards build -o "$shards" "${src[@]}" --seq-len 64 --vocab-size 1000 \
    --val-fraction 0.4 --no-progress
fi
arms=(
  --arms "hard-cos-fix-stale:strategy=hard,ratio_schedule=cosine,interval_schedule=fixed,rescore=stale"
  --arms "prune-anneal:mode=ledger,strategy=prune,prune_ratio=0.6,prune_quantile=0.7,anneal_fraction=0.125"
)
attent-scale bench --data "$shards" --config configs/ablation.yaml --budget-epochs 6 --seeds "$seeds" --clock cpu \
  --reuse --out "$out" --set checkpoint.export=false --set eval.every_steps=50 --set eval.max_batches=0 \
  --set model.config.n_embd=64 --set model.config.n_head=2 --set model.config.n_positions=64 \
  "${arms[@]}" "${@:4}"
