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
K = 1000  # clients in the population (host store)
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
  """4 devices, a population of K = 1,000 clients in the host store: a cohort of 8 (2 clients per device) and
  one of 5 (padded with 3 dummies) give the single-device round's server and client states; the compiled
  program is split per device, holds no [K, ...] array, and the aggregate is an all-reduce."""
  out = tmp_path / "mesh.json"
  _run_workers([(_worker("mesh", out), _env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))])
  report = json.loads(out.read_text())
  for name in ("divisible", "padded"):
    r = report[name]
    assert r["cohort"] == 8
    assert r["server"] < 1e-5 and r["clients"] < 1e-5 and r["loss"] < 1e-5 and r["drift"] < 1e-5, (name, r)
    assert r["dummy_drift_nan"], (name, r)
    assert r["moved"] > 1e-4, (name, r)  # the round trained
  hlo = report["hlo"]
  assert hlo["all_reduce"] > 0, hlo
  assert hlo["pixels_per_device"] and not hlo["pixels_global"], hlo  # each device: 2 of the 8 clients
  assert not hlo["population_shaped"], hlo


def test_two_processes_equal_one_and_resume_elsewhere(tmp_path):
  """jax.distributed on 127.0.0.1, 2 processes x 2 CPU devices, each feeding only its clients' rows, a checkpoint
  of the store saved and restored by both between the rounds: the same server and client states as one process
  running every client. Then one process with 4 devices resumes from that checkpoint (after round 1): the same
  final states again."""
  port = _free_port()
  env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
  _run_workers([(_worker("process", rank, 2, port, tmp_path), env) for rank in range(2)]
               + [(_worker("single", tmp_path / "single.npz"), _env())])
  _run_workers([(_worker("resume", tmp_path), _env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))])
  ref = np.load(tmp_path / "single.npz")
  for name in ("process0", "process1", "resumed"):
    got = np.load(tmp_path / f"{name}.npz")
    assert sorted(got) == sorted(ref)
    for k in ref:
      np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=1e-5, err_msg=f"{name} {k}")
  assert np.abs(ref["server['shared']['encoder']['layer_0']['adapter']['up_kernel']"]).max() > 0
  fed = [json.loads((tmp_path / f"process{rank}.json").read_text()) for rank in range(2)]
  assert fed[0] == {"fed": [[1, 3, 5, 7], [4, 5, 6, 7]], "main": True}
  assert fed[1] == {"fed": [[0, 2], [0, 1, 2, 3]], "main": False}
  assert (tmp_path / "checkpoints" / "1").is_dir()


def test_one_device_is_a_one_device_mesh():
  """One device: the default config's placement is a 1-device mesh (one code path); nothing is padded."""
  from feddat_jax import config_utils
  from feddat_jax.federated import sharding
  placement = sharding.from_config(config_utils.load_config(os.path.join(REPO, "configs/vqa.py")).distributed)
  assert placement.mesh.size == 1 and placement.num_shards == 1 and placement.is_main
  cohort = np.array([4, 1, 7], np.int32)
  assert placement.padded_size(3) == 3
  np.testing.assert_array_equal(placement.hosted(cohort), cohort)


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
  ssh = f"{tpu} ssh pod --zone=us-central2-b --worker=all '--command="
  assert lines[0] == f"{tpu} describe pod --zone=us-central2-b"  # a slice that exists is not created again
  assert lines[1] == (f"{tpu} create pod --zone=us-central2-b --accelerator-type=v4-32 "
                      "--version=tpu-ubuntu2204-base")
  assert lines[2].startswith("git -C ") and "archive" in lines[2]
  assert lines[3].startswith(f"{tpu} scp ") and lines[3].endswith("--zone=us-central2-b --worker=all")
  apt = "sudo apt-get -q -y -o DPkg::Lock::Timeout=600"
  q = "'\\''"  # a single quote inside the printed '--command=...'
  assert lines[4] == (
      f"{ssh}mkdir -p feddat_jax && tar xzf feddat_jax_src.tar.gz -C feddat_jax && "
      f"{{ dpkg -s python3.11-venv > /dev/null 2>&1 || {{ {apt} update && {apt} install python3.11 "
      f"python3.11-venv; }} || {{ sudo add-apt-repository -y ppa:deadsnakes/ppa && {apt} install python3.11 "
      "python3.11-venv; }; } && python3.11 -m venv ~/feddat_venv && ~/feddat_venv/bin/pip install -q -U pip && "
      f"cd feddat_jax && ~/feddat_venv/bin/pip install -q -e {q}.[tpu]{q}'")
  for i, (c, d) in enumerate([("algorithm=feddat", "algorithm_feddat"),
                              ("algorithm=fedavg_adapter,seed=1", "algorithm_fedavg_adapter_seed_1")]):
    runs = f"~/feddat_runs/_mnt_runs_vqa_{d}"
    poll = (f"{ssh}d={runs}; if [ -f $d/status ]; then echo \"feddat-run exit $(cat $d/status)\"; "
            "elif [ -f $d/pid ] && kill -0 \"$(cat $d/pid)\" 2> /dev/null; then echo feddat-run running; "
            "elif [ -f $d/pid ]; then echo feddat-run gone; else echo feddat-run new; fi'")
    start = (f"{ssh}d={runs} && mkdir -p $d && rm -f $d/status $d/pid && cd feddat_jax && {{ d=$d setsid nohup "
             f"bash -c {q}~/feddat_venv/bin/python -m feddat_jax.main --config=configs/vqa.py:{c} "
             f"--workdir=/mnt/runs/vqa_{d} --config.distributed.auto_detect=True --config.rounds=30; "
             f"echo $? > $d/status.tmp && mv $d/status.tmp $d/status{q} > $d/log 2>&1 < /dev/null & "
             "echo $! > $d/pid; }'")
    # the run's state on the workers, its detached start, then the poll the launcher repeats every --poll s
    assert lines[5 + 3 * i:8 + 3 * i] == [poll, start, poll]
  assert len(lines) == 12 and lines[-1] == f"{tpu} delete pod --zone=us-central2-b --quiet"
  missing = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_pod_sweep.sh"), "--dry-run", "--name", "x"],
                           capture_output=True, text=True, timeout=30)
  assert missing.returncode == 2 and "--zone is required" in missing.stderr


# ------------------------------------------------------------------------------------------- the workers


def _setup():
  """The tiny FedDAT of tests/helpers.py: frozen, server and a host store of K clients."""
  import jax
  import helpers
  from feddat_jax import experiment
  from feddat_jax.federated import algorithms as registry
  jax.config.update("jax_disable_most_optimizations", True)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  algo = registry.make("feddat", helpers.tiny_model("adapter"), helpers.OPTIM, total_rounds=4, options={})
  frozen, server, store = experiment.init_states(algo, 0, None, K)
  return algo, frozen, server, store


def _round_inputs(r, cohort):
  """Host RoundInputs of round r for cohort positions `cohort` (data of client c is a function of (r, c);
  dummies, ids >= K, have no steps and weight 0); uneven local steps: odd clients make one step fewer."""
  import helpers
  from feddat_jax.federated import engine
  cohort = np.asarray(cohort, np.int32)
  per_client = [helpers.toy_batches(1000 * r + int(c), num_clients=1) for c in np.minimum(cohort, K - 1)]
  batches = {k: np.concatenate([np.asarray(b[k]) for b in per_client]) for k in per_client[0]}
  step_mask = np.ones((len(cohort), helpers.S), bool)
  step_mask[cohort % 2 == 1, -1] = False
  step_mask[cohort >= K] = False
  weights = np.where(cohort < K, 1.0 + cohort, 0.0).astype(np.float32)
  import jax
  return engine.RoundInputs.make(cohort, batches, step_mask, weights, jax.random.key(r))


def _flat(tree):
  import jax
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _reference(algo, frozen, server, store, r, cohort):
  """One device, engine.build_round on the cohort's rows (dummies dropped)."""
  from feddat_jax.federated import engine
  real = np.asarray([c for c in cohort if c < K], np.int32)
  server, rows, metrics = engine.build_round(algo, donate=False)(frozen, server, store.gather(real),
                                                                  _round_inputs(r, real))
  store.scatter(real, rows)
  return server, metrics


def worker_mesh(out):
  """4 devices: for a cohort of 8 clients and one of 5 (of K), sharded round == single-device round."""
  import copy
  import jax
  from feddat_jax.federated import sharding
  assert jax.device_count() == 4, jax.devices()
  algo, frozen, server, store = _setup()
  placement = sharding.Placement(sharding.make_mesh())
  round_fn = placement.build_round(algo, donate=False)
  report = {}
  for name, cohort in [("divisible", np.array([3, 17, 120, 450, 451, 700, 998, 999])),
                       ("padded", np.array([0, 2, 31, 500, 999]))]:
    ref_store = copy.deepcopy(store)
    ref_server, ref_metrics = _reference(algo, frozen, server, ref_store, 0, cohort)
    padded = np.concatenate([cohort, np.full(placement.padded_size(len(cohort)) - len(cohort), K)]).astype(np.int32)
    got_store = copy.deepcopy(store)
    rows = placement.put_rows(got_store.gather(padded), len(padded))
    inputs = placement.put_inputs(_round_inputs(0, padded), len(padded))
    got_server, new_rows, metrics = round_fn(*placement.put_replicated((frozen, server)), rows, inputs)
    got_store.scatter(padded, jax.device_get(new_rows))
    diffs = {}
    fa, fb = _flat(ref_server), _flat(got_server)
    diffs["server"] = max(float(np.max(np.abs(fa[k] - fb[k]))) for k in fa)
    fa, fb = _flat(ref_store.gather(cohort)), _flat(got_store.gather(cohort))
    diffs["clients"] = max(float(np.max(np.abs(fa[k] - fb[k]))) for k in fa)
    assert len(got_store) == len(cohort)  # dummies never enter the store
    diffs["loss"] = float(np.max(np.abs(np.asarray(ref_metrics["loss"]) - np.asarray(metrics["loss"])[:len(cohort)])))
    diffs["drift"] = max(float(np.max(np.abs(np.asarray(ref_metrics[m]) - np.asarray(metrics[m])[:len(cohort)])))
                         for m in ("update_norm", "update_cosine"))  # client drift, computed over the sharded axis
    diffs["dummy_drift_nan"] = bool(np.isnan(np.asarray(metrics["update_norm"])[len(cohort):]).all())
    diffs["moved"] = max(float(np.max(np.abs(x - y))) for x, y in zip(_flat(server["shared"]).values(),
                                                                      _flat(got_server["shared"]).values()))
    diffs["cohort"] = len(padded)
    report[name] = diffs
  cohort = np.arange(8, dtype=np.int32)
  hlo = round_fn.lower(*placement.put_replicated((frozen, server)),
                       placement.put_rows(store.gather(cohort), 8),
                       placement.put_inputs(_round_inputs(0, cohort), 8)).compile().as_text()
  report["hlo"] = {"all_reduce": hlo.count("all-reduce"), "all_gather": hlo.count("all-gather"),
                   "pixels_per_device": "u8[2,3,4,1,32,32,3]" in hlo,
                   "pixels_global": "u8[8,3,4,1,32,32,3]" in hlo, "population_shaped": f"[{K}," in hlo}
  with open(out, "w") as f:
    json.dump(report, f)


# Two rounds with a cohort of 6 (padded to 8: process 0 feeds clients 1 3 5 7, process 1 feeds 0 2 and two
# dummies), then 8 clients in a new order; a checkpoint saved and restored in between.
COHORTS = (np.array([1, 3, 5, 7, 0, 2]), np.array([4, 5, 6, 7, 0, 1, 2, 3]))


def _save(out, server, store):
  np.savez(out, **{"server" + k: v for k, v in _flat(server).items()},
           **{"clients" + k: v for k, v in _flat(store.gather(np.arange(8))).items()})


def worker_single(out):
  """The reference: one device, every cohort client's data, engine.build_round."""
  algo, frozen, server, store = _setup()
  for r, cohort in enumerate(COHORTS):
    server, _ = _reference(algo, frozen, server, store, r, cohort)
  _save(out, server, store)


def _sharded_round(placement, round_fn, frozen, server, store, r, cohort):
  import jax
  padded = np.concatenate([cohort, np.full(placement.padded_size(len(cohort)) - len(cohort), K)]).astype(np.int32)
  hosted = placement.hosted(padded)
  rows = placement.put_rows(store.gather(hosted), len(padded))
  inputs = placement.put_inputs(_round_inputs(r, hosted), len(padded))
  server, rows, _ = round_fn(frozen, server, rows, inputs)
  store.scatter(padded, jax.device_get(rows))
  return server, hosted[hosted < K].tolist()


def worker_process(rank, num_processes, port, workdir):
  """One of the processes: feeds only its clients' rows; checkpoint after round 1, restore, round 2."""
  import jax
  from feddat_jax import checkpoint as ckpt_lib
  from feddat_jax.federated import sharding
  rank, num_processes = int(rank), int(num_processes)
  assert sharding.initialize(f"127.0.0.1:{port}", num_processes, rank)
  algo, frozen, server, store = _setup()
  placement = sharding.Placement(sharding.make_mesh())
  assert jax.process_count() == num_processes and jax.device_count() == 2 * num_processes
  frozen, server = placement.put_replicated((frozen, server))
  round_fn = placement.build_round(algo, donate=False)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), "test")
  fed = []
  for r, cohort in enumerate(COHORTS):
    server, hosted = _sharded_round(placement, round_fn, frozen, server, store, r, cohort)
    fed.append(hosted)
    if r == 0:
      checkpointer.save(1, {"server": server, "store": store.state()})
      saved = _flat((server, store.state()))
      restored = checkpointer.restore(1, {"server": server, "store": store.like(len(store))})
      server = placement.put_replicated(restored["server"])
      store.load(restored["store"])
      assert all(np.array_equal(saved[k], v) for k, v in _flat((server, store.state())).items())
  checkpointer.close()
  _save(os.path.join(workdir, f"process{rank}.npz"), server, store)
  with open(os.path.join(workdir, f"process{rank}.json"), "w") as f:
    json.dump({"fed": fed, "main": placement.is_main}, f)


def worker_resume(workdir):
  """One process, 4 devices: restore the 2-process job's checkpoint after round 1, run round 2."""
  from feddat_jax import checkpoint as ckpt_lib
  from feddat_jax.federated import sharding
  algo, frozen, server, store = _setup()
  placement = sharding.Placement(sharding.make_mesh())
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), "test")
  step, restored = checkpointer.restore_latest(
      lambda meta: {"server": server, "store": store.like(meta["shapes"]["['store']['ids']"][0][0])})
  assert step == 1, step
  store.load(restored["store"])
  frozen, server = placement.put_replicated((frozen, restored["server"]))
  server, _ = _sharded_round(placement, placement.build_round(algo, donate=False), frozen, server, store, 1,
                             COHORTS[1])
  _save(os.path.join(workdir, "resumed.npz"), server, store)


if __name__ == "__main__":
  {"mesh": worker_mesh, "single": worker_single, "process": worker_process, "resume": worker_resume}[
      sys.argv[1]](*sys.argv[2:])
