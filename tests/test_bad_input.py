"""A catalogue of bad inputs: each gives a one-line error naming the problem, exit status 2 from the CLI, and
leaves an existing workdir untouched (every file's hash; a fresh one: no checkpoint). (tests/test_experiment.py covers six more CLI kinds: an
unknown config field, a bad benchmark, an unknown config argument, a missing HF directory, a missing data
directory, an unknown algorithm; plus a workdir of another config and corrupt checkpoint files.)

Kinds here (CASES, then the tests below it):
  config values: unknown aggregator, negative dropout, dropout 1, min_clients > cohort_size, min_clients >
    the number of clients, min_clients 0, negative DP noise, DP noise without a clip norm, DP delta outside
    (0, 1), DP with example-count weights, trim_fraction 0.5, max_update_norm 0, rounds 0, a pretraining
    masking rate of 1, an unknown head readout, a non-numeric value for a number, a NaN learning rate, Adam
    b1 1.5, KD temperature 0, seed -1, synthetic image size 0 and scale 0, cohort_size > the clients, a
    tokenizer whose ids exceed the backbone's embedding (tests/test_config_checks.py: every field's range);
  training: a learning rate so high that every upload of round 1 is NaN (divergence: nothing saved);
  ALBEF: a missing ALBEF.pth, a .pth torch cannot read, real data without the BERT tokenizer, rank_k 0;
  files: a config file that is not valid Python, a config file that does not exist, a workdir that is a file, an HF config.json that is not
    JSON, an HF config.json of another model type, an HF model.safetensors that is not safetensors, a data
    directory with a malformed annotation JSON, a checkpoint whose meta is not ours, a checkpoint of the same
    config fingerprint but other shapes (CLI and Checkpointer), a checkpoint of the same config on the data of
    an earlier synthetic generator (feddat_jax/data/synthetic.py edited since);
  code: no module unpickles anything (pickle, allow_pickle, torch.load without weights_only=True).
"""
import concurrent.futures
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from unittest import mock

import jax.numpy as jnp
import pytest

from feddat_jax import checkpoint as ckpt_lib
from feddat_jax import config_utils, experiment
from feddat_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "runlocal=true,backbone=random"
BASE = [f"--config=configs/vqa.py:{SMOKE}", "--config.rounds=1"]
TINY_VILT = os.path.join(REPO, "tests", "fixtures", "tiny_vilt")
# Without torch (it is optional: `pip install -e ".[test]"` does not bring it) a .pth is refused before it is read.
HAS_TORCH = importlib.util.find_spec("torch") is not None

# kind -> (extra CLI arguments, words the error line must hold, workdir: "existing" (a copy of a finished run,
# whose checkpoints must not change) or "fresh" (errors found after the checkpoint check, which would first
# refuse a workdir of another config)). "{tmp}" is the case's scratch folder.
CASES = {
    "unknown aggregator": (["--config.aggregator=krum"], ["aggregator", "krum", "median"], "existing"),
    "negative dropout": (["--config.dropout=-0.1"], ["dropout=-0.1", "[0, 1)"], "existing"),
    "dropout of 1": (["--config.dropout=1.0"], ["dropout=1.0", "[0, 1)"], "existing"),
    "min_clients above cohort": (["--config.cohort_size=2", "--config.min_clients=3"],
                                 ["min_clients=3", "cohort_size=2"], "existing"),
    "min_clients above clients": (["--config.min_clients=6"], ["min_clients=6", "5 clients"], "fresh"),
    "min_clients 0": (["--config.min_clients=0"], ["min_clients=0", ">= 1"], "existing"),
    "negative DP noise": (["--config.aggregator=dp_mean", "--config.dp.noise_multiplier=-1"],
                          ["dp.noise_multiplier=-1", ">= 0"], "existing"),
    "DP noise without clipping": (["--config.aggregator=dp_mean", "--config.dp.clip_norm=0"],
                                  ["clip_norm > 0"], "existing"),
    "DP delta out of range": (["--config.dp.delta=1.5"], ["dp.delta=1.5", "(0, 1)"], "existing"),
    "DP with example weights": (["--config.aggregator=dp_mean", "--config.aggregation=examples"],
                                ["dp_mean", "aggregation=uniform"], "existing"),
    "trim fraction 0.5": (["--config.aggregator=trimmed_mean", "--config.trim_fraction=0.5"],
                          ["trim_fraction=0.5", "[0, 0.5)"], "existing"),
    "norm bound 0": (["--config.max_update_norm=0"], ["max_update_norm=0", "> 0"], "existing"),
    "zero rounds": (["--config.rounds=0"], ["rounds=0", "> 0"], "existing"),
    "masking rate 1": (["--config.pretrain.mask_prob=1.0"], ["pretrain.mask_prob=1.0", "[0, 1)"], "existing"),
    "learning rate NaN": (["--config.optim.lr=nan"], ["optim.lr=nan", "finite"], "existing"),
    "Adam b1 above 1": (["--config.optim.b1=1.5"], ["optim.b1=1.5", "[0, 1)"], "existing"),
    "temperature 0": (["--config.options.temperature=0"], ["options.temperature=0", "> 0"], "existing"),
    "negative seed": (["--config.seed=-1"], ["seed=-1", ">= 0"], "existing"),
    "synthetic image size 0": (["--config.synthetic.image_size=0"], ["synthetic.image_size=0", "> 0"], "existing"),
    "synthetic scale 0": (["--config.synthetic.scale=0"], ["synthetic.scale=0", "> 0"], "existing"),
    "cohort above clients": (["--config.cohort_size=8"], ["cohort_size=8", "5 clients"], "fresh"),
    "tokenizer beyond the embedding": ([f"--config.backbone=hf:{TINY_VILT}"], ["token ids", "64-row"], "fresh"),
    "missing config file": (["--config={tmp}/nope.py"], ["nope.py", "No such file"], "existing"),
    "diverging learning rate": (["--config.optim.lr=1e30"], ["round 1", "diverged", "optim.lr=1e+30"], "fresh"),
    "unknown head readout": (["--config.head_readout=mean"], ["head_readout='mean'", "cls_image"], "existing"),
    "non-numeric number": (["--config.dropout=lots"], ["dropout", "lots"], "existing"),
    "config file not Python": (["--config={tmp}/bad_config.py"], ["bad_config.py", "line 1"], "existing"),
    "workdir is a file": ([], ["not a directory"], "file"),
    "HF config.json not JSON": (["--config.backbone=hf:{tmp}/vilt"], ["config.json", "not valid JSON"], "fresh"),
    "HF config.json of another model": (["--config.backbone=hf:{tmp}/vilt"], ["model_type", "'bert'", "vilt"],
                                        "fresh"),
    "HF weights not safetensors": (["--config.backbone=hf:{tmp}/vilt"], ["model.safetensors", "safetensors"],
                                   "fresh"),
    "data JSON malformed": (["--config.benchmark=domain", "--config.data={tmp}/data",
                             "--config.backbone=hf:{tmp}/vilt", "--config.tfds_dir={tmp}/tfds"],
                            ["train.json", "invalid JSON"], "fresh"),
    "missing ALBEF checkpoint": (["--config.backbone=albef:{tmp}/ALBEF.pth"], ["ALBEF.pth", "no such file",
                                                                              "never downloads"], "existing"),
    "ALBEF checkpoint not torch": (["--config.backbone=albef:{tmp}/bad.pth"],
                                   ["bad.pth", "torch.load" if HAS_TORCH else "needs torch"], "fresh"),
    "ALBEF on real data without tokenizer": (["--config.backbone=albef", "--config.data={tmp}"],
                                             ["albef.tokenizer", "bert-base-uncased"], "existing"),
    "ALBEF rank_k 0": (["--config.albef.rank_k=0"], ["albef.rank_k=0", "> 0"], "existing"),
    "checkpoint meta not ours": ([], ["not a feddat_jax checkpoint"], "existing"),
    "checkpoint of an earlier generator": ([], ["no config field differs", "synthetic.py has changed"], "existing"),
    "checkpoint of other shapes": (["--config.num_answers=10"], ["does not match this run's states", "20) there",
                                                                 "10) here"], "existing"),
}


def _prepare(kind, tmp, finished):
  """The case's files; -> its workdir."""
  os.makedirs(tmp, exist_ok=True)
  if kind == "config file not Python":
    with open(os.path.join(tmp, "bad_config.py"), "w") as f:
      f.write("def get_config(:\n")
  if kind.startswith("HF") or kind == "data JSON malformed":
    shutil.copytree(TINY_VILT, os.path.join(tmp, "vilt"))
    cfg_path = os.path.join(tmp, "vilt", "config.json")
    if kind == "HF config.json not JSON":
      with open(cfg_path, "w") as f:
        f.write('{"model_type": "vilt",')
    elif kind == "HF config.json of another model":
      cfg = json.load(open(cfg_path))
      with open(cfg_path, "w") as f:
        json.dump({**cfg, "model_type": "bert"}, f)
    elif kind == "HF weights not safetensors":
      with open(os.path.join(tmp, "vilt", "model.safetensors"), "wb") as f:
        f.write(b"\x80\x04not a safetensors file")
  if kind == "ALBEF checkpoint not torch":
    with open(os.path.join(tmp, "bad.pth"), "wb") as f:
      f.write(b"PK\x03\x04 not a torch zip")
  if kind == "data JSON malformed":
    os.makedirs(os.path.join(tmp, "data", "aqua", "SemArt", "Images"))  # the official layout's image folder
    with open(os.path.join(tmp, "data", "aqua", "train.json"), "w") as f:
      f.write("{not json")
  workdir = os.path.join(tmp, "workdir")
  if kind == "workdir is a file":
    with open(workdir, "w") as f:
      f.write("not a directory")
  elif CASES[kind][2] == "existing":
    shutil.copytree(finished, workdir)
    meta = os.path.join(workdir, "checkpoints", "1", "meta", "metadata")
    if kind == "checkpoint meta not ours":
      with open(meta, "w") as f:
        json.dump({"hello": "world"}, f)
    elif kind == "checkpoint of an earlier generator":  # the finished run's config, another synthetic.py
      config = config_utils.load_config(os.path.join(REPO, f"configs/vqa.py:{SMOKE}"))
      config.rounds = 1
      data = json.load(open(meta))
      assert data["fingerprint"] == experiment.fingerprint(config)  # what the finished run wrote
      with mock.patch.object(synthetic, "GENERATOR", "0123456789ab"):
        earlier = experiment.fingerprint(config)
      with open(meta, "w") as f:
        json.dump({**data, "fingerprint": earlier}, f)
    elif kind == "checkpoint of other shapes":  # the fingerprint of the run below, the shapes of the finished one
      config = config_utils.load_config(os.path.join(REPO, f"configs/vqa.py:{SMOKE}"))
      config.rounds, config.num_answers = 1, 10
      data = json.load(open(meta))
      with open(meta, "w") as f:
        json.dump({**data, "fingerprint": experiment.fingerprint(config)}, f)
  return workdir


def _snapshot(workdir, whole=False):
  """{relative path: sha256} of every file under workdir/checkpoints, or the whole workdir (none there: {})."""
  root = workdir if whole else os.path.join(workdir, "checkpoints")
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


def _cli(args):
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "feddat_jax_xla"))
  return subprocess.run([sys.executable, "-m", "feddat_jax.main", *args], capture_output=True, text=True, cwd=REPO,
                        env=env, timeout=300)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished one-round run's workdir (checkpoint 1)."""
  workdir = str(tmp_path_factory.mktemp("finished"))
  config = config_utils.load_config(os.path.join(REPO, f"configs/vqa.py:{SMOKE}"))
  config.rounds = 1
  experiment.run(config, workdir)
  return workdir


def test_catalogue(finished, tmp_path):
  assert len(CASES) >= 15
  jobs = {}
  for i, kind in enumerate(CASES):
    tmp = str(tmp_path / f"case{i}")
    workdir = _prepare(kind, tmp, finished)
    args, needles, _ = CASES[kind]
    args = [a.replace("{tmp}", tmp) for a in args]
    if not any(a.startswith("--config=") for a in args):
      args = BASE + args
    jobs[kind] = (workdir, _snapshot(workdir, whole=CASES[kind][2] == "existing"), [n.replace("{tmp}", tmp) for n in needles], args + [
        f"--workdir={workdir}"])
  with concurrent.futures.ThreadPoolExecutor(3) as pool:  # a few seconds each, mostly imports
    results = dict(zip(jobs, pool.map(lambda job: _cli(job[3]), jobs.values())))
  failures = []
  for kind, res in results.items():
    workdir, before, needles, _ = jobs[kind]
    lines = res.stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    ok = (res.returncode == 2 and last.startswith("error: ") and all(n in last for n in needles)
          and "Traceback" not in res.stderr and _snapshot(workdir, whole=CASES[kind][2] == "existing") == before)
    if not ok:
      failures.append(f"{kind}: rc {res.returncode}, last line {last!r}")
  assert not failures, "\n".join(failures)


def test_checkpointer_refuses_other_shapes(tmp_path):
  """Restoring into states of other shapes names the first differing array and both shapes, reading nothing."""
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), "fp")
  ckpt.save(3, {"server": {"shared": jnp.zeros((4, 8))}, "clients": {"head": jnp.zeros((5, 2), jnp.int32)}})
  ckpt.check_config()
  with pytest.raises(ckpt_lib.CheckpointError, match=r"\['server'\]\['shared'\] is float32\(4, 8\) there, "
                                                      r"float32\(4, 9\) here"):
    ckpt.restore(3, {"server": {"shared": jnp.zeros((4, 9))}, "clients": {"head": jnp.zeros((5, 2), jnp.int32)}})
  with pytest.raises(ckpt_lib.CheckpointError, match=r"\['clients'\]\['head'\] is int32\(5, 2\) there, float32"):
    ckpt.restore(3, {"server": {"shared": jnp.zeros((4, 8))}, "clients": {"head": jnp.zeros((5, 2))}})
  with pytest.raises(ckpt_lib.CheckpointError, match=r"\['clients'\]\['opt'\] is absent there"):
    ckpt.restore(3, {"server": {"shared": jnp.zeros((4, 8))}, "clients": {"head": jnp.zeros((5, 2), jnp.int32),
                                                                         "opt": jnp.zeros(1)}})
  ckpt.close()


# Unpickling runs code from the file; every reader here uses safetensors, orbax, JSON or torch's weights_only.
_UNSAFE = [re.compile(p) for p in (r"\bimport pickle\b", r"\bpickle\.loads?\(", r"\bcPickle\b", r"\bdill\b",
                                   r"\bjoblib\b", r"allow_pickle\s*=\s*True", r"\bshelve\b", r"\bmarshal\.loads?\(")]


def test_no_unpickling_anywhere():
  found = []
  for folder in ("feddat_jax", "scripts", "benchmarks", "configs", "launch"):
    for dirpath, _, files in os.walk(os.path.join(REPO, folder)):
      for name in files:
        if not name.endswith(".py"):
          continue
        path = os.path.join(dirpath, name)
        for n, line in enumerate(open(path, encoding="utf-8"), 1):
          code = line.split("#")[0]
          if any(p.search(code) for p in _UNSAFE):
            found.append(f"{path}:{n}: {line.strip()}")
          if "torch.load(" in code and "weights_only=True" not in code:
            found.append(f"{path}:{n}: torch.load without weights_only=True: {line.strip()}")
  assert not found, "\n".join(found)
