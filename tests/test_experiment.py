"""The main job end to end: files written, resume after a kill, one-line CLI errors."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import helpers
import numpy as np
import pytest
from PIL import Image

from feddat_jax import config_utils, experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "runlocal=true,backbone=random"


def _env():
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "feddat_jax_xla"))
  return env


def _cli(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "feddat_jax.main", *args], capture_output=True, text=True,
                        cwd=REPO, env=_env(), timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("smoke"))
  config = config_utils.load_config(os.path.join(REPO, f"configs/vqa.py:{SMOKE}"))
  return config, workdir, experiment.run(config, workdir)


def test_run_writes_reports(smoke_run):
  config, workdir, results = smoke_run
  names = results["clients"]
  assert names == ["attribute", "knowledge", "logical", "object", "relation"]
  # FedDAT evaluates the DAT, A_C alone and A_S alone for every client.
  assert set(results["final"]) == {"dat", "personal", "shared"}
  for scores in results["final"].values():
    assert set(scores) == set(names)
    assert all(0.0 <= s <= 100.0 for s in scores.values())
  assert results["final_mean"]["dat"] == pytest.approx(np.mean(list(results["final"]["dat"].values())))
  # Adapters at tiny size: 2 layers x (64*4 + 4 + 4*64 + 64) parameters are uploaded per client and round.
  assert results["params"]["communicated_per_client"] == 2 * (64 * 4 + 4 + 4 * 64 + 64)
  assert results["params"]["bytes_uploaded_per_round"] == 4 * 1160 * 5

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["round"] for r in rows if r["kind"] == "train"] == [1, 2]
  assert [r["round"] for r in rows if r["kind"] == "eval"] == [0, 1, 2]  # round 0: before any training
  for row in (r for r in rows if r["kind"] == "train"):  # client drift: every client's update, each round
    assert sorted(row["drift"]) == names, row
    assert all(d["norm"] > 0 and -1 <= d["cosine"] <= 1 for d in row["drift"].values()), row["drift"]
  with open(os.path.join(workdir, "summary.csv")) as f:
    lines = f.read().splitlines()
  assert lines[0] == "variant," + ",".join(names) + ",mean"
  assert [l.split(",")[0] for l in lines[1:]] == ["dat", "personal", "shared"]
  for png in ("scores_vs_round.png", "final_scores.png", "drift.png"):
    with Image.open(os.path.join(workdir, png)) as im:
      assert im.size[0] > 200 and im.size[1] > 200
  events = glob.glob(os.path.join(workdir, "tensorboard", "events*"))
  assert events and any(b"drift/cosine/relation" in open(e, "rb").read() for e in events)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["algorithm"] == "feddat"


def test_rerun_of_finished_workdir_gives_same_results(smoke_run):
  config, workdir, results = smoke_run
  again = experiment.run(config, workdir)
  assert again["final"] == results["final"]
  assert again["seconds_per_round_median"] == results["seconds_per_round_median"]  # from the log, not null


def _train_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == "train"]


def test_packed_lanes_match_auto_lanes(smoke_run, tmp_path):
  """The smoke run (client_parallelism=auto: lanes on this CPU; lanes=0: as many as keep the client-steps real,
  here one per client, as vmap batches them) has the losses, drift and final scores of the same run with its
  clients packed into 2 lanes (3 + 2 clients back to back). Lanes against vmap and scan, with unequal clients,
  dummies, dropout and a NaN client: tests/test_engine.py."""
  config, workdir, results = smoke_run
  packed = config_utils.load_config(os.path.join(REPO, f"configs/vqa.py:{SMOKE}"))
  packed.lanes = 2
  got = experiment.run(packed, str(tmp_path))
  for a, b in zip(_train_rows(workdir), _train_rows(str(tmp_path)), strict=True):
    np.testing.assert_allclose(list(b["loss"].values()), list(a["loss"].values()), rtol=1e-4)
    for m in ("norm", "cosine"):
      np.testing.assert_allclose([d[m] for d in b["drift"].values()], [d[m] for d in a["drift"].values()],
                                 rtol=1e-3, atol=1e-5)
    assert a["client_steps"] == {"real": 10, "program": 10}  # 5 clients x 2 steps in 5 lanes of 2 steps
    assert b["client_steps"] == {"real": 10, "program": 12}  # in 2 lanes of 6 steps
  assert got["final"] == results["final"]


def _one_line_error(res, *needles):
  assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), res.stderr[-2000:]
  for needle in needles:
    assert needle in last, last
  assert "Traceback" not in res.stderr


def test_streamed_run_matches_memory(smoke_run, tmp_path):
  """data_loading=stream (rounds and evaluations read from the array_record files by grain's workers) gives the
  smoke run's losses and scores exactly: the batches are bitwise the same."""
  config, workdir, results = smoke_run
  streamed = config_utils.load_config(os.path.join(REPO, f"configs/vqa.py:{SMOKE}"))
  streamed.data_loading = "stream"
  got = experiment.run(streamed, str(tmp_path))
  train = lambda d: [r["loss"] for r in _train_rows(d)]
  assert train(str(tmp_path)) == train(workdir) and len(train(workdir)) == config.rounds
  assert got["final"] == results["final"] and got["history"] == results["history"]


@pytest.mark.parametrize("args, needles", [
    (["--config=configs/vqa.py", "--config.no_such_field=1"], ["unknown config field 'no_such_field' in "
                                                              "--config.no_such_field;"]),
    (["--config=configs/vqa.py", "--config.dp.noise_multiplierr=1"],  # readable, not an escaped repr
     ["unknown config field 'noise_multiplierr' in --config.dp.noise_multiplierr (did you mean "
      "'noise_multiplier'?)"]),
    (["--config=configs/vqa.py:benchmark=weather"], ["benchmark", "weather", "domain"]),
    (["--config=configs/vqa.py:flavour=mint"], ["unknown config argument", "flavour"]),
    ([f"--config=configs/vqa.py:{SMOKE}", "--config.backbone=hf:/no/such/vilt"], ["/no/such/vilt", "does not exist"]),
    ([f"--config=configs/vqa.py:{SMOKE}", "--config.data=/no/such/data"], ["/no/such/data", "no such directory"]),
    ([f"--config=configs/vqa.py:{SMOKE}", "--config.algorithm=fedsgd_adapter"], ["fedsgd_adapter", "unknown"]),
])
def test_cli_errors(args, needles, tmp_path):
  _one_line_error(_cli(*args, f"--workdir={tmp_path / 'w'}"), *needles)


def test_help_shows_the_usage():
  """main --help: the variant keys of configs/vqa.py's argument string and the --config.<field>=<value> syntax."""
  res = _cli("--help")
  assert not res.stderr, res.stderr
  with pytest.raises(ValueError, match="known: ") as info:  # the keys get_config's argument string takes
    config_utils.load_config(os.path.join(REPO, "configs/vqa.py:no_such_key=1"))
  keys = re.findall(r"'(\w+)'", str(info.value).split("known: ")[1])
  assert len(keys) >= 5
  for key in keys:
    assert re.search(rf"^  {key} ", res.stdout, re.M), (key, res.stdout)
  assert "--config.<field>=<value>" in res.stdout and "--config=configs/vqa.py:benchmark=domain," in res.stdout
  assert "Intentionally short" not in res.stdout


def test_workdir_of_another_config_is_refused(smoke_run, tmp_path):
  _, workdir, _ = smoke_run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  before = sorted(os.listdir(os.path.join(copy, "checkpoints")))
  res = _cli(f"--config=configs/vqa.py:{SMOKE}", "--config.optim.lr=0.5", f"--workdir={copy}")
  _one_line_error(res, "another config", copy, "optim.lr: 0.001 there, 0.5 here")  # says what differs
  assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == before


def test_config_differences_name_the_changed_keys(tmp_path):
  config = config_utils.load_config(os.path.join(REPO, "configs/vqa.py:runlocal=true"))
  path = str(tmp_path / "config.json")
  with open(path, "w") as f:
    f.write(config.to_json())
  assert experiment.config_differences(path, config) == ""
  changed = config.copy_and_resolve_references()
  changed.rounds, changed.pretrain.mask_prob, changed.distributed.num_processes = 7, 0.5, 4
  assert experiment.config_differences(path, changed) == ("pretrain.mask_prob: 0.0 there, 0.5 here; "
                                                          "rounds: 2 there, 7 here")  # distributed aside
  assert experiment.config_differences(path, changed, limit=1) == ("pretrain.mask_prob: 0.0 there, 0.5 here; "
                                                                   "and 1 more")
  with open(path, "w") as f:  # a saved config from before a field existed
    json.dump({k: v for k, v in json.loads(config.to_json()).items() if k != "head_readout"}, f)
  assert experiment.config_differences(path, config) == "head_readout: absent there, 'cls' here"
  assert experiment.config_differences(str(tmp_path / "missing.json"), config) == ""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax, on the cut file
@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_damaged_newest_checkpoint_resumes_from_the_previous(smoke_run, tmp_path, capsys, damage):
  """64 bytes flipped inside an array file of checkpoint 2 (size unchanged: only the checksum tells), or that
  file cut in half: one warning line, the run resumes from checkpoint 1 and ends bitwise equal to the
  uninterrupted run (the same checksum for every array of the new checkpoint 2)."""
  config, workdir, results = smoke_run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  step = os.path.join(copy, "checkpoints", "2")
  if damage == "flipped":
    helpers.flip_bytes(step)
  else:
    path = max(glob.glob(os.path.join(step, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)
    os.truncate(path, os.path.getsize(path) // 2)
  capsys.readouterr()
  again = experiment.run(config, copy)
  out = capsys.readouterr().out
  warnings = [l for l in out.splitlines() if l.startswith("warning: checkpoint")]
  assert len(warnings) == 1 and f"{copy}/checkpoints/2 is" in warnings[0], out
  assert "after round 1" in out
  assert again["final"] == results["final"] and again["history"] == results["history"]
  meta = lambda d: json.load(open(os.path.join(d, "checkpoints", "2", "meta", "metadata")))["checksums"]
  assert meta(copy) == meta(workdir)


def _drift_seed(workdir, dest, seed, scale, lr=None):
  """A copy of `workdir`'s config and metrics as another seed (or, with `lr`, another setting) whose drift norms
  are `scale` times the original's (cosines unchanged)."""
  os.makedirs(dest)
  config = json.load(open(os.path.join(workdir, "config.json")))
  config["seed"] = seed
  config["optim"]["lr"] = lr or config["optim"]["lr"]
  json.dump(config, open(os.path.join(dest, "config.json"), "w"))
  with open(os.path.join(workdir, "metrics.jsonl")) as f, open(os.path.join(dest, "metrics.jsonl"), "w") as g:
    for row in map(json.loads, f):
      for d in row.get("drift", {}).values():
        d["norm"] *= scale
      g.write(json.dumps(row) + "\n")
  return str(dest)


def test_drift_comparison_of_runs(smoke_run, tmp_path, capsys):
  """benchmarks/drift.py: a table row per round with the mean drift over each run's clients; runs that differ only
  in seed are pooled (mean ± sample std over seeds), another setting gets its own columns; and a plot."""
  _, workdir, _ = smoke_run
  script = helpers.load_script("drift")
  seed1 = _drift_seed(workdir, tmp_path / "s1", seed=1, scale=3.0)
  other = _drift_seed(workdir, tmp_path / "lr", seed=0, scale=1.0, lr=0.5)
  script.main([workdir, seed1, other, f"--table={tmp_path / 't.md'}", f"--plot={tmp_path / 'p.png'}"])
  lines = (tmp_path / "t.md").read_text().splitlines()
  assert lines[0] == "| round | feddat norm | feddat cosine | feddat (lr) norm | feddat (lr) cosine |"
  assert lines[-1].endswith("(feddat 2 seeds, feddat (lr) 1 seed).")
  drift = [r["drift"] for r in _train_rows(workdir)]
  for line, d in zip(lines[2:-2], drift, strict=True):
    cells = line.strip("|").split("|")
    norm = np.mean([x["norm"] for x in d.values()])
    cosine = np.mean([x["cosine"] for x in d.values()])
    mean, sd = map(float, cells[1].split("±"))
    assert mean == pytest.approx(2 * norm, abs=1e-4) and sd == pytest.approx(np.std([norm, 3 * norm], ddof=1), abs=1e-4)
    assert [float(x) for x in cells[2].split("±")] == pytest.approx([cosine, 0.0], abs=1e-3)
    assert float(cells[3]) == pytest.approx(norm, abs=1e-4) and float(cells[4]) == pytest.approx(cosine, abs=1e-3)
  assert capsys.readouterr().out.splitlines() == lines
  assert (tmp_path / "p.png").stat().st_size > 10_000
  with pytest.raises(SystemExit, match="repeats seed 0"):
    script.main([workdir, workdir])
