#!/usr/bin/env bash
# Install rlhf_jax on every worker of a TPU VM and mount the GCS bucket there.
set -euo pipefail
SCRIPT_NAME="setup.sh"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu_scripts/setup.sh

On every worker (--worker=all): copy the code, create a Python 3.11 venv,
pip install -e ".[tpu]" (jax[tpu] with libtpu, pinned by pyproject.toml), install
gcsfuse and mount gs://BUCKET at GCS_MOUNT so all workers share one workdir.

Code: by default the committed tree (git archive HEAD; uncommitted changes are NOT
shipped) is copied with `gcloud compute tpus tpu-vm scp --worker=all`. With REPO_URL
set, each worker runs `git clone REPO_URL` and checks out REPO_REF (default: this
checkout's HEAD commit, which must be pushed).

Required:  TPU_NAME  ZONE  PROJECT  BUCKET (name or gs://name; never created or deleted here)
Optional:  GCS_MOUNT (default /gcs/BUCKET)  GCSFUSE_FLAGS (default --implicit-dirs)
           REPO_URL  REPO_REF  REMOTE_DIR (default rlhf_jax)  REMOTE_VENV (default rlhf_jax_venv)
           PIP_EXTRA (default tpu)  DRY_RUN=1
USAGE
}

if wants_help "$@"; then usage; exit 0; fi
(($# == 0)) || die "setup.sh takes no arguments (configure it with environment variables; see --help)"
require_env TPU_NAME ZONE PROJECT BUCKET
resolve_tpu_settings
resolve_run_settings
setup_workers
