"""benchmarks/round_throughput.py keeps the JSON fields issue #22 names (`round_s`, which reference_loop.py reads)
and runs end to end: the issue's flags at tiny size, without the peak-memory subprocesses and the sequential loop
(one subprocess, one compile)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_issue_flags_print_round_s_and_the_rounds_flops():
  res = subprocess.run(
      [sys.executable, "benchmarks/round_throughput.py", "--size=tiny", "--clients=5", "--steps=4", "--batch=8",
       "--rounds=3", "--algorithm=feddat", "--json", "--memory_clients=", "--nosequential"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
  assert res.returncode == 0, res.stderr[-2000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["size"] == "tiny" and out["clients"] == 5 and out["steps"] == 4 and out["batch"] == 8
  assert out["round_s"] > 0 and out["compile_s"] > 0
  # The random inputs (random_inputs.random_batches) and the tiny model fix the work: 5.03 GFLOP per round.
  assert abs(out["flops_per_round"] - 5.025e9) / 5.025e9 < 0.02
  assert out["examples_per_s"] > 0 and out["client_parallelism"].startswith(("lanes", "vmap", "scan"))
