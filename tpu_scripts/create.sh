#!/usr/bin/env bash
# Create a Cloud TPU VM (or a queued resource) for rlhf_jax.
set -euo pipefail
SCRIPT_NAME="create.sh"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: tpu_scripts/create.sh

Create a TPU VM (single host or multi-host pod slice), on-demand or spot, directly
(gcloud compute tpus tpu-vm create) or through a queued resource (QUEUED=1:
gcloud compute tpus queued-resources create ... --node-id, then wait until ACTIVE).

Required:  TPU_NAME  ZONE  PROJECT  ACCELERATOR_TYPE (v4-8, v4-32, v5litepod-8, v5p-32, v6e-8, ...)
Optional:  RUNTIME_VERSION  default per generation: v4 and older tpu-ubuntu2204-base,
                            v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
           SPOT=1           spot capacity (cheaper, can be preempted at any time)
           QUEUED=1         queued resource (waits for capacity); QR_NAME (default TPU_NAME-qr),
                            VALID_UNTIL_DURATION (e.g. 6h: give up if not provisioned by then)
           RESERVED=1       use a reservation
           SERVICE_ACCOUNT  service account of the VMs (default: Compute Engine default SA)
           EXTRA_CREATE_ARGS  more gcloud flags, space-separated (e.g. "--network=my-net")
           DRY_RUN=1        print the gcloud commands instead of running them

Example:
  TPU_NAME=rlhf-v4 ZONE=us-central2-b PROJECT=my-proj ACCELERATOR_TYPE=v4-32 SPOT=1 \
    tpu_scripts/create.sh
USAGE
}

if wants_help "$@"; then usage; exit 0; fi
(($# == 0)) || die "create.sh takes no arguments (configure it with environment variables; see --help)"
require_env TPU_NAME ZONE PROJECT ACCELERATOR_TYPE
resolve_tpu_settings
create_tpu
