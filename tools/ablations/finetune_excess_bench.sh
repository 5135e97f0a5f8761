#!/usr/bin/env bash
# Issue 9, regime (b) with excess loss (docs/benchmarks.md): the base model of finetune_bench.sh, LoRA
# fine-tuning for 3 epochs on text of another kind whose shards hold a held-out `ref` split (20% of the
# documents). The reference is the base LoRA-fine-tuned on that split (3 epochs, uniform, one thread, merged
# export), which then scores the train split; bench charges its training + scoring CPU seconds to the excess
# arms. Arms: the official AtteNT LLM recipe and the cycle-mode schedule, each by raw loss and by excess
# loss (learner - reference), the project default (ledger-hard), plus the automatic controls. CPU clock,
# one thread per arm.
# Usage: tools/ablations/finetune_excess_bench.sh [SEEDS] [BASE_CORPUS] [FT_CORPUS] [OUT] [bench options...]
set -euo pipefail
seeds=${1:-3}
base_corpus=${2:-stdlib}
ft_corpus=${3:-prose}
out=${4:-runs/finetune-bench/$base_corpus-to-$ft_corpus-excess}
root=runs/finetune-bench
# shellcheck source=tools/ablations/bench_common.sh
source "$(dirname "$0")/bench_common.sh"
"$(dirname "$0")/finetune_bench.sh" 0 "$base_corpus" "$ft_corpus"  # the base model and its tokenizer
base=$root/base-$base_corpus
ft_shards=$root/shards-$ft_corpus-by-$base_corpus-ref
if [ ! -f "$ft_shards/manifest.json" ]; then
  ref_split_src "$ft_corpus"
  attent shards build -o "$ft_shards" "${split_src[@]}" --seq-len 64 \
    --tokenizer "$root/shards-$base_corpus/tokenizer.model" --no-progress
fi
ref_run=$root/reference-$ft_corpus-by-$base_corpus
ref=$ref_run/export/merged/scores-train.safetensors
if [ ! -f "$ref" ]; then
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 ATTENT_NUM_THREADS=1  # its CPU seconds are charged like an arm's
  attent train --config "$repo"/configs/ablation.yaml --set run_dir="$ref_run" --set data.dir="$ft_shards" \
    --set data.train_split=ref --set model.pretrained="$base/export/model" --set model.lora.enabled=true \
    --set model.lora.export_merged=true --set teacher.mode=none --set train.max_steps=1000000 \
    --set train.max_epochs=3 --set eval.every_steps=0 --set checkpoint.export=true --no-resume "${quarter_model[@]}"
  attent score --model "$ref_run/export" --data "$ft_shards" --split train
fi
official=mode=ledger,strategy=hard,ratio_schedule=constant,initial_ratio=0.7,final_ratio=0.7,warmup_epochs=1
cycle=strategy=hard,ratio_schedule=cosine,interval_schedule=fixed,rescore=stale
arms=(
  --arms "official-ledger-hard-0.7:$official"
  --arms "official-excess:$official,score=excess,reference=$ref"
  --arms "ledger-hard:mode=ledger,$cycle"
  --arms "cycle-hard:$cycle"
  --arms "cycle-hard-excess:$cycle,score=excess,reference=$ref"
)
attent bench --data "$ft_shards" --config "$repo"/configs/ablation.yaml --init-from "$base" --budget-epochs 3 \
  --seeds "$seeds" --clock cpu --reuse --out "$out" --set model.lora.enabled=true --set checkpoint.export=false \
  --set eval.every_steps=25 --set eval.max_batches=0 "${quarter_model[@]}" "${arms[@]}" "${@:5}"
