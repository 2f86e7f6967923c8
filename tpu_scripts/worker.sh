#!/usr/bin/env bash
# Runs ON each TPU worker (setup.sh / launch.sh / stop.sh / watch.sh call it over
# `gcloud compute tpus tpu-vm ssh --worker=all`). Relative paths are under $HOME.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash tpu_scripts/worker.sh COMMAND [--key=value ...] [-- TRAIN COMMAND...]

Worker-side half of tpu_scripts (you normally never call it yourself).

  setup  --dir=rlhf_jax --venv=rlhf_jax_venv --pip-extra=tpu [--bucket=B --mount=/gcs/B]
         [--gcsfuse-flags=--implicit-dirs]
         Python 3.11 venv + `pip install -e "DIR[EXTRA]"`; installs gcsfuse (Google's
         apt repository) and mounts gs://B at MOUNT.
  start  --name=RUN --dir=rlhf_jax --venv=rlhf_jax_venv [--mount=/gcs/B] -- CMD...
         Runs CMD from DIR in the background (nohup), venv first on PATH; output is
         appended to ~/rlhf_jax_logs/RUN.log; refuses if RUN is already running here.
  stop   --name=RUN [--timeout=600]
         SIGTERM the trainer (it checkpoints and exits 75 = preempted) and wait for it;
         records the stop so that `status` says "stopped" (watch.sh does not relaunch).
  status --name=RUN
         Prints one line: "running PID", "exited RC" (75: preempted by a SIGTERM that did
         not come from `stop`, resumable), "stopped RC" (after `stop`), "lost" (pid file
         but no process and no exit code, e.g. after a reboot) or "missing" (never
         started here).

Environment: DRY_RUN=1 prints the commands `setup` would run instead of running them.
EOF
}

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
SCRIPT_NAME="worker $(hostname)"
# shellcheck source=common.sh
source "$(dirname "${SELF}")/common.sh"   # run, quote_cmd, die, log
LOG_DIR="${HOME}/rlhf_jax_logs"

sudo_if_needed() {
  if [[ "$(id -u)" == "0" ]]; then run "$@"; else run sudo "$@"; fi
}
apt_install() {
  # Fresh TPU VMs often run unattended-upgrades at boot: wait for the dpkg lock.
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -y -q install "$@"
}
apt_update() {
  sudo_if_needed apt-get -o DPkg::Lock::Timeout=600 -q update
}

# Options (--key=value; dashes in keys become underscores).
OPT_dir="" OPT_venv="" OPT_pip_extra="" OPT_bucket="" OPT_mount="" OPT_gcsfuse_flags=""
OPT_name="" OPT_timeout="" OPT_pid_file="" OPT_rc_file=""
KNOWN_OPTS=" dir venv pip_extra bucket mount gcsfuse_flags name timeout pid_file rc_file "

parse_opts() {
  REST=()
  while (($# > 0)); do
    case "$1" in
      --) shift; REST=("$@"); return 0 ;;
      --*=*)
        local key="${1%%=*}"
        key="${key#--}"
        key="${key//-/_}"
        [[ "${KNOWN_OPTS}" == *" ${key} "* ]] || die "unknown option '${1%%=*}'"
        printf -v "OPT_${key}" '%s' "${1#*=}"
        ;;
      *) die "unexpected argument '$1' (options are --key=value; the command goes after --)" ;;
    esac
    shift
  done
}

need_opt() {
  local key
  for key in "$@"; do
    local var="OPT_${key}"
    [[ -n "${!var:-}" ]] || die "missing --${key//_/-}=..."
  done
}

# ---------------------------------------------------------------------------

# A Python 3.11 venv with pip. TPU VM images are Ubuntu 22.04 (Python 3.10): install
# python3.11 + python3.11-venv from Ubuntu's archive when needed (Debian's python
# cannot make a venv with pip without the -venv package).
ensure_venv() {
  local venv="$1"
  if [[ -x "${venv}/bin/python" ]] && "${venv}/bin/python" -m pip --version >/dev/null 2>&1; then
    return 0
  fi
  if ! command -v python3.11 >/dev/null 2>&1; then
    log "installing python3.11 (the project needs Python 3.11)"
    apt_update
    apt_install python3.11 python3.11-venv
  fi
  if ! run python3.11 -m venv --clear "${venv}"; then
    log "python3.11 -m venv failed; installing python3.11-venv and retrying"
    apt_update
    apt_install python3.11-venv
    run python3.11 -m venv --clear "${venv}"
  fi
}

install_gcsfuse() {
  if command -v gcsfuse >/dev/null 2>&1; then return 0; fi
  log "installing gcsfuse from Google's apt repository"
  local codename repo_line key_url="https://packages.cloud.google.com/apt/doc/apt-key.gpg"
  if command -v lsb_release >/dev/null 2>&1; then
    codename="$(lsb_release -c -s)"
  else
    # shellcheck source=/dev/null
    codename="$(. /etc/os-release && echo "${VERSION_CODENAME}")"
  fi
  repo_line="deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-${codename} main"
  local sudo=(sudo)
  if [[ "$(id -u)" == "0" ]]; then sudo=(); fi
  if is_dry_run; then
    printf '%s | %s\n' "$(quote_cmd echo "${repo_line}")" "$(quote_cmd ${sudo[@]+"${sudo[@]}"} tee /etc/apt/sources.list.d/gcsfuse.list)"
    printf '%s | %s\n' "$(quote_cmd curl -fsSL "${key_url}")" "$(quote_cmd ${sudo[@]+"${sudo[@]}"} tee /usr/share/keyrings/cloud.google.asc)"
  else
    echo "${repo_line}" | ${sudo[@]+"${sudo[@]}"} tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
    curl -fsSL "${key_url}" | ${sudo[@]+"${sudo[@]}"} tee /usr/share/keyrings/cloud.google.asc >/dev/null
  fi
  apt_update
  apt_install gcsfuse   # pulls in the fuse package it needs
}

mount_bucket() {
  local bucket="$1" mount="$2" flags="$3"
  if mountpoint -q "${mount}"; then
    log "gs://${bucket} already mounted at ${mount}"
  else
    sudo_if_needed mkdir -p "${mount}"
    sudo_if_needed chown "$(id -u):$(id -g)" "${mount}"
    local flag_words=()
    read -r -a flag_words <<<"${flags}"
    run gcsfuse ${flag_words[@]+"${flag_words[@]}"} "${bucket}" "${mount}"
  fi
  if ! is_dry_run; then
    local probe
    probe="${mount}/.rlhf_jax_write_probe_$(hostname)"
    { : >"${probe}" && rm -f "${probe}"; } ||
      die "cannot write to gs://${bucket} through ${mount}: give the TPU's service account roles/storage.objectUser on the bucket"
  fi
}

cmd_setup() {
  parse_opts "$@"
  need_opt dir venv pip_extra
  cd "${HOME}"
  [[ -f "${OPT_dir}/pyproject.toml" ]] || die "${HOME}/${OPT_dir}/pyproject.toml not found: the code was not copied"
  ensure_venv "${OPT_venv}"
  run "${OPT_venv}/bin/python" -m pip install -q --upgrade pip
  run "${OPT_venv}/bin/python" -m pip install -q -e "./${OPT_dir}[${OPT_pip_extra}]"
  if [[ -n "${OPT_bucket:-}" ]]; then
    need_opt mount
    install_gcsfuse
    mount_bucket "${OPT_bucket}" "${OPT_mount}" "${OPT_gcsfuse_flags:---implicit-dirs}"
  fi
  if ! is_dry_run; then
    log "setup done: $("${OPT_venv}/bin/python" --version 2>&1), code in ~/${OPT_dir}"
  fi
}

# ---------------------------------------------------------------------------

run_files() {
  PID_FILE="${LOG_DIR}/${OPT_name}.pid"
  RC_FILE="${LOG_DIR}/${OPT_name}.rc"
  LOG_FILE="${LOG_DIR}/${OPT_name}.log"
  STOPPED_FILE="${LOG_DIR}/${OPT_name}.stopped"   # written by `stop`
}

# Prints the status line; see usage.
status_line() {
  run_files
  if [[ -f "${PID_FILE}" ]]; then
    local pid
    pid="$(cat "${PID_FILE}")"
    if [[ -n "${pid}" ]] && kill -0 "${pid}" 2>/dev/null; then
      echo "running ${pid}"
      return 0
    fi
  fi
  if [[ -f "${RC_FILE}" && -f "${STOPPED_FILE}" ]]; then
    echo "stopped $(cat "${RC_FILE}")"
  elif [[ -f "${RC_FILE}" ]]; then
    echo "exited $(cat "${RC_FILE}")"
  elif [[ -f "${PID_FILE}" ]]; then
    echo "lost"
  else
    echo "missing"
  fi
}

cmd_status() {
  parse_opts "$@"
  need_opt name
  status_line
}

cmd_start() {
  parse_opts "$@"
  need_opt name dir venv
  ((${#REST[@]} > 0)) || die "start needs the command after --"
  cd "${HOME}"
  mkdir -p "${LOG_DIR}"
  local status
  status="$(status_line)"
  if [[ "${status}" == running* ]]; then
    die "run '${OPT_name}' is already ${status} on $(hostname); stop it first (tpu_scripts/stop.sh)"
  fi
  if [[ -n "${OPT_mount:-}" ]] && ! mountpoint -q "${OPT_mount}"; then
    die "${OPT_mount} is not mounted on $(hostname): run tpu_scripts/setup.sh first"
  fi
  [[ -d "${OPT_dir}" ]] || die "${HOME}/${OPT_dir} not found: run tpu_scripts/setup.sh first"
  [[ -x "${OPT_venv}/bin/python" ]] || die "${HOME}/${OPT_venv} not found: run tpu_scripts/setup.sh first"
  run_files
  rm -f "${RC_FILE}" "${PID_FILE}" "${STOPPED_FILE}"
  printf '=== %s start on %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(hostname)" "${REST[*]}" >>"${LOG_FILE}"
  local venv_bin
  venv_bin="$(cd "${OPT_venv}/bin" && pwd)"
  (
    cd "${OPT_dir}"
    # setsid + nohup: the run outlives the ssh session that started it.
    PATH="${venv_bin}:${PATH}" setsid nohup bash "${SELF}" _supervise \
      "--pid-file=${PID_FILE}" "--rc-file=${RC_FILE}" -- "${REST[@]}" \
      >>"${LOG_FILE}" 2>&1 </dev/null &
  )
  # Wait for the supervisor to record the trainer's pid.
  local i
  for ((i = 0; i < 50; i++)); do
    [[ -s "${PID_FILE}" ]] && break
    sleep 0.1
  done
  log "started '${OPT_name}' ($(status_line)); log: ${LOG_FILE}"
}

# Background half of `start`: runs the command, records its pid and exit code.
cmd_supervise() {
  parse_opts "$@"
  local child rc=0
  "${REST[@]}" &
  child=$!
  echo "${child}" >"${OPT_pid_file}"
  wait "${child}" || rc=$?
  echo "${rc}" >"${OPT_rc_file}"
  printf '=== %s exit code %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${rc}"
}

cmd_stop() {
  parse_opts "$@"
  need_opt name
  run_files
  local status timeout="${OPT_timeout:-600}" i
  status="$(status_line)"
  if [[ "${status}" != running* ]]; then
    log "'${OPT_name}' is not running (${status})"
    return 0
  fi
  local pid="${status#running }"
  log "SIGTERM to pid ${pid} (the trainer checkpoints and exits 75)"
  : >"${STOPPED_FILE}"
  kill -TERM "${pid}"
  for ((i = 0; i < timeout; i++)); do
    kill -0 "${pid}" 2>/dev/null || break
    sleep 1
  done
  # The supervisor writes the exit code right after the trainer exits.
  for ((i = 0; i < 20; i++)); do
    [[ -f "${RC_FILE}" ]] && break
    sleep 0.1
  done
  log "'${OPT_name}': $(status_line)"
}

main() {
  if (($# == 0)); then
    usage >&2
    exit 2
  fi
  local sub="$1"
  shift
  case "${sub}" in
    -h | --help | help) usage ;;
    setup) cmd_setup "$@" ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    _supervise) cmd_supervise "$@" ;;
    *) die "unknown command '${sub}' (setup, start, stop, status)" ;;
  esac
}

main "$@"
