#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: create the TPU VMs (directly or as a queued resource), copy this checkout to
# every worker, install the pinned requirements with JAX for TPU, and start the same command on all workers.
# JAX finds its peers on a pod by itself; the workdir and the TFDS data must be on GCS. Each worker fetches the
# VGG-16 weights of the loss (Keras file, MD5-checked) into its cache.
#
#   launch/tpu_pod.sh --name pconv --zone us-central2-b --type v4-32 --config configs/places2.py \
#       --workdir gs://BUCKET/pconv/places2 --tfds_data_dir gs://BUCKET/tensorflow_datasets [--queued] \
#       [--dry-run] [-- --config.optim.batch_size=96 ...]
#
# --dry-run prints every command without running it. Re-running with the same --workdir resumes training.
source "$(dirname "$0")/common.sh"

usage() { sed -n '2,/^source/{/^#/p}' "$0"; exit 2; }
name="" zone="" type="" config="" workdir="" data_dir="" version="tpu-ubuntu2204-base" queued=0 extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --type) type=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --tfds_data_dir) data_dir=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --queued) queued=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ -n "$name" && -n "$zone" && -n "$type" && -n "$config" && -n "$workdir" ]] || \
  die "--name, --zone, --type, --config and --workdir are required (see --help)"
[[ "$workdir" == gs://* ]] || die "--workdir must be a gs:// path: every worker writes checkpoints there"

if [[ "$queued" == 1 ]]; then
  run gcloud compute tpus queued-resources create "$name" --node-id "$name" --zone "$zone" \
    --accelerator-type "$type" --runtime-version "$version"
  state_cmd=(gcloud compute tpus queued-resources describe "$name" --zone "$zone" --format 'value(state.state)')
  echo "# wait until the queued resource is ACTIVE: ${state_cmd[*]}"
  if [[ "$DRY_RUN" != 1 ]]; then
    until [[ "$("${state_cmd[@]}")" == ACTIVE ]]; do sleep 60; done
  fi
else
  run gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$type" --version "$version"
fi

ssh_all=(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all)
archive=${TMPDIR:-/tmp}/pconv_jax_$name.tar.gz
run tar -czf "$archive" -C "$(dirname "$0")/.." --exclude=.git --exclude='__pycache__' .
run gcloud compute tpus tpu-vm scp "$archive" "$name:~/pconv_jax.tar.gz" --zone "$zone" --worker=all
run "${ssh_all[@]}" --command "mkdir -p ~/pconv_jax && tar -xzf ~/pconv_jax.tar.gz -C ~/pconv_jax && \
cd ~/pconv_jax && pip install -r requirements-gcs.txt 'jax[tpu]==0.10.2' && python -m pconv_jax.vgg fetch keras"

flags=(--config "$config" --workdir "$workdir")
[[ -n "$data_dir" ]] && flags+=(--config.data.tfds_data_dir="$data_dir")
flags+=("${extra[@]}")
quoted=$(printf ' %q' "${flags[@]}")
run "${ssh_all[@]}" --command "cd ~/pconv_jax && nohup python -m pconv_jax.main${quoted} > train.log 2>&1 &"
echo "# logs: ${ssh_all[*]} --command 'tail -f ~/pconv_jax/train.log'; TensorBoard: $workdir/logs"
