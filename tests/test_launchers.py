"""The launchers in launch/, with a stub `gcloud` on PATH that logs its calls (and fails on request): arguments
are checked before anything is created, a failing run does not stop the others, --delete always deletes the
slice, --help is the usage only."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "launch", "tpu_pod_sweep.sh")
LOCAL = os.path.join(REPO, "launch", "local_multiprocess.sh")
GOOD = "configs/vqa.py:runlocal=true"
FAILING = "configs/vqa.py:runlocal=true,algorithm=fedavg_adapter"  # the stub fails the run of this one

STUB = """#!/usr/bin/env bash
echo "$*" >> "$GCLOUD_LOG"
for a in "$@"; do
  if [[ -n "$GCLOUD_FAIL_ON" && "$a" == *"$GCLOUD_FAIL_ON"* ]]; then exit 3; fi
done
"""


@pytest.fixture
def gcloud(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(STUB)
  (bin_dir / "gcloud").chmod(0o755)
  log = tmp_path / "gcloud.log"

  def launch(script, *args, fail_on=""):
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", GCLOUD_LOG=str(log), GCLOUD_FAIL_ON=fail_on,
               PYTHON=sys.executable, PYTHONPATH=REPO, TMPDIR=str(tmp_path))
    res = subprocess.run(["bash", script, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    res.calls = log.read_text().splitlines() if log.exists() else []
    return res

  return launch


def _verb(call):  # "compute tpus tpu-vm create NAME ..." -> "create"
  return call.split()[3]



def test_failing_run_still_deletes_the_slice_and_runs_the_others(gcloud):
  res = gcloud(TPU, "--name", "pod", "--zone", "z", "--workdir", "/mnt/runs", "--skip-install", "--create",
               "--delete", "--config", FAILING, "--config", GOOD, fail_on="fedavg_adapter")
  assert res.returncode == 1, res.stderr
  assert [_verb(c) for c in res.calls] == ["create", "ssh", "ssh", "delete"]
  assert "fedavg_adapter" in res.calls[1] and "fedavg_adapter" not in res.calls[2]
  assert f"1 of 2 runs failed: {FAILING}" in res.stderr.strip().splitlines()[-1]


def test_failed_create_still_deletes(gcloud):
  res = gcloud(TPU, "--name", "pod", "--zone", "z", "--workdir", "/mnt/runs", "--create", "--delete",
               "--config", GOOD, fail_on="create")
  assert res.returncode == 3
  assert [_verb(c) for c in res.calls] == ["create", "delete"]


@pytest.mark.parametrize("args, words", [
    (["--config", "configs/no_such.py"], ["configs/no_such.py", "does not load", "does not exist"]),
    (["--config", "configs/vqa.py:flavour=mint"], ["flavour", "does not load"]),
    (["--config"], ["--config needs a value"]),
])
def test_bad_sweep_arguments_create_nothing(gcloud, args, words):
  for dry in ([], ["--dry-run"]):
    res = gcloud(TPU, "--name", "pod", "--zone", "z", "--workdir", "/mnt/runs", "--create", "--delete", *dry, *args)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and all(w in lines[0] for w in words), res.stderr
    assert res.calls == []


@pytest.mark.parametrize("args, words", [
    (["-n", "abc"], ["-n", "positive integer", "abc"]),
    (["-n", "0"], ["-n", "positive integer", "'0'"]),
    (["--devices", "-1"], ["--devices", "positive integer"]),
    (["-n"], ["-n needs a value"]),
    (["-n", "2"], ["after --"]),
])
def test_local_launcher_checks_its_arguments(gcloud, tmp_path, args, words):
  logdir = tmp_path / "logs"
  rest = ["--", f"--config={GOOD}"] if args not in (["-n", "2"], ["-n"]) else []
  res = gcloud(LOCAL, "--logdir", str(logdir), *args, *rest)
  lines = res.stderr.strip().splitlines()
  assert res.returncode == 2 and len(lines) == 1 and all(w in lines[0] for w in words), res.stderr
  assert not logdir.exists()


@pytest.mark.parametrize("script, first", [(TPU, "A sweep of configs"), (LOCAL, "N processes of one run")])
def test_help_is_the_usage_only(gcloud, script, first):
  res = gcloud(script, "--help")
  assert res.returncode == 0 and res.stdout.startswith(first)
  assert not any(l.startswith(("#", "set -", "name=", "n=")) for l in res.stdout.splitlines()), res.stdout
