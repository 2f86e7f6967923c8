#!/usr/bin/env bash
# Stop a run gracefully on every worker: SIGTERM -> the trainer checkpoints and exits 75.
set -euo pipefail
SCRIPT_NAME="stop.sh"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu_scripts/stop.sh

Sends SIGTERM to the trainer on every worker (--worker=all) and waits for it: the
trainer saves a checkpoint at the end of the current step and exits 75 (preempted).
The worker records the stop, so watch.sh reports "stopped" and does not relaunch it.
Relaunch with launch.sh (same RUN_NAME) to resume.

Required:  TPU_NAME  ZONE  PROJECT  RUN_NAME
Optional:  STOP_TIMEOUT (seconds to wait, default 600)  REMOTE_DIR  DRY_RUN=1
USAGE
}

if wants_help "$@"; then usage; exit 0; fi
(($# == 0)) || die "stop.sh takes no arguments (configure it with environment variables; see --help)"
require_env TPU_NAME ZONE PROJECT RUN_NAME
resolve_tpu_settings
ssh_workers all bash "${REMOTE_DIR}/tpu_scripts/worker.sh" stop "--name=${RUN_NAME}" \
  "--timeout=${STOP_TIMEOUT:-600}"
