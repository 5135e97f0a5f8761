#!/usr/bin/env bash
# Issue 9, regime (b) (docs/benchmarks.md): the paper's LLM regime on a 2-core machine. A base model is
# pretrained once on one corpus (uniform, not timed), then every arm LoRA-fine-tunes it for 3 epochs on
# text of another kind, tokenized with the base's tokenizer: uniform, the official AtteNT LLM recipe
# (epoch 1 on all data recording training losses, then the top 70% by loss: ledger mode, hard, ratio 0.7),
# our default (cycle, hard, cosine, fixed interval, rescore stale), unbiased pruning (ledger losses,
# annealed), plus the automatic controls. CPU clock, one thread per arm.
# Usage: tools/ablations/finetune_bench.sh [SEEDS] [BASE_CORPUS] [FT_CORPUS] [OUT] [bench options...]
#   corpora: stdlib | prose; SEEDS=0 only prepares the shards and the base model
set -euo pipefail
seeds=${1:-3}
base_corpus=${2:-stdlib}
ft_corpus=${3:-prose}
out=${4:-runs/finetune-bench/$base_corpus-to-$ft_corpus}
root=runs/finetune-bench
# shellcheck source=tools/ablations/bench_common.sh
source "$(dirname "$0")/bench_common.sh"
src() {  # the corpus' inputs for `shards build` (CORPUS CAP)
  if [ "$1" = stdlib ]; then echo "--max-bytes $2"; else echo "/usr/share/doc --glob copyright --max-bytes $2"; fi
}
base_shards=$root/shards-$base_corpus
if [ ! -f "$base_shards/manifest.json" ]; then
  # shellcheck disable=SC2046
  attent shards build -o "$base_shards" $(src "$base_corpus" 2000000) --seq-len 64 --vocab-size 1000 \
    --val-fraction 0.1 --no-progress
fi
base=$root/base-$base_corpus
if [ ! -f "$base/export/model/config.json" ]; then
  attent train --config "$repo"/configs/ablation.yaml --set run_dir="$base" --set data.dir="$base_shards" \
    --set teacher.mode=none --set train.max_steps=1000000 --set train.max_epochs=4 --set eval.every_steps=200 \
    --set checkpoint.export=true --no-resume "${quarter_model[@]}"
fi
ft_shards=$root/shards-$ft_corpus-by-$base_corpus
if [ ! -f "$ft_shards/manifest.json" ]; then
  # shellcheck disable=SC2046
  attent shards build -o "$ft_shards" $(src "$ft_corpus" 320000) --seq-len 64 \
    --tokenizer "$base_shards/tokenizer.model" --val-fraction 0.4 --no-progress
fi
[ "$seeds" = 0 ] && exit 0  # SEEDS=0: only prepare the shards and the base model
arms=(
  --arms "official-ledger-hard-0.7:mode=ledger,strategy=hard,ratio_schedule=constant,initial_ratio=0.7,final_ratio=0.7,warmup_epochs=1"
  --arms "hard-cos-fix-stale:strategy=hard,ratio_schedule=cosine,interval_schedule=fixed,rescore=stale"
  --arms "prune-anneal:mode=ledger,strategy=prune,prune_ratio=0.6,prune_quantile=0.7,anneal_fraction=0.125"
)
attent bench --data "$ft_shards" --config "$repo"/configs/ablation.yaml --init-from "$base" --budget-epochs 3 \
  --seeds "$seeds" --clock cpu --reuse --out "$out" --set model.lora.enabled=true --set checkpoint.export=false \
  --set eval.every_steps=25 --set eval.max_batches=0 "${quarter_model[@]}" "${arms[@]}" "${@:5}"
