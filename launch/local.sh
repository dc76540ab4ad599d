#!/usr/bin/env bash
# Run N processes of one training job on this machine, each with its own CPU devices, connected through
# jax.distributed and gloo CPU collectives: the multi-host code path without a cluster. Processes get glibc's
# transparent huge pages for XLA:CPU's buffers (pconv_jax/hugepages.py) unless GLIBC_TUNABLES is set.
#
#   launch/local.sh --processes 2 --devices-per-process 2 --config configs/demo.py --workdir /tmp/pconv_multi \
#       [--port 12355] [--dry-run] [-- --config.stages.initial_steps=20 ...]
source "$(dirname "$0")/common.sh"

usage() { sed -n '2,/^source/{/^#/p}' "$0"; exit 2; }
processes=2 devices=2 config="" workdir="" port=12355 extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes) processes=$2; shift 2 ;;
    --devices-per-process) devices=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ -n "$config" && -n "$workdir" ]] || die "--config and --workdir are required (see --help)"

tunables=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' INT TERM  # SIGTERM makes every process save and exit.
for ((i = 0; i < processes; i++)); do
  command=(python -m pconv_jax.main --config "$config" --workdir "$workdir" --num_cpu_devices "$devices"
           --coordinator_address "127.0.0.1:$port" --num_processes "$processes" --process_id "$i" "${extra[@]}")
  if [[ "$DRY_RUN" == 1 ]]; then
    run env JAX_PLATFORMS=cpu GLIBC_TUNABLES="$tunables" "${command[@]}"
  else
    run env JAX_PLATFORMS=cpu GLIBC_TUNABLES="$tunables" "${command[@]}" > "$workdir.process_$i.log" 2>&1 &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
[[ "$DRY_RUN" == 1 ]] || echo "logs: $workdir.process_*.log"
exit $status
