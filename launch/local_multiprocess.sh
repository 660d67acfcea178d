#!/usr/bin/env bash
# N processes of one run on this machine, joined by jax.distributed over 127.0.0.1: the multi-host code path
# (each process feeds its own clients, gloo collectives on CPU, checkpoints from every process, reports from
# process 0) without a cluster.
#
#   launch/local_multiprocess.sh [--dry-run] [-n N] [--devices D] [--port P] [--module M] [--logdir DIR] \
#       -- --config=configs/vqa.py:runlocal=true --workdir=runs/local_mp
#
#   -n N          processes (default 2)
#   --devices D   CPU devices per process (default 1); the mesh has N * D devices along `clients`
#   --port P      coordinator port on 127.0.0.1 (default: a free one)
#   --module M    python module to run (default feddat_jax.main; feddat_jax.sweep works too)
#   --logdir DIR  where processes 1..N-1 write their output (default: a temporary directory)
#   --dry-run     print the commands, run nothing
# Everything after `--` goes to every process. Process 0 prints to this terminal. Exit status: the first
# non-zero status of a process, else 0.
set -euo pipefail

n=2
devices=1
port=""
module="feddat_jax.main"
logdir=""
dry_run=0
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # quote(), usage(), need_value(), positive_int()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--devices|--port|--module|--logdir) need_value "$1" "$#" ;;&
    -n) n="$2"; shift 2 ;;
    --devices) devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --module) module="$2"; shift 2 ;;
    --logdir) logdir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) usage "$0"; exit 0 ;;
    *) echo "unknown option $1 (arguments for the run go after --)" >&2; exit 2 ;;
  esac
done
# Checked before anything is started or created.
positive_int -n "$n"
positive_int --devices "$devices"
[[ -z "$port" ]] || { positive_int --port "$port"; [[ "$port" -le 65535 ]] || { echo "--port must be <= 65535" >&2; exit 2; }; }
[[ $# -gt 0 ]] || { echo "give the run's arguments after --, e.g. -- --config=configs/vqa.py:runlocal=true" >&2; exit 2; }
python="${PYTHON:-python}"
if [[ -z "$port" ]]; then
  if [[ $dry_run == 1 ]]; then
    port=12355  # a dry run shows the commands with a fixed port
  else
    port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  fi
fi
[[ -n "$logdir" ]] || logdir="${TMPDIR:-/tmp}/feddat_local_mp_${port}"

# One process's command line (an `env` prefix, so the printed line is exactly what runs).
command_for() {
  local i="$1"; shift
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=${devices}"
       "$python" -m "$module" "$@"
       "--config.distributed.coordinator_address=127.0.0.1:${port}"
       "--config.distributed.num_processes=${n}"
       "--config.distributed.process_id=${i}")
}

if [[ $dry_run == 1 ]]; then
  for ((i = 0; i < n; i++)); do
    command_for "$i" "$@"
    redirect=""
    [[ $i -eq 0 ]] || redirect=" > $(quote "${logdir}/process_${i}.log") 2>&1"
    echo "$(quote "${cmd[@]}")${redirect} &"
  done
  echo "wait"
  exit 0
fi

mkdir -p "$logdir"
pids=()
cleanup() {  # stop the processes this script started, by pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup INT TERM
for ((i = 0; i < n; i++)); do
  command_for "$i" "$@"
  if [[ $i -eq 0 ]]; then
    "${cmd[@]}" &
  else
    "${cmd[@]}" > "${logdir}/process_${i}.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  rc=0
  wait "${pids[$i]}" || rc=$?
  if [[ $rc -ne 0 ]]; then
    where="above"
    [[ $i -eq 0 ]] || where="${logdir}/process_${i}.log"
    echo "process ${i} exited with status ${rc} (its output: ${where})" >&2
    [[ $status -ne 0 ]] || status=$rc
    cleanup  # the others would wait for it forever in a collective
  fi
done
exit $status
