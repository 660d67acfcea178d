"""data_loading=stream against memory: the default job's round time side by side, and host RSS against data size.

  python benchmarks/streaming.py --part=overlap --json
  python benchmarks/streaming.py --part=memory --examples=20000 --json     # and --examples=40000

overlap: the default job (`configs/vqa.py`, a random backbone) run round after round through the feeder's
prefetching iterator (`Feeder.rounds`, as `experiment._train` runs it: round r+1 is read, preprocessed and put on
the device in the background while round r computes), with its data in memory and streamed (grain's reader
threads over the array_record files; with the config's cache of preprocessed examples, and with none:
"stream:0"), in alternating blocks of --block rounds so machine noise hits every mode alike. Per mode: the median wall time from one round's start to the next's, the first round of each block left
out (nothing to overlap it with).

memory: a GQA folder as the dataset ships (`<imageId>.jpg` photos and `{train,val}_balanced_questions.json`)
with --examples training questions, each with its own --image_size square JPEG (smooth noise, about 18 KB
each), is built into array_record once (under --workdir), then a child process per loading mode reads it the
way a run does: the tokenizer and data of the real-data path, a Dirichlet population of --clients clients,
--rounds rounds of a cohort of --cohort clients x --local_steps steps of --batch_size examples at the model's
--model_size (the host side of a run: feeder, preprocessing, host-to-device transfer; the model's compute is
not run), then the evaluation of one cohort-sized block. Prints each child's peak RSS; `--modes=stream` skips the
in-memory child (at 384 x 384 it holds 442 KB per example: 8.8 GB at 20,000).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xla_costs  # noqa: E402

flags.DEFINE_enum("part", "overlap", ["overlap", "memory", "child"], "What to measure (child: internal).")
flags.DEFINE_string("config", "configs/vqa.py:backbone=random", "overlap: the job whose rounds are timed.")
flags.DEFINE_list("overlap_modes", ["memory", "stream", "stream:0"],
                  "overlap: memory | stream[:cache MiB] (stream alone: the config's stream_cache_mb); the first is "
                  "the reference.")
flags.DEFINE_integer("blocks", 3, "overlap: blocks per mode, alternating.")
flags.DEFINE_integer("block", 4, "overlap: rounds per block (the first of each block is not timed).")
flags.DEFINE_integer("examples", 20000, "memory: training questions in the written dataset.")
flags.DEFINE_integer("val_examples", 1000, "memory: validation questions (the same for every --examples).")
flags.DEFINE_integer("image_size", 384, "memory: side of the stored JPEG photos.")
flags.DEFINE_integer("model_size", 384, "memory: the model's input side (image_preprocess=square).")
flags.DEFINE_list("modes", ["stream", "memory"], "memory: the loading modes to run.")
flags.DEFINE_integer("clients", 20, "memory: Dirichlet clients cut from the dataset.")
flags.DEFINE_integer("cohort", 4, "memory: clients per round.")
flags.DEFINE_integer("rounds", 4, "memory: rounds read.")
flags.DEFINE_integer("local_steps", 4, "memory: local steps per client and round.")
flags.DEFINE_integer("batch_size", 8, "memory: examples per step.")
flags.DEFINE_string("workdir", "/tmp/feddat_streaming_bench", "memory: where the dataset is written and built.")
flags.DEFINE_string("mode", "stream", "child: the loading mode.")
flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
FLAGS = flags.FLAGS


def _peak_rss_mib() -> float:
  """This process's peak RSS, MiB (`xla_costs.peak_rss_bytes`: its own high-water mark, not the parent's)."""
  return xla_costs.peak_rss_bytes() / 2**20


def _rss_now_mib() -> dict[str, float]:
  """The process's resident memory now: anonymous (its own) and file-backed (mapped file pages, such as the
  array_record files' pages a reader touched: page cache the kernel can drop), MiB."""
  with open("/proc/self/status") as f:
    fields = dict(line.split(":", 1) for line in f)
  return {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}


# ------------------------------------------------------------------------------------------------ overlap


def overlap() -> dict:
  import jax

  from feddat_jax import config_utils, experiment
  from feddat_jax.data import pipeline
  from feddat_jax.federated import feeder as feeder_lib, sharding

  config = config_utils.load_config(FLAGS.config)
  datasets, tok = experiment.load_data(config)
  model, pretrained, image_size, _ = experiment.build_model(config, tok, max(d.num_images for d in datasets))
  algo = experiment.build_algorithm(config, model)
  placement = sharding.Placement()
  how = experiment.parallelism(config, placement)
  frozen, server, store = experiment.init_states(algo, config.seed, pretrained, len(datasets))
  frozen = placement.put_replicated(frozen)
  round_fn = placement.build_round(algo, donate=False, client_parallelism=how)
  feeds, setup_s = {}, {}
  for mode in FLAGS.overlap_modes:
    loading, _, cache = mode.partition(":")
    t = time.perf_counter()
    data = pipeline.FederatedData(datasets, tok, image_hw=(image_size,) * 2, text_len=config.text_len,
                                  batch_size=config.batch_size, num_answers=config.num_answers, seed=config.seed,
                                  loading=loading, cache_mb=float(cache or config.stream_cache_mb))
    setup_s[mode] = time.perf_counter() - t
    feeds[mode] = feeder_lib.Feeder(data, placement, seed=config.seed, cohort_size=config.cohort_size,
                                    local_epochs=config.local_epochs, lanes=config.lanes if how == "lanes" else 0)
  times = {m: [] for m in feeds}
  start = 0
  for _ in range(FLAGS.blocks):
    for mode, feed in feeds.items():
      last = None
      for rnd in feed.rounds(start, start + FLAGS.block):
        now = time.perf_counter()
        if last is not None and rnd.index > start + 1:  # the first interval holds the unoverlapped first read
          times[mode].append(now - last)
        last = now
        rows = placement.put_rows(store.gather(rnd.cohort), len(rnd.cohort))
        jax.block_until_ready(round_fn(frozen, placement.put_replicated(server), rows, rnd.inputs))
      times[mode].append(time.perf_counter() - last)
      start += FLAGS.block
  med = {m: statistics.median(t) for m, t in times.items()}
  base = FLAGS.overlap_modes[0]
  return {"part": "overlap", "config": FLAGS.config, "parallelism": how, "setup_s": setup_s,
          "round_s": med, "times": times, "vs_" + base: {m: t / med[base] for m, t in med.items()},
          "device": jax.devices()[0].device_kind, "cpus": os.cpu_count()}


# ------------------------------------------------------------------------------------------------ memory


def _write_gqa(root: str, n_train: int, n_val: int, size: int) -> None:
  """GQA as it unpacks: images/<imageId>.jpg and {train,val}_balanced_questions.json (one photo per question)."""
  import numpy as np
  from PIL import Image

  images = os.path.join(root, "images")
  os.makedirs(images, exist_ok=True)
  rng = np.random.default_rng(0)
  answers = [f"answer{i}" for i in range(50)]
  for split, n in (("train", n_train), ("val", n_val)):
    questions = {}
    for i in range(n):
      image_id = f"{split}{i}"
      path = os.path.join(images, f"{image_id}.jpg")
      if not os.path.exists(path):  # smooth colour noise (18 KB at 384): tfds's writer holds a split in memory
        small = rng.integers(0, 256, (size // 24, size // 24, 3), dtype=np.uint8)  # and needs TensorFlow past 1 GiB
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(path, quality=85)
      questions[f"{split}q{i}"] = dict(imageId=image_id, question=f"what is in picture {i % 97}?",
                                       answer=answers[int(rng.zipf(1.5)) % len(answers)])
    with open(os.path.join(root, f"{split}_balanced_questions.json"), "w") as f:
      json.dump(questions, f)


def child() -> dict:
  """One loading mode over the built dataset (run in its own process: its own peak RSS)."""
  import numpy as np

  from feddat_jax.data import builders, pipeline, tokenizer
  from feddat_jax.federated import feeder as feeder_lib, sharding

  t = time.perf_counter()
  tfds_dir, manual = _dirs()
  (client,) = builders.load_clients("gqa", tfds_dir, manual_dir=manual, config="full")
  rss_open = _peak_rss_mib()
  data = pipeline.FederatedData([client], tokenizer.SyntheticTokenizer(), image_hw=(FLAGS.model_size,) * 2,
                                text_len=40, batch_size=FLAGS.batch_size, num_answers=50, seed=0,
                                population=f"dirichlet:{FLAGS.clients}:0.5", loading=FLAGS.mode)
  setup_s = time.perf_counter() - t
  rss_setup, now_setup = _peak_rss_mib(), _rss_now_mib()
  feed = feeder_lib.Feeder(data, sharding.Placement(), seed=0, cohort_size=FLAGS.cohort,
                           local_steps=FLAGS.local_steps)
  t = time.perf_counter()
  examples = 0
  for rnd in feed.rounds(0, FLAGS.rounds):
    examples += int(np.asarray(rnd.inputs.batches["example_mask"]).sum())
  rounds_s = time.perf_counter() - t
  ids = feed.eval_ids(0, final=True)[:feed.size]
  for _, inputs in feed.eval_blocks(ids):
    examples += int(np.asarray(inputs.batches["example_mask"]).sum())
  return {"mode": FLAGS.mode, "examples": len(client.train), "val_examples": len(client.test),
          "clients": data.num_clients, "setup_s": setup_s, "rounds_s": rounds_s, "examples_read": examples,
          "peak_rss_mib": {"after_open": rss_open, "after_setup": rss_setup, "end": _peak_rss_mib()},
          "rss_now_mib": {"after_setup": now_setup, "end": _rss_now_mib()}}


def _dirs():
  tag = f"gqa{FLAGS.examples}x{FLAGS.image_size}"
  return os.path.join(FLAGS.workdir, tag, "tfds"), os.path.join(FLAGS.workdir, tag, "manual")


def memory() -> dict:
  tfds_dir, manual = _dirs()
  t = time.perf_counter()
  _write_gqa(os.path.join(manual, "gqa"), FLAGS.examples, FLAGS.val_examples, FLAGS.image_size)
  write_s = time.perf_counter() - t
  t = time.perf_counter()
  from feddat_jax.data import builders
  builders.load_clients("gqa", tfds_dir, manual_dir=manual, config="full")  # built once, in this process
  build_s = time.perf_counter() - t
  out = {"part": "memory", "examples": FLAGS.examples, "image_size": FLAGS.image_size, "write_s": write_s,
         "build_s": build_s, "children": {}}
  for mode in FLAGS.modes:
    args = [sys.executable, os.path.abspath(__file__), "--part=child", f"--mode={mode}", "--json"] + [
        f"--{k}={getattr(FLAGS, k)}" for k in ("examples", "val_examples", "image_size", "model_size", "clients",
                                               "cohort", "rounds", "local_steps", "batch_size", "workdir")]
    res = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if res.returncode:
      raise SystemExit(res.stderr[-3000:])
    out["children"][mode] = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"{mode}: {out['children'][mode]}", flush=True)
  return out


def main(argv):
  del argv
  out = {"overlap": overlap, "memory": memory, "child": child}[FLAGS.part]()
  if FLAGS.part != "child":
    print(json.dumps(out, indent=1) if not FLAGS.json else "")
  if FLAGS.json or FLAGS.part == "child":
    print(json.dumps(out))


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
