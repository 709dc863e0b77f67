#!/usr/bin/env bash
# Show (or follow) a run's log on a TPU VM worker.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: $KT_SCRIPT --name NAME --zone ZONE --run-name RUN [options]

Print ~/$KT_REMOTE_DIR/logs/RUN.log of one worker (process 0 holds the summaries), or follow it as it grows.

required:
  --name NAME           TPU VM name
  --zone ZONE           its zone
  --run-name RUN        the run's name (tpu_run.sh --run-name; default there: the config's file name)
options:
  --project PROJECT     Google Cloud project
  --worker W            worker index or all (default 0)
  --follow              keep following the log (tail -F) until interrupted
  --dry-run             print the commands, one per line, and run nothing
  -h, --help            this help
EOF
}

name="" zone="" project="" run_name="" worker=0 follow=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) kt_need_value "$@"; name=$2; shift 2 ;;
    --zone) kt_need_value "$@"; zone=$2; shift 2 ;;
    --project) kt_need_value "$@"; project=$2; shift 2 ;;
    --run-name) kt_need_value "$@"; run_name=$2; shift 2 ;;
    --worker) kt_need_value "$@"; worker=$2; shift 2 ;;
    --follow) follow=1; shift ;;
    --dry-run) KT_DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) kt_die "unknown argument '$1'" ;;
  esac
done

kt_require --name "$name"
kt_require --zone "$zone"
kt_require --run-name "$run_name"
kt_check_name --name "$name"
kt_check_zone --zone "$zone"
kt_check_project --project "$project"
kt_check_run_name --run-name "$run_name"
kt_check_worker --worker "$worker"
kt_gcloud_scope "$zone" "$project"

log="$KT_REMOTE_DIR/logs/$run_name.log"
if [[ $follow == 1 ]]; then
  show="tail -n +1 -F $log"
else
  show="cat $log"
fi
kt_run gcloud compute tpus tpu-vm ssh "$name" "${KT_SCOPE[@]}" "--worker=$worker" "--command=$show"
