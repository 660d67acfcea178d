"""benchmarks/calibrate_twins.py: the calibration table from made-up scores, and its one-line argument errors
(no training: seconds)."""
from __future__ import annotations

import csv
import io
import os
import subprocess
import sys

import pytest

import helpers
from feddat_jax import config_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def calib():
  return helpers.load_script("calibrate_twins")


TWINS = {
    "domain": {"prior": {"a": 40.0, "b": 60.0},
               "centralized_full": {"b": 80.0, "a": 50.0},  # the prior's client order counts, not this one's
               "centralized_adapter": {"a": 42.0, "b": 61.0}},
    "task": {"prior": {"x": 50.0}, "centralized_full": {"x": 65.0}, "centralized_adapter": {"x": 45.0}},
}


def test_rows_margin_and_mean(calib):
  rows = calib.calibration_rows(TWINS, margin=15.0)
  assert [(r["twin"], r["client"]) for r in rows] == [("domain", "a"), ("domain", "b"), ("domain", "mean"),
                                                      ("task", "x"), ("task", "mean")]
  a, b, mean, x, _ = rows
  assert (a["full_minus_prior"], a["adapter_minus_prior"], a["meets_margin"]) == (10.0, 2.0, "no")
  assert (b["full_minus_prior"], b["meets_margin"]) == (20.0, "yes")
  assert (x["full_minus_prior"], x["adapter_minus_prior"], x["meets_margin"]) == (15.0, -5.0, "yes")  # >=
  assert (mean["prior"], mean["centralized_full"], mean["centralized_adapter"]) == (50.0, 65.0, 51.5)
  assert mean["full_minus_prior"] == 15.0 and mean["meets_margin"] == "1/2"  # the mean row counts clients
  assert [r["meets_margin"] for r in calib.calibration_rows(TWINS, margin=25.0)] == ["no", "no", "0/2", "no",
                                                                                     "0/1"]


def test_markdown_csv_and_short_table(calib):
  rows = calib.calibration_rows(TWINS, margin=15.0)
  md = calib.markdown(rows, 15.0, "python benchmarks/calibrate_twins.py --rounds=3", "settings")
  assert "python benchmarks/calibrate_twins.py --rounds=3" in md.split("|")[0]  # the command first
  assert "| twin | client | text prior | centralized full | centralized adapter | full - prior | adapter - prior " \
         "| full - prior >= 15 |" in md
  assert "| domain | a | 40.0 | 50.0 | 42.0 | +10.0 | +2.0 | no |" in md
  assert "| domain | **mean** | 50.0 | 65.0 | 51.5 | +15.0 | +1.5 | 1/2 |" in md
  text = calib.table_csv(rows, "python x.py")
  assert text.startswith("# python x.py\n")
  records = list(csv.DictReader(io.StringIO(text.split("\n", 1)[1])))
  assert list(records[0]) == list(calib.COLUMNS) and len(records) == 5
  assert records[4]["client"] == "mean" and records[4]["meets_margin"] == "1/1"
  assert float(records[3]["adapter_minus_prior"]) == -5.0
  short = calib.short_table(rows, 15.0)
  assert len(short.splitlines()) == 6 and "1/2" in short
  assert calib._signed(-1e-12) == "+0.0" and calib._signed(-0.26) == "-0.3"


def test_check_args(calib):
  calib.check_args(["domain", "task"], 20, 1, 15.0)
  for args, needle in [((["domian"], 20, 1, 15.0), "unknown benchmark(s) ['domian']"),
                       (([], 20, 1, 15.0), "empty"), ((["task", "task"], 20, 1, 15.0), "twice"),
                       ((["task"], 0, 1, 15.0), "--rounds=0"), ((["task"], 5, 1, -1.0), "--margin"),
                       ((["task"], 5, 1, 15.0, None, {"lr": 1e-4, "head_lr_mult": 0.0}), "--full_head_lr_mult=0.0"),
                       ((["task"], 5, 1, 15.0, None, {"lr": float("nan"), "head_lr_mult": 10.0}), "--full_lr=nan")]:
    with pytest.raises(ValueError, match=None) as e:
      calib.check_args(*args)
    assert needle in str(e.value)


@pytest.mark.parametrize("argv, needle", [
    (["--benchmarks=domain,nope"], "unknown benchmark(s) ['nope']"),
    (["--algorithms=feddat"], "algorithms"),  # a sweep flag, not one of this tool
    (["--config.optim.lr=-1"], "lr"),
    (["--config.population=iid:10"], "population=natural"),
])
def test_bad_input_is_one_line(argv, needle, tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "calibrate_twins.py"), *argv,
                         f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHONPATH": REPO})
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
  assert not os.listdir(tmp_path)  # failed before any run


def test_full_finetuning_gets_its_own_optimiser(calib):
  """centralized_full runs with the full-finetuning lr and head multiplier; the adapter run keeps the config's."""
  twin = calib.twin_config(config_utils.load_config(calib.DEFAULT_CONFIG), "task", 3, 1, 0)
  full = calib.run_config(twin, "centralized_full", 0, {"lr": 1e-4, "head_lr_mult": 10.0})
  adapter = calib.run_config(twin, "centralized_adapter", 0, {"lr": 1e-4, "head_lr_mult": 10.0})
  assert (full.optim.lr, full.optim.head_lr_mult, full.algorithm) == (1e-4, 10.0, "centralized_full")
  assert (adapter.optim.lr, adapter.optim.head_lr_mult) == (twin.optim.lr, twin.optim.head_lr_mult) == (1e-3, 1.0)
