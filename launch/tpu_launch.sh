#!/usr/bin/env bash
# One config on a fresh TPU VM, end to end: create -> set up -> run on all workers -> fetch -> delete.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
here=$(dirname "${BASH_SOURCE[0]}")

usage() {
  cat <<EOF
usage: $KT_SCRIPT --name NAME --zone ZONE --accelerator-type TYPE --config CONFIG [options] [-- KT_JAX_RUN_ARGS...]

Create TPU VM NAME, install kt-jax on every worker, bring the data and checkpoint, run \`kt-jax run --config
CONFIG\` on all workers (streaming the output), copy the run directory and logs to --dest, and delete the VM (also
when the run fails; --keep keeps it). Every argument is checked by every step before anything is created.

required:
  --name NAME               TPU VM name
  --zone ZONE               e.g. us-central2-b
  --accelerator-type TYPE   v2-N, v3-N, v4-N, v5p-N, v5litepod-N or v6e-N
  --config CONFIG           local YAML config file
options:
  --project PROJECT         Google Cloud project
  --runtime-version V       TPU software version (default by generation, see tpu_create.sh)
  --spot                    Spot capacity
  --queued                  create through a queued resource (waits for capacity)
  --data SRC                gs:// URI or local path, copied to ~/$KT_REMOTE_DIR/data/ on every worker; repeatable
  --checkpoint SRC          the same into ~/$KT_REMOTE_DIR/checkpoints/; repeatable
  --run-name RUN            log name (default: the config's file name without extension)
  --run-dir PATH            run directory to fetch, relative to ~/$KT_REMOTE_DIR (default: runs)
  --dest DIR                local directory for the fetched files (default: ./tpu-runs/NAME)
  --keep                    do not delete the VM at the end
  --dry-run                 print every command of every step, one per line, and run nothing
  -h, --help                this help
EOF
}

name="" zone="" accel="" config="" project="" runtime="" run_name="" run_dir=runs dest="" keep=0
create_flags=() setup_flags=() run_args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) kt_need_value "$@"; name=$2; shift 2 ;;
    --zone) kt_need_value "$@"; zone=$2; shift 2 ;;
    --accelerator-type) kt_need_value "$@"; accel=$2; shift 2 ;;
    --config) kt_need_value "$@"; config=$2; shift 2 ;;
    --project) kt_need_value "$@"; project=$2; shift 2 ;;
    --runtime-version) kt_need_value "$@"; runtime=$2; shift 2 ;;
    --data|--checkpoint) kt_need_value "$@"; setup_flags+=("$1" "$2"); shift 2 ;;
    --run-name) kt_need_value "$@"; run_name=$2; shift 2 ;;
    --run-dir) kt_need_value "$@"; run_dir=$2; shift 2 ;;
    --dest) kt_need_value "$@"; dest=$2; shift 2 ;;
    --spot|--queued) create_flags+=("$1"); shift ;;
    --keep) keep=1; shift ;;
    --dry-run) KT_DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; run_args=("$@"); break ;;
    *) kt_die "unknown argument '$1'" ;;
  esac
done

kt_require --name "$name"
kt_require --zone "$zone"
kt_require --accelerator-type "$accel"
kt_require --config "$config"
dest=${dest:-tpu-runs/$name}
scope=(--name "$name" --zone "$zone")
if [[ -n $project ]]; then
  scope+=(--project "$project")
fi
if [[ -n $runtime ]]; then
  create_flags+=(--runtime-version "$runtime")
fi
run_flags=(--config "$config")
if [[ -n $run_name ]]; then
  run_flags+=(--run-name "$run_name")
fi
queued_flag=()
for f in ${create_flags[@]+"${create_flags[@]}"}; do
  if [[ $f == --queued ]]; then
    queued_flag=(--queued)
  fi
done
if [[ ${#run_args[@]} -gt 0 ]]; then
  run_flags+=(-- "${run_args[@]}")
fi

# each step: its script with FLAGS (e.g. --dry-run) first, then its arguments
create() { bash "$here/tpu_create.sh" "$@" "${scope[@]}" --accelerator-type "$accel" ${create_flags[@]+"${create_flags[@]}"}; }
setup() { bash "$here/tpu_setup.sh" "$@" "${scope[@]}" ${setup_flags[@]+"${setup_flags[@]}"}; }
run() { bash "$here/tpu_run.sh" "$@" "${scope[@]}" "${run_flags[@]}"; }
fetch() { bash "$here/tpu_fetch.sh" "$@" "${scope[@]}" --run-dir "$run_dir" --dest "$dest"; }
# shellcheck disable=SC2317  # called from the EXIT trap
delete() { bash "$here/tpu_delete.sh" "$@" "${scope[@]}" ${queued_flag[@]+"${queued_flag[@]}"}; }

# preflight: every step checks its arguments (its dry run) before anything is created
for step in create setup run fetch delete; do
  "$step" --dry-run > /dev/null
done

dry=()
if [[ $KT_DRY_RUN == 1 ]]; then
  dry=(--dry-run)
fi
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  if [[ $keep == 1 ]]; then
    printf '%s: keeping %s; delete it with: %s\n' "$KT_SCRIPT" "$name" \
      "$(kt_join bash "$here/tpu_delete.sh" "${scope[@]}" ${queued_flag[@]+"${queued_flag[@]}"})" >&2
  else
    delete ${dry[@]+"${dry[@]}"}
  fi
}
trap cleanup EXIT  # set before create: a half-created VM (or a queued request) is deleted too
create ${dry[@]+"${dry[@]}"}
setup ${dry[@]+"${dry[@]}"}
status=0
run ${dry[@]+"${dry[@]}"} || status=$?
fetch ${dry[@]+"${dry[@]}"}
exit "$status"
