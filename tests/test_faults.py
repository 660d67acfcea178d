"""Faults: SIGKILL at three points then resume == uninterrupted (bitwise), client dropout, NaN uploads, quorum.

The kills use the test hook FEDDAT_DEBUG_PAUSE_AT=<phase>:<round> (feddat_jax/federated/faults.py): the run
prints a marker and sleeps at that point, and the test kills it there:
  round:2  after round 2's computation, before anything of it is logged, evaluated or saved;
  save:2   inside checkpoint 2's save, its files written to orbax's temporary folder, before the rename;
  eval:3   inside the evaluation after round 3 (checkpoint 3 not yet written).
The runs use dropout, DP noise and client sampling, all drawn from (seed, round), so resuming must redo them
exactly. The four runs (and then the three resumes) run concurrently to bound the test's time.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from feddat_jax import config_utils, experiment
from feddat_jax.federated import algorithms as registry
from feddat_jax.federated import engine, faults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/vqa.py:runlocal=true,backbone=random", "--config.rounds=3", "--config.cohort_size=4",
        "--config.dropout=0.3", "--config.aggregator=dp_mean", "--config.dp.noise_multiplier=0.5"]
KILLS = {"round:2": 1, "save:2": 1, "eval:3": 2}  # pause point -> the last complete checkpoint when killed


def _env(pause=None):
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # also cache the op-by-op compiles of model init
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "feddat_jax_xla"))
  env.pop(faults.PAUSE_ENV, None)
  if pause:
    env[faults.PAUSE_ENV] = pause
  return env


def _start(workdir, pause=None):
  os.makedirs(workdir, exist_ok=True)
  out = open(workdir + (".killed" if pause else "") + ".out", "w")
  proc = subprocess.Popen([sys.executable, "-m", "feddat_jax.main", *ARGS, f"--workdir={workdir}"], cwd=REPO,
                          env=_env(pause), stdout=out, stderr=subprocess.STDOUT)
  proc.out_path = out.name
  return proc


def _output(proc):
  with open(proc.out_path) as f:
    return f.read()


def _finish(proc, timeout=400):
  assert proc.wait(timeout) == 0, _output(proc)[-3000:]


def _steps(workdir):
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def _final_state(workdir, step=3):
  """The saved states of checkpoint `step` as numpy arrays (structure as saved)."""
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return jax.tree_util.tree_map(np.asarray, state)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


def test_sigkill_at_three_points_then_resume_is_bitwise_equal(tmp_path):
  """One run killed at each point in turn (each kill resumed by the next process), beside an unbroken run."""
  whole = _start(str(tmp_path / "whole"))
  workdir = str(tmp_path / "killed")
  resumed_after = None
  for pause, last_complete in KILLS.items():
    proc = _start(workdir, pause=pause)
    deadline = time.time() + 400
    while f"FEDDAT_DEBUG_PAUSED {pause}" not in _output(proc):
      assert proc.poll() is None, f"the run ended before {pause}:\n" + _output(proc)[-3000:]
      assert time.time() < deadline, f"no marker for {pause}"
      time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if resumed_after is not None:
      assert f"resumed from {workdir}/checkpoints after round {resumed_after}" in _output(proc), pause
    steps = _steps(workdir)
    assert [s for s in steps if s.isdigit()][-1] == str(last_complete), (pause, steps)
    if pause.startswith("save"):  # the kill left the half-done save's temporary folder
      assert any(s.startswith("2.") and "tmp" in s for s in steps), steps
    resumed_after = last_complete
  last = _start(workdir)
  _finish(last)
  _finish(whole)
  assert f"resumed from {workdir}/checkpoints after round {resumed_after}" in _output(last)

  ref_dir = str(tmp_path / "whole")
  ref = json.load(open(os.path.join(ref_dir, "results.json")))
  assert any(row.get("dropped") for row in _rows(ref_dir)), "dropout never struck; pick another seed"
  res = json.load(open(os.path.join(workdir, "results.json")))
  for key in ("final", "history", "privacy", "fingerprint"):
    assert res[key] == ref[key], key
  assert _rows(workdir) == _rows(ref_dir)
  assert helpers.leaves_equal(_final_state(workdir), _final_state(ref_dir))
  assert all(s.isdigit() for s in _steps(workdir)), _steps(workdir)  # temporary folders cleaned


# ------------------------------------------------------------------------------------------------ dropout


def test_dropout_is_reproducible_and_spares_dummies():
  cohort = np.array([0, 3, 5, 7, 9, 10, 10])  # 10 clients: positions 5 and 6 are dummies
  a = faults.dropped(0, 4, cohort, 10, 0.3)
  np.testing.assert_array_equal(a, faults.dropped(0, 4, cohort, 10, 0.3))
  assert not faults.dropped(0, 4, cohort, 10, 0.0).any()
  draws = np.stack([faults.dropped(0, r, cohort, 10, 0.3) for r in range(400)])
  assert not draws[:, 5:].any()
  assert abs(draws[:, :5].mean() - 0.3) < 0.05
  assert len({tuple(d) for d in draws}) > 10  # differs across rounds


def test_round_report():
  names = [f"c{i}" for i in range(5)]
  cohort = np.array([0, 2, 3, 4, 5])  # position 4: a dummy
  report = faults.round_report(names, cohort, 5, dropped_mask=[False, True, False, False, False],
                               finite=[True, True, False, True, True], min_clients=2)
  assert report == {"reported": ["c0", "c4"], "dropped": ["c2"], "nonfinite": ["c3"], "skipped": False}
  assert faults.round_report(names, cohort, 5, [False] * 5, [True, False, False, True, True], 3)["skipped"]


def _ten_clients(real_load_data):
  def load_data(config):
    clients, tokenizer = real_load_data(config)
    return clients + [dataclasses.replace(c, name=c.name + "_b") for c in clients], tokenizer
  return load_data


def test_dropout_run_on_ten_clients_logs_who_reported(tmp_path, monkeypatch):
  """30% dropout, 10 clients, min_clients 7: the run completes; each train row says who reported, and the
  rounds with 6 reports (rounds 3 and 4 for seed 0) are skipped."""
  monkeypatch.setattr(experiment, "load_data", _ten_clients(experiment.load_data))
  config = config_utils.load_config(os.path.join(REPO, "configs/vqa.py:runlocal=true,backbone=random"))
  config.rounds, config.dropout, config.min_clients, config.checkpoint_every = 4, 0.3, 7, 0
  config.local_steps, config.eval_every, config.cohort_size = 1, 4, 10
  results = experiment.run(config, str(tmp_path))
  names = results["clients"]
  assert len(names) == 10
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train = [r for r in rows if r["kind"] == "train"]
  assert [r["round"] for r in train] == [1, 2, 3, 4]
  for r in train:
    dropped = faults.dropped(config.seed, r["round"] - 1, np.arange(10), 10, 0.3)
    assert r["dropped"] == [names[i] for i in np.flatnonzero(dropped)]
    assert r["reported"] == [names[i] for i in np.flatnonzero(~dropped)]
    assert r["nonfinite"] == []
    assert r["skipped"] == (len(r["reported"]) < 7)
    assert sorted(r["loss"]) == sorted(r["reported"])  # dropped clients did not train
  assert [r["skipped"] for r in train] == [False, False, True, True]
  assert all(np.isfinite(v) for s in results["final"].values() for v in s.values())


# ------------------------------------------------------------------------------------------------ NaN uploads


@pytest.fixture(scope="module")
def _fast():
  with helpers.fast_compile():
    yield


def _nan_targets(batches, c):
  """Client c's soft targets NaN: its loss, gradients and upload become NaN (a broken client)."""
  return {**batches, "targets": batches["targets"].at[c].set(jnp.nan)}


@pytest.mark.parametrize("name", ["fedavg_adapter", "feddat"])
def test_nan_upload_is_excluded(name, _fast):
  """Client 1 uploads NaN: flagged in metrics, weight 0, its state kept; the server stays finite and equals
  the round in which client 1 did not report at all."""
  ns = helpers.setup(name)
  cohort = jnp.arange(helpers.C, dtype=jnp.int32)
  batches, mask, weights = helpers.toy_batches(21), jnp.ones((helpers.C, helpers.S), bool), jnp.ones(helpers.C)
  rng = jax.random.key(1)
  server, clients, metrics = ns.round(ns.frozen, ns.server, ns.clients, cohort, _nan_targets(batches, 1), mask,
                                      weights, rng)
  np.testing.assert_array_equal(metrics["upload_finite"], [True, False, True])
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(server))
  assert helpers.leaves_equal(helpers.take(clients, 1), helpers.take(ns.clients, 1))
  absent, absent_clients, _ = ns.round(ns.frozen, ns.server, ns.clients, cohort, batches, mask.at[1].set(False),
                                       weights, rng)
  assert helpers.leaves_equal(server, absent)
  assert helpers.leaves_equal(clients, absent_clients)


def test_too_few_finite_uploads_skip_the_round(_fast):
  """min_clients=3 and one NaN upload of three: the server keeps its adapter, the round counter advances."""
  ns = helpers.setup("fedavg_adapter")
  algo = registry.make("fedavg_adapter", ns.model, helpers.OPTIM, total_rounds=helpers.TOTAL_ROUNDS, min_clients=3)
  round_fn = helpers.with_cohort(engine.build_round(algo, donate=False))
  cohort = jnp.arange(helpers.C, dtype=jnp.int32)
  batches, mask = helpers.toy_batches(22), jnp.ones((helpers.C, helpers.S), bool)
  server, _, metrics = round_fn(ns.frozen, ns.server, ns.clients, cohort, _nan_targets(batches, 2), mask,
                                jnp.ones(helpers.C), jax.random.key(2))
  assert not bool(metrics["upload_finite"][2])
  assert helpers.leaves_equal(server["shared"], ns.server["shared"])
  assert int(server["round"]) == 1
  server, _, _ = round_fn(ns.frozen, ns.server, ns.clients, cohort, batches, mask, jnp.ones(helpers.C),
                          jax.random.key(2))
  assert helpers.max_abs_diff(server["shared"], ns.server["shared"]) > 1e-5
