#!/usr/bin/env bash
# Delete the TPU VM / queued resource. Never touches the GCS bucket.
set -euo pipefail
SCRIPT_NAME="teardown.sh"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu_scripts/teardown.sh

If RUN_NAME is set, first stops that run gracefully (SIGTERM on every worker: the
trainer checkpoints; skipped if the VM is unreachable), then deletes the TPU VM
(or, with QUEUED=1, the queued resource and its node, --force). The bucket, the
workdir and its checkpoints are never touched: re-create, setup and launch resumes.

Required:  TPU_NAME  ZONE  PROJECT
Optional:  QUEUED=1 (+ QR_NAME, default TPU_NAME-qr)  RUN_NAME  DRY_RUN=1
USAGE
}

if wants_help "$@"; then usage; exit 0; fi
(($# == 0)) || die "teardown.sh takes no arguments (configure it with environment variables; see --help)"
require_env TPU_NAME ZONE PROJECT
resolve_tpu_settings
if [[ -n "${RUN_NAME:-}" ]]; then
  ssh_workers all bash "${REMOTE_DIR}/tpu_scripts/worker.sh" stop "--name=${RUN_NAME}" ||
    log "could not stop '${RUN_NAME}' (VM unreachable or already gone); deleting anyway"
fi
delete_tpu
log "deleted. The bucket and the run's checkpoints are kept."
