# shellcheck shell=bash
# Shared helpers for the launch scripts: argument checks, command printing (--dry-run) and running.
# Sourced, never run. Every check prints "SCRIPT: error: ..." and exits 2.

KT_SCRIPT=$(basename "${0}")
KT_DRY_RUN=${KT_DRY_RUN:-0}
KT_REMOTE_DIR=kt-jax  # the project's directory on every TPU worker, relative to the login user's home

kt_die() {  # usage error: message, hint, exit 2
  printf '%s: error: %s\n' "$KT_SCRIPT" "$1" >&2
  printf '%s: run "%s --help" for usage\n' "$KT_SCRIPT" "$KT_SCRIPT" >&2
  exit 2
}

kt_quote_always() {  # one word in single quotes
  local s=${1//\'/\'\\\'\'}
  printf "'%s'" "$s"
}

kt_quote() {  # one word, quoted only when the shell needs it (--flag=VALUE keeps the flag bare)
  local w=$1
  if [[ -n $w && $w =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$w"
  elif [[ $w =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    kt_quote_always "${BASH_REMATCH[2]}"
  else
    kt_quote_always "$w"
  fi
}

kt_join() {  # words -> one shell command line
  local line="" w
  for w in "$@"; do
    line+="${line:+ }$(kt_quote "$w")"
  done
  printf '%s' "$line"
}

kt_run() {  # print the command (--dry-run) or echo it to stderr and run it
  if [[ $KT_DRY_RUN == 1 ]]; then
    printf '%s\n' "$(kt_join "$@")"
    return 0
  fi
  printf '+ %s\n' "$(kt_join "$@")" >&2
  "$@"
}

kt_need_value() {  # FLAG [VALUE ...] (the remaining arguments): a flag that takes a value must have one
  if [[ $# -lt 2 || $2 == --* ]]; then
    kt_die "$1 needs a value"
  fi
}

kt_require() {  # FLAG VALUE: required flags
  if [[ -z $2 ]]; then
    kt_die "$1 is required"
  fi
}

kt_check_name() {  # FLAG VALUE: a TPU / queued-resource name
  if [[ ! $2 =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]]; then
    kt_die "$1 '$2' is not a valid name (lower-case letters, digits and '-', starting with a letter, at most 63)"
  fi
}

kt_check_zone() {  # FLAG VALUE
  if [[ ! $2 =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]]; then
    kt_die "$1 '$2' is not a zone (expected REGION-ZONE such as us-central2-b or europe-west4-a)"
  fi
}

kt_check_project() {  # FLAG VALUE (optional flag)
  if [[ -n $2 && ! $2 =~ ^[a-z][-a-z0-9]{4,28}[a-z0-9]$ ]]; then
    kt_die "$1 '$2' is not a Google Cloud project id (6-30 lower-case letters, digits, '-')"
  fi
}

kt_check_target() {  # NAME ZONE PROJECT: the --name/--zone (required) and --project flags of every TPU script
  kt_require --name "$1"
  kt_require --zone "$2"
  kt_check_name --name "$1"
  kt_check_zone --zone "$2"
  kt_check_project --project "$3"
}

kt_check_accelerator() {  # FLAG VALUE: TPU generation and chip/core count
  if [[ ! $2 =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-[0-9]+$ ]]; then
    kt_die "$1 '$2' is not a TPU accelerator type (expected v2-N, v3-N, v4-N, v5p-N, v5litepod-N or v6e-N, e.g. v5litepod-16)"
  fi
}

kt_default_runtime() {  # ACCELERATOR -> the TPU software version for JAX on it
  case $1 in
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v5litepod-*) printf 'v2-alpha-tpuv5-lite' ;;
    *) printf 'tpu-ubuntu2204-base' ;;
  esac
}

kt_check_runtime() {  # FLAG VALUE
  if [[ ! $2 =~ ^[a-z0-9][a-z0-9.-]*$ ]]; then
    kt_die "$1 '$2' is not a TPU software version (e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite)"
  fi
}

kt_check_file() {  # FLAG VALUE: a local file that must exist
  if [[ ! -f $2 ]]; then
    kt_die "$1 '$2': no such file"
  fi
}

kt_check_source() {  # FLAG VALUE: gs://bucket/path or an existing local file/directory
  if [[ $2 == gs://* ]]; then
    if [[ ! $2 =~ ^gs://[a-z0-9][-_.a-z0-9]{1,221}[a-z0-9](/.*)?$ ]]; then
      kt_die "$1 '$2' is not a valid gs:// URI (gs://BUCKET/PATH)"
    fi
  elif [[ ! -e $2 ]]; then
    kt_die "$1 '$2': neither a gs:// URI nor an existing local path"
  fi
}

kt_check_relpath() {  # FLAG VALUE: a path relative to the project directory on the workers
  if [[ ! $2 =~ ^[A-Za-z0-9._][A-Za-z0-9._/-]*$ || $2 =~ (^|/)\.\.(/|$) ]]; then
    kt_die "$1 '$2' must be a relative path inside ~/$KT_REMOTE_DIR (letters, digits, . _ - /, no ..)"
  fi
}

kt_check_run_name() {  # FLAG VALUE
  if [[ ! $2 =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
    kt_die "$1 '$2' must be letters, digits, '.', '_' or '-'"
  fi
}

kt_check_worker() {  # FLAG VALUE: a worker index or "all"
  if [[ ! $2 =~ ^([0-9]+|all)$ ]]; then
    kt_die "$1 '$2' must be a worker index (0, 1, ...) or all"
  fi
}

kt_gcloud_scope() {  # ZONE PROJECT -> sets KT_SCOPE: the --zone/--project flags every gcloud call gets
  KT_SCOPE=("--zone=$1")
  if [[ -n $2 ]]; then
    KT_SCOPE+=("--project=$2")
  fi
}
