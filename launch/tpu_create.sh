#!/usr/bin/env bash
# Create a TPU VM (directly, or through a queued resource that waits for capacity).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: $KT_SCRIPT --name NAME --zone ZONE --accelerator-type TYPE [options]

Create a Cloud TPU VM for kt-jax.

required:
  --name NAME               TPU VM name (also the queued resource's and node's id)
  --zone ZONE               e.g. us-central2-b, europe-west4-a, us-east5-b
  --accelerator-type TYPE   v2-N, v3-N, v4-N, v5p-N, v5litepod-N or v6e-N (e.g. v5litepod-16)
options:
  --runtime-version V       TPU software version (default by generation: v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
                            v5litepod v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base)
  --project PROJECT         Google Cloud project (default: gcloud's configured project)
  --spot                    Spot capacity (cheaper, can be preempted)
  --queued                  request through a queued resource and wait until it is ACTIVE
  --wait-timeout SECONDS    with --queued: how long to wait for ACTIVE (default 3600)
  --dry-run                 print the commands, one per line, and run nothing
  -h, --help                this help
EOF
}

name="" zone="" accel="" runtime="" project="" spot=0 queued=0 wait_timeout=3600
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) kt_need_value "$@"; name=$2; shift 2 ;;
    --zone) kt_need_value "$@"; zone=$2; shift 2 ;;
    --accelerator-type) kt_need_value "$@"; accel=$2; shift 2 ;;
    --runtime-version) kt_need_value "$@"; runtime=$2; shift 2 ;;
    --project) kt_need_value "$@"; project=$2; shift 2 ;;
    --wait-timeout) kt_need_value "$@"; wait_timeout=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --queued) queued=1; shift ;;
    --dry-run) KT_DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) kt_die "unknown argument '$1'" ;;
  esac
done

kt_require --name "$name"
kt_require --zone "$zone"
kt_require --accelerator-type "$accel"
kt_check_name --name "$name"
kt_check_zone --zone "$zone"
kt_check_accelerator --accelerator-type "$accel"
kt_check_project --project "$project"
runtime=${runtime:-$(kt_default_runtime "$accel")}
kt_check_runtime --runtime-version "$runtime"
if [[ ! $wait_timeout =~ ^[0-9]+$ ]]; then
  kt_die "--wait-timeout '$wait_timeout' must be a whole number of seconds"
fi
kt_gcloud_scope "$zone" "$project"

extra=()
if [[ $spot == 1 ]]; then
  extra+=(--spot)
fi

if [[ $queued == 0 ]]; then
  kt_run gcloud compute tpus tpu-vm create "$name" "${KT_SCOPE[@]}" "--accelerator-type=$accel" \
    "--version=$runtime" "${extra[@]}"
  exit 0
fi

kt_run gcloud compute tpus queued-resources create "$name" "--node-id=$name" "${KT_SCOPE[@]}" \
  "--accelerator-type=$accel" "--runtime-version=$runtime" "${extra[@]}"
describe=(gcloud compute tpus queued-resources describe "$name" "${KT_SCOPE[@]}" "--format=value(state.state)")
if [[ $KT_DRY_RUN == 1 ]]; then
  kt_run "${describe[@]}"  # repeated every 30 s until the state is ACTIVE
  exit 0
fi
waited=0
while true; do
  state=$(kt_run "${describe[@]}")
  printf '%s: queued resource %s is %s (%d s)\n' "$KT_SCRIPT" "$name" "$state" "$waited" >&2
  case $state in
    ACTIVE) exit 0 ;;
    FAILED|SUSPENDED) printf '%s: queued resource %s is %s\n' "$KT_SCRIPT" "$name" "$state" >&2; exit 1 ;;
  esac
  if [[ $waited -ge $wait_timeout ]]; then
    printf '%s: %s not ACTIVE after %d s (still queued; delete it with tpu_delete.sh --queued)\n' \
      "$KT_SCRIPT" "$name" "$waited" >&2
    exit 1
  fi
  sleep 30
  waited=$((waited + 30))
done
