#!/usr/bin/env bash
# Regroup tests/ by kind (issue 19): tests/unit (one process), tests/distributed (real gloo ranks of library
# parts), tests/e2e (the trainer, bench, score, CLI and docs as subprocesses), tests/cluster (real Slurm /
# Prometheus servers) and tests/helpers (runners, servers, workers; on pytest's pythonpath).
# git mv + the path rewrites a move one folder down needs, also applied to every grouped file (for edits
# merged from the flat layout). Idempotent: only flat tests/*.py move (conftest.py stays), so a second run
# moves nothing; run it again after merging branches that add flat test files, then `ruff check .` (a
# rewritten path can make a line too long). A test file the table below does not list is placed by a rule
# (printed with the reason). Usage: tools/ops/regroup_tests.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

declare -A GROUP=(
  [test_api]=unit [test_bad_input]=unit [test_checkpoint_state]=unit [test_data_builder]=unit
  [test_data_demo]=unit [test_data_integrity]=unit [test_data_stream]=unit [test_dependencies]=unit
  [test_engines_config]=unit [test_engines_local]=unit [test_engines_loss]=unit [test_launch_env]=unit
  [test_launch_scripts]=unit [test_launcher]=unit [test_ledger_pending]=unit [test_metrics]=unit
  [test_models]=unit [test_ops]=unit [test_runlock]=unit [test_shards_cli]=unit [test_shards_parallel]=unit
  [test_teacher_simulate]=unit [test_teacher_unit]=unit
  [test_data_resume_procs]=distributed [test_engines_dist]=distributed [test_engines_weights]=distributed
  [test_hf_trainer]=distributed [test_teacher_dist]=distributed [test_teacher_prune]=distributed
  [test_bad_input_table]=e2e [test_bench]=e2e [test_checkpoint_faults]=e2e [test_cli]=e2e [test_docs]=e2e
  [test_elastic_resume]=e2e [test_faults_e2e]=e2e [test_hf_bench]=e2e [test_pretrained]=e2e
  [test_score_reference]=e2e [test_tensorboard]=e2e [test_train_e2e]=e2e
  [test_multihost]=cluster [test_ops_servers]=cluster
)

rule() {  # a test file nobody listed: by what it needs and what it starts
  local f=$1
  if grep -qE 'mark\.servers|slurm_hosts|prometheus_server|multihost_cluster' "$f"; then
    echo "cluster (needs Slurm / Prometheus servers)"
  elif grep -qE '\brun_train\b|"-m", "attent_scale"|launcher\.command|subprocess\.|Popen\(' "$f"; then
    echo "e2e (starts processes)"
  elif grep -qE 'mp\.spawn|start_processes|_worker\b|from engine_worker import|import [a-z_]+_worker' "$f"; then
    echo "distributed (spawns ranks)"
  else
    echo "unit (one process)"
  fi
}

rewrite() {  # a file moved from tests/ to tests/GROUP/: one folder deeper, helpers in tests/helpers
  local f=$1 is_test=$2
  sed -i -E \
    -e 's#Path\(__file__\)\.resolve\(\)\.parents\[1\]#Path(__file__).resolve().parents[2]#g' \
    -e 's#Path\(__file__\)\.resolve\(\)\.parent\.parent\b#Path(__file__).resolve().parents[2]#g' \
    -e 's#/ "tests"( / "helpers")?#/ "tests" / "helpers"#g' "$f"
  if [ "$is_test" = 1 ]; then  # a test's siblings (workers, trainers) are now in helpers/
    sed -i -E \
      -e 's#Path\(__file__\)\.with_name\(#Path(__file__).parents[1].joinpath("helpers", #g' \
      -e 's#Path\(__file__\)\.parent / "#Path(__file__).parents[1] / "helpers" / "#g' "$f"
  fi
}

moved=0
while IFS= read -r f; do
  name=$(basename "$f" .py)
  [ "$name" = conftest ] && continue
  if [[ $name == test_* ]]; then
    if [ -n "${GROUP[$name]:-}" ]; then group=${GROUP[$name]}; why="listed"
    else why=$(rule "$f"); group=${why%% *}; why=${why#* (}; why="by rule: ${why%)}"; fi
    is_test=1
  else
    group=helpers; why="not a test file"; is_test=0
  fi
  mkdir -p "tests/$group"
  git mv "$f" "tests/$group/$name.py"
  rewrite "tests/$group/$name.py" "$is_test"
  echo "placed $f -> tests/$group/ ($why)"
  moved=$((moved + 1))
done < <(git ls-files 'tests/*.py' | grep -E '^tests/[^/]+\.py$')

# files merged into the groups from branches that still had the flat layout: the same rewrites (each is
# idempotent: a second pass finds nothing to change)
for f in $(git ls-files 'tests/*/*.py'); do
  case $(basename "$f") in test_*) rewrite "$f" 1 ;; *) rewrite "$f" 0 ;; esac
done

# references by path (docs, docstrings, comments): tests/NAME.py -> tests/GROUP/NAME.py
mapfile -t texts < <(git ls-files README.md docs tests attent_scale tools launch configs Makefile pyproject.toml .ci \
  | grep -vE '\.(json|tar|model)$')
for f in $(git ls-files 'tests/*/*.py'); do
  rel=${f#tests/}; name=$(basename "$rel")
  sed -i "s#\btests/$name\b#tests/$rel#g" "${texts[@]}"
done

grep -q '^pythonpath' pyproject.toml || sed -i '/^testpaths = /a pythonpath = ["tests/helpers"]' pyproject.toml
echo "regroup_tests: moved $moved file(s); groups: $(for d in tests/*/; do
  n=$(git ls-files "$d" | grep -c '\.py$' || true); printf '%s %s, ' "$(basename "$d")" "$n"; done)"
