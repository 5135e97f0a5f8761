#!/usr/bin/env bash
# Issue 29's small-GPT regimes (docs/benchmarks.md "Regimes where the noise hurts"): the quarter-size model
# of bench_common.sh, CPU clock, one thread per run, corpora built by regimes.py. Per regime, uniform, the
# `oracle` (uniform on the regime's clean twin: regimes.py's oracle.jsonl, built with the same tokenizer and
# val split), the current default `signal` and the controls bench adds (random-subset[signal],
# uniform-short[N]); $ARMS adds arms by name. Then the tables (OUT/REGIME/bench.md) and issue 29's targets
# seed by seed (regime_targets.py --issue 29).
#   span        every train document with RATE (0.25) of its words replaced in 2..8-word spans (random
#               corpus words or the document's own words out of order); oracle: the documents without them
#   dup         40% of the originals with 2..16 occurrences; oracle: each original once
#   noise       15% of the documents replaced by noise text (the old regime); oracle: the rest
#   clean       the originals; no oracle (uniform is one)
#   constrained clean text trained $CONSTRAINED_EPOCHS (14) epochs (Muennighoff et al. 2023); judged against
#               uniform's best val; no oracle
#   repeats     prose (licence text) with its natural repeats kept (val shares them); "oracle": the train
#               split deduplicated, which tells whether dropping the repeats helps at all
# Usage: tools/ablations/learn_regimes.sh [CORPUS=stdlib] [SEEDS=3] [OUT=runs/learn-regimes/CORPUS] [bench args]
# env: REGIMES (default "span dup noise clean constrained repeats"), ARMS (extra bench arms, ';'-separated
#   NAME:KEY=VALUE,... specs; `{reference}` in a spec is the regime's cross-fitted reference scores, fitted
#   once per regime by `attent-scale reference fit` with REF_ARGS, its CPU seconds charged by bench: e.g.
#   ARMS='learn:mode=ledger,strategy=learn,ratio_schedule=constant,initial_ratio=0.2,reference={reference}'),
#   REF_ARGS (default: one epoch per fold, eval every 35 steps, early-stop patience 1), SPAN_RATE (0.25),
#   SPAN_WORDS (2,8), SPAN_KINDS (random,shuffle), NOISE_RATE (0.15), EPOCHS (6), CONSTRAINED_EPOCHS (14),
#   CONSTRAINED_BYTES (160000),
#   REPEATS_CORPUS (prose), ORACLE_STEPS (uniform | budget), JOBS (regimes run at once, 1), GAP_ONLY (set:
#   uniform and the oracle only, `bench --gap-only`: check that the noise hurts before judging a teacher;
#   a later run without it reuses both).
set -euo pipefail
corpus=${1:-stdlib}
seeds=${2:-3}
out=${3:-runs/learn-regimes/$corpus}
regimes=${REGIMES:-span dup noise clean constrained repeats}
epochs=${EPOCHS:-6}
jobs=${JOBS:-1}
# shellcheck source=tools/ablations/bench_common.sh
source "$(dirname "$0")/bench_common.sh"
default_and_extra_arms  # sets arms: the default signal arm, then $ARMS

build() {  # build REGIME DATA: the regime's jsonl files, its shards and, where it has one, its twin's shards
  local regime=$1 data=$2 how=() src=$corpus bytes=400000
  case $regime in
    span) how=(--regime span --rate "${SPAN_RATE:-0.25}" --span-words "${SPAN_WORDS:-2,8}"
               --noise-kinds "${SPAN_KINDS:-random,shuffle}") ;;
    dup) how=(--regime dup --rate 0.4 --max-copies 16); bytes=160000 ;;
    noise) how=(--regime noise --rate "${NOISE_RATE:-0.15}") ;;
    clean) how=(--regime clean) ;;
    constrained) how=(--regime clean); bytes=${CONSTRAINED_BYTES:-160000} ;;
    repeats) how=(--regime repeats); src=${REPEATS_CORPUS:-prose} ;;
    *) echo "learn_regimes.sh: unknown regime '$regime' in REGIMES" >&2; exit 2 ;;
  esac
  # ATTENT_TINY: less train text than the tiny build's cap (`regimes.py kinds` needs all of it built)
  [ "$tiny" = 1 ] && { bytes=20000; [ "$regime" = dup ] && how+=(--max-copies 4); }
  "$py" "$repo"/tools/ablations/regimes.py "${how[@]}" --corpus "$src" --max-bytes "$bytes" --seed 0 \
    --out "$data"
  attent shards build "$data/train.jsonl" --val-input "$data/val.jsonl" -o "$data/shards" --seq-len 64 \
    --vocab-size 1000 --no-progress --overwrite
  if [ -f "$data/oracle.jsonl" ] && "$py" -c 'import json, sys
sys.exit(0 if json.load(open(sys.argv[1]))["oracle_file"] else 1)' "$data/kinds.json"; then
    attent shards build "$data/oracle.jsonl" --val-input "$data/val.jsonl" -o "$data/oracle-shards" \
      --seq-len 64 --tokenizer "$data/shards/tokenizer.model" --no-progress --overwrite
  fi
}

one() {  # one REGIME: build (once), its reference (when an arm needs one), bench, the default's drops
  local regime=$1 data=$out/data-$1 budget=$epochs oracle=() ref regime_arms=()
  [ -f "$data/shards/manifest.json" ] || build "$regime" "$data"
  [ "$regime" = constrained ] && budget=${CONSTRAINED_EPOCHS:-14}
  [ -f "$data/oracle-shards/manifest.json" ] && oracle=(--oracle-data "$data/oracle-shards" \
    --oracle-steps "${ORACLE_STEPS:-uniform}")
  ref=$out/$regime/reference
  if [[ "${arms[*]}" == *"{reference}"* ]]; then  # the learn helper's arms: one cross-fitted reference
    read -r -a ref_args <<< "${REF_ARGS:---set reference.epochs=1 --set reference.eval_every_steps=35 \
--set reference.early_stop_patience=1}"
    attent reference fit --config "$repo"/configs/ablation.yaml --data "$data/shards" --out "$ref" --reuse \
      --set eval.max_batches=0 "${quarter_model[@]}" "${ref_args[@]}"
  fi
  for a in "${arms[@]}"; do regime_arms+=("${a//\{reference\}/$ref/scores-train.safetensors}"); done
  if [ -n "${GAP_ONLY:-}" ]; then  # uniform and the oracle only: the regime's oracle gap
    if [ "${#oracle[@]}" -eq 0 ]; then echo "$regime: no clean twin, no gap to measure"; return 0; fi
    regime_arms=(--gap-only)
  fi
  attent bench --data "$data/shards" --config "$repo"/configs/ablation.yaml --budget-epochs "$budget" \
    --seeds "$seeds" --clock cpu --reuse --out "$out/$regime" --set checkpoint.export=false \
    --set eval.every_steps=50 --set eval.max_batches=0 "${quarter_model[@]}" "${oracle[@]}" \
    "${regime_arms[@]}" "${@:2}"
  if [ "$tiny" = 1 ]; then  # bench --dry-run trained no arm: what the regime's samples are instead
    echo "$regime: ATTENT_TINY, no arm's selection to read (bench --dry-run); kinds of the train samples:"
    "$py" "$repo"/tools/ablations/regimes.py kinds "$data/shards" "$data/kinds.json"
    return 0
  fi
  [ -n "${GAP_ONLY:-}" ] || "$py" "$repo"/tools/ablations/regimes.py kinds "$data/shards" "$data/kinds.json" \
    --selection "$out/$regime/signal/seed-0/selection.jsonl"
}

mkdir -p "$out"
running=0 failed=0
for regime in $regimes; do  # JOBS regimes at once, each in its own log (OUT/REGIME.log)
  one "$regime" "${@:4}" > "$out/$regime.log" 2>&1 &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n || failed=$((failed + 1))
    running=$((running - 1))
  fi
done
while [ "$running" -gt 0 ]; do
  wait -n || failed=$((failed + 1))
  running=$((running - 1))
done
for regime in $regimes; do
  echo "== $regime ($out/$regime.log)"
  if [ "$tiny" = 1 ]; then cat "$out/$regime.log"; else tail -n 30 "$out/$regime.log"; fi
done
"$py" "$repo"/tools/ablations/regime_targets.py "$out" --issue 29  # issue 29's targets, seed by seed
if [ "$failed" -gt 0 ]; then
  echo "learn_regimes.sh: $failed regime(s) failed; see their logs" >&2
  exit 1
fi
