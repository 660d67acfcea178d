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

# The stub stands for the slice: a folder is the workers' home (one worker), where it really runs the launcher's
# run, poll and liveness commands (those naming ~/feddat_runs), so the detached start, the status file and the
# polling are exercised; ~/feddat_venv/bin/python is a fake run that logs its arguments, sleeps $FAKE_RUN_SECONDS
# (or until the launcher has checked for live runs: ~/.release) and exits 3 when they contain $GCLOUD_FAIL_ON.
# Other calls are only logged (and fail on $GCLOUD_FAIL_ON). $GCLOUD_DROPS: after the first run is started,
# that many ssh calls fail as a dropped connection would (status 255).
STUB = """#!/usr/bin/env bash
echo "$*" >> "$GCLOUD_LOG"
home="$GCLOUD_HOME"
case "$4" in
  describe) [[ -f "$home/.slice" ]]; exit ;;
  create) touch "$home/.slice" ;;
  delete) rm -f "$home/.slice" ;;
esac
command=""
for a in "$@"; do
  [[ "$a" != --command=* ]] || command="${a#--command=}"
done
if [[ "$4" != ssh ]]; then
  for a in "$@"; do
    if [[ -n "$GCLOUD_FAIL_ON" && "$a" == *"$GCLOUD_FAIL_ON"* ]]; then exit 3; fi
  done
elif [[ "$command" == *feddat_runs* ]]; then
  drops=$(cat "$home/.drops" 2> /dev/null || echo 0)
  if [[ "$command" != *nohup* && $drops -gt 0 ]]; then
    echo $((drops - 1)) > "$home/.drops"
    echo "ssh: connect to host 10.0.0.2 port 22: Connection timed out" >&2
    exit 255
  fi
  (cd "$home" && HOME="$home" bash -c "$command") || exit
  [[ "$command" != *"feddat-run checked"* ]] || touch "$home/.release"
  if [[ "$command" == *nohup* && ! -f "$home/.dropped" ]]; then
    touch "$home/.dropped"
    echo "${GCLOUD_DROPS:-0}" > "$home/.drops"
  fi
fi
"""

FAKE_RUN = """#!/usr/bin/env bash
echo "$*" >> "$HOME/runs.log"
for _ in $(seq $((10 * ${FAKE_RUN_SECONDS:-1}))); do
  [[ ! -f "$HOME/.release" ]] || break
  sleep 0.1
done
[[ -z "$GCLOUD_FAIL_ON" || "$*" != *"$GCLOUD_FAIL_ON"* ]] || exit 3
"""


@pytest.fixture
def gcloud(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(STUB)
  (bin_dir / "gcloud").chmod(0o755)
  home = tmp_path / "worker"
  (home / "feddat_jax").mkdir(parents=True)
  (home / "feddat_venv" / "bin").mkdir(parents=True)
  (home / "feddat_venv" / "bin" / "python").write_text(FAKE_RUN)
  (home / "feddat_venv" / "bin" / "python").chmod(0o755)
  log = tmp_path / "gcloud.log"

  def launch(script, *args, fail_on="", drops=0, run_seconds=1):
    log.unlink(missing_ok=True)
    for f in (".drops", ".dropped", ".release"):
      (home / f).unlink(missing_ok=True)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", GCLOUD_LOG=str(log), GCLOUD_FAIL_ON=fail_on,
               GCLOUD_HOME=str(home), GCLOUD_DROPS=str(drops), FAKE_RUN_SECONDS=str(run_seconds),
               PYTHON=sys.executable, PYTHONPATH=REPO, TMPDIR=str(tmp_path))
    res = subprocess.run(["bash", script, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    res.calls = log.read_text().splitlines() if log.exists() else []
    runs = home / "runs.log"
    res.runs = runs.read_text().splitlines() if runs.exists() else []
    return res

  return launch


def _verb(call):  # "compute tpus tpu-vm create NAME ..." -> "create"
  return call.split()[3]


SWEEP = ["--name", "pod", "--zone", "z", "--workdir", "/mnt/runs", "--poll", "1"]


def test_failing_run_still_deletes_the_slice_and_runs_the_others(gcloud):
  res = gcloud(TPU, *SWEEP, "--skip-install", "--create", "--delete", "--config", FAILING, "--config", GOOD,
               fail_on="fedavg_adapter")
  assert res.returncode == 1, res.stderr
  verbs = [_verb(c) for c in res.calls]
  assert verbs[:2] == ["describe", "create"] and verbs[-1] == "delete" and set(verbs[2:-1]) == {"ssh"}, verbs
  starts = [c for c in res.calls if "nohup" in c]  # each run started once, detached, in the given order
  assert len(starts) == 2 and "fedavg_adapter" in starts[0] and "fedavg_adapter" not in starts[1]
  assert len(res.runs) == 2 and "fedavg_adapter" in res.runs[0]
  assert "(1 exit 3;" in res.stderr
  assert f"1 of 2 runs failed: {FAILING}" in res.stderr.strip().splitlines()[-1]


def test_dropped_polls_are_retried(gcloud):
  res = gcloud(TPU, *SWEEP, "--skip-install", "--retries", "4", "--config", GOOD, drops=3)
  assert res.returncode == 0, res.stderr
  assert len(res.runs) == 1 and sum("nohup" in c for c in res.calls) == 1


def test_lost_contact_keeps_the_slice_and_a_rerun_reattaches(gcloud):
  args = [*SWEEP, "--create", "--delete", "--retries", "2", "--config", GOOD, "--config", FAILING]
  lost = gcloud(TPU, *args, drops=100, run_seconds=60)  # the run lasts until the rerun has seen it alive
  assert lost.returncode == 75, lost.stderr
  assert "lost contact with pod" in lost.stderr and "rerun this same command to re-attach" in lost.stderr
  assert "delete" not in [_verb(c) for c in lost.calls] and len(lost.runs) == 1  # the first run goes on
  again = gcloud(TPU, *args)  # the same command: the slice is there, the first run still alive
  assert again.returncode == 0, again.stderr
  verbs = [_verb(c) for c in again.calls]
  assert "create" not in verbs and "scp" not in verbs and verbs[-1] == "delete", verbs
  # The first run is waited for, or (on a slow machine, its 60 s already over) found ended and not run again.
  assert "not installing again" in again.stderr
  assert ("is running already: waiting for it" in again.stderr
          or "runlocal=true has ended with status 0 already: not running it again" in again.stderr), again.stderr
  assert len(again.runs) == 2  # the first run was not started again, the second was
  third = gcloud(TPU, *args[:-2], "--skip-install")  # the first run ended with 0: not run again
  assert third.returncode == 0 and "not running it again" in third.stderr and len(third.runs) == 2


@pytest.mark.parametrize("accelerator, version", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e")])
def test_dry_run_runtime_version_and_python_311(gcloud, accelerator, version):
  res = gcloud(TPU, *SWEEP, "--dry-run", "--create", "--accelerator-type", accelerator, "--config", GOOD)
  assert res.returncode == 0 and res.calls == [], res.stderr
  lines = res.stdout.splitlines()
  create = [l for l in lines if " create " in l]
  assert create == [f"gcloud compute tpus tpu-vm create pod --zone=z --accelerator-type={accelerator} "
                    f"--version={version}"]
  install = [l for l in lines if "pip install" in l]
  assert len(install) == 1
  assert "sudo apt-get -q -y -o DPkg::Lock::Timeout=600 install python3.11 python3.11-venv" in install[0]
  assert "sudo add-apt-repository -y ppa:deadsnakes/ppa" in install[0]
  assert "python3.11 -m venv ~/feddat_venv && " in install[0]
  assert install[0].index("python3.11 -m venv") < install[0].index("~/feddat_venv/bin/pip install -q -e")
  assert "~/feddat_venv/bin/pip install -q -e '\\''.[tpu]'\\''" in install[0]  # '.[tpu]' within '--command=...'
  start = [l for l in lines if "feddat_jax.main" in l]
  assert len(start) == 1 and "setsid nohup bash -c" in start[0] and "~/feddat_venv/bin/python -m feddat_jax.main" \
      in start[0] and "echo $? > $d/status.tmp && mv $d/status.tmp $d/status" in start[0]


def test_accelerator_version_override_and_unknown(gcloud):
  res = gcloud(TPU, *SWEEP, "--dry-run", "--create", "--accelerator-type", "v7x-8", "--config", GOOD)
  lines = res.stderr.strip().splitlines()
  assert res.returncode == 2 and len(lines) == 1 and "v7x-8" in lines[0] and "--version" in lines[0], res.stderr
  res = gcloud(TPU, *SWEEP, "--dry-run", "--create", "--accelerator-type", "v7x-8", "--version", "my-image",
               "--config", GOOD)
  assert res.returncode == 0 and "--accelerator-type=v7x-8 --version=my-image" in res.stdout, res.stderr
  res = gcloud(TPU, *SWEEP, "--dry-run", "--accelerator-type", "v6e-8", "--version", "v2-alpha-tpuv6e-next",
               "--create", "--config", GOOD)
  assert "--version=v2-alpha-tpuv6e-next" in res.stdout


def test_gs_workdir_is_refused(gcloud):
  res = gcloud(TPU, "--name", "pod", "--zone", "z", "--workdir", "gs://bucket/runs", "--config", GOOD, "--dry-run")
  lines = res.stderr.strip().splitlines()
  assert res.returncode == 2 and len(lines) == 1 and "gcsfuse" in lines[0] and res.stdout == "", res.stderr


def test_failed_create_still_deletes(gcloud):
  res = gcloud(TPU, "--name", "pod", "--zone", "z", "--workdir", "/mnt/runs", "--create", "--delete",
               "--config", GOOD, fail_on="create")
  assert res.returncode == 3
  assert [_verb(c) for c in res.calls] == ["describe", "create", "delete"]


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
