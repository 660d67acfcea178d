"""A population of K clients, a cohort of C per round, on D devices: device memory, host memory, compiles, time.

  python benchmarks/population.py --clients=10000 --cohort=16 --devices=8 --size=tiny --rounds=10 --json
  python benchmarks/population.py --clients=10000 --cohort=16 --devices=8 --size=base --abstract --json

Runs the real round of a run (feeder -> host client-state store -> `Placement.build_round` on a D-device mesh,
forced host devices on CPU) for R rounds of FedDAT. Client sizes come from a Dirichlet partition
(`dirichlet:K:ALPHA` of one dataset of K * --mean_size examples over --labels answer labels), so cohorts
differ in data size round to round; local work is one epoch capped at --max_steps steps of --batch examples.
The examples' contents are cut from a pool of --pool random examples (what the model reads does not change
memory or time; a pool keeps host memory independent of K, as streamed data would).

Prints `device_bytes_per_device` (arguments + temporaries of the compiled round, XLA's memory analysis per
device), `host_rss_mb` (peak RSS of this process), `store_bytes` (host bytes of the client-state store after
the rounds) beside `store_bytes_if_all_trained` (K rows), `compiles` (traces of the round over all rounds)
and `round_s` (median seconds per round after the first). --abstract compiles the round from abstract shapes
only (no weights, no training: base size fits any machine) and prints the memory figures.
With --json the last line printed is one JSON object.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

from absl import app, flags

flags.DEFINE_integer("clients", 1000, "Population size K.")
flags.DEFINE_integer("cohort", 16, "Clients per round C.")
flags.DEFINE_integer("devices", 8, "Devices of the mesh (forced host devices on CPU).")
flags.DEFINE_enum("size", "tiny", ["tiny", "small", "base"], "ViLT size preset.")
flags.DEFINE_integer("rounds", 10, "Rounds to run.")
flags.DEFINE_float("alpha", 0.5, "Dirichlet concentration of the partition (small: unequal, skewed clients).")
flags.DEFINE_integer("mean_size", 24, "Training examples per client on average.")
flags.DEFINE_integer("labels", 20, "Answer labels of the partitioned dataset.")
flags.DEFINE_integer("batch", 8, "Batch per client B.")
flags.DEFINE_integer("max_steps", 8, "Local steps per round at most (one epoch, capped).")
flags.DEFINE_integer("answers", 100, "Answer-head width A (3129 for VQA v2's answer space).")
flags.DEFINE_integer("pool", 256, "Distinct examples the clients' data are cut from.")
flags.DEFINE_bool("abstract", False, "Only compile the round from abstract shapes and print memory figures.")
flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
FLAGS = flags.FLAGS


def _population(num_clients, size, answers, tokenizer):
  """A FederatedData of K Dirichlet-sized clients over one dataset whose rows repeat a pool of random examples."""
  import numpy as np

  from feddat_jax.data import partition, pipeline, schema
  from feddat_jax.models import vilt

  class PooledData(pipeline.FederatedData):
    def __init__(self):  # the attributes FederatedData's methods read, without encoding K * mean_size examples
      rng = np.random.default_rng(0)
      n_train, n_test = num_clients * FLAGS.mean_size, num_clients * 2
      labels = lambda n: rng.integers(0, FLAGS.labels, n)
      self.parts = partition.partition(f"dirichlet:{num_clients}:{FLAGS.alpha}", [labels(n_train)],
                                       [labels(n_test)], seed=0)
      self.datasets = [schema.ClientData("pool", [], [], [str(i) for i in range(answers)])]
      self.names = [f"pool/{p.index}" for p in self.parts]
      self.dataset_of = np.zeros(num_clients, np.int32)
      self.num_examples = np.array([len(p.train) for p in self.parts], np.int64)
      self.num_test = np.array([len(p.test) for p in self.parts], np.int64)
      self.batch_size, self.seed, self.num_answers, self.num_images = FLAGS.batch, 0, answers, 1
      self.answer_mask, self.answer_ids = np.ones((1, answers), np.float32), None
      s, n, text_len = vilt.PRESETS[size]["image_size"], FLAGS.pool, 40
      pool = {
          "input_ids": rng.integers(5, tokenizer.vocab_size, (n, text_len)).astype(np.int32),
          "attention_mask": np.ones((n, text_len), np.int32),
          "pixel_values": rng.integers(0, 256, (n, 1, s, s, 3)).astype(np.uint8),
          "pixel_mask": np.ones((n, 1, s, s), bool),
          "targets": np.eye(answers, dtype=np.float32)[rng.integers(0, answers, n)],
      }
      self._cache = [{"train": pool, "test": pool}]

    def _rows(self, part, split, positions):
      return getattr(part, split)[positions] % FLAGS.pool

  return PooledData()


def main(argv):
  del argv
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={FLAGS.devices}").strip()
  import jax

  from feddat_jax.data import tokenizer as tokenizer_lib
  from feddat_jax.federated import algorithms as registry
  from feddat_jax.federated import engine, optim, sharding
  from feddat_jax.models import peft, vilt, vlm

  if jax.device_count() < FLAGS.devices:
    sys.exit(f"error: {jax.device_count()} devices visible, --devices={FLAGS.devices} asked")
  tok = tokenizer_lib.SyntheticTokenizer()
  cfg = vilt.ViltConfig.preset(FLAGS.size, vocab_size=tok.vocab_size, max_position_embeddings=40)
  model = vlm.VisionLanguageModel(cfg, peft.PeftConfig("adapter"), FLAGS.answers)
  algo = registry.make("feddat", model, optim.OptimConfig(), total_rounds=FLAGS.rounds)
  placement = sharding.Placement(sharding.make_mesh(devices=jax.devices()[:FLAGS.devices]))
  traces = []

  def counted(*args):
    traces.append(1)  # runs once per trace, i.e. per compiled program
    return engine.round_fn_for(algo)(*args)

  round_fn = placement.jit(counted, donate=(1,))
  out = {"clients": FLAGS.clients, "cohort": FLAGS.cohort, "devices": FLAGS.devices, "size": FLAGS.size,
         "answers": FLAGS.answers, "batch": FLAGS.batch, "max_steps": FLAGS.max_steps,
         "device": jax.devices()[0].device_kind}

  if FLAGS.abstract:
    _abstract(out, algo, placement, round_fn, cfg)
  else:
    _run(out, algo, placement, round_fn, tok, traces)
  out["host_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  for k, v in out.items():
    print(f"{k:>28}: {v}")
  if FLAGS.json:
    print(json.dumps(out))


def _memory(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.temp_size_in_bytes)


def _run(out, algo, placement, round_fn, tok, traces):
  import jax
  import numpy as np
  from tqdm import tqdm

  from feddat_jax import experiment
  from feddat_jax.federated import feeder as feeder_lib
  t = time.perf_counter()
  data = _population(FLAGS.clients, FLAGS.size, FLAGS.answers, tok)
  feed = feeder_lib.Feeder(data, placement, seed=0, cohort_size=FLAGS.cohort, max_local_steps=FLAGS.max_steps)
  frozen, server, store = experiment.init_states(algo, 0, None, FLAGS.clients)
  frozen, server = placement.put_replicated((frozen, server))
  out["setup_s"] = time.perf_counter() - t
  out["client_examples_min_median_max"] = [int(data.num_examples.min()), int(np.median(data.num_examples)),
                                           int(data.num_examples.max())]
  times, real_steps = [], []
  for rnd in tqdm(feed.rounds(0, FLAGS.rounds), total=FLAGS.rounds, desc="rounds", file=sys.stderr):
    t = time.perf_counter()
    rows = placement.put_rows(store.gather(placement.hosted(rnd.cohort)), len(rnd.cohort))
    if rnd.index == 0:
      out["device_bytes_per_device"] = _memory(round_fn.lower(frozen, server, rows, rnd.inputs).compile())
    server, rows, metrics = round_fn(frozen, server, rows, rnd.inputs)
    store.scatter(rnd.cohort, jax.device_get(rows))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
    real_steps.append(int(np.asarray(rnd.inputs.step_mask).sum()))
  out["compiles"] = len(traces)
  out["cohort_real_steps_per_round"] = real_steps
  out["steps_per_round_program"] = feed.buckets[-1] * feed.size
  out["round_s"] = statistics.median(times[1:]) if len(times) > 1 else times[0]
  out["first_round_s"] = times[0]
  out["store_rows"] = len(store)
  out["store_bytes"] = store.nbytes()
  out["store_bytes_if_all_trained"] = store.row_bytes() * FLAGS.clients


def _abstract(out, algo, placement, round_fn, cfg):
  """The round compiled from ShapeDtypeStructs: what one device holds for a cohort of C."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from feddat_jax.federated import engine
  c, s, b, a, l = placement.padded_size(FLAGS.cohort), FLAGS.max_steps, FLAGS.batch, FLAGS.answers, 40
  h = cfg.image_size
  frozen, server, clients = jax.eval_shape(lambda k: algo.init(k, 1), jax.random.key(0))
  rep, cl = placement.replicated, placement.by_client
  spec = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  frozen, server = jax.tree_util.tree_map(lambda x: spec(x.shape, x.dtype, rep), (frozen, server))
  rows = jax.tree_util.tree_map(lambda x: spec((c,) + x.shape[1:], x.dtype, cl), clients)
  batches = {"input_ids": spec((c, s, b, l), jnp.int32, cl), "attention_mask": spec((c, s, b, l), jnp.int32, cl),
             "pixel_values": spec((c, s, b, 1, h, h, 3), jnp.uint8, cl),
             "pixel_mask": spec((c, s, b, 1, h, h), jnp.bool_, cl), "targets": spec((c, s, b, a), jnp.float32, cl),
             "example_mask": spec((c, s, b), jnp.float32, cl)}
  inputs = engine.RoundInputs(spec((c,), jnp.int32, cl), batches, {"answer_mask": spec((c, a), jnp.float32, cl)},
                              spec((c, s), jnp.bool_, cl), spec((c,), jnp.float32, cl), spec((2,), jnp.uint32, rep))
  t = time.perf_counter()
  compiled = round_fn.lower(frozen, server, rows, inputs).compile()
  out["compile_s"] = time.perf_counter() - t
  m = compiled.memory_analysis()
  out["device_bytes_per_device"] = int(m.argument_size_in_bytes + m.temp_size_in_bytes)
  out["argument_bytes_per_device"] = int(m.argument_size_in_bytes)
  out["temp_bytes_per_device"] = int(m.temp_size_in_bytes)
  out["frozen_backbone_bytes"] = int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(frozen)))
  row = int(sum(np.prod(x.shape[1:]) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(clients)))
  out["client_state_bytes"] = row
  out["store_bytes_if_all_trained"] = row * FLAGS.clients


if __name__ == "__main__":
  app.run(main)
