#!/usr/bin/env bash
# Install kt-jax on every worker of a TPU VM and bring the data and the checkpoint there.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: $KT_SCRIPT --name NAME --zone ZONE [options]

Ship this checkout (git HEAD) to every worker of TPU VM NAME, create ~/$KT_REMOTE_DIR/.venv there (Python via uv)
with kt-jax and jax[tpu], and copy data and a checkpoint to ~/$KT_REMOTE_DIR/data/ and ~/$KT_REMOTE_DIR/checkpoints/
on every worker (configs refer to them as data/... and checkpoints/...).

required:
  --name NAME           TPU VM name
  --zone ZONE           its zone
options:
  --project PROJECT     Google Cloud project
  --data SRC            gs://BUCKET/PATH (copied by each worker with gcloud storage) or a local file/directory
                        (copied with scp); repeatable
  --checkpoint SRC      the same, for a HF checkpoint directory; repeatable
  --source DIR          the git checkout to ship (default: this repository)
  --python VERSION      Python for the workers' venv (default 3.12; the images ship 3.10, kt-jax needs >= 3.11)
  --dry-run             print the commands, one per line, and run nothing
  -h, --help            this help
EOF
}

name="" zone="" project="" python=3.12
source_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
data=() checkpoints=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) kt_need_value "$@"; name=$2; shift 2 ;;
    --zone) kt_need_value "$@"; zone=$2; shift 2 ;;
    --project) kt_need_value "$@"; project=$2; shift 2 ;;
    --data) kt_need_value "$@"; data+=("$2"); shift 2 ;;
    --checkpoint) kt_need_value "$@"; checkpoints+=("$2"); shift 2 ;;
    --source) kt_need_value "$@"; source_dir=$2; shift 2 ;;
    --python) kt_need_value "$@"; python=$2; shift 2 ;;
    --dry-run) KT_DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) kt_die "unknown argument '$1'" ;;
  esac
done

kt_check_target "$name" "$zone" "$project"
if [[ ! -d $source_dir/.git && ! -f $source_dir/.git ]]; then
  kt_die "--source '$source_dir' is not a git checkout"
fi
if [[ ! -f $source_dir/pyproject.toml ]]; then
  kt_die "--source '$source_dir' has no pyproject.toml (not a kt-jax checkout)"
fi
if [[ ! $python =~ ^3\.[0-9]+$ ]]; then
  kt_die "--python '$python' must be a version like 3.12"
fi
for src in ${data[@]+"${data[@]}"}; do
  kt_check_source --data "$src"
done
for src in ${checkpoints[@]+"${checkpoints[@]}"}; do
  kt_check_source --checkpoint "$src"
done
kt_gcloud_scope "$zone" "$project"

tarball="${TMPDIR:-/tmp}/kt-jax-src-$name.tar.gz"
remote_tar="$KT_REMOTE_DIR-src.tar.gz"
ssh_all=(gcloud compute tpus tpu-vm ssh "$name" "${KT_SCOPE[@]}" --worker=all)
scp_all=(gcloud compute tpus tpu-vm scp "${KT_SCOPE[@]}" --worker=all)

# 1. the source, as committed (uncommitted edits are not shipped)
kt_run git -C "$source_dir" archive --format=tar.gz "--output=$tarball" HEAD
kt_run "${scp_all[@]}" "$tarball" "$name:$remote_tar"

# 2. venv + install on every worker
uv=.local/bin/uv
install="set -e; mkdir -p $KT_REMOTE_DIR/data $KT_REMOTE_DIR/checkpoints $KT_REMOTE_DIR/launch-configs"
install+=" $KT_REMOTE_DIR/logs && tar -xzf $remote_tar -C $KT_REMOTE_DIR && cd $KT_REMOTE_DIR"
install+=" && python3 -m pip install --user --quiet uv && ~/$uv venv --allow-existing --python $python .venv"
install+=" && ~/$uv pip install --python .venv/bin/python --quiet -e . 'jax[tpu]'"
install+=" && .venv/bin/python -c 'import jax, kt_jax; print(\"kt-jax\", kt_jax.__version__, \"jax\", jax.__version__)'"
kt_run "${ssh_all[@]}" "--command=$install"

# 3. data and checkpoints on every worker
copy() {  # KIND SRC
  local dest="$KT_REMOTE_DIR/$1/"
  if [[ $2 == gs://* ]]; then
    kt_run "${ssh_all[@]}" "--command=gcloud storage cp --recursive $(kt_quote "$2") $dest"
  else
    kt_run "${scp_all[@]}" --recurse "$2" "$name:$dest"
  fi
}
for src in ${data[@]+"${data[@]}"}; do
  copy data "$src"
done
for src in ${checkpoints[@]+"${checkpoints[@]}"}; do
  copy checkpoints "$src"
done
