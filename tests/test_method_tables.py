"""benchmarks/method_tables.py (issue #19, item 3): the FedDAT-versus-each-method verdicts follow the Holm-adjusted
Welch tests, the report is assembled from finished sweeps, and missing sweeps or bad flags are one-line errors.
Sweeps here are written by hand (seconds); the sweeps the script starts are `feddat_jax.sweep`'s
(tests/test_sweep.py)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from feddat_jax import compare
from feddat_jax.data import synthetic

import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENTS = ["a", "b", "c"]
METHODS = ["feddat", "fedavg_adapter", "local_adapter"]


@pytest.fixture(scope="module")
def mt():
  return helpers.load_script("method_tables")


def fake_sweep(offsets: dict[str, float], seeds: int = 3, seed: int = 0) -> dict:
  """A sweep result whose method m scores 50 + offsets[m] + a little noise on every client."""
  rng = np.random.default_rng(seed)
  return dict(clients=CLIENTS, synthetic_generator=synthetic.GENERATOR, methods={
      m: dict(variant="dat" if m == "feddat" else "global",
              scores=(50 + off + rng.normal(0, 0.5, (seeds, len(CLIENTS)))).tolist()) for m, off in offsets.items()})


def test_verdicts_follow_holm_adjusted_welch_tests(mt):
  result = fake_sweep({"feddat": 0.0, "fedavg_adapter": -10.0, "local_adapter": 0.1})
  random = fake_sweep({"feddat": -20.0}, seed=1)
  t = mt.table(result, random, {"a": 10.0, "b": 20.0, "c": 30.0}, METHODS)
  assert [r["method"] for r in t["rows"]] == METHODS + [mt.RANDOM_ROW]
  assert t["prior"]["mean"] == pytest.approx(20.0)
  by = {c["method"]: c for c in t["comparisons"]}
  assert by["fedavg_adapter"]["verdict"] == "wins" and by["fedavg_adapter"]["diff"] == pytest.approx(10, abs=1.5)
  assert by["local_adapter"]["verdict"] == "no clear difference (under 2 points: worth 5 seeds)"
  mean = lambda m: np.mean(np.asarray(result["methods"][m]["scores"]), 1)
  ps = [compare.welch(mean("feddat"), mean(m))["p"] for m in METHODS[1:]]
  np.testing.assert_allclose([by[m]["p_holm"] for m in METHODS[1:]], compare.holm(ps))
  lost = mt.table(fake_sweep({"feddat": -10.0, "fedavg_adapter": 0.0}), None, {c: 0.0 for c in CLIENTS},
                  METHODS[:2])
  assert lost["comparisons"][0]["verdict"] == "loses" and len(lost["rows"]) == 2


def test_missing_method_is_a_clear_error(mt):
  with pytest.raises(compare.CompareError, match="local_adapter"):
    mt.table(fake_sweep({"feddat": 0.0, "fedavg_adapter": 0.0}), None, {c: 0.0 for c in CLIENTS}, METHODS)


def test_sweep_command_and_completeness(mt, tmp_path):
  cmd = mt.sweep_command("configs/vqa.py", "scene", 1, ["feddat"], 3, "w", ["rounds=2"], random=True)
  assert "--config=configs/vqa.py:benchmark=scene,backbone=random" in cmd
  assert "--config.synthetic.seed=1" in cmd and "--config.rounds=2" in cmd and "--seeds=3" in cmd
  assert "--config=configs/vqa.py:runlocal=true,benchmark=scene" in mt.sweep_command(
      "configs/vqa.py:runlocal=true", "scene", 0, ["feddat"], 2, "w")
  (tmp_path / "sweep.json").write_text(json.dumps(fake_sweep({"feddat": 0.0}, seeds=2)))
  assert mt.complete(str(tmp_path), ["feddat"], 2)
  assert not mt.complete(str(tmp_path), ["feddat"], 3) and not mt.complete(str(tmp_path), ["fedavg_lora"], 2)
  assert not mt.complete(str(tmp_path / "nowhere"), ["feddat"], 1)
  earlier = dict(fake_sweep({"feddat": 0.0}, seeds=2), synthetic_generator="0123456789ab")
  (tmp_path / "sweep.json").write_text(json.dumps(earlier))
  assert not mt.complete(str(tmp_path), ["feddat"], 2)  # data of an earlier generator: run again
  assert mt.data_scale("configs/vqa.py", []) == 1.0 and mt.data_scale("configs/vqa.py:runlocal=true", []) == 0.03
  assert mt.data_scale("configs/vqa.py", ["rounds=2", "synthetic.scale=0.5"]) == 0.5


def write_workdir(mt, root, draws=(1, 0), out=None):
  """Sweeps in root as feddat_jax.sweep writes them, the priors where method_tables keeps them (out: root/tables)."""
  for d in draws:
    for random, offsets in ((False, {"feddat": 0.0, "fedavg_adapter": -8.0, "local_adapter": 3.0}),
                            (True, {"feddat": -15.0})):
      path = mt.sweep_dir(str(root), "function", d, random)
      os.makedirs(path)
      with open(os.path.join(path, "sweep.json"), "w") as f:
        json.dump(fake_sweep(offsets, seed=d), f)
    os.makedirs(f"{out or root / 'tables'}_sweeps", exist_ok=True)
    with open(f"{out or root / 'tables'}_sweeps/function_draw{d}_prior.json", "w") as f:  # text_prior's cache
      json.dump({"key": dict(benchmark="function", seed=d, scale=1.0, generator=synthetic.GENERATOR),
                 "prior": {"a": 30.0, "b": 40.0, "c": 20.0}}, f)


def run_script(*args):
  return subprocess.run([sys.executable, "benchmarks/method_tables.py", *args], capture_output=True, text=True,
                        cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)


def test_assemble_only_writes_the_report_both_draws_side_by_side(mt, tmp_path):
  write_workdir(mt, tmp_path)
  out = tmp_path / "tables"
  proc = run_script("--benchmarks=function", "--draws=1,0", f"--algorithms={','.join(METHODS)}", "--seeds=3",
                    f"--workdir={tmp_path}", f"--out={out}", "--assemble_only")
  assert proc.returncode == 0, proc.stderr[-2000:]
  md = (tmp_path / "tables.md").read_text()
  assert md.index("### Draw 1 (not tuned on)") < md.index("### Draw 0 (tuned on)")
  assert "| fedavg_adapter | +8." in md and "wins" in md and "loses" in md and "text-only prior" in md
  # The summary comes first: one line per method over every twin and draw, with the tally.
  assert md.index("## Summary") < md.index("## Function")
  assert re.search(r"\| fedavg_adapter \| \+8\.\d wins \| \+[78]\.\d wins \| 2 / 0 / 0 \|", md), md
  assert re.search(r"\| local_adapter \| -[23]\.\d loses \| -[23]\.\d loses \| 0 / 0 / 2 \|", md), md
  report = json.loads((tmp_path / "tables.json").read_text())
  assert report["summary"] == {"fedavg_adapter": dict(wins=2, ties=0, losses=0),
                               "local_adapter": dict(wins=0, ties=0, losses=2)}
  assert set(report["tables"]["function"]) == {"0", "1"}
  assert report["tables"]["function"]["1"]["prior"]["mean"] == pytest.approx(30.0)
  rows = (tmp_path / "tables.csv").read_text().splitlines()
  assert rows[0] == "benchmark,draw,method,column,mean,std,seeds" and len(rows) == 1 + 2 * 5 * 4
  assert (tmp_path / "tables_function_draw1.png").stat().st_size > 0
  # Each method's finished sweep is kept beside the report: without the workdir's runs the same report comes
  # back, and without one method's kept sweep (a table stopped before it) --assemble_only names that method.
  for d in (1, 0):
    for random in (False, True):
      path = mt.sweep_dir(str(tmp_path), "function", d, random)
      whole = compare.load_sweep(path)
      for m in whole["methods"]:
        assert compare.load_sweep(mt.kept_sweep(str(out), "function", d, m, random)) == dict(
            whole, methods={m: dict(whole["methods"][m], seeds=[0, 1, 2])})
      os.remove(os.path.join(path, "sweep.json"))
  proc = run_script("--benchmarks=function", "--draws=1,0", f"--algorithms={','.join(METHODS)}", "--seeds=3",
                    f"--workdir={tmp_path}", f"--out={out}", "--assemble_only")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (tmp_path / "tables.md").read_text() == md
  os.remove(mt.kept_sweep(str(out), "function", 0, "local_adapter"))
  proc = run_script("--benchmarks=function", "--draws=1,0", f"--algorithms={','.join(METHODS)}", "--seeds=3",
                    f"--workdir={tmp_path}", f"--out={out}", "--assemble_only")
  assert proc.returncode == 2 and "draw0/local_adapter.json: no finished sweep of local_adapter" in proc.stderr


def test_close_methods_get_more_seeds_added_to_their_kept_sweeps(mt, tmp_path):
  """--close_seeds (5 by default): FedDAT and each method within 2 points of it on the client mean get seeds 3
  and 4 added to their kept three, here from the workdir's sweep of just those seeds (as `--first_seed=3`
  writes it); a method further away keeps its three."""
  out = str(tmp_path / "tables")
  offsets = {"feddat": 0.0, "fedavg_adapter": -8.0, "local_adapter": 0.5}
  base, more = fake_sweep(offsets, seed=1), fake_sweep(offsets, seeds=2, seed=3)
  for m in offsets:
    os.makedirs(os.path.dirname(mt.kept_sweep(out, "function", 1, m)), exist_ok=True)
    with open(mt.kept_sweep(out, "function", 1, m), "w") as f:
      json.dump(dict(base, methods={m: base["methods"][m]}), f)
    more["methods"][m]["seeds"] = [3, 4]
  write_workdir(mt, tmp_path / "unused", draws=(1,), out=out)  # the random row's sweep and the prior
  random = compare.load_sweep(mt.sweep_dir(str(tmp_path / "unused"), "function", 1, True))
  os.makedirs(os.path.dirname(mt.kept_sweep(out, "function", 1, "feddat", True)))
  with open(mt.kept_sweep(out, "function", 1, "feddat", True), "w") as f:
    json.dump(random, f)
  # Before seeds 3 and 4 are there, the table is not reported on 3: --assemble_only fails, --partial leaves it out.
  flags = ["--benchmarks=function", "--draws=1", f"--algorithms={','.join(METHODS)}", "--seeds=3",
           f"--workdir={tmp_path}", f"--out={out}", "--assemble_only"]
  proc = run_script(*flags)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "function draw 1: no 5 kept seeds of feddat, local_adapter" in proc.stderr and "--close_seeds=3" in proc.stderr
  assert not os.path.exists(out + ".md")
  write_workdir(mt, tmp_path, draws=(0,), out=out)  # a draw with no close differences, reported at once
  proc = run_script(*flags[:1], "--draws=1,0", *flags[2:], "--partial")
  assert proc.returncode == 0, proc.stderr[-2000:]
  md = open(out + ".md").read()
  assert "### Draw 0" in md and "### Draw 1" not in md
  assert "function draw 1 (no 5 kept seeds of feddat, local_adapter, under 2 points apart)" in md
  os.makedirs(mt.sweep_dir(str(tmp_path), "function", 1))
  with open(os.path.join(mt.sweep_dir(str(tmp_path), "function", 1), "sweep.json"), "w") as f:
    json.dump(more, f)
  proc = run_script("--benchmarks=function", "--draws=1", f"--algorithms={','.join(METHODS)}", "--seeds=3",
                    f"--workdir={tmp_path}", f"--out={out}", "--assemble_only")
  assert proc.returncode == 0, proc.stderr[-2000:]
  for m, n in (("feddat", 5), ("local_adapter", 5), ("fedavg_adapter", 3)):
    entry = compare.load_sweep(mt.kept_sweep(out, "function", 1, m))["methods"][m]
    assert mt.seed_ids(entry) == list(range(n))
    assert entry["scores"] == base["methods"][m]["scores"] + (more["methods"][m]["scores"] if n == 5 else [])
  assert "over 3/5 training seeds" in open(out + ".md").read()


def test_kept_sweeps_of_other_data_do_not_merge(mt):
  a = fake_sweep({"feddat": 0.0})
  assert set(mt.merge([a, fake_sweep({"fedavg_adapter": 0.0})])["methods"]) == {"feddat", "fedavg_adapter"}
  with pytest.raises(compare.CompareError, match="differ in clients or data"):
    mt.merge([a, dict(fake_sweep({"fedavg_adapter": 0.0}), clients=["a", "b", "d"])])


def test_missing_sweep_and_bad_flags_are_one_line_errors(mt, tmp_path):
  write_workdir(mt, tmp_path, draws=(1,))
  proc = run_script("--benchmarks=function", "--draws=1,0", f"--algorithms={','.join(METHODS)}",
                    f"--workdir={tmp_path}", "--assemble_only")
  assert proc.returncode == 2 and "function_draw0/feddat.json: no finished sweep" in proc.stderr
  assert "Traceback" not in proc.stderr and not (tmp_path / "tables.md").exists()
  # --partial writes what is kept and names what is not; with nothing kept, or without --assemble_only, it fails.
  proc = run_script("--benchmarks=function", "--draws=1,0", f"--algorithms={','.join(METHODS)}",
                    f"--workdir={tmp_path}", "--assemble_only", "--partial")
  assert proc.returncode == 0, proc.stderr[-2000:]
  md = (tmp_path / "tables.md").read_text()
  assert "### Draw 1 (not tuned on)" in md and "### Draw 0" not in md
  assert ("Not in this report yet, their sweeps not all kept: function draw 0 (no 3 kept seeds of feddat, "
          "fedavg_adapter, local_adapter, feddat on a random backbone).") in md
  report = json.loads((tmp_path / "tables.json").read_text())
  assert set(report["tables"]["function"]) == {"1"} and len(report["left_out"]) == 1
  proc = run_script("--benchmarks=function", "--draws=0", f"--algorithms={','.join(METHODS)}",
                    f"--workdir={tmp_path}", f"--out={tmp_path / 'none'}", "--assemble_only", "--partial")
  assert proc.returncode == 2 and "no twin and draw has all its sweeps kept" in proc.stderr
  assert not (tmp_path / "none.md").exists()
  proc = run_script("--partial", f"--workdir={tmp_path}")
  assert proc.returncode == 2 and "add --assemble_only" in proc.stderr
  proc = run_script("--draws=one", f"--workdir={tmp_path}", "--assemble_only")
  assert proc.returncode == 2 and "--draws=one" in proc.stderr and "Traceback" not in proc.stderr
  proc = run_script("--seeds=1", f"--workdir={tmp_path}", "--assemble_only")
  assert proc.returncode == 2 and "at least 2 seeds" in proc.stderr
