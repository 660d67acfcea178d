#!/usr/bin/env bash
# Accelerator figures for the federated round, in one command (issue 22, item 3).
#
# Usage:
#   bash benchmarks/accelerator.sh                    # the sweep below on whatever device JAX sees
#   bash benchmarks/accelerator.sh --out=PATH         # results to PATH (default benchmarks/accelerator_results.json)
#   bash benchmarks/accelerator.sh --cpu-smoke        # CPU, tiny size: checks that the sweep works (CI)
#   bash benchmarks/accelerator.sh --clients=5,16 --peak_tflops=989   # any other flag goes to accelerator.py
#   bash benchmarks/accelerator.sh --help             # this text
#
# The sweep: base-size ViLT, FedDAT and FedAvg-adapter, float32 and bfloat16 compute, lanes 1 and C
# (clients one after the other, or all C batched), C = 5, 16, 64, S = 4 local steps of B = 8 examples,
# 3 timed rounds after a warm-up; random inputs and a random backbone. Meant to take a few minutes on one GPU
# or TPU (not timed on one yet: no accelerator has been lent so far).
# One line per configuration: algorithm, dtype, lanes, C, round_s (median), examples_per_s,
# flops_per_round (XLA cost analysis), mfu (over the device's peak: a table by device kind, --peak_tflops,
# or a measured matmul; the header says which), peak device memory in bytes (memory_stats, or the compiled
# round's memory analysis on the CPU; the tag says which), compile_s. A configuration that fails (out of
# memory) prints one FAILED line and the sweep goes on. The results file holds one JSON object per
# configuration per line. Details: the docstring of benchmarks/accelerator.py and BENCHMARKS.md.
#
# Environment: PYTHON (default python, else python3) runs the script; JAX_COMPILATION_CACHE_DIR, when set, keeps compiled
# programs between runs.
set -euo pipefail

if [[ " $* " == *" --help "* || " $* " == *" -h "* ]]; then
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
  exit 0
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/benchmarks/accelerator_results.json"
args=()
while (($#)); do
  case "$1" in
    --out=*) out="${1#--out=}" ;;
    --out) out="$2"; shift ;;
    --cpu-smoke) args+=(--cpu_smoke); export JAX_PLATFORMS=cpu ;;
    *) args+=("$1") ;;
  esac
  shift
done
mkdir -p "$(dirname "$out")"
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"

cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-$(command -v python || command -v python3)}"
"$python" benchmarks/accelerator.py --json_out="$out" ${args[@]+"${args[@]}"}
echo "results: $out"
