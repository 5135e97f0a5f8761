#!/usr/bin/env bash
# attent-scale on one machine: torchrun with N processes (ATTENT_NPROC, default: GPUs, else 1).
#
# Usage:  launch/local.sh CONFIG.yaml [--set key=value ...]      (further args go to `attent-scale train`)
#
# EDIT: ATTENT_NPROC (processes), ATTENT_VENV (venv to activate; default: the one on PATH),
#   ATTENT_RDZV_PORT (29500), ATTENT_METRICS (1: exporters on 127.0.0.1:ATTENT_METRICS_PORT+local_rank),
#   ATTENT_METRICS_PORT (19400), ATTENT_TARGETS_DIR (file_sd directory for a local Prometheus; unset = none).
#   ATTENT_MODULE (python module run as the trainer: attent_scale). Runs in the current directory (the
#   config's relative paths start there); CONFIG may be a packaged config's name, e.g. demo.
# Stopping: USR1, TERM or INT to this script asks the trainers to checkpoint and exit (code 75, passed on);
#   running the same command again resumes from the checkpoint.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG.yaml [--set key=value ...]" >&2
    exit 2
fi
config=$1
shift

if [[ -n ${ATTENT_VENV:-} ]]; then
    # shellcheck disable=SC1091
    source "$ATTENT_VENV/bin/activate"
fi

if [[ -n ${ATTENT_NPROC:-} ]]; then
    nproc=$ATTENT_NPROC
elif gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2> /dev/null) && ((gpus > 0)); then
    nproc=$gpus  # what CUDA enumerates: respects CUDA_VISIBLE_DEVICES, one per MIG instance (not nvidia-smi -L)
else
    nproc=1
fi
metrics_port=${ATTENT_METRICS_PORT:-19400}
targets=local-$$.json

module=${ATTENT_MODULE:-attent_scale}   # python module run as the trainer
train_args=(train --config "$config")
if [[ ${ATTENT_METRICS:-1} == 1 ]]; then
    train_args+=(--set metrics.enabled=true --set metrics.address=127.0.0.1
                 --set "metrics.port=$metrics_port")
    if [[ -n ${ATTENT_TARGETS_DIR:-} ]]; then
        python -m attent_scale.ops.targets --out "$ATTENT_TARGETS_DIR/$targets" \
            --nodelist 127.0.0.1 --ranks-per-node "$nproc" --base-port "$metrics_port"
    fi
fi
train_args+=("$@")

launcher=
stopping=0
# shellcheck disable=SC2317  # invoked by the trap
on_stop() {
    stopping=1
    echo "attent-scale: stop requested: asking the trainers to checkpoint and exit"
    if [[ -n $launcher ]]; then
        pkill -USR1 -P "$launcher" || true   # the workers are torchrun's children
    fi
}
trap on_stop USR1 TERM INT

# torchrun starts with USR1 ignored (inherited across exec) and never sees TERM/INT from us, so it does
# not SIGKILL the workers while they checkpoint (pytorch #119856).
(trap '' USR1 INT; exec torchrun --standalone --nproc-per-node="$nproc" --max-restarts=0 \
    -m "$module" "${train_args[@]}") &
launcher=$!
while kill -0 "$launcher" 2>/dev/null; do   # a wait the trap interrupts returns early (128 + USR1)
    wait "$launcher" || true
done
rc=0
wait "$launcher" || rc=$?   # the exit status itself: bash keeps it for a child it has already reaped
if [[ -n ${ATTENT_TARGETS_DIR:-} ]]; then
    rm -f "$ATTENT_TARGETS_DIR/$targets"
fi
if [[ $rc -ne 0 && $stopping == 1 ]]; then
    echo "attent-scale: stopped after a checkpoint (rc $rc); run the same command again to resume"
    exit 75
fi
exit "$rc"
