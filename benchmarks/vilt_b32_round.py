"""The paper's setting end to end at real size: configs/vqa_vilt_b32.py on a ViLT-B/32 checkpoint directory and
real-format data, one round and an evaluation on this machine's CPU.

What it writes (under --out, default a temporary directory):
  ckpt/   a ViLT-B/32-sized checkpoint as `dandelin/vilt-b32-mlm` ships: `ViltForMaskedLM(ViltConfig())` (random
          weights, "vilt.*" keys plus the MLM head, config.json) saved by transformers' `save_pretrained`, and a
          `BertTokenizerFast` saved beside it (vocab.txt, tokenizer.json, ...). The vocabulary has the
          checkpoint's 30,522 entries, BERT's special tokens at BERT's ids, the words of the data and "[unused]"
          filler, since the loader requires the tokenizer's size to equal the model's vocab_size
          (docs/real_data.md);
  data/   the "domain" benchmark's five datasets (aqua, vqa_abstract, vizwiz, coco_qa, gqa) in their official
          layouts, written by the writers of tests/test_builders.py with real-size photos (640x480 landscape
          and, with --orientation=mixed, 480x640 portrait: smooth gradients plus noise, saved as each dataset
          ships them, JPEG or PNG): --train train and --test test examples per dataset.

Then, in a child process (no torch in it, so its peak RSS is the run's), `configs/vqa_vilt_b32.py` pointed at
them (image_preprocess=vilt) with `--config.rounds=2 --config.local_steps=LOCAL_STEPS --config.cohort_size=COHORT
--config.eval_every=2 --config.checkpoint_every=0 --config.client_parallelism=scan` (batch 2, the config's): the data are prepared into
array_record, an evaluation before round 1 (compiles the evaluation program), round 1 (compiles the round),
round 2 (the compiled round again) and the final evaluation of every client's test split (compiled). Printed: the
time of each phase, the canvas, the peak RSS; with --json one JSON line last.

  python benchmarks/vilt_b32_round.py [--orientation mixed|landscape] [--json]

Needs torch and transformers to write the checkpoint (no network). Not a CI test: several minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "what animal is it this color how many kind of the a in picture there cat dog red blue 2 3 ?".split()
ANSWERS = ["cat", "dog", "red", "blue", "2", "3"]
QUESTIONS = ["what animal is it?", "what color is it?", "how many are there?", "what kind of animal is this?"]


def write_checkpoint(path: str) -> dict:
  """ViltForMaskedLM(ViltConfig()) + a 30,522-token BertTokenizerFast, both by save_pretrained, into `path`."""
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.ViltConfig()
  transformers.ViltForMaskedLM(config).save_pretrained(path)
  # BERT's layout: [PAD] 0, [unused0..98], [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, then the words.
  vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
  vocab += [f"[unused{i}]" for i in range(99, 99 + config.vocab_size - len(vocab))]
  with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, "vocab.txt"), "w") as f:
      f.write("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(tmp, local_files_only=True)
  assert len(tokenizer) == config.vocab_size, (len(tokenizer), config.vocab_size)
  tokenizer.save_pretrained(path)
  return {"vocab_size": config.vocab_size, "hidden": config.hidden_size, "layers": config.num_hidden_layers,
          "patch": config.patch_size, "files": sorted(os.listdir(path))}


def _builder_writers():
  """tests/test_builders.py, imported for its official-layout writers."""
  spec = importlib.util.spec_from_file_location("_test_builders", os.path.join(REPO, "tests", "test_builders.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def write_data(root: str, n_train: int, n_test: int, orientation: str) -> dict:
  """The domain benchmark's datasets under `root`, real-size photos; -> {"images": n, "shapes": {...}}."""
  import pathlib

  import numpy as np
  import PIL.Image
  tb = _builder_writers()
  count = {"images": 0, "shapes": {}}

  def photo(path: pathlib.Path, color, mode="RGB"):
    # Replaces the writers' 5x4 solid images: a 640x480 photo, every other one 480x640 with "mixed".
    i = count["images"]
    h, w = (640, 480) if orientation == "mixed" and i % 2 else (480, 640)
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([color[0] * y / h + 40, color[1] * x / w + 40, 127 + 100 * np.sin((x + y) / 23)], -1)
    pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(pixels).convert(mode).save(path)
    count["images"] += 1
    count["shapes"][f"{h}x{w}"] = count["shapes"].get(f"{h}x{w}", 0) + 1

  tb._image = photo  # the writers look the name up in their module at call time
  colors = [tb.RED, tb.GREEN, tb.BLUE, tb.GREY]

  def items(n, offset, ten):
    out = []
    for i in range(n):
      a = ANSWERS[(i + offset) % len(ANSWERS)]
      out.append((QUESTIONS[i % len(QUESTIONS)], [a] * 10 if ten else (a,), [colors[i % len(colors)]]))
    return out

  writers = {
      "aqua": lambda r, it: tb._write_aqua(r, it, images="SemArt/Images"),
      "vqa_abstract": lambda r, it: tb._write_vqa(r, it, abstract=True),
      "vizwiz": lambda r, it: tb._write_vizwiz(r, it, annotations="Annotations"),
      "coco_qa": tb._write_coco_qa,
      "gqa": tb._write_gqa,
  }
  for name, write in writers.items():
    ten = name in ("vqa_abstract", "vizwiz")  # ten answers per question in the VQA-style formats
    write(pathlib.Path(root) / name, (items(n_train, 0, ten), items(n_test, 0, ten)))
  return count


def child(args) -> None:
  """The run, timed phase by phase (this process imports no torch)."""
  import resource

  from feddat_jax import config_utils, experiment, reporting
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import xla_costs  # the child's own peak memory, not its parent's
  times = {"evaluations": []}
  load_data, evaluator = experiment.load_data, experiment._evaluator

  def timed_load_data(config):
    t0 = time.perf_counter()
    out = load_data(config)
    times["data_prepare_and_read_s"] = time.perf_counter() - t0
    return out

  def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

  def timed_evaluator(r):
    evaluate = evaluator(r)
    times["canvas"] = list(r.data.image_hw)

    def wrapped(rounds_done, final=False):
      t0, c0 = time.perf_counter(), cpu()
      out = evaluate(rounds_done, final)
      times["evaluations"].append({"after_round": rounds_done, "seconds": time.perf_counter() - t0,
                                   "cpu_seconds": cpu() - c0})
      return out

    return wrapped

  from feddat_jax.federated import sharding
  build_round = sharding.Placement.build_round

  def timed_build_round(self, *a, **kw):
    round_fn = build_round(self, *a, **kw)

    def wrapped(*args):
      c0 = cpu()
      out = jax.block_until_ready(round_fn(*args))
      times["round_cpu"].append(cpu() - c0)
      return out

    return wrapped

  import jax
  times["round_cpu"] = []
  sharding.Placement.build_round = timed_build_round
  experiment.load_data, experiment._evaluator = timed_load_data, timed_evaluator
  config = config_utils.load_config(os.path.join(REPO, "configs", "vqa_vilt_b32.py")
                                    + f":ckpt={args.ckpt},data={args.data},benchmark=domain")
  config.rounds, config.local_steps, config.cohort_size = 2, args.local_steps, args.cohort
  config.eval_every, config.checkpoint_every, config.tfds_dir = 2, 0, args.tfds_dir
  config.client_parallelism = args.client_parallelism
  t0, c0 = time.perf_counter(), cpu()
  results = experiment.run(config, args.workdir)
  total, total_cpu = time.perf_counter() - t0, cpu() - c0
  rounds = [row["seconds"] for row in reporting.read_metrics(args.workdir) if row.get("kind") == "train"]
  out = {
      "canvas": times["canvas"], "image_preprocess": config.image_preprocess, "batch_size": config.batch_size,
      "cohort_size": config.cohort_size, "local_steps": config.local_steps, "clients": results["clients"],
      "train_examples": results["train_examples"],
      "data_prepare_and_read_s": round(times["data_prepare_and_read_s"], 1),
      "client_parallelism": config.client_parallelism,
      "round_s": [round(s, 1) for s in rounds], "evaluation_s": [round(e["seconds"], 1) for e in times["evaluations"]],
      "round_cpu_s": [round(c, 1) for c in times["round_cpu"]],
      "evaluation_cpu_s": [round(e["cpu_seconds"], 1) for e in times["evaluations"]],
      "run_total_s": round(total, 1), "run_total_cpu_s": round(total_cpu, 1),
      "load_average_1min_at_end": round(os.getloadavg()[0], 1), "peak_rss_mib": round(xla_costs.peak_rss_bytes() / 2**20),
  }
  print("CHILD_RESULT " + json.dumps(out), flush=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="", help="where to write ckpt/, data/, tfds/, run/ (default: a temp dir)")
  parser.add_argument("--orientation", choices=("mixed", "landscape"), default="mixed",
                      help="mixed: every other photo portrait (canvas 608x608); landscape: all 640x480 (384x608)")
  parser.add_argument("--train", type=int, default=8, help="train examples per dataset")
  parser.add_argument("--test", type=int, default=4, help="test examples per dataset")
  parser.add_argument("--cohort", type=int, default=2, help="clients per round (config cohort_size)")
  parser.add_argument("--local_steps", type=int, default=1, help="local steps per client per round")
  parser.add_argument("--client_parallelism", default="scan",
                      help="config client_parallelism; scan (default here): the cohort's clients one after the "
                           "other, exactly cohort x local_steps client-steps (auto picks lanes, whose fixed lane "
                           "length pads a sampled cohort of 2 one-step clients to 4 client-steps)")
  parser.add_argument("--json", action="store_true", help="print the figures as one JSON line last")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  for name in ("ckpt", "data", "tfds_dir", "workdir"):
    parser.add_argument(f"--{name}", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    child(args)
    return 0

  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  tmp = None
  if not args.out:
    tmp = tempfile.TemporaryDirectory(prefix="vilt_b32_round_")
  out = args.out or tmp.name
  ckpt, data = os.path.join(out, "ckpt"), os.path.join(out, "data")
  t0 = time.perf_counter()
  ckpt_info = write_checkpoint(ckpt)
  t_ckpt = time.perf_counter() - t0
  t0 = time.perf_counter()
  data_info = write_data(data, args.train, args.test, args.orientation)
  t_data = time.perf_counter() - t0
  print(f"wrote {ckpt} ({ckpt_info['layers']} layers, hidden {ckpt_info['hidden']}, vocab {ckpt_info['vocab_size']}: "
        f"{', '.join(ckpt_info['files'])}) in {t_ckpt:.1f}s; {data} ({data_info['images']} photos "
        f"{data_info['shapes']}) in {t_data:.1f}s", flush=True)
  cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--ckpt={ckpt}", f"--data={data}",
         f"--tfds_dir={os.path.join(out, 'tfds')}", f"--workdir={os.path.join(out, 'run')}",
         f"--cohort={args.cohort}", f"--local_steps={args.local_steps}",
         f"--client_parallelism={args.client_parallelism}"]
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  result = None
  for line in proc.stdout.splitlines():
    if line.startswith("CHILD_RESULT "):
      result = json.loads(line.removeprefix("CHILD_RESULT "))
    elif "Warning" not in line:
      print("  | " + line, flush=True)
  if tmp is not None:
    tmp.cleanup()
  if proc.returncode or result is None:
    print(f"FAILED: the run exited with {proc.returncode}")
    return 1
  result.update(orientation=args.orientation, photos=data_info["shapes"], write_checkpoint_s=round(t_ckpt, 1),
                write_data_s=round(t_data, 1))
  print(f"ViLT-B/32 FedDAT on domain ({len(result['clients'])} clients, cohort {result['cohort_size']}, batch "
        f"{result['batch_size']}, {result['local_steps']} local step(s)), images {result['image_preprocess']} on a "
        f"{result['canvas'][0]}x{result['canvas'][1]} canvas: data prepared in {result['data_prepare_and_read_s']}s; "
        f"evaluations {result['evaluation_s']} s (the first compiles); rounds {result['round_s']} s (the first "
        f"compiles); CPU time of the rounds {result['round_cpu_s']} s, of the evaluations {result['evaluation_cpu_s']} s; peak RSS {result['peak_rss_mib']} MiB; "
        f"load average at the end {result['load_average_1min_at_end']}")
  if args.json:
    print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
