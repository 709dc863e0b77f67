#!/usr/bin/env bash
# Run `kt-jax run --config CONFIG` on every worker of a TPU VM (one JAX process per worker) and stream the output.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: $KT_SCRIPT --name NAME --zone ZONE --config CONFIG [options] [-- KT_JAX_RUN_ARGS...]

Copy CONFIG to every worker of TPU VM NAME and start \`kt-jax run --config CONFIG\` on all of them at once, with
KT_JAX_DISTRIBUTED=auto so each process calls jax.distributed.initialize() (kt_jax.distributed) and JAX finds the
other workers itself. Output of all workers streams here and is kept in ~/$KT_REMOTE_DIR/logs/RUN_NAME.log on each.
Arguments after -- go to \`kt-jax run\` unchanged (e.g. dotted config overrides).

required:
  --name NAME           TPU VM name (set up with tpu_setup.sh)
  --zone ZONE           its zone
  --config CONFIG       local YAML config file
options:
  --project PROJECT     Google Cloud project
  --run-name RUN        log file name (default: the config's file name without extension)
  --detach              start the run in the background (nohup) and return; follow it with tpu_logs.sh
  --dry-run             print the commands, one per line, and run nothing
  -h, --help            this help
EOF
}

name="" zone="" project="" config="" run_name="" detach=0
run_args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) kt_need_value "$@"; name=$2; shift 2 ;;
    --zone) kt_need_value "$@"; zone=$2; shift 2 ;;
    --project) kt_need_value "$@"; project=$2; shift 2 ;;
    --config) kt_need_value "$@"; config=$2; shift 2 ;;
    --run-name) kt_need_value "$@"; run_name=$2; shift 2 ;;
    --detach) detach=1; shift ;;
    --dry-run) KT_DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; run_args=("$@"); break ;;
    *) kt_die "unknown argument '$1'" ;;
  esac
done

kt_require --name "$name"
kt_require --zone "$zone"
kt_require --config "$config"
kt_check_name --name "$name"
kt_check_zone --zone "$zone"
kt_check_project --project "$project"
kt_check_file --config "$config"
config_file=$(basename "$config")
kt_check_run_name "--config file name" "$config_file"
run_name=${run_name:-${config_file%.*}}
kt_check_run_name --run-name "$run_name"
kt_gcloud_scope "$zone" "$project"

remote_config="launch-configs/$config_file"
log="logs/$run_name.log"
kt_run gcloud compute tpus tpu-vm scp "${KT_SCOPE[@]}" --worker=all "$config" "$name:$KT_REMOTE_DIR/$remote_config"

run="KT_JAX_DISTRIBUTED=auto .venv/bin/kt-jax run --config $remote_config"
if [[ ${#run_args[@]} -gt 0 ]]; then
  run+=" $(kt_join "${run_args[@]}")"
fi
if [[ $detach == 1 ]]; then
  remote="cd $KT_REMOTE_DIR && mkdir -p logs && (nohup env $run > $log 2>&1 < /dev/null &)"
else
  remote="set -o pipefail; cd $KT_REMOTE_DIR && mkdir -p logs && $run 2>&1 | tee $log"
fi
kt_run gcloud compute tpus tpu-vm ssh "$name" "${KT_SCOPE[@]}" --worker=all "--command=$remote"
