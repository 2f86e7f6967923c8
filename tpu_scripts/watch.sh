#!/usr/bin/env bash
# Keep a run going on a (spot / queued) TPU: create if needed, set up, launch, and after
# a preemption re-create, re-setup and re-launch; the trainer resumes from the newest
# checkpoint in the GCS workdir.
set -euo pipefail
SCRIPT_NAME="watch.sh"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu_scripts/watch.sh [--config.KEY=VALUE ...]

Every POLL_SECONDS: read the TPU state (queued resource state with QUEUED=1) and the
trainer's status on worker 0, then
  READY/ACTIVE, trainer running        -> wait
  READY/ACTIVE, nothing started        -> setup.sh + launch.sh
  READY/ACTIVE, trainer exited 0       -> finished (config.num_steps done): exit 0
  READY/ACTIVE, trainer exited 75      -> preempted (SIGTERM: it saved a checkpoint); after
                                          GRACE_SECONDS, if the TPU is still up: relaunch
                                          (resume), else handle the new state
  READY/ACTIVE, trainer stopped        -> tpu_scripts/stop.sh stopped it: exit 0
  READY/ACTIVE, trainer exited other   -> stop with an error (see logs.sh)
  PREEMPTED/TERMINATED/STOPPED/SUSPENDED/FAILED/not found
                                       -> teardown + create + setup + launch (resume)
  anything else (CREATING, WAITING_FOR_RESOURCES, ...) -> wait
Arguments are forwarded to `rlhf-jax train` on every (re)launch, like launch.sh.
Run it where it can keep running (tmux, screen, a small VM): it only polls.

Required:  TPU_NAME  ZONE  PROJECT  ACCELERATOR_TYPE  BUCKET  RUN_NAME  CONFIG
           (plus everything create.sh / setup.sh / launch.sh read: SPOT, QUEUED, ...)
Optional:  POLL_SECONDS (default 60)  GRACE_SECONDS (default 120)
           MAX_RESTARTS (default 20 re-creations before giving up)  DRY_RUN=1 (prints the
           state query and the recovery sequence once)
USAGE
}

if wants_help "$@"; then usage; exit 0; fi
require_env TPU_NAME ZONE PROJECT ACCELERATOR_TYPE BUCKET RUN_NAME CONFIG
resolve_tpu_settings
resolve_run_settings
if [[ "${1:-}" == "--" ]]; then shift; fi
POLL_SECONDS="${POLL_SECONDS:-60}"
GRACE_SECONDS="${GRACE_SECONDS:-120}"
MAX_RESTARTS="${MAX_RESTARTS:-20}"
for var in POLL_SECONDS GRACE_SECONDS MAX_RESTARTS; do
  [[ "${!var}" =~ ^[0-9]+$ ]] || die "${var} must be a whole number, got '${!var}'"
done

status_cmd() {
  loc_flags
  STATUS_CMD=("${GCLOUD}" compute tpus tpu-vm ssh "${TPU_NAME}" "${LOC_FLAGS[@]}" --worker=0
    "--command=$(quote_cmd bash "${REMOTE_DIR}/tpu_scripts/worker.sh" status "--name=${RUN_NAME}")")
}

# Trainer status on worker 0 ("running PID", "exited RC", "lost", "missing"), or
# "unreachable" if ssh failed.
trainer_status() {
  status_cmd
  local out
  if out="$("${STATUS_CMD[@]}" 2>/dev/null)"; then
    # The last line is the status (ssh may print banners before it).
    printf '%s\n' "${out}" | awk 'NF { line = $0 } END { print line }'
  else
    echo "unreachable"
  fi
}

# try_step CMD...: run CMD in a subshell that stops at its first error, without
# ending the watch (a failed step is retried on a later poll). Status in TRY_RC.
try_step() {
  set +e
  (
    set -e
    "$@"
  )
  TRY_RC=$?
  set -e
  if ((TRY_RC != 0)); then log "step '$1' failed (exit ${TRY_RC}); retrying after ${POLL_SECONDS}s"; fi
}

setup_and_launch() {
  setup_workers
  launch_workers "$@"
}

recover() {
  local state="$1"
  shift
  if [[ "${state}" != "NOT_FOUND" ]]; then delete_tpu; fi
  create_tpu
  setup_workers
  launch_workers "$@"
}

if is_dry_run; then
  state_cmd
  dry_note "every ${POLL_SECONDS}s: state of the TPU, then of the trainer on worker 0"
  quote_cmd "${STATE_CMD[@]}"
  status_cmd
  quote_cmd "${STATUS_CMD[@]}"
  dry_note "when preempted (PREEMPTED/TERMINATED/STOPPED/SUSPENDED/FAILED): delete, create, setup, launch"
  recover PREEMPTED "$@"
  dry_note "when the TPU is up but nothing runs on it: setup, launch"
  setup_and_launch "$@"
  exit 0
fi

restarts=0
while :; do
  state="$(tpu_state)"
  case "${state}" in
    READY | ACTIVE)
      status="$(trainer_status)"
      case "${status}" in
        running*) log "${state}; trainer ${status}" ;;
        "exited 0")
          log "run '${RUN_NAME}' finished; workdir ${WORKDIR}. Tear down with tpu_scripts/teardown.sh"
          exit 0
          ;;
        "exited ${EXIT_PREEMPTED}")
          log "trainer preempted (exit ${EXIT_PREEMPTED}: SIGTERM, checkpoint saved); re-checking the TPU in ${GRACE_SECONDS}s"
          sleep "${GRACE_SECONDS}"
          state="$(tpu_state)"
          if [[ "${state}" == "READY" || "${state}" == "ACTIVE" ]]; then
            log "TPU still ${state}: relaunching; the run resumes from its last checkpoint"
            try_step setup_and_launch "$@"
          else
            log "TPU is now ${state}; handling it on the next poll"
            continue
          fi
          ;;
        stopped*)
          log "trainer ${status} by tpu_scripts/stop.sh; not relaunching (launch.sh resumes it)"
          exit 0
          ;;
        exited*) die "trainer on worker 0 ${status}; see tpu_scripts/logs.sh (fix, then run watch.sh again to resume)" ;;
        missing | lost)
          log "${state}; no trainer running (${status}): setting up and launching"
          try_step setup_and_launch "$@"
          ;;
        *) log "${state}; worker 0 ${status}; retrying" ;;
      esac
      ;;
    PREEMPTED | TERMINATED | STOPPED | SUSPENDED | FAILED | NOT_FOUND)
      if ((restarts >= MAX_RESTARTS)); then
        die "TPU is ${state} and MAX_RESTARTS=${MAX_RESTARTS} re-creations were used up"
      fi
      restarts=$((restarts + 1))
      log "TPU is ${state}: re-creating (${restarts}/${MAX_RESTARTS}); the run resumes from its last checkpoint"
      try_step recover "${state}" "$@"
      if ((TRY_RC == 0)); then continue; fi
      ;;
    *) log "TPU state ${state}; waiting" ;;
  esac
  sleep "${POLL_SECONDS}"
done
