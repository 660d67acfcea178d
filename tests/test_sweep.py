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
  from feddat_jax.data import synthetic
  assert result["synthetic_generator"] == synthetic.GENERATOR  # which twins' data it ran on
  for seed in range(2):  # each run is an ordinary experiment workdir
    with open(os.path.join(workdir, f"fedavg_adapter_seed{seed}", "results.json")) as f:
      final = json.load(f)["final"]["shared"]
    np.testing.assert_allclose([final[c] for c in clients], s[seed])
  md = open(os.path.join(workdir, "table.md")).read()
  assert "+- is the sample std over 2 seeds" in md and "| fedavg_adapter (shared) |" in md
  assert md.count("|---") == len(clients) + 2  # method column, clients, mean
  row = next(csv.DictReader(io.StringIO(open(os.path.join(workdir, "table.csv")).read())))
  assert row["method"] == "fedavg_adapter" and row["seeds"] == "2"
  np.testing.assert_allclose(float(row["mean_mean"]), s.mean(), atol=1e-3)
  np.testing.assert_allclose(float(row[f"{clients[0]}_std"]), s[:, 0].std(ddof=1), atol=1e-3)
  assert os.path.getsize(os.path.join(workdir, "table.png")) > 1000


def test_sweep_says_which_run(monkeypatch, capsys, tmp_path):
  """"run i/N <name>" before each run (a tqdm bar on a terminal, a line always)."""
  def fake_run(config, workdir):
    return {"clients": ["x"], "final": {"shared": {"x": float(config.seed)}}}

  monkeypatch.setattr(sweep.experiment, "run", fake_run)
  config = config_utils.load_config(os.path.join(REPO, "configs/vqa.py:runlocal=true"))
  result = sweep.run_sweep(config, ["feddat", "local_head"], 2, str(tmp_path))
  err = capsys.readouterr().err
  assert [line for line in err.splitlines() if line.startswith("sweep:")] == [
      "sweep: run 1/4: feddat_seed0", "sweep: run 2/4: feddat_seed1", "sweep: run 3/4: local_head_seed0",
      "sweep: run 4/4: local_head_seed1"]
  assert result["methods"]["local_head"]["scores"] == [[0.0], [1.0]]


def test_compare_a_sweep_with_itself(swept, tmp_path):
  workdir, result = swept
  md = compare.run([workdir, workdir], labels=("a", "b"), out=str(tmp_path / "cmp"))
  rows = list(csv.DictReader(open(tmp_path / "cmp.csv")))
  assert [r["client"] for r in rows] == result["clients"] + ["mean"]
  for r in rows:
    assert float(r["diff"]) == 0 and float(r["p"]) == 1.0
    assert r["spread_p"] in ("nan", "1.0000")  # 2 seeds a side: no spread test, unless no seed differs
  assert "a (2 seeds) vs b (2 seeds)" in md and md.rstrip().endswith("| 1.000 | - | - |")  # mean: no Holm p
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


def test_sweep_and_compare_tables_agree_on_plus_minus(tmp_path):
  """Known scores: "+-" is the sample std over seeds (ddof=1) in the sweep table, its CSV and the comparison,
  and every caption says so."""
  scores = {"feddat": [[50.0, 30.0], [52.0, 33.0], [57.0, 30.0]], "fedavg_adapter": [[40.0, 20.0], [41.0, 26.0],
                                                                                   [45.0, 20.0]]}
  result = {"clients": ["x", "y"], "methods": {m: {"variant": "v", "scores": s} for m, s in scores.items()}}
  rows = sweep.summarize(result)
  feddat = np.array(scores["feddat"])
  feddat = np.concatenate([feddat, feddat.mean(1, keepdims=True)], 1)
  # x: 50, 52, 57 -> mean 53, sample std sqrt(13) = 3.606 (the population std would be 2.944)
  np.testing.assert_allclose(rows[0]["std"], feddat.std(0, ddof=1))
  assert rows[0]["std"][0] == pytest.approx(np.sqrt(13.0))
  md = sweep.markdown(rows, "t")
  assert "+- is the sample std over 3 seeds" in md.splitlines()[0]
  assert "| feddat (v) | 53.0 +- 3.6 | 31.0 +- 1.7 | 42.0 +- 1.8 |" in md  # mean column: 40, 42.5, 43.5
  csv_rows = list(csv.DictReader(io.StringIO(sweep.table_csv(rows))))
  assert float(csv_rows[0]["x_std"]) == pytest.approx(np.sqrt(13.0), abs=1e-3)
  with open(tmp_path / "table.csv", "w") as f:
    f.write(sweep.table_csv(rows))
  back = sweep.read_table_csv(str(tmp_path / "table.csv"))
  np.testing.assert_allclose(back[0]["std"], rows[0]["std"], atol=1e-3)
  old = sweep.read_table_csv(str(tmp_path / "table.csv"), ddof=0)  # a file of population stds, rescaled
  np.testing.assert_allclose(old[0]["std"], rows[0]["std"] * np.sqrt(1.5), atol=1e-3)

  d = tmp_path / "sweep"
  os.makedirs(d)
  with open(d / "sweep.json", "w") as f:
    json.dump(result, f)
  cmp_md = compare.run([str(d), str(d)], methods=("feddat", "fedavg_adapter"), out=str(tmp_path / "c"))
  assert "+- is the sample std over 3 / 3 seeds" in cmp_md.splitlines()[0]
  assert "| x | 53.0 +- 3.6 | 42.0 +- 2.6 | +11.0 |" in cmp_md  # the sweep table's cells, again
  cmp_rows = {r["client"]: r for r in csv.DictReader(open(tmp_path / "c.csv"))}
  for j, c in enumerate(["x", "y", "mean"]):
    assert float(cmp_rows[c]["feddat_std"]) == pytest.approx(rows[0]["std"][j], abs=1e-4)
    assert float(cmp_rows[c]["fedavg_adapter_std"]) == pytest.approx(rows[1]["std"][j], abs=1e-4)
    assert cmp_rows[c]["feddat_seeds"] == "3"
  # Welch's test and its interval agree with scipy; Holm across the two clients; the mean row is not adjusted.
  ref = scipy_stats.ttest_ind([50.0, 52.0, 57.0], [40.0, 41.0, 45.0], equal_var=False)
  assert float(cmp_rows["x"]["p"]) == pytest.approx(ref.pvalue, abs=1e-4)
  assert float(cmp_rows["x"]["ci95_lo"]) == pytest.approx(ref.confidence_interval(0.95).low, abs=1e-4)
  px, py = float(cmp_rows["x"]["p"]), float(cmp_rows["y"]["p"])
  assert float(cmp_rows["x"]["p_holm"]) == pytest.approx(min(1, max(2 * min(px, py), px if px > py else 0)), abs=2e-4)
  assert cmp_rows["mean"]["p_holm"] == "nan"
  redrawn, labels = compare.read_table_csv(str(tmp_path / "c.csv"))
  assert labels == ("feddat", "fedavg_adapter") and redrawn[0]["a_n"] == 3
  compare.plot(redrawn, labels, str(tmp_path / "redrawn.png"), "t")  # a figure from the CSV alone
  assert os.path.getsize(tmp_path / "redrawn.png") > 1000


def test_holm_and_p_format():
  np.testing.assert_allclose(compare.holm([0.01, 0.04, 0.03, 0.2]), [0.04, 0.09, 0.09, 0.2])
  np.testing.assert_allclose(compare.holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1, never below the raw p
  assert compare.format_p(0.0004) == "< 0.001" and compare.format_p(0.0123) == "0.012"
  assert compare.format_p(float("nan")) == "-"


def test_prior_from_report_or_numbers(tmp_path):
  report = [{"benchmark": "domain", "clients": [{"name": "y", "question_only_score": 30.0},
                                                {"name": "x", "question_only_score": 40.0}]}]
  with open(tmp_path / "h.json", "w") as f:
    json.dump(report, f)
  assert sweep.read_prior(str(tmp_path / "h.json"), "domain", ["x", "y"]) == {"x": 40.0, "y": 30.0, "mean": 35.0}
  assert sweep.read_prior("1,2", "domain", ["x", "y"]) == {"x": 1.0, "y": 2.0, "mean": 1.5}
  assert sweep.read_prior("", "domain", ["x"]) is None
  with pytest.raises(ValueError, match="no report of benchmark 'task'"):
    sweep.read_prior(str(tmp_path / "h.json"), "task", ["x", "y"])
  with pytest.raises(ValueError, match="gives 1 scores for 2 clients"):
    sweep.read_prior("1", "domain", ["x", "y"])
  result = {"clients": ["x", "y"], "methods": {"m": {"variant": "v", "scores": [[41.0, 31.0], [43.0, 29.0]]}}}
  prior = sweep.read_prior("40,30", "domain", ["x", "y"])
  md = sweep.markdown(sweep.summarize(result), "t", prior)
  assert md.rstrip().endswith("| text-only prior | 40.0 | 30.0 | 35.0 |")
  sweep.plot(sweep.summarize(result), str(tmp_path / "t.png"), "t", prior)
  assert os.path.getsize(tmp_path / "t.png") > 1000


def test_sweep_cli_refuses_a_bad_prior_before_running(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "feddat_jax.sweep", "--config=configs/vqa.py:runlocal=true",
                         f"--workdir={tmp_path}", "--prior=40,lots"], capture_output=True, text=True, cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
  assert proc.returncode == 2 and proc.stderr.strip() == (
      "error: --prior='40,lots' is neither a file nor comma-separated numbers"), proc.stderr
  assert not [n for n in os.listdir(tmp_path) if "seed" in n]  # no run started


def test_a_second_sweep_in_a_busy_workdir_is_refused(tmp_path):
  """Two sweeps in one workdir (say of different methods) would each write sweep.json, the later over the
  earlier's results: while one holds the workdir, another is refused in one line, and writes nothing there."""
  from feddat_jax import workdir_lock
  workdir_lock.acquire(str(tmp_path))  # this test's process plays the running sweep
  try:
    proc = subprocess.run([sys.executable, "-m", "feddat_jax.sweep", "--config=configs/vqa.py:runlocal=true,backbone="
                           "random", f"--workdir={tmp_path}", "--algorithms=fedavg_adapter"], capture_output=True,
                          text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
  finally:
    workdir_lock.release(str(tmp_path))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().count("\n") == 0 and f"pid {os.getpid()}" in proc.stderr, proc.stderr
  assert "use another --workdir" in proc.stderr and os.listdir(tmp_path) == []


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
    (lambda p: [_write_sweep(p / "a", [[1, 2]] * 3), _write_sweep(p / "b", [[1, 2]] * 3), "--lables=a,b"],
     "Unknown command line flag 'lables'"),
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


@pytest.mark.parametrize("module,expected", [
    ("feddat_jax.sweep", ["python -m feddat_jax.sweep --config=configs/vqa.py:benchmark=domain \\\n",
                          "--prior"]),
    ("feddat_jax.compare", ["--labels=pretrained,random --out=", "runs/seeds10_function_random \\\n"]),
])
def test_help_reads_cleanly(module, expected):
  """--help: the usage example keeps its line breaks (a raw docstring), and it is the module's text."""
  proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
  assert proc.returncode in (0, 1) and not proc.stderr, proc.stderr  # absl's --help exits with 1
  for text in expected:
    assert text in proc.stdout, proc.stdout[:2000]


def test_regenerate_stored_results(tmp_path):
  """scripts/regenerate_results.py: an old method table (population std) becomes the sample std once (a rerun
  changes nothing); an old comparison gains seeds and Holm columns; figures are redrawn."""
  sys.path.insert(0, os.path.join(REPO, "scripts"))
  try:
    import regenerate_results
  finally:
    sys.path.pop(0)
  d = tmp_path / "results"
  os.makedirs(d)
  (d / "domain.md").write_text("domain benchmark (synthetic) (VQA score on test, mean +- std over 3 seeds)\n\n"
                               "| method | x | mean |\n|---|---|---|\n| m (v) | 53.0 +- 2.9 | 53.0 +- 2.9 |\n")
  (d / "domain.csv").write_text("method,variant,seeds,x_mean,x_std,mean_mean,mean_std\n"
                                f"m,v,3,53.000,{np.std([50, 52, 57]):.3f},53.000,{np.std([50, 52, 57]):.3f}\n")
  (d / "domain.png").write_bytes(b"")
  (d / "c.md").write_text("a (3 seeds) vs b (4 seeds): mean +- sample std; ...\n\n| client |\n|---|\n| x |\n")
  (d / "c.csv").write_text("client,a_mean,a_std,b_mean,b_std,diff,ci95_lo,ci95_hi,p,welch_df,spread_p\n"
                           "x,53.0,3.6,42.0,2.6,11.0,3.0,19.0,0.0200,3.5,0.5\ny,31.0,1.7,22.0,3.5,9.0,1.0,17.0,"
                           "0.0300,3.0,0.4\nmean,42.0,1.8,32.0,1.8,10.0,6.0,14.0,0.0010,4.0,1.0\n")
  for _ in range(2):
    assert regenerate_results.main([str(d), "--prior="]) == 0
    row = next(csv.DictReader(open(d / "domain.csv")))
    assert float(row["x_std"]) == pytest.approx(np.sqrt(13.0), abs=2e-3)
    assert "+- is the sample std over 3 seeds" in (d / "domain.md").read_text()
    rows = {r["client"]: r for r in csv.DictReader(open(d / "c.csv"))}
    assert float(rows["x"]["p_holm"]) == pytest.approx(0.04) and rows["y"]["b_seeds"] == "4"
  assert os.path.getsize(d / "domain.png") > 1000 and os.path.getsize(d / "c.png") > 1000


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


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [[r["loss"][c] for c in sorted(r["loss"])] for r in rows if r["kind"] == "train"]


def _report_files(workdir):
  """A run's report files: top-level names, and the checkpoints' rounds (TensorBoard's file names hold times)."""
  return sorted(os.listdir(workdir)), sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def test_a_later_first_seed_adds_seeds(swept, tmp_path):
  """first_seed=1, seeds=1: seed 1 alone, in its own run directory, with the scores the two-seed sweep gave it
  (how benchmarks/method_tables.py takes a kept sweep from 3 seeds to 5 without training seeds 0-2 again)."""
  _, result = swept
  config = config_utils.load_config(os.path.join(REPO, "configs/vqa.py:runlocal=true,backbone=random"))
  more = sweep.run_sweep(config, ["fedavg_adapter"], 1, str(tmp_path), first_seed=1)
  assert result["methods"]["fedavg_adapter"]["seeds"] == [0, 1] and more["methods"]["fedavg_adapter"]["seeds"] == [1]
  np.testing.assert_allclose(more["methods"]["fedavg_adapter"]["scores"],
                             result["methods"]["fedavg_adapter"]["scores"][1:], atol=1e-6)
  assert sorted(os.listdir(tmp_path)) == ["fedavg_adapter_seed1"]


def test_vectorized_seeds_equal_separate_runs(swept, tmp_path, monkeypatch):
  """--vectorize_seeds: the 2 seeds of `swept` trained as one program (compiled once; their random backbones
  differ, so the frozen one is stacked too) give each seed's separate-run losses and final scores, to float
  rounding, the same report files per seed and the same table. Tolerance: the vmapped program is a different
  XLA program (other fusions and reduction orders), so the float32 losses agree to ~1e-6 relative, not bitwise;
  scores are 100 x means of per-example VQA scores, equal unless an argmax flips (it does not here)."""
  from feddat_jax.federated import engine
  separate, result = swept
  traces = []
  round_fn_for = engine.round_fn_for

  def counted(*args, **kwargs):
    fn = round_fn_for(*args, **kwargs)
    def traced(*a):
      traces.append(1)
      return fn(*a)
    return traced

  monkeypatch.setattr(engine, "round_fn_for", counted)
  workdir = str(tmp_path / "vectorized")
  config = config_utils.load_config(os.path.join(REPO, "configs/vqa.py:runlocal=true,backbone=random"))
  vectorized = sweep.run_sweep(config, ["fedavg_adapter"], 2, workdir, vectorize_seeds=True)
  assert len(traces) == 1  # one program for both seeds and both rounds
  assert vectorized["clients"] == result["clients"]
  np.testing.assert_allclose(vectorized["methods"]["fedavg_adapter"]["scores"],
                             result["methods"]["fedavg_adapter"]["scores"], atol=1e-4)
  for seed in range(2):
    a, b = (os.path.join(d, f"fedavg_adapter_seed{seed}") for d in (separate, workdir))
    np.testing.assert_allclose(_train_losses(b), _train_losses(a), rtol=1e-4)
    assert _report_files(b) == _report_files(a)
  sweep.write_reports(vectorized, workdir, "function benchmark (synthetic)")
  assert open(os.path.join(workdir, "table.md")).read() == open(os.path.join(separate, "table.md")).read()

  # Resume: seed 1 lost its last checkpoint (killed between the seeds' saves): it catches up alone, then both
  # end with the same results.
  seed1 = os.path.join(workdir, "fedavg_adapter_seed1")
  import shutil
  shutil.rmtree(os.path.join(seed1, "checkpoints", "2"))
  again = sweep.run_sweep(config, ["fedavg_adapter"], 2, workdir, vectorize_seeds=True)
  np.testing.assert_allclose(again["methods"]["fedavg_adapter"]["scores"],
                             vectorized["methods"]["fedavg_adapter"]["scores"], atol=1e-4)
  assert [r["round"] for r in map(json.loads, open(os.path.join(seed1, "metrics.jsonl"))) if r["kind"] == "train"] \
      == [1, 2]


def test_vectorized_seeds_refuse_what_one_program_cannot_share():
  from feddat_jax import experiment
  config = config_utils.load_config(os.path.join(REPO, "configs/vqa.py:runlocal=true"))
  configs = [config.copy_and_resolve_references() for _ in range(2)]
  configs[1].seed = 1
  experiment.check_seeds(configs)
  configs[1].rounds = 3
  with pytest.raises(experiment.ConfigError, match="differ in more than the seed: rounds: 2 there, 3 here"):
    experiment.check_seeds(configs)
  configs[1].rounds = 2
  for c in configs:
    c.aggregator = "dp_mean"
  with pytest.raises(experiment.ConfigError, match="cannot run aggregator=dp_mean"):
    experiment.check_seeds(configs)


def test_seeds_round_pads_seeds_to_one_shape():
  """Two seeds whose rounds have other step counts (4 and 3) and lane lengths (4 and 3), as sampled cohorts with
  step buckets give: `pad_rounds` pads the shorter with masked steps and idle lane slots, and the one vmapped
  program gives the padded seed its own round's server, rows and metrics (float rounding: another program).
  Clients vmapped here (cheaper to compile; the reference is helpers' compiled round); the sweep test above runs
  the seeds' rounds in lanes."""
  import helpers
  import jax
  import jax.numpy as jnp
  from feddat_jax import experiment
  from feddat_jax.federated import engine, feeder, sharding
  ns = helpers.setup("fedavg_adapter")
  cohort = np.arange(helpers.C, dtype=np.int32)
  masks = [np.array([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]], bool), np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]], bool)]
  rounds = []
  for seed, mask in enumerate(masks):
    s = mask.shape[1]
    batches = {k: np.asarray(v) for k, v in helpers.toy_batches(seed, steps=s).items()}
    inputs = engine.RoundInputs.make(cohort, batches, mask, np.ones(helpers.C, np.float32), jax.random.key(seed),
                                     schedule=engine.lane_schedule(mask, 2, engine.lane_length(mask.sum(1), 2)))
    rounds.append(feeder.Round(0, cohort, np.zeros(helpers.C, bool), jax.tree_util.tree_map(np.asarray, inputs)))
  padded = experiment.pad_rounds(rounds, 2)
  assert padded[0] is not rounds[0] and padded[0].inputs is rounds[0].inputs  # the longest: unchanged
  one = padded[1].inputs
  assert one.step_mask.shape == (3, 4) and not one.step_mask[:, 3].any() and one.schedule["slot"].shape == (2, 4)
  np.testing.assert_array_equal(one.schedule["slot"][:, :3], rounds[1].inputs.schedule["slot"])  # + idle slots
  assert (one.schedule["slot"][:, 3] == helpers.C).all()
  servers = [ns.server, jax.tree_util.tree_map(lambda x: x * 1.01 if x.dtype == jnp.float32 else x, ns.server)]
  placement = sharding.Placement()
  seeds_round = placement.build_seeds_round(ns.algo, "vmap", donate=False)
  stack = lambda trees: jax.tree_util.tree_map(lambda *xs: np.stack(xs), *trees)
  got = seeds_round(ns.frozen, stack(servers), placement.put_seed_rows(stack([ns.clients] * 2), helpers.C),
                    placement.put_seed_inputs(stack([r.inputs for r in padded]), helpers.C))
  ref = ns.round.inner(ns.frozen, servers[1], ns.clients, rounds[1].inputs.replace(schedule=None))
  for a, b in zip(ref, got):
    helpers.assert_trees_close(a, jax.tree_util.tree_map(lambda x: x[1], b), atol=1e-5, rtol=1e-5)
