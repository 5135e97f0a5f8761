#!/usr/bin/env bash
# GPU check for the benchmark (docs/benchmarks.md): GPT-2 small (124M) from config, bf16, seq 1024, on
# real text shards of the embedded corpus; uniform vs the best AtteNT default, same step budget. Prints
# tokens/s, the scoring forward's cost relative to a training step, selection fraction and val loss.
# One prepared run, ~8 minutes on one H100: tools/gpu_run.sh [STEPS] [ARM]
set -euo pipefail
steps=${1:-600}
arm=${2:-${ATTENT_GPU_ARM:-ledger-soft:mode=ledger,strategy=soft,ratio_schedule=incremental}}
out=runs/gpu
python -m pip install -q -e . >/dev/null
if [ ! -f "$out/shards/manifest.json" ]; then
  python -m attent_scale shards build -o "$out/shards" --seq-len 1024 --vocab-size 8000 --max-bytes 24000000 \
    --val-fraction 0.02 --no-progress
fi
python -m attent_scale bench --data "$out/shards" --config configs/gpu_gpt2_small.yaml --budget-steps "$steps" \
  --arms "$arm" --out "$out/bench"
python - "$out/bench" <<'PY'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
for summary in sorted(root.glob("*/seed-0/summary.json")):
    s = json.loads(summary.read_text())
    per_train = s["train_seconds"] / max(1, s["samples_trained"])
    score = s["selection_seconds_by_phase"]["score"]
    per_score = score / s["samples_scored"] if s["samples_scored"] else float("nan")
    print(f"{summary.parent.parent.name:28} tokens/s {s['tokens_trained'] / s['train_seconds']:9.0f}  "
          f"score/train per sample {per_score / per_train:5.2f}  selection {100 * s['selection_fraction']:5.1f}%  "
          f"val {s['final_val_loss']:.4f}")
PY
