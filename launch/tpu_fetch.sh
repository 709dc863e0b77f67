#!/usr/bin/env bash
# Copy a run directory (and the logs) from a TPU VM worker to this machine.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: $KT_SCRIPT --name NAME --zone ZONE --run-dir PATH --dest DIR [options]

Copy ~/$KT_REMOTE_DIR/PATH and ~/$KT_REMOTE_DIR/logs from one worker into DIR. Worker 0 (process 0) is the one
that writes reports, summaries and the run directory's files.

required:
  --name NAME           TPU VM name
  --zone ZONE           its zone
  --run-dir PATH        the run directory, relative to ~/$KT_REMOTE_DIR (e.g. runs/world-tiny)
  --dest DIR            local directory to copy into (created if missing)
options:
  --project PROJECT     Google Cloud project
  --worker N            worker index to copy from (default 0)
  --dry-run             print the commands, one per line, and run nothing
  -h, --help            this help
EOF
}

name="" zone="" project="" run_dir="" dest="" worker=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) kt_need_value "$@"; name=$2; shift 2 ;;
    --zone) kt_need_value "$@"; zone=$2; shift 2 ;;
    --project) kt_need_value "$@"; project=$2; shift 2 ;;
    --run-dir) kt_need_value "$@"; run_dir=$2; shift 2 ;;
    --dest) kt_need_value "$@"; dest=$2; shift 2 ;;
    --worker) kt_need_value "$@"; worker=$2; shift 2 ;;
    --dry-run) KT_DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) kt_die "unknown argument '$1'" ;;
  esac
done

kt_require --name "$name"
kt_require --zone "$zone"
kt_require --run-dir "$run_dir"
kt_require --dest "$dest"
kt_check_name --name "$name"
kt_check_zone --zone "$zone"
kt_check_project --project "$project"
kt_check_relpath --run-dir "$run_dir"
if [[ ! $worker =~ ^[0-9]+$ ]]; then
  kt_die "--worker '$worker' must be one worker index (0, 1, ...)"
fi
if [[ -e $dest && ! -d $dest ]]; then
  kt_die "--dest '$dest' exists and is not a directory"
fi
kt_gcloud_scope "$zone" "$project"

kt_run mkdir -p "$dest"
for path in "$run_dir" logs; do
  kt_run gcloud compute tpus tpu-vm scp "${KT_SCOPE[@]}" "--worker=$worker" --recurse \
    "$name:$KT_REMOTE_DIR/$path" "$dest/"
done
