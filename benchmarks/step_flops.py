"""FLOPs of one local step, from XLA's cost analysis: FedDAT (one DAT pass) vs the reference's three passes
vs FedAvg with an adapter.

  python benchmarks/step_flops.py --size=small --batch=8

The reference step runs the DAT forward twice (teacher for A_S, then again for A_C's update) and A_S once:
three forwards and two backwards. FedDAT here keeps the first DAT pass's `jax.vjp`, since only the head
changes in between: two forwards and two backwards. Backwards through a frozen backbone compute input
gradients only (no weight gradients), so each costs about one forward.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from feddat_jax.federated import algorithms as registry
from feddat_jax.federated import optim
from feddat_jax.models import peft, vilt, vlm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xla_costs  # noqa: E402

flags.DEFINE_enum("size", "small", ["tiny", "small", "base"], "ViLT size preset.")
flags.DEFINE_integer("batch", 8, "Batch B.")
flags.DEFINE_integer("answers", 100, "Answer-head width A.")
flags.DEFINE_integer("text_len", 40, "Text tokens L.")
flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
FLAGS = flags.FLAGS


def step_flops(name: str, options: dict) -> float:
  cfg = vilt.ViltConfig.preset(FLAGS.size, vocab_size=1000, max_position_embeddings=max(40, FLAGS.text_len))
  model = vlm.VisionLanguageModel(cfg, peft.PeftConfig(registry.peft_method(name)), FLAGS.answers)
  algo = registry.make(name, model, optim.OptimConfig(), total_rounds=10, options=options)
  frozen, server, clients = algo.init(jax.random.key(0), 1)
  client = jax.tree_util.tree_map(lambda x: x[0], clients)
  rng = np.random.default_rng(0)
  b, s, a = FLAGS.batch, cfg.image_size, FLAGS.answers
  batch = {
      "input_ids": jnp.asarray(rng.integers(5, 1000, (b, FLAGS.text_len)), jnp.int32),
      "attention_mask": jnp.ones((b, FLAGS.text_len), jnp.int32),
      "pixel_values": jnp.asarray(rng.integers(0, 256, (b, 1, s, s, 3)), jnp.uint8),
      "pixel_mask": jnp.ones((b, 1, s, s), bool), "targets": jnp.zeros((b, a)),
      "example_mask": jnp.ones((b,)), "answer_mask": jnp.ones((a,)),
  }
  return xla_costs.step_flops(algo, frozen, server, client, batch)


def main(argv):
  del argv
  out = {"size": FLAGS.size, "batch": FLAGS.batch,
         "feddat_one_pass": step_flops("feddat", {}),
         "feddat_reference_three_pass": step_flops("feddat", {"single_pass_dat": False}),
         "fedavg_adapter": step_flops("fedavg_adapter", {})}
  out["one_pass_saving"] = 1 - out["feddat_one_pass"] / out["feddat_reference_three_pass"]
  print(f"one local step, size={FLAGS.size}, B={FLAGS.batch} (GFLOP, XLA cost analysis)")
  print(f"  FedDAT, one DAT pass (2 fwd + 2 bwd)        {out['feddat_one_pass'] / 1e9:8.2f}")
  print(f"  FedDAT, reference's passes (3 fwd + 2 bwd)  {out['feddat_reference_three_pass'] / 1e9:8.2f}")
  print(f"  FedAvg-adapter (1 fwd + 1 bwd)              {out['fedavg_adapter'] / 1e9:8.2f}")
  print(f"  one-pass DAT saves {100 * out['one_pass_saving']:.1f}% of the reference step's FLOPs")
  if FLAGS.json:
    print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
