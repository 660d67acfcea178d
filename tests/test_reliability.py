"""Reliability pieces on their own (cheap; the end-to-end cases are in tests/test_experiment.py and
tests/test_bad_input.py): checkpoint checksums and the fall-back to the newest intact step, divergence, the
workdir lock, a metrics.jsonl cut short, Ctrl-C, how the CLIs end (one line) and the data tools' output checks."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import helpers
import jax.numpy as jnp
import numpy as np
import pytest

from feddat_jax import checkpoint as ckpt_lib
from feddat_jax import cli, config_utils, reporting, workdir_lock
from feddat_jax.federated import faults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "runlocal=true,backbone=random"


def _env():
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "feddat_jax_xla"))
  env.pop(faults.PAUSE_ENV, None)
  return env


# ------------------------------------------------------------------------------------------------ checkpoints

def _state(i, clients=3):
  return {"server": {"shared": jnp.arange(4096.0) + i}, "clients": {"head": jnp.full((clients, 2048), float(i))}}


def test_flipped_bytes_fail_the_checksum_and_the_previous_step_is_restored(tmp_path, capsys):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), "fp")
  ckpt.save(1, _state(1))
  ckpt.save(2, _state(2))
  helpers.flip_bytes(str(tmp_path / "2"))
  with pytest.raises(ckpt_lib.CheckpointDamaged, match=r"/2 is damaged: \['server'\]\['shared'\] does not match"):
    ckpt.restore(2, _state(0))
  ckpt.check_config()  # the meta is intact: the same config
  step, state = ckpt.restore_latest(lambda meta: _state(0))
  assert step == 1 and np.array_equal(state["server"]["shared"], _state(1)["server"]["shared"])
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1 and out[0].startswith("warning: checkpoint") and "trying the previous" in out[0], out
  ckpt.save(2, _state(5))  # the damaged step is replaced
  assert ckpt.restore_latest(lambda meta: _state(0))[0] == 2
  ckpt.close()


def test_every_step_damaged_is_an_error_and_a_cut_meta_falls_back(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), "fp")
  ckpt.save(1, _state(1))
  ckpt.save(2, _state(2))
  with open(tmp_path / "2" / "meta" / "metadata", "w") as f:
    f.write('{"format": 2, "fing')  # cut short
  ckpt.check_config()
  assert ckpt.restore_latest(lambda meta: _state(0))[0] == 1
  helpers.flip_bytes(str(tmp_path / "1"))
  with pytest.raises(ckpt_lib.CheckpointError, match=r"every checkpoint in .* is damaged \(steps \[1, 2\]\)"):
    ckpt.restore_latest(lambda meta: _state(0))
  ckpt.close()


def test_restore_latest_builds_the_like_tree_from_the_meta(tmp_path):
  """Leading dims may differ between checkpoints (a population that grew): like_fn reads them from meta."""
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), "fp")
  assert ckpt.restore_latest(lambda meta: None) == (0, None)
  ckpt.save(1, _state(1, clients=3))
  ckpt.save(2, _state(2, clients=5))
  seen = []

  def like(meta):
    seen.append(meta["round"])
    shape, dtype = meta["shapes"]["['clients']['head']"]
    return {"server": {"shared": jnp.zeros(4096)}, "clients": {"head": jnp.zeros(shape, dtype)}}

  step, state = ckpt.restore_latest(like)
  assert (step, seen, state["clients"]["head"].shape) == (2, [2], (5, 2048))
  ckpt.close()


# ------------------------------------------------------------------------------------------------ divergence

def test_divergence_is_every_trained_client_nonfinite():
  config = config_utils.load_config(os.path.join(REPO, f"configs/vqa.py:{SMOKE}"))
  report = lambda reported, nonfinite, dropped=(): {"reported": list(reported), "nonfinite": list(nonfinite),
                                                    "dropped": list(dropped), "skipped": not reported}
  faults.check_divergence(3, report(["a"], ["b"]), [0.5, np.nan], config)  # one client left: not divergence
  faults.check_divergence(3, report([], [], ["a", "b"]), [], config)  # everyone dropped out: skipped, not diverged
  with pytest.raises(faults.DivergenceError, match=r"^round 3: .*every client's upload is NaN or Inf; .*optim.lr="
                                                   r"0.001.*options.temperature=3.0"):
    faults.check_divergence(3, report([], ["a", "b"]), [np.nan, 1.0], config)
  with pytest.raises(faults.DivergenceError, match=r"every client's loss is NaN"):
    faults.check_divergence(4, report(["a", "b"], []), [np.inf, np.nan], config)


# ------------------------------------------------------------------------------------------------ workdir lock

def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, capsys):
  workdir = str(tmp_path)
  path = tmp_path / workdir_lock.NAME
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    owner = {"pid": sleeper.pid, "host": socket.gethostname(), "process_start": None, "started": time.time()}
    path.write_text(json.dumps(owner))
    with pytest.raises(workdir_lock.WorkdirLocked, match=rf"in use by another run: pid {sleeper.pid} on host "):
      workdir_lock.acquire(workdir)
    path.write_text(json.dumps({**owner, "host": "elsewhere"}))
    with pytest.raises(workdir_lock.WorkdirLocked, match=r"pid \d+ on host elsewhere.*if that run is gone, delete"):
      workdir_lock.acquire(workdir)
  finally:
    sleeper.kill()
    sleeper.wait()
  path.write_text(json.dumps({**owner, "pid": _dead_pid()}))
  (tmp_path / "results.json.tmp").write_text('{"cut')  # a write_atomic the dead run did not finish
  workdir_lock.acquire(workdir)
  assert "taking over the lock of a run that is gone" in capsys.readouterr().out
  assert not (tmp_path / "results.json.tmp").exists()
  assert json.loads(path.read_text())["pid"] == os.getpid()
  with pytest.raises(workdir_lock.WorkdirLocked, match="another run of this process"):
    workdir_lock.acquire(workdir)
  workdir_lock.release(workdir)
  assert not path.exists()


def test_second_run_on_a_workdir_refuses_in_one_line(tmp_path):
  """A live run holds the workdir (here: this test process): the CLI refuses, naming it, and changes nothing."""
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  workdir_lock.acquire(workdir)
  try:
    before = sorted(os.listdir(workdir))
    res = subprocess.run([sys.executable, "-m", "feddat_jax.main", f"--config=configs/vqa.py:{SMOKE}",
                          f"--workdir={workdir}"], capture_output=True, text=True, cwd=REPO, env=_env(), timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert lines[-1].startswith("error: workdir") and f"pid {os.getpid()}" in lines[-1], lines[-1]
    assert sorted(os.listdir(workdir)) == before
  finally:
    workdir_lock.release(workdir)


# ------------------------------------------------------------------------------------------------ crash leftovers

def test_metrics_log_drops_a_cut_last_line(tmp_path, capsys):
  rows = [{"round": 1, "kind": "train"}, {"round": 1, "kind": "eval", "scores": {}}]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows) + '{"round": 2, "kind": "tra')
  log = reporting.MetricsLog(str(tmp_path), 1)
  assert log.rows == rows
  assert "line 3 is cut short" in capsys.readouterr().out
  assert open(tmp_path / "metrics.jsonl").read().count("\n") == 2
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write("garbage\n" + json.dumps(rows[0]) + "\n")
  with pytest.raises(reporting.MetricsLogError, match=r"line 1 is not a JSON row"):
    reporting.MetricsLog(str(tmp_path), 1)


# ------------------------------------------------------------------------------------------------ Ctrl-C

def test_ctrl_c_is_one_line_and_exit_130_and_resumes(tmp_path):
  """Ctrl-C in round 2 (checkpoint 1 saved): one line, status 130, the lock released; the same command resumes."""
  workdir = str(tmp_path / "w")
  args = [sys.executable, "-m", "feddat_jax.main", f"--config=configs/vqa.py:{SMOKE}", f"--workdir={workdir}"]
  proc = subprocess.Popen(args, cwd=REPO, env={**_env(), faults.PAUSE_ENV: "round:2"}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:
    if line.startswith("FEDDAT_DEBUG_PAUSED"):
      break
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-2000:]
  assert err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
  assert "Traceback" not in err
  assert not os.path.exists(os.path.join(workdir, workdir_lock.NAME))
  again = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  assert "after round 1" in again.stdout and "taking over" not in again.stdout


# ------------------------------------------------------------------------------------------------ the CLIs' ends

@pytest.mark.parametrize("error, status, words", [
    (OSError(errno.EROFS, "Read-only file system", "/ro/run"), 2, ["cannot write /ro/run", "read-only"]),
    (OSError(errno.ENOSPC, "No space left on device", "/full/run/x"), 2, ["/full/run/x", "disk is full", "rerun"]),
    (PermissionError(errno.EACCES, "Permission denied", "/root/run"), 2, ["/root/run", "no permission"]),
    (KeyboardInterrupt(), 130, ["interrupted; rerun the same command to resume"]),
    (faults.DivergenceError("round 2: training diverged"), 2, ["error: round 2: training diverged"]),
])
def test_cli_ends_in_one_line(capsys, error, status, words):
  def fn():
    raise error
  with pytest.raises(SystemExit) as e:
    cli.run_or_exit(fn)
  err = capsys.readouterr().err.strip()
  assert e.value.code == status and "\n" not in err and all(w in err for w in words), err
  with pytest.raises(FileNotFoundError):  # not a storage problem: a bug, with its traceback
    cli.run_or_exit(lambda: open("/no/such/file"))


@pytest.mark.parametrize("args", [
    ["-m", "feddat_jax.data.report", "--benchmark=domain", "--json={tmp}/missing/report.json"],
    ["-m", "feddat_jax.data.contact_sheet", "--out={tmp}/missing/sheet.png"],
])
def test_data_tools_check_the_output_folder_first(tmp_path, args):
  res = subprocess.run([sys.executable, *[a.replace("{tmp}", str(tmp_path)) for a in args]], capture_output=True,
                       text=True, cwd=REPO, env=_env(), timeout=120)
  lines = res.stderr.strip().splitlines()
  assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
  assert f"{tmp_path}/missing does not exist" in lines[0]
