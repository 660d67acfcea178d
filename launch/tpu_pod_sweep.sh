#!/usr/bin/env bash
# A sweep of configs on a Cloud TPU VM pod slice: (create the slice,) copy this checkout to every worker,
# install, then run each config on all workers at once. On a pod, `distributed.auto_detect=True` lets
# jax.distributed find the coordinator and the ranks; the clients axis is sharded over every chip.
#
#   launch/tpu_pod_sweep.sh [--dry-run] --name NAME --zone ZONE [--project P] [--create] [--delete] \
#       [--accelerator-type v4-32] [--version tpu-ubuntu2204-base] --workdir DIR \
#       --config 'configs/vqa.py:benchmark=domain,algorithm=feddat' --config '...:algorithm=fedavg_adapter' \
#       [-- extra flags for every run, e.g. --config.rounds=30]
#
#   --create / --delete   create the slice first / delete it at the end
#   --workdir DIR         parent of the runs' workdirs (<DIR>/<run name>). It must be the same storage on
#                         every worker (an NFS / Filestore mount, or a bucket mounted with gcsfuse): all
#                         processes write and read the checkpoints; reports come from worker 0.
#   --config C            one run per --config (repeatable): python -m feddat_jax.main --config=C
#   --skip-install        the workers already have this checkout installed
#   --dry-run             print the gcloud commands, run nothing
# Every --config is loaded here first (with $PYTHON, default python3, and this checkout), so a typo fails
# before a slice is created. A run that fails does not stop the others; at the end the failed ones are listed
# and the exit status is 1. With --delete the slice is deleted whatever happens (also on an error or Ctrl-C).
set -euo pipefail

name=""
zone=""
project=""
accelerator="v4-32"
version="tpu-ubuntu2204-base"
workdir=""
create=0
delete=0
install=1
dry_run=0
configs=()
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # quote(), usage(), need_value()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name|--zone|--project|--accelerator-type|--version|--workdir|--config) need_value "$1" "$#" ;;&
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --accelerator-type) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --config) configs+=("$2"); shift 2 ;;
    --create) create=1; shift ;;
    --delete) delete=1; shift ;;
    --skip-install) install=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) usage "$0"; exit 0 ;;
    *) echo "unknown option $1 (extra flags for the runs go after --)" >&2; exit 2 ;;
  esac
done
extra=("$@")
for required in name zone workdir; do
  [[ -n "${!required}" ]] || { echo "--${required} is required" >&2; exit 2; }
done
[[ ${#configs[@]} -gt 0 ]] || { echo "give at least one --config" >&2; exit 2; }

repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
here() {  # run python in this checkout
  (cd "$repo" && PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" "$@")
}
if here -c 'import feddat_jax.config_utils, ml_collections' > /dev/null 2>&1; then
  for config in "${configs[@]}"; do  # each config as the workers will load it, before anything is created
    if ! out=$(here -c 'import sys; from feddat_jax import config_utils; config_utils.load_config(sys.argv[1])' \
        "$config" 2>&1); then
      echo "--config ${config}: does not load here: $(tail -n 1 <<< "$out")" >&2
      exit 2
    fi
  done
else
  echo "warning: ${python} cannot import feddat_jax here, so the configs are not checked before the slice is" \
    "used; set PYTHON to this checkout's python to check them" >&2
fi
tarball="${TMPDIR:-/tmp}/feddat_jax_src.tar.gz"
remote_dir="feddat_jax"  # on each worker, under the login user's home
tpu=(gcloud compute tpus tpu-vm)
where=("--zone=${zone}")
[[ -z "$project" ]] || where+=("--project=${project}")

run() {  # print (dry run) or run one command
  if [[ $dry_run == 1 ]]; then
    quote "$@"
  else
    "$@"
  fi
}

# A run's directory name: the config argument with its punctuation made path-safe.
run_name() {
  local c="${1##*/}"
  c="${c/.py/}"
  c="${c//[:,=\/]/_}"
  echo "$c"
}

created=0
finish() {  # on any exit: --delete deletes the slice, even after an error
  local status=$?
  trap - EXIT INT TERM
  if [[ $delete == 1 && ( $created == 1 || $create == 0 ) ]]; then
    run "${tpu[@]}" delete "$name" "${where[@]}" --quiet || { echo "deleting ${name} failed; delete it by hand:" \
      "$(quote "${tpu[@]}" delete "$name" "${where[@]}")" >&2; status=1; }
  fi
  exit $status
}
trap finish EXIT
trap 'exit 130' INT TERM
if [[ $create == 1 ]]; then
  created=1  # also if the create fails part way: a half-made slice is deleted too
  run "${tpu[@]}" create "$name" "${where[@]}" "--accelerator-type=${accelerator}" "--version=${version}"
fi
if [[ $install == 1 ]]; then
  # The committed tree of this checkout (what the sweep runs is what is in git), copied to every worker.
  run git -C "$repo" archive --format=tar.gz "--output=${tarball}" HEAD
  run "${tpu[@]}" scp "$tarball" "${name}:feddat_jax_src.tar.gz" "${where[@]}" --worker=all
  run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all \
    "--command=mkdir -p ${remote_dir} && tar xzf feddat_jax_src.tar.gz -C ${remote_dir} && pip install -q -U 'jax[tpu]' && pip install -q -e ${remote_dir}"
fi
failed=()
for config in "${configs[@]}"; do
  flags=("--config=${config}" "--workdir=${workdir}/$(run_name "$config")" "--config.distributed.auto_detect=True"
         "${extra[@]}")
  rc=0
  run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all \
    "--command=cd ${remote_dir} && $(quote python3 -m feddat_jax.main "${flags[@]}")" || rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "run --config ${config} failed (status ${rc}); going on with the others" >&2
    failed+=("$config")
  fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "${#failed[@]} of ${#configs[@]} runs failed: ${failed[*]} (rerun them: each resumes from its checkpoint)" >&2
  exit 1
fi
