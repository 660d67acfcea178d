"""Clients sharded over devices and processes: same round as one device; launchers' dry runs.

The main pytest process has already initialised JAX with one CPU device, so the multi-device and
multi-process checks run this file as a script in subprocesses (`python tests/test_sharding.py <mode> ...`):
  mesh <out>                          4 CPU devices: sharded rounds vs the single-device round, and the HLO
  process <rank> <n> <port> <out>     one of n processes under jax.distributed (gloo collectives on CPU)
  single <out>                        the reference for `process`: one process, one device, all clients
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
K = 8  # clients with a state
ROUNDS = 2


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, HERE]), **extra)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "feddat_jax_xla"))
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(commands, timeout=240):
  """Start every command at once; wait for all (killing them all past `timeout`); assert they succeeded."""
  procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for cmd, env in commands]
  deadline = time.monotonic() + timeout
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]


def _worker(*args):
  return [sys.executable, os.path.abspath(__file__), *map(str, args)]


# ------------------------------------------------------------------------------------------- the tests


def test_sharded_round_equals_one_device(tmp_path):
  """4 devices: a cohort of 8 (2 clients per device) and one of 5 (padded with 3 dummies) give the
  single-device round's server and client states; the compiled program is split per device and the
  aggregate is an all-reduce."""
  out = tmp_path / "mesh.json"
  _run_workers([(_worker("mesh", out), _env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))])
  report = json.loads(out.read_text())
  for name in ("divisible", "padded"):
    r = report[name]
    assert r["cohort"] == 8
    assert r["server"] < 1e-5 and r["clients"] < 1e-5 and r["loss"] < 1e-5, (name, r)
    assert r["moved"] > 1e-4, (name, r)  # the round trained
  hlo = report["hlo"]
  assert hlo["all_reduce"] > 0, hlo
  assert hlo["pixels_per_device"] and not hlo["pixels_global"], hlo  # each device: 2 of the 8 clients


def test_two_processes_equal_one(tmp_path):
  """jax.distributed on 127.0.0.1, 2 processes x 2 CPU devices, each feeding only its clients' rows (one with
  fewer local steps), a checkpoint saved and restored by both between the rounds: the same server and
  client states as one process running every client."""
  port = _free_port()
  env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
  _run_workers([(_worker("process", rank, 2, port, tmp_path), env) for rank in range(2)]
               + [(_worker("single", tmp_path / "single.npz"), _env())])
  ref = np.load(tmp_path / "single.npz")
  for rank in range(2):
    got = np.load(tmp_path / f"process{rank}.npz")
    assert sorted(got) == sorted(ref)
    for k in ref:
      np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=1e-5, err_msg=k)
  assert np.abs(ref["server['shared']['encoder']['layer_0']['adapter']['up_kernel']"]).max() > 0
  fed = [json.loads((tmp_path / f"process{rank}.json").read_text()) for rank in range(2)]
  assert fed[0] == {"fed": [[1, 3, 5, 7], [4, 5, 6, 7]], "main": True}
  assert fed[1] == {"fed": [[0, 2], [0, 1, 2, 3]], "main": False}
  assert (tmp_path / "checkpoints" / "1").is_dir()


def test_placement_without_mesh_is_the_engine():
  """One device: the default config's placement changes nothing (cohort, rows, programs)."""
  from feddat_jax import config_utils
  from feddat_jax.federated import sharding
  placement = sharding.from_config(config_utils.load_config(os.path.join(REPO, "configs/vqa.py")).distributed)
  assert placement.mesh is None and placement.num_shards == 1 and placement.is_main
  cohort = np.array([4, 1, 7], np.int32)
  np.testing.assert_array_equal(placement.pad_cohort(cohort, 8), cohort)
  np.testing.assert_array_equal(placement.hosted(cohort), cohort)
  assert placement.hosted_clients(np.array([2, 0, 3]), 3) == [2, 0]
  assert placement.put_states(cohort) is cohort


def _dry_run(script, *args):
  out = subprocess.run(["bash", os.path.join(REPO, "launch", script), "--dry-run", *args], capture_output=True,
                       text=True, timeout=30, cwd=REPO)
  assert out.returncode == 0, out.stderr
  return out.stdout.splitlines()


def test_local_multiprocess_dry_run():
  lines = _dry_run("local_multiprocess.sh", "-n", "3", "--devices", "2", "--port", "4321", "--logdir", "/tmp/mp",
                   "--", "--config=configs/vqa.py:runlocal=true", "--workdir=runs/mp")
  assert len(lines) == 4 and lines[-1] == "wait"
  for i, line in enumerate(lines[:3]):
    expected = ("env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m feddat_jax.main "
                "--config=configs/vqa.py:runlocal=true --workdir=runs/mp "
                "--config.distributed.coordinator_address=127.0.0.1:4321 --config.distributed.num_processes=3 "
                f"--config.distributed.process_id={i}")
    expected += "" if i == 0 else f" > /tmp/mp/process_{i}.log 2>&1"
    assert line == expected + " &"


def test_tpu_pod_sweep_dry_run():
  lines = _dry_run("tpu_pod_sweep.sh", "--name", "pod", "--zone", "us-central2-b", "--create", "--delete",
                   "--accelerator-type", "v4-32", "--workdir", "/mnt/runs", "--config", "configs/vqa.py:algorithm=feddat",
                   "--config", "configs/vqa.py:algorithm=fedavg_adapter,seed=1", "--", "--config.rounds=30")
  tpu = "gcloud compute tpus tpu-vm"
  assert lines[0] == (f"{tpu} create pod --zone=us-central2-b --accelerator-type=v4-32 "
                      "--version=tpu-ubuntu2204-base")
  assert lines[1].startswith("git -C ") and "archive" in lines[1]
  assert lines[2].startswith(f"{tpu} scp ") and lines[2].endswith("--zone=us-central2-b --worker=all")
  assert lines[3].startswith(f"{tpu} ssh pod --zone=us-central2-b --worker=all '--command=") and "pip install" in lines[3]
  runs = [l for l in lines if "feddat_jax.main" in l]
  assert runs == [
      f"{tpu} ssh pod --zone=us-central2-b --worker=all '--command=cd feddat_jax && python3 -m feddat_jax.main "
      f"--config=configs/vqa.py:{c} --workdir=/mnt/runs/vqa_{d} --config.distributed.auto_detect=True "
      "--config.rounds=30'"
      for c, d in [("algorithm=feddat", "algorithm_feddat"),
                   ("algorithm=fedavg_adapter,seed=1", "algorithm_fedavg_adapter_seed_1")]]
  assert lines[-1] == f"{tpu} delete pod --zone=us-central2-b --quiet"
  missing = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_pod_sweep.sh"), "--dry-run", "--name", "x"],
                           capture_output=True, text=True, timeout=30)
  assert missing.returncode == 2 and "--zone is required" in missing.stderr


# ------------------------------------------------------------------------------------------- the workers


def _setup(num_clients=K):
  """The tiny FedDAT of tests/helpers.py with `num_clients` stacked client states."""
  import jax
  import helpers
  from feddat_jax.federated import algorithms as registry
  jax.config.update("jax_disable_most_optimizations", True)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  algo = registry.make("feddat", helpers.tiny_model("adapter"), helpers.OPTIM, total_rounds=4, options={})
  frozen, server, clients = jax.jit(algo.init, static_argnums=1)(jax.random.key(0), num_clients)
  return algo, frozen, server, clients


def _round_inputs(r, cohort, num_clients=K):
  """Host arrays of round r for `cohort` (real clients; data of client c is a function of (r, c))."""
  import helpers
  full = helpers.toy_batches(100 + r, num_clients=num_clients)
  batches = {k: np.asarray(v)[cohort] for k, v in full.items()}
  step_mask = np.ones((len(cohort), helpers.S), bool)
  step_mask[::2, -1] = False  # uneven local steps
  weights = 1.0 + np.asarray(cohort, np.float32)
  return batches, step_mask, weights


def _flat(tree):
  import jax
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def worker_mesh(out):
  """4 devices: for a cohort of all 8 clients and one of 5, sharded round == single-device round."""
  import jax
  import jax.numpy as jnp
  from feddat_jax.federated import engine, sharding
  assert jax.device_count() == 4, jax.devices()
  algo, frozen, server, clients = _setup()
  placement = sharding.Placement(sharding.make_mesh())
  round_fn = placement.build_round(algo, donate=False)
  single = engine.build_round(algo, donate=False)
  rng = jax.random.key(3)
  report = {}
  for name, cohort in [("divisible", np.arange(K)), ("padded", np.array([0, 2, 3, 5, 7]))]:
    batches, step_mask, weights = _round_inputs(0, cohort)
    ref = single(frozen, server, clients, jnp.asarray(cohort, jnp.int32), batches, step_mask, weights, rng)
    padded = placement.pad_cohort(cohort, K)
    dummies = len(padded) - len(cohort)
    pad = lambda x: np.concatenate([x, np.zeros((dummies,) + x.shape[1:], x.dtype)])
    args = (frozen, *placement.put_states((server, clients)), padded, {k: pad(v) for k, v in batches.items()},
            pad(step_mask), pad(weights), rng)
    got = round_fn(*args)
    diffs = {}
    for part, a, b in [("server", ref[0], got[0]), ("clients", ref[1], got[1])]:
      fa, fb = _flat(a), _flat(b)
      diffs[part] = max(float(np.max(np.abs(fa[k].astype(np.float64) - fb[k]))) for k in fa)
    loss_ref, loss_got = np.asarray(ref[2]["loss"]), np.asarray(got[2]["loss"])[:len(cohort)]
    diffs["loss"] = float(np.max(np.abs(loss_ref - loss_got)))
    diffs["moved"] = max(float(np.max(np.abs(x - y))) for x, y in zip(_flat(server["shared"]).values(),
                                                                      _flat(got[0]["shared"]).values()))
    diffs["cohort"] = len(padded)
    report[name] = diffs
  # The program: per-device shapes hold K / 4 clients; the aggregation is an all-reduce.
  batches, step_mask, weights = _round_inputs(0, np.arange(K))
  hlo = round_fn.jitted.lower(*round_fn.global_args(frozen, *placement.put_states((server, clients)), np.arange(K),
                                                    batches, step_mask, weights, rng)).compile().as_text()
  report["hlo"] = {"all_reduce": hlo.count("all-reduce"), "all_gather": hlo.count("all-gather"),
                   "pixels_per_device": "u8[2,3,4,1,32,32,3]" in hlo,
                   "pixels_global": "u8[8,3,4,1,32,32,3]" in hlo}
  with open(out, "w") as f:
    json.dump(report, f)


# Two rounds with a cohort of 6 (padded to 8: process 0 feeds clients 1 3 5 7, all with one step fewer; process 1
# feeds 0 2 and two dummies), then all 8 clients in a new order; a checkpoint saved and restored in between.
COHORTS = (np.array([1, 3, 5, 7, 0, 2]), np.array([4, 5, 6, 7, 0, 1, 2, 3]))


def _steps_of(cohort):
  """Step masks [C, S]: odd clients make one step fewer (so a process of odd clients cuts S - 1 steps)."""
  import helpers
  mask = np.ones((len(cohort), helpers.S), bool)
  mask[np.asarray(cohort) % 2 == 1, -1] = False
  return mask


def _save(out, server, clients):
  np.savez(out, **{"server" + k: v for k, v in _flat(server).items()},
           **{"clients" + k: v for k, v in _flat(clients).items()})


def worker_single(out):
  """The reference: one device, every cohort client's data, engine.build_round."""
  import jax
  import jax.numpy as jnp
  from feddat_jax.federated import engine
  algo, frozen, server, clients = _setup()
  round_fn = engine.build_round(algo, donate=False)
  for r, cohort in enumerate(COHORTS):
    batches, _, weights = _round_inputs(r, cohort)
    server, clients, _ = round_fn(frozen, server, clients, jnp.asarray(cohort, jnp.int32), batches,
                                  _steps_of(cohort), weights, jax.random.key(r))
  _save(out, server, clients)


def worker_process(rank, num_processes, port, workdir):
  """One of the processes: feeds only its clients' rows; checkpoint after round 1, restore, round 2."""
  import jax
  from feddat_jax import checkpoint as ckpt_lib
  from feddat_jax.federated import sharding
  rank, num_processes = int(rank), int(num_processes)
  assert sharding.initialize(f"127.0.0.1:{port}", num_processes, rank)
  algo, frozen, server, clients = _setup()
  placement = sharding.Placement(sharding.make_mesh())
  assert jax.process_count() == num_processes and jax.device_count() == 2 * num_processes
  frozen, server, clients = placement.put_states((frozen, server, clients))
  fresh = (server, clients)
  round_fn = placement.build_round(algo, donate=False)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), "test")
  fed = []
  for r, cohort in enumerate(COHORTS):
    padded = placement.pad_cohort(cohort, K)
    hosted = placement.hosted(padded)
    real = hosted[hosted < K]
    fed.append(real.tolist())
    batches, _, weights = _round_inputs(r, real)
    step_mask = _steps_of(real)
    if not step_mask[:, -1].any():  # cut to this process's own step count: the placement aligns processes
      batches = {k: v if k == "answer_mask" else v[:, :-1] for k, v in batches.items()}
      step_mask = step_mask[:, :-1]
    weights = np.concatenate([1.0 + cohort.astype(np.float32), np.zeros(len(padded) - len(cohort), np.float32)])
    server, clients, _ = round_fn(frozen, server, clients, padded, batches, step_mask, weights, jax.random.key(r))
    if r == 0:
      checkpointer.save(1, {"server": server, "clients": clients})
      saved = _flat((server, clients))
      restored = checkpointer.restore(1, {"server": fresh[0], "clients": fresh[1]})
      server, clients = restored["server"], restored["clients"]
      assert all(np.array_equal(saved[k], v) for k, v in _flat((server, clients)).items())
  checkpointer.close()
  _save(os.path.join(workdir, f"process{rank}.npz"), server, clients)
  with open(os.path.join(workdir, f"process{rank}.json"), "w") as f:
    json.dump({"fed": fed, "main": placement.is_main}, f)


if __name__ == "__main__":
  {"mesh": worker_mesh, "single": worker_single, "process": worker_process}[sys.argv[1]](*sys.argv[2:])
