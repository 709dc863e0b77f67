#!/usr/bin/env bash
# Delete a TPU VM (or the queued resource and its node).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: $KT_SCRIPT --name NAME --zone ZONE [options]

Delete TPU VM NAME without asking (fetch the run directory first: tpu_fetch.sh).

required:
  --name NAME           TPU VM name (or queued resource id)
  --zone ZONE           its zone
options:
  --project PROJECT     Google Cloud project
  --queued              it was created with tpu_create.sh --queued: delete the queued resource and its node
  --dry-run             print the commands, one per line, and run nothing
  -h, --help            this help
EOF
}

name="" zone="" project="" queued=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) kt_need_value "$@"; name=$2; shift 2 ;;
    --zone) kt_need_value "$@"; zone=$2; shift 2 ;;
    --project) kt_need_value "$@"; project=$2; shift 2 ;;
    --queued) queued=1; shift ;;
    --dry-run) KT_DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) kt_die "unknown argument '$1'" ;;
  esac
done

kt_check_target "$name" "$zone" "$project"
kt_gcloud_scope "$zone" "$project"

if [[ $queued == 1 ]]; then
  kt_run gcloud compute tpus queued-resources delete "$name" "${KT_SCOPE[@]}" --force --quiet
else
  kt_run gcloud compute tpus tpu-vm delete "$name" "${KT_SCOPE[@]}" --quiet
fi
