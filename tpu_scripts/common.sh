# shellcheck shell=bash
# Shared settings and helpers for the tpu_scripts/*.sh launchers. Sourced, never run.
#
# Everything is configured through environment variables (see tpu_scripts/README.md):
#   required (per script):  TPU_NAME ZONE PROJECT ACCELERATOR_TYPE BUCKET RUN_NAME CONFIG
#   optional:               RUNTIME_VERSION SPOT QUEUED QR_NAME RESERVED SERVICE_ACCOUNT
#                           VALID_UNTIL_DURATION EXTRA_CREATE_ARGS GCS_MOUNT WORKDIR
#                           GCSFUSE_FLAGS REPO_URL REPO_REF REMOTE_DIR REMOTE_VENV PIP_EXTRA
#                           TRAIN_ENV WORKER LINES FOLLOW POLL_SECONDS MAX_RESTARTS
#                           DRY_RUN GCLOUD
# With DRY_RUN=1 no command is executed: each one is printed on stdout, one line per
# command, shell-quoted so that the line can be copy-pasted. Progress messages go to
# stderr, so stdout of a dry run is exactly the commands.

TPU_SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${TPU_SCRIPTS_DIR}/.." && pwd)"

DRY_RUN="${DRY_RUN:-0}"
GCLOUD="${GCLOUD:-gcloud}"
# Exit status of `rlhf-jax train` stopped by SIGTERM after saving a checkpoint
# (rlhf_jax.EXIT_PREEMPTED, EX_TEMPFAIL): re-launch / re-queue it to resume.
# shellcheck disable=SC2034  # used by watch.sh and slurm_train.sbatch
EXIT_PREEMPTED=75

# ---------------------------------------------------------------------------
# Messages, errors, quoting, running

log() { printf '[%s] %s\n' "${SCRIPT_NAME:-tpu_scripts}" "$*" >&2; }

# One clear line on stderr, non-zero exit.
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# Print arguments as one shell-quoted line, so that `bash -c "$(quote_cmd ...)"` runs
# exactly the same argv: words made only of safe characters stay bare, others are
# single-quoted (for --flag=VALUE only the VALUE, which reads better).
quote_cmd() {
  local out="" word q="'" esc="'\\''" safe='^[A-Za-z0-9_@%+=:,./-]+$' flag='^(--[A-Za-z0-9_.-]+=)(.*)$'
  for word in "$@"; do
    if [[ -n "${word}" && "${word}" =~ ${safe} ]]; then
      out+="${out:+ }${word}"
    elif [[ "${word}" =~ ${flag} ]]; then
      local value="${BASH_REMATCH[2]}"
      out+="${out:+ }${BASH_REMATCH[1]}${q}${value//${q}/${esc}}${q}"
    else
      out+="${out:+ }${q}${word//${q}/${esc}}${q}"
    fi
  done
  printf '%s\n' "${out}"
}

is_dry_run() { [[ "${DRY_RUN}" == "1" ]]; }

# run CMD ARGS...: execute, or with DRY_RUN=1 print the command line instead.
run() {
  if is_dry_run; then
    quote_cmd "$@"
  else
    log "+ $(quote_cmd "$@")"
    "$@"
  fi
}

# A comment line in dry-run output (explains repeated / conditional commands).
dry_note() {
  if is_dry_run; then printf '# %s\n' "$*"; fi
}

# require_env VAR...: fail with one line naming every missing variable.
require_env() {
  local var missing=()
  for var in "$@"; do
    if [[ -z "${!var:-}" ]]; then missing+=("${var}"); fi
  done
  if ((${#missing[@]} > 0)); then
    die "missing required environment variable(s): ${missing[*]} (run ${SCRIPT_NAME:-the script} --help, or see tpu_scripts/README.md)"
  fi
}

# Flags are 0/1; anything else is a typo worth stopping on.
check_bool() {
  local var
  for var in "$@"; do
    case "${!var:-0}" in
      0 | 1) ;;
      *) die "${var} must be 0 or 1, got '${!var}'" ;;
    esac
  done
}

wants_help() {
  local arg
  for arg in "$@"; do
    case "${arg}" in
      -h | --help) return 0 ;;
      --) return 1 ;;
    esac
  done
  return 1
}

# ---------------------------------------------------------------------------
# Settings with defaults (resolved after the caller's require_env)

SPOT="${SPOT:-0}"
QUEUED="${QUEUED:-0}"
RESERVED="${RESERVED:-0}"
REMOTE_DIR="${REMOTE_DIR:-rlhf_jax}"          # on each worker, relative to $HOME
REMOTE_VENV="${REMOTE_VENV:-rlhf_jax_venv}"   # on each worker, relative to $HOME
PIP_EXTRA="${PIP_EXTRA:-tpu}"                 # pip install -e ".[$PIP_EXTRA]"
GCSFUSE_FLAGS="${GCSFUSE_FLAGS:---implicit-dirs}"

# Runtime (software) version for a TPU generation, per Cloud TPU's "TPU software
# versions" page: v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5,
# v5e -> v2-alpha-tpuv5-lite, v4 and older -> tpu-ubuntu2204-base.
default_runtime_version() {
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    *) return 1 ;;
  esac
}

resolve_tpu_settings() {
  if [[ -n "${ACCELERATOR_TYPE:-}" ]]; then
    if [[ ! "${ACCELERATOR_TYPE}" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]]; then
      die "ACCELERATOR_TYPE='${ACCELERATOR_TYPE}' does not look like a TPU type (e.g. v4-8, v5litepod-8, v5p-32, v6e-8)"
    fi
    if [[ -z "${RUNTIME_VERSION:-}" ]]; then
      RUNTIME_VERSION="$(default_runtime_version "${ACCELERATOR_TYPE}")" ||
        die "no default runtime version for ACCELERATOR_TYPE=${ACCELERATOR_TYPE}; set RUNTIME_VERSION (gcloud compute tpus tpu-vm versions list)"
    fi
  fi
  QR_NAME="${QR_NAME:-${TPU_NAME:-}-qr}"
  check_bool SPOT QUEUED RESERVED DRY_RUN
}

resolve_run_settings() {
  BUCKET="${BUCKET#gs://}"
  BUCKET="${BUCKET%%/*}"
  GCS_MOUNT="${GCS_MOUNT:-/gcs/${BUCKET}}"
  WORKDIR="${WORKDIR:-${GCS_MOUNT}/runs/${RUN_NAME:-}}"
}

# ---------------------------------------------------------------------------
# gcloud command builders (shared by create/setup/launch/watch/teardown)

# Flags every zonal TPU command takes.
loc_flags() { LOC_FLAGS=("--zone=${ZONE}" "--project=${PROJECT}"); }

create_tpu() {
  loc_flags
  local common=()
  if [[ "${SPOT}" == "1" ]]; then common+=(--spot); fi
  if [[ "${RESERVED}" == "1" ]]; then common+=(--reserved); fi
  if [[ -n "${SERVICE_ACCOUNT:-}" ]]; then common+=("--service-account=${SERVICE_ACCOUNT}"); fi
  local extra=()
  if [[ -n "${EXTRA_CREATE_ARGS:-}" ]]; then read -r -a extra <<<"${EXTRA_CREATE_ARGS}"; fi
  if [[ "${QUEUED}" == "1" ]]; then
    if [[ -n "${VALID_UNTIL_DURATION:-}" ]]; then
      common+=("--valid-until-duration=${VALID_UNTIL_DURATION}")
    fi
    run "${GCLOUD}" compute tpus queued-resources create "${QR_NAME}" "${LOC_FLAGS[@]}" \
      "--node-id=${TPU_NAME}" "--accelerator-type=${ACCELERATOR_TYPE}" \
      "--runtime-version=${RUNTIME_VERSION}" ${common[@]+"${common[@]}"} ${extra[@]+"${extra[@]}"}
    wait_until_ready
  else
    run "${GCLOUD}" compute tpus tpu-vm create "${TPU_NAME}" "${LOC_FLAGS[@]}" \
      "--accelerator-type=${ACCELERATOR_TYPE}" "--version=${RUNTIME_VERSION}" \
      ${common[@]+"${common[@]}"} ${extra[@]+"${extra[@]}"}
  fi
}

delete_tpu() {
  loc_flags
  if [[ "${QUEUED}" == "1" ]]; then
    # --force also deletes the queued resource's TPU node.
    run "${GCLOUD}" compute tpus queued-resources delete "${QR_NAME}" "${LOC_FLAGS[@]}" --force --quiet
  else
    run "${GCLOUD}" compute tpus tpu-vm delete "${TPU_NAME}" "${LOC_FLAGS[@]}" --quiet
  fi
}

state_cmd() {
  loc_flags
  if [[ "${QUEUED}" == "1" ]]; then
    STATE_CMD=("${GCLOUD}" compute tpus queued-resources describe "${QR_NAME}" "${LOC_FLAGS[@]}" "--format=value(state.state)")
  else
    STATE_CMD=("${GCLOUD}" compute tpus tpu-vm describe "${TPU_NAME}" "${LOC_FLAGS[@]}" "--format=value(state)")
  fi
}

# Echo the state of the TPU VM (READY, PREEMPTED, ...) or queued resource (ACTIVE,
# SUSPENDED, WAITING_FOR_RESOURCES, ...); NOT_FOUND if it does not exist; UNKNOWN
# if gcloud failed for another reason (network, auth): callers retry those.
tpu_state() {
  state_cmd
  local out err_file rc=0
  err_file="$(mktemp)"
  out="$("${STATE_CMD[@]}" 2>"${err_file}")" || rc=$?
  if ((rc != 0)); then
    if grep -qiE 'NOT_FOUND|not found' "${err_file}"; then
      echo "NOT_FOUND"
    else
      log "describe failed: $(tr '\n' ' ' <"${err_file}")"
      echo "UNKNOWN"
    fi
  else
    echo "${out:-UNKNOWN}"
  fi
  rm -f "${err_file}"
}

# Queued resources come up asynchronously: poll until ACTIVE.
wait_until_ready() {
  state_cmd
  if is_dry_run; then
    dry_note "repeated every ${POLL_SECONDS:-60}s until the state is READY (TPU VM) or ACTIVE (queued resource):"
    quote_cmd "${STATE_CMD[@]}"
    return 0
  fi
  local state
  while :; do
    state="$(tpu_state)"
    case "${state}" in
      READY | ACTIVE) log "${QR_NAME:-${TPU_NAME}}: ${state}"; return 0 ;;
      FAILED | SUSPENDED | PREEMPTED | TERMINATED | NOT_FOUND)
        die "TPU resource is ${state} while waiting for it to come up" ;;
      *) log "state ${state}; waiting ${POLL_SECONDS:-60}s" ;;
    esac
    sleep "${POLL_SECONDS:-60}"
  done
}

# ssh_workers WORKER REMOTE_COMMAND_WORDS...: run one command on WORKER (0, 1, ... or all).
# The words are quoted for the remote shell here, once.
ssh_workers() {
  local worker="$1"
  shift
  loc_flags
  run "${GCLOUD}" compute tpus tpu-vm ssh "${TPU_NAME}" "${LOC_FLAGS[@]}" \
    "--worker=${worker}" "--command=$(quote_cmd "$@")"
}

# Install the project on every worker and mount the bucket (setup.sh, watch.sh).
setup_workers() {
  loc_flags
  local worker_setup=(bash "${REMOTE_DIR}/tpu_scripts/worker.sh" setup
    "--venv=${REMOTE_VENV}" "--dir=${REMOTE_DIR}" "--pip-extra=${PIP_EXTRA}"
    "--bucket=${BUCKET}" "--mount=${GCS_MOUNT}" "--gcsfuse-flags=${GCSFUSE_FLAGS}")
  if [[ -n "${REPO_URL:-}" ]]; then
    local ref="${REPO_REF:-}"
    if [[ -z "${ref}" ]]; then
      ref="$(git -C "${REPO_ROOT}" rev-parse HEAD)" || die "cannot read HEAD of ${REPO_ROOT}; set REPO_REF"
    fi
    # Clone (or update) the repository on every worker, at one exact ref.
    local fetch
    fetch="test -d $(quote_cmd "${REMOTE_DIR}/.git") || git clone --quiet $(quote_cmd "${REPO_URL}" "${REMOTE_DIR}")"
    fetch+=" && git -C $(quote_cmd "${REMOTE_DIR}") fetch --quiet origin $(quote_cmd "${ref}")"
    fetch+=" && git -C $(quote_cmd "${REMOTE_DIR}") checkout --quiet --force FETCH_HEAD"
    run "${GCLOUD}" compute tpus tpu-vm ssh "${TPU_NAME}" "${LOC_FLAGS[@]}" --worker=all \
      "--command=${fetch} && $(quote_cmd "${worker_setup[@]}")"
  else
    # Ship the committed tree (git archive HEAD) to every worker.
    local sha tarball
    sha="$(git -C "${REPO_ROOT}" rev-parse --short=12 HEAD)" || die "${REPO_ROOT} is not a git checkout; set REPO_URL instead"
    if [[ -n "$(git -C "${REPO_ROOT}" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
      log "warning: uncommitted changes are NOT shipped; workers get commit ${sha} (git archive HEAD)"
    fi
    tarball="${TMPDIR:-/tmp}/rlhf_jax-${sha}.tar.gz"
    run git -C "${REPO_ROOT}" archive --format=tar.gz "--output=${tarball}" HEAD
    run "${GCLOUD}" compute tpus tpu-vm scp "${tarball}" "${TPU_NAME}:rlhf_jax.tar.gz" \
      "${LOC_FLAGS[@]}" --worker=all
    local unpack
    unpack="rm -rf $(quote_cmd "${REMOTE_DIR}") && mkdir -p $(quote_cmd "${REMOTE_DIR}")"
    unpack+=" && tar -xzf rlhf_jax.tar.gz -C $(quote_cmd "${REMOTE_DIR}")"
    run "${GCLOUD}" compute tpus tpu-vm ssh "${TPU_NAME}" "${LOC_FLAGS[@]}" --worker=all \
      "--command=${unpack} && $(quote_cmd "${worker_setup[@]}")"
  fi
}

# The trainer command every worker runs (launch.sh, watch.sh); extra args are
# forwarded to `rlhf-jax train`.
train_cmd() {
  TRAIN_CMD=(env PYTHONUNBUFFERED=1)
  local extra_env=()
  if [[ -n "${TRAIN_ENV:-}" ]]; then read -r -a extra_env <<<"${TRAIN_ENV}"; fi
  TRAIN_CMD+=(${extra_env[@]+"${extra_env[@]}"} rlhf-jax train "--config=${CONFIG}"
    "--workdir=${WORKDIR}" --config.distributed.enabled=True "$@")
}

launch_workers() {
  train_cmd "$@"
  ssh_workers all bash "${REMOTE_DIR}/tpu_scripts/worker.sh" start "--name=${RUN_NAME}" \
    "--dir=${REMOTE_DIR}" "--venv=${REMOTE_VENV}" "--mount=${GCS_MOUNT}" -- "${TRAIN_CMD[@]}"
}
