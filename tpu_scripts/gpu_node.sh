#!/usr/bin/env bash
# Run rlhf_jax on one multi-GPU machine (or on a few, each started by hand).
set -euo pipefail
SCRIPT_NAME="gpu_node.sh"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu_scripts/gpu_node.sh setup
       tpu_scripts/gpu_node.sh train [--config.KEY=VALUE ...]

setup  creates VENV with PYTHON (3.11) and runs pip install -e ".[cuda12]"
       (jax[cuda12]: CUDA and cuDNN come as pip wheels; needs an NVIDIA driver).
train  runs, in the foreground, from the repository root:
         env PYTHONUNBUFFERED=1 VENV/bin/rlhf-jax train --config=CONFIG --workdir=WORKDIR [args]
       One process drives every GPU of the machine. Run it again with the same
       WORKDIR to resume from the newest checkpoint. SIGTERM checkpoints and exits 75
       (preempted: run it again to resume); 0 means config.num_steps are done.
       Use tmux/screen or nohup to keep it running after you log out.

Required (train):  CONFIG (e.g. configs/sft.py:1b)  WORKDIR (e.g. runs/sft-1b)
Optional:  VENV (default REPO/.venv)  PYTHON (default python3.11)  GPU_PIP_EXTRA (default cuda12)
           TRAIN_ENV "KEY=VALUE ..." extra environment for the trainer  DRY_RUN=1
Several machines without SLURM: start one process per machine with
           NUM_PROCESSES=N PROCESS_ID=i (0..N-1) COORDINATOR_ADDRESS=host0:port
           (same values on every machine except PROCESS_ID); this adds
           --config.distributed.enabled=True and sets RLHF_JAX_COORDINATOR_ADDRESS,
           RLHF_JAX_NUM_PROCESSES and RLHF_JAX_PROCESS_ID. With SLURM use slurm_train.sbatch.
USAGE
}

if wants_help "$@" || (($# == 0)); then usage; exit 0; fi
check_bool DRY_RUN
VENV="${VENV:-${REPO_ROOT}/.venv}"
PYTHON="${PYTHON:-python3.11}"
GPU_PIP_EXTRA="${GPU_PIP_EXTRA:-cuda12}"
sub="$1"
shift

case "${sub}" in
  setup)
    (($# == 0)) || die "setup takes no arguments"
    if [[ ! -x "${VENV}/bin/python" ]]; then run "${PYTHON}" -m venv "${VENV}"; fi
    run "${VENV}/bin/python" -m pip install -q --upgrade pip
    run "${VENV}/bin/python" -m pip install -q -e "${REPO_ROOT}[${GPU_PIP_EXTRA}]"
    ;;
  train)
    require_env CONFIG WORKDIR
    if [[ "${1:-}" == "--" ]]; then shift; fi
    cmd=(env PYTHONUNBUFFERED=1)
    if [[ -n "${TRAIN_ENV:-}" ]]; then
      read -r -a extra_env <<<"${TRAIN_ENV}"
      cmd+=("${extra_env[@]}")
    fi
    distributed=()
    if [[ -n "${NUM_PROCESSES:-}${PROCESS_ID:-}${COORDINATOR_ADDRESS:-}" ]]; then
      require_env NUM_PROCESSES PROCESS_ID COORDINATOR_ADDRESS
      [[ "${NUM_PROCESSES}" =~ ^[0-9]+$ && "${PROCESS_ID}" =~ ^[0-9]+$ ]] ||
        die "NUM_PROCESSES and PROCESS_ID must be numbers"
      ((PROCESS_ID < NUM_PROCESSES)) || die "PROCESS_ID=${PROCESS_ID} must be < NUM_PROCESSES=${NUM_PROCESSES}"
      cmd+=("RLHF_JAX_COORDINATOR_ADDRESS=${COORDINATOR_ADDRESS}"
        "RLHF_JAX_NUM_PROCESSES=${NUM_PROCESSES}" "RLHF_JAX_PROCESS_ID=${PROCESS_ID}")
      distributed=(--config.distributed.enabled=True)
    fi
    cmd+=("${VENV}/bin/rlhf-jax" train "--config=${CONFIG}" "--workdir=${WORKDIR}"
      ${distributed[@]+"${distributed[@]}"} "$@")
    run cd "${REPO_ROOT}"
    if is_dry_run; then
      quote_cmd "${cmd[@]}"
    else
      log "+ $(quote_cmd "${cmd[@]}")"
      exec "${cmd[@]}"
    fi
    ;;
  *) die "unknown command '${sub}' (setup or train; see --help)" ;;
esac
