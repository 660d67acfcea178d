"""benchmarks/accelerator.sh --cpu-smoke: the accelerator sweep runs end to end on the CPU at tiny size.

One subprocess (about 35 s on 2 cores once the persistent compilation cache holds the programs; a cold cache
compiles 8 round programs and takes a few minutes). The cheap checks of the script's pieces run in-process.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

import helpers

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "accelerator.sh"


def _module():
  return helpers.load_script("accelerator")


@pytest.fixture(scope="module")
def accelerator():
  return _module()


def test_help_prints_only_the_comment_block():
  res = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, check=True, timeout=30)
  lines = res.stdout.splitlines()
  assert lines[0].startswith("Accelerator figures") and "--cpu-smoke" in res.stdout
  comment = [l for l in SCRIPT.read_text().splitlines()[1:] if l.startswith("#")]
  assert len(lines) == len(comment)
  assert not any(l.startswith(("set ", "root=", "#")) for l in lines)


def test_lanes_map_to_the_engine_in_one_place(accelerator):
  # Only the lane count is read before refusing: no algorithm is needed to see the refusal.
  with pytest.raises(ValueError, match="lanes=3 with C=5"):
    accelerator._round_fn(None, 3, 5)
  assert [c[2:] for c in accelerator.configurations(["a"], ["float32"], ["1", "C"], ["4", "2"])] == [
      (1, 2), (2, 2), (1, 4), (4, 4)]
  # C = 1: lanes 1 and C are the same configuration.
  assert len(accelerator.configurations(["a"], ["float32"], ["1", "C"], ["1"])) == 1


def test_peaks(accelerator):
  peak, note = accelerator.peaks("NVIDIA H200", ["bfloat16", "float32"])
  assert peak == {"bfloat16": 989.0, "float32": 67.0} and "assumed" in note and "TF32" in note
  assert accelerator.peaks("NVIDIA A100-SXM4-80GB", ["float32"])[0] == {"float32": 19.5}
  assert accelerator.peaks("TPU v5 lite", ["bfloat16"])[0] == {"bfloat16": 197.0}
  assert accelerator.peaks("TPU v5p", ["bfloat16"])[0] == {"bfloat16": 459.0}
  assert accelerator.peaks("TPU v6 lite", ["bfloat16"])[0] == {"bfloat16": 918.0}
  assert accelerator.peaks("cpu", ["float32"], "2")[0] == {"float32": 2.0}
  assert accelerator.peaks("cpu", ["float32", "bfloat16"], "bfloat16=4,float32=1")[0] == {
      "float32": 1.0, "bfloat16": 4.0}


def test_cpu_smoke(tmp_path):
  out = tmp_path / "results.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable,
         "JAX_COMPILATION_CACHE_DIR": os.environ.get(
             "FEDDAT_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "feddat_jax_xla")),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
  res = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", "--out", str(out)], capture_output=True, text=True,
                       env=env, timeout=900, cwd=tmp_path)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  records = [json.loads(line) for line in out.read_text().splitlines()]
  expected = {(a, d, n, c) for a in ("feddat", "fedavg_adapter") for d in ("float32", "bfloat16")
              for c in (2,) for n in (1, c)}
  assert {(r["algorithm"], r["dtype"], r["lanes"], r["clients"]) for r in records} == expected
  assert len(records) == len(expected)
  lines = [l for l in res.stdout.splitlines() if " lanes=" in l]
  assert len(lines) == len(expected) and not any("FAILED" in l for l in lines), res.stdout
  assert "mfu: peak measured" in res.stdout and "memory_analysis" in res.stdout
  for r in records:
    assert "error" not in r, r
    for k in ("round_s", "examples_per_s", "flops_per_round", "peak_memory_bytes"):
      assert math.isfinite(r[k]) and r[k] > 0, (k, r)
    assert 0 < r["mfu"] <= 1, r
    assert r["examples_per_s"] == pytest.approx(r["clients"] * 2 * 2 / r["round_s"])
    assert r["peak_memory_source"] == "memory_analysis.argument+temp" and r["uploads_finite"], r
    assert f"round_s={r['round_s']:.4g} " in res.stdout
  # The 1-lane round is credited with the C-lane round's FLOPs (the same arithmetic).
  flops = {(r["algorithm"], r["dtype"], r["lanes"], r["clients"]): r["flops_per_round"] for r in records}
  assert all(flops[a, d, 1, c] == flops[a, d, c, c] for a, d, _, c in expected)
