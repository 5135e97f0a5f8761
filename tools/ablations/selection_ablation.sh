#!/usr/bin/env bash
# Issue 9's extended ablation (docs/benchmarks.md "Extended ablation"): cycle vs ledger scoring, raw vs excess
# loss, pruning +/- annealing +/- reweighting, against uniform and the automatic controls. Regime (a):
# pretraining from scratch, 6-epoch budget, the quarter-size model of prune_bench.sh, CPU clock (bench pins
# every arm to one thread), one corpus per call. The shards hold a held-out `ref` split (20% of the documents,
# by hash) on which a reference model is trained once (4 epochs, uniform, one thread) and then scores the
# train split (`attent-scale score`); the excess arms rank by learner loss - reference loss, and bench
# charges the reference's training + scoring CPU seconds to them ("reference s", "speedup charged").
# Usage: tools/ablations/selection_ablation.sh CORPUS [SEEDS] [OUT] [extra bench args...]   (CORPUS: stdlib | prose)
set -euo pipefail
corpus=${1:?stdlib or prose}
seeds=${2:-3}
out=${3:-runs/selection-ablation/$corpus}
root=runs/selection-ablation
shards=$root/shards-$corpus
ref_run=$root/reference-$corpus
# shellcheck source=tools/ablations/bench_common.sh
source "$(dirname "$0")/bench_common.sh"
if [ ! -f "$shards/manifest.json" ]; then
  ref_split_src "$corpus"
  attent shards build -o "$shards" "${split_src[@]}" --seq-len 64 --vocab-size 1000 --no-progress
fi
ref=$ref_run/export/model/scores-train.safetensors
if [ ! -f "$ref" ]; then
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 ATTENT_NUM_THREADS=1  # its CPU seconds are charged like an arm's
  attent train --config "$repo"/configs/ablation.yaml --set data.dir="$shards" --set data.train_split=ref \
    --set run_dir="$ref_run" --set teacher.mode=none --set train.max_epochs=4 --set checkpoint.export=true \
    --set eval.every_steps=0 "${quarter_model[@]}"
  attent score --model "$ref_run/export" --data "$shards" --split train
fi
sched=strategy=hard,ratio_schedule=cosine,interval_schedule=fixed
prune=mode=ledger,strategy=prune,prune_ratio=0.6,prune_quantile=0.7
arms=(
  --arms "cycle-hard:$sched,rescore=stale"
  --arms "ledger-hard:mode=ledger,$sched"
  --arms "cycle-hard-excess:$sched,rescore=stale,score=excess,reference=$ref"
  --arms "ledger-hard-excess:mode=ledger,$sched,score=excess,reference=$ref"
  --arms "prune-anneal:$prune,anneal_fraction=0.125"
  --arms "prune:$prune,anneal_fraction=0"
  --arms "prune-anneal-noreweight:$prune,anneal_fraction=0.125,reweight=false"
)
attent bench --data "$shards" --config "$repo"/configs/ablation.yaml --budget-epochs 6 --seeds "$seeds" --clock cpu \
  --reuse --out "$out" --set checkpoint.export=false --set eval.every_steps=50 --set eval.max_batches=0 \
  "${quarter_model[@]}" "${arms[@]}" "${@:4}"
