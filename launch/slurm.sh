#!/usr/bin/env bash
# Train on a GPU cluster with Slurm: one process per GPU (JAX reads the Slurm environment and connects the
# processes itself). Submits launch/slurm.sbatch with sbatch.
#
#   launch/slurm.sh --nodes 2 --gpus-per-node 8 --config configs/places2.py --workdir /shared/pconv/places2 \
#       [--partition gpu] [--time 3-00:00:00] [--dry-run] [-- --config.optim.batch_size=96 ...]
#
# The workdir must be on a file system every node sees. Resubmitting with the same workdir resumes.
source "$(dirname "$0")/common.sh"

usage() { sed -n '2,/^source/{/^#/p}' "$0"; exit 2; }
nodes=1 gpus=8 config="" workdir="" partition="" time_limit="3-00:00:00" extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --gpus-per-node) gpus=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --partition) partition=$2; shift 2 ;;
    --time) time_limit=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ -n "$config" && -n "$workdir" ]] || die "--config and --workdir are required (see --help)"

args=(--nodes "$nodes" --ntasks-per-node "$gpus" --gpus-per-node "$gpus" --time "$time_limit"
      --output "$workdir/slurm-%j.out" --signal=TERM@300)
[[ -n "$partition" ]] && args+=(--partition "$partition")
run mkdir -p "$workdir"
run sbatch "${args[@]}" "$(dirname "$0")/slurm.sbatch" --config "$config" --workdir "$workdir" "${extra[@]}"
