#!/usr/bin/env bash
# Start `rlhf-jax train` on every worker of a TPU VM, in the background.
set -euo pipefail
SCRIPT_NAME="launch.sh"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu_scripts/launch.sh [--config.KEY=VALUE ...]

Runs, on every worker at once (--worker=all), in the background (nohup):
  env PYTHONUNBUFFERED=1 [TRAIN_ENV...] rlhf-jax train --config=CONFIG \
      --workdir=WORKDIR --config.distributed.enabled=True [your arguments]
Each worker appends its output to ~/rlhf_jax_logs/RUN_NAME.log (see logs.sh).
jax.distributed.initialize() finds the other workers by itself on a TPU VM.
Launching again with the same RUN_NAME/WORKDIR resumes from the newest checkpoint.

Required:  TPU_NAME  ZONE  PROJECT  BUCKET  RUN_NAME  CONFIG (e.g. configs/sft.py:1b)
Optional:  WORKDIR (default GCS_MOUNT/runs/RUN_NAME = /gcs/BUCKET/runs/RUN_NAME)
           TRAIN_ENV  extra environment for the trainer, "KEY=VALUE KEY2=VALUE2"
           GCS_MOUNT  REMOTE_DIR  REMOTE_VENV  DRY_RUN=1

Example:
  RUN_NAME=sft-1b CONFIG=configs/sft.py:1b tpu_scripts/launch.sh --config.optimizer.lr=3e-4
USAGE
}

if wants_help "$@"; then usage; exit 0; fi
require_env TPU_NAME ZONE PROJECT BUCKET RUN_NAME CONFIG
resolve_tpu_settings
resolve_run_settings
if [[ "${1:-}" == "--" ]]; then shift; fi
launch_workers "$@"
log "started '${RUN_NAME}' on all workers of ${TPU_NAME}; workdir ${WORKDIR}; follow with tpu_scripts/logs.sh"
