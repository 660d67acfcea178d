#!/usr/bin/env bash
# A sweep of configs on a Cloud TPU VM pod slice: (create the slice,) copy this checkout to every worker,
# install, then run each config on all workers at once. On a pod, `distributed.auto_detect=True` lets
# jax.distributed find the coordinator and the ranks; the clients axis is sharded over every chip.
#
#   launch/tpu_pod_sweep.sh [--dry-run] --name NAME --zone ZONE [--project P] [--create] [--delete] \
#       [--accelerator-type v4-32] [--version VERSION] --workdir DIR [--poll SECONDS] [--retries N] \
#       --config 'configs/vqa.py:benchmark=domain,algorithm=feddat' --config '...:algorithm=fedavg_adapter' \
#       [-- extra flags for every run, e.g. --config.rounds=30]
#
#   --create / --delete   create the slice first (unless it exists) / delete it at the end
#   --accelerator-type T  the slice's TPU type (default v4-32); the TPU software version follows from it:
#                         v2, v3, v4 -> tpu-ubuntu2204-base, v5litepod (v5e) -> v2-alpha-tpuv5-lite,
#                         v5p -> v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e
#   --version VERSION     that software version instead (needed for any other accelerator type)
#   --workdir DIR         parent of the runs' workdirs (<DIR>/<run name>). It must be the same storage on
#                         every worker: all processes write and read the checkpoints; reports come from
#                         worker 0. Checkpoint storage: orbax alone could write gs:// paths directly, but a
#                         run's workdir also holds its lock file, config.json, logs and reports, written as
#                         local files, so DIR is a path on the workers: an NFS / Filestore mount, or a bucket
#                         mounted with gcsfuse with directory renames allowed (--rename-dir-limit=200000, say):
#                         orbax commits a checkpoint by renaming its temporary folder, which gcsfuse refuses by
#                         default. A gs:// DIR is refused.
#   --config C            one run per --config (repeatable): python -m feddat_jax.main --config=C
#   --skip-install        the workers already have this checkout installed (in ~/feddat_venv)
#   --poll SECONDS        how often to ask the workers whether a run has ended (default 60)
#   --retries N           failed polls in a row before giving up on the connection (default 10)
#   --dry-run             print the commands, run nothing (as if the slice were absent and no run started)
# Every --config is loaded here first (with $PYTHON, default python3, and this checkout), so a typo fails
# before a slice is created. The install makes a Python 3.11 venv, ~/feddat_venv, on every worker (the TPU
# images' python3 is 3.10; from the deadsnakes PPA where the image's apt has no python3.11) and installs
# this checkout in it with jax[tpu].
# Each run starts detached on every worker (setsid nohup; output in ~/feddat_runs/<run>/log, exit status
# in ~/feddat_runs/<run>/status) and the launcher polls for the status files, one run after the other, so
# a dropped connection only stops the polling: after --retries failed polls the launcher leaves the slice
# (even with --delete) and the runs going, and says so. Rerunning the same command re-attaches: an
# existing slice is not created again, the install is skipped while a run is alive, a run still alive is
# waited for, one that ended with status 0 on every worker is not run again (remove ~/feddat_runs/<run> on
# the workers to run it again), and the others are started again (each resumes from its checkpoint).
# A run that fails does not stop the others; at the end the failed ones are listed and the exit status is 1.
# With --delete the slice is deleted whatever else happens (also on an error or Ctrl-C, which kills the
# runs), except when contact is lost as above.
set -euo pipefail

name=""
zone=""
project=""
accelerator="v4-32"
version=""
workdir=""
create=0
delete=0
install=1
dry_run=0
poll=60
retries=10
configs=()
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # quote(), usage(), need_value(), positive_int()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name|--zone|--project|--accelerator-type|--version|--workdir|--config|--poll|--retries)
      need_value "$1" "$#" ;;&
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --accelerator-type) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --config) configs+=("$2"); shift 2 ;;
    --poll) positive_int "$1" "$2"; poll="$2"; shift 2 ;;
    --retries) positive_int "$1" "$2"; retries="$2"; shift 2 ;;
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

# The TPU VM software version (gcloud --version) for an accelerator type. These are Cloud TPU's documented
# software versions for TPU VMs as of writing; --version overrides them (e.g. for a newer image).
runtime_version() {
  case "$1" in
    v2-*|v3-*|v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) return 1 ;;
  esac
}
[[ "$workdir" != gs://* ]] || { echo "--workdir ${workdir}: give the path where the bucket is mounted (gcsfuse" \
  "--rename-dir-limit=...) on the workers, not a gs:// URL: a run's workdir is written as local files" >&2; exit 2; }
if [[ -z "$version" ]] && ! version=$(runtime_version "$accelerator"); then
  echo "--accelerator-type ${accelerator}: no known TPU software version for it (known: v2, v3, v4, v5litepod," \
    "v5e, v5p, v6e); give --version" >&2
  exit 2
fi

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
errors="${TMPDIR:-/tmp}/feddat_jax_gcloud.err"
remote_dir="feddat_jax"  # on each worker, under the login user's home
tpu=(gcloud compute tpus tpu-vm)
where=("--zone=${zone}")
[[ -z "$project" ]] || where+=("--project=${project}")
# On every worker: Python 3.11 (the image's apt, else the deadsnakes PPA), a venv, this checkout with jax[tpu].
apt=(sudo apt-get -q -y -o DPkg::Lock::Timeout=600)
install_command="mkdir -p ${remote_dir} && tar xzf feddat_jax_src.tar.gz -C ${remote_dir} && \
{ dpkg -s python3.11-venv > /dev/null 2>&1 || { ${apt[*]} update && ${apt[*]} install python3.11 python3.11-venv; } \
|| { sudo add-apt-repository -y ppa:deadsnakes/ppa && ${apt[*]} install python3.11 python3.11-venv; }; } && \
python3.11 -m venv ~/feddat_venv && ~/feddat_venv/bin/pip install -q -U pip && \
cd ${remote_dir} && ~/feddat_venv/bin/pip install -q -e '.[tpu]'"

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
keep=""  # why the slice is kept even with --delete (the runs go on)
finish() {  # on any exit: --delete deletes the slice, even after an error
  local status=$?
  trap - EXIT INT TERM
  if [[ $delete == 1 && -n "$keep" ]]; then
    echo "not deleting ${name}: ${keep}" >&2
  elif [[ $delete == 1 && ( $created == 1 || $create == 0 ) ]]; then
    run "${tpu[@]}" delete "$name" "${where[@]}" --quiet || { echo "deleting ${name} failed; delete it by hand:" \
      "$(quote "${tpu[@]}" delete "$name" "${where[@]}")" >&2; status=1; }
  fi
  exit $status
}
trap finish EXIT
trap 'exit 130' INT TERM

# ask CMD: run CMD on every worker and set `answer` to its "feddat-run ..." lines (without the prefix); a
# failed ssh is retried every --poll seconds, and after --retries failures in a row the launcher stops,
# leaving the slice and its runs as they are.
ask() {
  local fails=0 out
  answer=""
  if [[ $dry_run == 1 ]]; then
    quote "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all "--command=$1"
    return
  fi
  while ! out=$("${tpu[@]}" ssh "$name" "${where[@]}" --worker=all "--command=$1" 2> "$errors") \
      || ! grep -q '^feddat-run ' <<< "$out"; do
    fails=$((fails + 1))
    if [[ $fails -ge $retries ]]; then
      keep="lost contact with its workers and runs may be going on"
      echo "lost contact with ${name}: ${retries} polls in a row failed ($(tail -n 1 "$errors" 2>/dev/null))." \
        "The runs go on on the workers (output in ~/feddat_runs/<run>/log); rerun this same command to" \
        "re-attach" >&2
      exit 75
    fi
    sleep "$poll"
  done
  answer=$(sed -n 's/^feddat-run //p' <<< "$out")
}

if [[ $create == 1 ]]; then
  # A slice that exists already (a rerun that re-attaches) is used as it is.
  if [[ $dry_run == 1 ]]; then
    quote "${tpu[@]}" describe "$name" "${where[@]}"  # a dry run takes it for absent
  fi
  if [[ $dry_run == 0 ]] && "${tpu[@]}" describe "$name" "${where[@]}" > /dev/null 2>&1; then
    echo "${name} exists already: not creating it" >&2
  else
    created=1  # also if the create fails part way: a half-made slice is deleted too
    run "${tpu[@]}" create "$name" "${where[@]}" "--accelerator-type=${accelerator}" "--version=${version}"
    fresh=1
  fi
  created=1
fi
if [[ $install == 1 && -z "${fresh:-}" ]]; then  # on a slice that was there: no reinstall under a live run
  ask 'for d in ~/feddat_runs/*/; do [ ! -f "${d}status" ] && [ -f "${d}pid" ] && kill -0 "$(cat "${d}pid")" '\
'2> /dev/null && echo "feddat-run alive ${d}"; done; echo feddat-run checked'
  if grep -q '^alive' <<< "$answer"; then
    echo "runs are alive on ${name}: not installing again (re-attaching)" >&2
    install=0
  fi
fi
if [[ $install == 1 ]]; then
  # The committed tree of this checkout (what the sweep runs is what is in git), copied to every worker.
  run git -C "$repo" archive --format=tar.gz "--output=${tarball}" HEAD
  run "${tpu[@]}" scp "$tarball" "${name}:feddat_jax_src.tar.gz" "${where[@]}" --worker=all
  run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all "--command=${install_command}"
fi

# state: what the workers say about the run in directory $1: running (on some worker), done (status 0 on
# every worker), new (never started), else failed (the statuses, e.g. "exit 1 / gone").
state() {
  ask "d=~/feddat_runs/$1; if [ -f \$d/status ]; then echo \"feddat-run exit \$(cat \$d/status)\"; \
elif [ -f \$d/pid ] && kill -0 \"\$(cat \$d/pid)\" 2> /dev/null; then echo feddat-run running; \
elif [ -f \$d/pid ]; then echo feddat-run gone; else echo feddat-run new; fi"
  if [[ $dry_run == 1 ]]; then state=new
  elif grep -qx running <<< "$answer"; then state=running
  elif ! grep -qvx 'exit 0' <<< "$answer"; then state=done
  elif ! grep -qvx new <<< "$answer"; then state=new
  else state="failed: $(sort <<< "$answer" | uniq -c | sed 's/^ *//' | paste -sd, -)"
  fi
}

failed=()
for config in "${configs[@]}"; do
  run_workdir="${workdir}/$(run_name "$config")"
  key="${run_workdir//[^A-Za-z0-9._-]/_}"  # the run's state on each worker: ~/feddat_runs/<key>/
  d="~/feddat_runs/${key}"
  flags=("--config=${config}" "--workdir=${run_workdir}" "--config.distributed.auto_detect=True" "${extra[@]}")
  state "$key"
  case "$state" in
    running) echo "run --config ${config} is running already: waiting for it" >&2 ;;
    done) echo "run --config ${config} has ended with status 0 already: not running it again" >&2 ;;
    *)  # detached from this ssh session: the run writes its exit status to ${d}/status when it ends
      body="~/feddat_venv/bin/python $(quote -m feddat_jax.main "${flags[@]}"); echo \$? > \$d/status.tmp \
&& mv \$d/status.tmp \$d/status"
      run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all "--command=d=${d} && mkdir -p \$d && rm -f \$d/status \
\$d/pid && cd ${remote_dir} && { d=\$d setsid nohup bash -c $(quote "$body") > \$d/log 2>&1 < /dev/null & \
echo \$! > \$d/pid; }" || true  # a start that did not happen shows in the state
      state "$key"
      [[ $state != new ]] || state="failed: not started" ;;
  esac
  while [[ $state == running && $dry_run == 0 ]]; do
    sleep "$poll"
    state "$key"
  done
  if [[ $state != done && $dry_run == 0 ]]; then
    echo "run --config ${config} failed (${state#failed: }; output in ${d}/log on the workers); going on with" \
      "the others" >&2
    failed+=("$config")
  fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "${#failed[@]} of ${#configs[@]} runs failed: ${failed[*]} (rerun them: each resumes from its checkpoint)" >&2
  exit 1
fi
