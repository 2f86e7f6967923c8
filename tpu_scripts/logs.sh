#!/usr/bin/env bash
# Stream a run's log from a TPU worker.
set -euo pipefail
SCRIPT_NAME="logs.sh"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu_scripts/logs.sh

Follows ~/rlhf_jax_logs/RUN_NAME.log on one worker (tail -F; Ctrl-C stops following,
the run goes on). Worker 0 writes the metrics; every worker has its own log.

Required:  TPU_NAME  ZONE  PROJECT  RUN_NAME
Optional:  WORKER (default 0; a number, or "all" for every worker interleaved)
           LINES (default 100)  FOLLOW=0 (print the last LINES and exit)  DRY_RUN=1
USAGE
}

if wants_help "$@"; then usage; exit 0; fi
(($# == 0)) || die "logs.sh takes no arguments (configure it with environment variables; see --help)"
require_env TPU_NAME ZONE PROJECT RUN_NAME
resolve_tpu_settings
WORKER="${WORKER:-0}"
LINES="${LINES:-100}"
FOLLOW="${FOLLOW:-1}"
check_bool FOLLOW
[[ "${WORKER}" =~ ^([0-9]+|all)$ ]] || die "WORKER must be a worker number or 'all', got '${WORKER}'"
[[ "${LINES}" =~ ^[0-9]+$ ]] || die "LINES must be a number, got '${LINES}'"
tail_args=(tail -n "${LINES}")
if [[ "${FOLLOW}" == "1" ]]; then tail_args+=(-F); fi
ssh_workers "${WORKER}" "${tail_args[@]}" "rlhf_jax_logs/${RUN_NAME}.log"
