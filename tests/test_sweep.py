"""The sweep (methods x seeds -> the paper's table) and the comparison of two sweeps (Welch's t-test)."""
import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats

from feddat_jax import compare, config_utils, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  """A real two-seed sweep of one method on the smoke config, with its reports written."""
  workdir = str(tmp_path_factory.mktemp("sweep"))
  config = config_utils.load_config(os.path.join(REPO, "configs/vqa.py:runlocal=true,backbone=random"))
  result = sweep.run_sweep(config, ["fedavg_adapter"], 2, workdir)
  sweep.write_reports(result, workdir, "function benchmark (synthetic)")
  return workdir, result


def test_sweep_writes_the_table(swept):
  workdir, result = swept
  clients = result["clients"]
  s = np.asarray(result["methods"]["fedavg_adapter"]["scores"])
  assert s.shape == (2, len(clients)) and np.isfinite(s).all()
  for seed in range(2):  # each run is an ordinary experiment workdir
    with open(os.path.join(workdir, f"fedavg_adapter_seed{seed}", "results.json")) as f:
      final = json.load(f)["final"]["shared"]
    np.testing.assert_allclose([final[c] for c in clients], s[seed])
  md = open(os.path.join(workdir, "table.md")).read()
  assert "mean +- std over 2 seeds" in md and "| fedavg_adapter (shared) |" in md
  assert md.count("|---") == len(clients) + 2  # method column, clients, mean
  row = next(csv.DictReader(io.StringIO(open(os.path.join(workdir, "table.csv")).read())))
  assert row["method"] == "fedavg_adapter" and row["seeds"] == "2"
  np.testing.assert_allclose(float(row["mean_mean"]), s.mean(), atol=1e-3)
  np.testing.assert_allclose(float(row[f"{clients[0]}_std"]), s[:, 0].std(), atol=1e-3)
  assert os.path.getsize(os.path.join(workdir, "table.png")) > 1000


def test_compare_a_sweep_with_itself(swept, tmp_path):
  workdir, result = swept
  md = compare.run([workdir, workdir], labels=("a", "b"), out=str(tmp_path / "cmp"))
  rows = list(csv.DictReader(open(tmp_path / "cmp.csv")))
  assert [r["client"] for r in rows] == result["clients"] + ["mean"]
  for r in rows:
    assert float(r["diff"]) == 0 and float(r["p"]) == 1.0
    assert r["spread_p"] in ("nan", "1.0000")  # 2 seeds a side: no spread test, unless no seed differs
  assert "a (2 seeds) vs b (2 seeds)" in md and md.rstrip().endswith("| 1.000 | - |")
  assert os.path.getsize(tmp_path / "cmp.png") > 1000


def test_welch_matches_the_formula():
  a, b = np.array([40.0, 42.0, 44.0, 46.0]), np.array([30.0, 36.0, 33.0])
  r = compare.welch(a, b)
  va, vb = a.var(ddof=1) / 4, b.var(ddof=1) / 3  # 5/3 and 3
  df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
  assert r["diff"] == pytest.approx(10.0) and r["df"] == pytest.approx(df)
  # t = 10 / sqrt(14/3) = 4.63 on ~3.9 df: p ~ 0.01; the 95% interval excludes 0 and is symmetric.
  assert 0.005 < r["p"] < 0.02
  assert r["lo"] > 0 and r["hi"] - 10 == pytest.approx(10 - r["lo"])
  same = compare.welch(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]))
  assert same["diff"] == 0 and same["p"] == pytest.approx(1.0)


def _write_sweep(path, scores, clients=("x", "y"), method="feddat"):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "sweep.json"), "w") as f:
    json.dump({"clients": list(clients), "methods": {method: {"variant": "dat", "scores": scores}}}, f)
  return str(path)


def test_compare_detects_a_real_gap(tmp_path):
  rng = np.random.default_rng(0)
  a = _write_sweep(tmp_path / "a", (50 + rng.normal(0, 1, (8, 2))).tolist())
  b = _write_sweep(tmp_path / "b", (45 + rng.normal(0, 1, (8, 2))).tolist())
  compare.run([a, b], out=str(tmp_path / "out"))
  rows = {r["client"]: r for r in csv.DictReader(open(tmp_path / "out.csv"))}
  for c in ("x", "y", "mean"):
    assert 3.5 < float(rows[c]["diff"]) < 6.5 and float(rows[c]["p"]) < 1e-4
    assert float(rows[c]["ci95_lo"]) > 0


def test_spread_p_tells_a_steadier_side_from_an_equal_one():
  rng = np.random.default_rng(1)
  steady, shaky = 50 + rng.normal(0, 0.5, 12), 50 + rng.normal(0, 3.0, 12)
  assert compare.spread_p(steady, shaky) < 0.01
  assert compare.spread_p(steady, steady + 4.0) > 0.999  # the same spread at another level
  assert compare.spread_p(np.full(3, 2.0), np.full(4, 7.0)) == 1.0  # neither varies: nothing to tell apart
  assert np.isnan(compare.spread_p(np.array([1.0, 2.0]), np.array([1.0, 5.0])))  # 2 seeds cannot tell
  np.testing.assert_allclose(compare.spread_p(steady, shaky),  # Levene's W about the medians, F(1, n - 2)
                             _brown_forsythe_p(steady, shaky), rtol=1e-10)


def _brown_forsythe_p(a, b):
  z = [np.abs(x - np.median(x)) for x in (a, b)]
  n, zbar = len(a) + len(b), np.concatenate(z).mean()
  between = sum(len(x) * (x.mean() - zbar) ** 2 for x in z)
  within = sum(((x - x.mean()) ** 2).sum() for x in z)
  w = (n - 2) * between / within
  return scipy_stats.f.sf(w, 1, n - 2)


@pytest.mark.parametrize("make,message", [
    (lambda p: [str(p / "nowhere"), str(p / "nowhere")], "sweep.json does not exist"),
    (lambda p: [_write_sweep(p / "a", [[1, 2]]), _write_sweep(p / "b", [[1, 2], [3, 4]])], "needs >= 2 per side"),
    (lambda p: [_write_sweep(p / "a", [[1, 2], [3, 4]]), _write_sweep(p / "b", [[1, 2], [3, 4]], ("x", "z"))],
     "different clients"),
    (lambda p: [_write_sweep(p / "a", [[1, 2]] * 3), _write_sweep(p / "b", [[1, 2]] * 3), "--seed_range=2-3"],
     "is not START:STOP"),
    (lambda p: [_write_sweep(p / "a", [[1, 2]] * 3), _write_sweep(p / "b", [[1, 2]] * 3), "--seed_range=2:2"],
     "is not START:STOP"),
    (lambda p: [_write_sweep(p / "a", [[1, 2]] * 3), _write_sweep(p / "b", [[1, 2]] * 3), "--seed_range=1:5"],
     "has 3 seeds; --seed_range=1:5 asks for"),
])
def test_compare_cli_errors(tmp_path, make, message):
  proc = subprocess.run([sys.executable, "-m", "feddat_jax.compare", *make(tmp_path)], capture_output=True,
                        text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr


def test_compare_needs_a_method_name_when_a_sweep_has_several():
  result = {"clients": ["x"], "methods": {"a": {"scores": [[1], [2]]}, "b": {"scores": [[1], [2]]}}}
  with pytest.raises(compare.CompareError, match="pick one with --methods"):
    compare.scores(result, "", "sweepdir")
  with pytest.raises(compare.CompareError, match="has no method 'c'"):
    compare.scores(result, "c", "sweepdir")
  np.testing.assert_allclose(compare.scores(result, "b"), [[1, 1], [2, 2]])


def test_compare_a_range_of_seeds(tmp_path):
  """--seed_range=START:STOP compares only those seeds of both sweeps (a look at seeds an earlier one did not use)."""
  a = _write_sweep(tmp_path / "a", [[50.0, 50.0], [52.0, 52.0], [60.0, 60.0], [62.0, 62.0], [61.0, 61.0]])
  b = _write_sweep(tmp_path / "b", [[51.0, 51.0], [51.0, 53.0], [40.0, 40.0], [42.0, 42.0], [41.0, 41.0]])
  md = compare.run([a, b], labels=("a", "b"), out=str(tmp_path / "late"), seeds="2:")
  assert md.startswith("Seeds 2: (START:STOP) of each sweep. a (3 seeds) vs b (3 seeds)")
  assert "| x | 61.0 +- 1.0 | 41.0 +- 1.0 | +20.0 |" in md
  md = compare.run([a, b], labels=("a", "b"), out=str(tmp_path / "early"), seeds=":2")
  assert "| x | 51.0 +- 1.4 | 51.0 +- 0.0 | +0.0 |" in md
  assert compare.seed_range("") == (0, None) and compare.seed_range("10:20") == (10, 20)


def test_compare_two_methods_of_one_sweep(tmp_path):
  d = str(tmp_path / "s")
  os.makedirs(d)
  with open(os.path.join(d, "sweep.json"), "w") as f:
    json.dump({"clients": ["x"], "methods": {"feddat": {"scores": [[50.0], [52.0], [51.0]]},
                                             "fedavg_adapter": {"scores": [[40.0], [41.0], [42.0]]}}}, f)
  md = compare.run([d, d], methods=("feddat", "fedavg_adapter"), out=str(tmp_path / "c"))
  assert "feddat (3 seeds) vs fedavg_adapter (3 seeds)" in md and "| x | 51.0 +- 1.0 | 41.0 +- 1.0 | +10.0 |" in md


@pytest.mark.parametrize("args,message", [
    (["--algorithms=fedavg_adapter,fedavg_adaptor"], "algorithm='fedavg_adaptor' is unknown"),
    (["--seeds=0"], "--seeds=0 must be >= 1"),
])
def test_sweep_checks_every_run_before_the_first(tmp_path, args, message):
  """A typo in the last algorithm, or no seeds: one line before anything runs or is created."""
  workdir = tmp_path / "sweep"
  proc = subprocess.run([sys.executable, "-m", "feddat_jax.sweep", "--config=configs/vqa.py:runlocal=true,backbone="
                         "random", f"--workdir={workdir}", *args], capture_output=True, text=True, cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1"), timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
  assert not workdir.exists()
