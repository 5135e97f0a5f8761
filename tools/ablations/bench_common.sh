# Sourced by the issue-9 benchmark scripts (selection_ablation.sh, finetune_bench.sh,
# finetune_excess_bench.sh): the quarter-size model they all train, and the shard splits with a held-out
# `ref` split for a reference model.
# shellcheck shell=bash disable=SC2034  # the variables are read by the scripts that source this file

# GPT-2 shape, 2 layers x 64, sequence 64 (configs/ablation.yaml otherwise)
quarter_model=(--set model.config.n_embd=64 --set model.config.n_head=2 --set model.config.n_positions=64)

# ref_split_src CORPUS: sets `split_src`, the `shards build` inputs and fractions of CORPUS (stdlib | prose)
# with a ref split. The splits go by document hash and both corpora have a few very large documents, so
# the fractions are lumpy: stdlib 1314 train / 1557 val / 182 ref windows at seq 64, vocab 1000; prose
# 1248 / 475 / 738.
ref_split_src() {
  if [ "$1" = stdlib ]; then
    split_src=(--max-bytes 500000 --val-fraction 0.25 --ref-fraction 0.25)
  else
    split_src=(/usr/share/doc --glob copyright --max-bytes 360000 --val-fraction 0.3 --ref-fraction 0.2)
  fi
}
