#!/usr/bin/env bash
# Single-host GPU recipe: a venv with kt-jax and CUDA JAX, then `kt-jax run --config CONFIG` on all local GPUs.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: $KT_SCRIPT --config CONFIG [options] [-- KT_JAX_RUN_ARGS...]

On one machine with NVIDIA GPUs: create VENV (if missing), install this checkout (pip install -e) with
jax[cudaN] (CUDA from pip wheels; needs a recent NVIDIA driver), then run \`kt-jax run --config CONFIG\` in one
process over all visible GPUs (choose them with CUDA_VISIBLE_DEVICES). Output is kept in LOG_DIR/RUN.log.
Arguments after -- go to \`kt-jax run\` unchanged.

required:
  --config CONFIG       YAML config file
options:
  --venv DIR            virtual environment (default: .venv-gpu in this checkout)
  --python PYTHON       interpreter that creates the venv, >= 3.11 (default: python3)
  --cuda N              CUDA major version of the jax wheels: 12 or 13 (default 12)
  --skip-install        use VENV as it is (no pip install)
  --log-dir DIR         where RUN.log goes (default: logs)
  --run-name RUN        log file name (default: the config's file name without extension)
  --dry-run             print the commands, one per line, and run nothing
  -h, --help            this help
EOF
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
config="" venv="$repo/.venv-gpu" python=python3 cuda=12 install=1 log_dir=logs run_name=""
run_args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --config) kt_need_value "$@"; config=$2; shift 2 ;;
    --venv) kt_need_value "$@"; venv=$2; shift 2 ;;
    --python) kt_need_value "$@"; python=$2; shift 2 ;;
    --cuda) kt_need_value "$@"; cuda=$2; shift 2 ;;
    --log-dir) kt_need_value "$@"; log_dir=$2; shift 2 ;;
    --run-name) kt_need_value "$@"; run_name=$2; shift 2 ;;
    --skip-install) install=0; shift ;;
    --dry-run) KT_DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; run_args=("$@"); break ;;
    *) kt_die "unknown argument '$1'" ;;
  esac
done

kt_require --config "$config"
kt_check_file --config "$config"
if [[ ! $cuda =~ ^(12|13)$ ]]; then
  kt_die "--cuda '$cuda' must be 12 or 13"
fi
config_file=$(basename "$config")
run_name=${run_name:-${config_file%.*}}
kt_check_run_name --run-name "$run_name"
if [[ $install == 0 && ! -x $venv/bin/kt-jax ]]; then
  kt_die "--skip-install: '$venv' has no bin/kt-jax (run once without --skip-install)"
fi
if [[ $install == 1 && $KT_DRY_RUN == 0 ]]; then
  if ! command -v "$python" > /dev/null; then
    kt_die "--python '$python' not found"
  fi
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    kt_die "--python '$python' is $("$python" -V 2>&1); kt-jax needs Python >= 3.11"
  fi
fi
if [[ $KT_DRY_RUN == 0 ]] && ! command -v nvidia-smi > /dev/null; then
  printf '%s: warning: nvidia-smi not found; JAX will fall back to the CPU if it sees no GPU\n' "$KT_SCRIPT" >&2
fi

if [[ $install == 1 ]]; then
  if [[ ! -x $venv/bin/python ]]; then
    kt_run "$python" -m venv "$venv"
  fi
  kt_run "$venv/bin/python" -m pip install --quiet --upgrade pip
  kt_run "$venv/bin/python" -m pip install --quiet -e "$repo" "jax[cuda$cuda]"
fi
kt_run mkdir -p "$log_dir"
kt_run "$venv/bin/python" -c 'import jax; print(jax.devices())'
cmd=("$venv/bin/kt-jax" run --config "$config" ${run_args[@]+"${run_args[@]}"})
if [[ $KT_DRY_RUN == 1 ]]; then
  printf '%s 2>&1 | tee %s\n' "$(kt_join "${cmd[@]}")" "$(kt_quote "$log_dir/$run_name.log")"
  exit 0
fi
printf '+ %s 2>&1 | tee %s\n' "$(kt_join "${cmd[@]}")" "$(kt_quote "$log_dir/$run_name.log")" >&2
"${cmd[@]}" 2>&1 | tee "$log_dir/$run_name.log"
