"""Can the tiny ViLT see shapes? Single-object shape classification (7 shapes, chance 1/7) on the synthetic
benchmarks' images, as a probe of the image path:

  python benchmarks/shape_probe.py --out=docs/results/shape_probe.json

Modes (each on the same images, the text "[CLS] [SEP]"; P: the ViLT patch size, 16 in the tiny preset):
  scratch<P>:    the whole tiny ViLT trained on the labels (what the architecture can learn in `--steps` steps:
                 the pretraining budget of the default job);
  pretrained<P>: the tiny foundation model (the default job's before the shipped mini one; `--config.patch_size=P`:
                 the one that setting uses; pretrained first if not cached), frozen, with a linear head on its pooled [CLS] and the
                 mean and max over its image-patch outputs (what MLM + ITM taught it; the max keeps what one
                 object's patches hold, which the mean over the whole image dilutes);
  random<P>:     the same with a randomly initialised frozen backbone.
Prints train and test accuracy every `--steps // 5` steps and writes the final ones as JSON.
"""
from __future__ import annotations

import json
import os
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from feddat_jax import config_utils, experiment, reporting
from feddat_jax.data import synthetic
from feddat_jax.data.tokenizer import SyntheticTokenizer
from feddat_jax.models import vilt

flags.DEFINE_list("modes", ["scratch16", "scratch8", "pretrained16", "pretrained8", "random16"],
                  "scratch<patch size>, pretrained<patch size>, random<patch size>.")
flags.DEFINE_integer("steps", 1500, "Training steps per mode (batch 64).")
flags.DEFINE_integer("train", 8192, "Training images.")
flags.DEFINE_integer("test", 1024, "Held-out images.")
flags.DEFINE_string("cache_dir", "~/.cache/feddat_jax/foundation", "Where the pretrained backbone is cached.")
flags.DEFINE_string("out", "", "Write the final accuracies here as JSON.")
FLAGS = flags.FLAGS
MODES = ("scratch", "pretrained", "random")  # each followed by a patch size
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "vqa.py")


def parse_mode(mode: str) -> tuple[str, int]:
  """"scratch16" -> ("scratch", 16); a one-line UsageError for anything else."""
  m = re.fullmatch(r"([a-z]+)(\d+)", mode)
  if not m or m[1] not in MODES or 64 % int(m[2]):
    raise app.UsageError(f"--modes: unknown mode {mode!r}; use scratch, pretrained or random followed by a patch "
                         "size that divides 64 (e.g. scratch16)")
  return m[1], int(m[2])


class Probe(nn.Module):
  """ViLT on "[CLS] [SEP]" + image -> shape logits from [pooled; mean and max of the image-patch outputs]."""
  cfg: vilt.ViltConfig

  @nn.compact
  def __call__(self, pixels):
    b, n_patches = pixels.shape[0], (self.cfg.image_size // self.cfg.patch_size) ** 2
    tok = SyntheticTokenizer()
    ids = jnp.tile(jnp.array([[tok.cls_token_id, tok.sep_token_id]], jnp.int32), (b, 1))
    out = vilt.ViLT(self.cfg, name="vilt")(ids, jnp.ones_like(ids), pixels.astype(jnp.float32) / 127.5 - 1.0,
                                           jnp.ones(pixels.shape[:3], bool))
    patches = out["last_hidden_state"][:, -n_patches:]
    feats = jnp.concatenate([out["pooler_output"], patches.mean(1), patches.max(1)], -1)
    return nn.Dense(len(synthetic.SHAPES), name="head")(feats)


def run_mode(mode: str, data, steps: int, log=print) -> dict:
  (x_tr, y_tr), (x_te, y_te) = data
  kind, patch = parse_mode(mode)
  # The tiny ViLT (the default job's before the mini one) through the job's backbone builder, so `pretrained` reuses
  # its cache entry (patch 0: the preset's).
  config = config_utils.load_config(CONFIG + (":size=tiny,backbone=pretrained" if kind == "pretrained" else
                                              ":size=tiny,backbone=random"))
  config.patch_size = 0 if patch == vilt.PRESETS["tiny"]["patch_size"] else patch
  config.pretrain.cache_dir = FLAGS.cache_dir
  cfg, backbone = experiment.build_backbone(config, SyntheticTokenizer(), num_images=1)
  model = Probe(cfg)
  params = model.init(jax.random.key(0), x_tr[:2])["params"]
  if backbone is not None:
    params = {**params, "vilt": backbone}
  train_all = kind == "scratch"  # frozen backbones: only the head trains
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 2e-3, max(1, steps // 10), max(2, steps)), b2=0.98,
                    weight_decay=0.01)
  trainable = params if train_all else params["head"]
  opt_state = opt.init(trainable)

  def loss_fn(trainable, x, y):
    p = trainable if train_all else {**params, "head": trainable}
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  @jax.jit
  def step(trainable, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, x, y)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  @jax.jit
  def accuracy(trainable, x, y):
    p = trainable if train_all else {**params, "head": trainable}
    return (model.apply({"params": p}, x).argmax(-1) == y).mean()

  rng = np.random.default_rng(1)
  t0 = time.perf_counter()
  result = {}
  for i in range(steps):
    idx = rng.integers(0, len(x_tr), 64)
    trainable, opt_state, loss = step(trainable, opt_state, x_tr[idx], y_tr[idx])
    if (i + 1) % max(1, steps // 5) == 0 or i + 1 == steps:
      result = dict(steps=i + 1, loss=float(loss), train_acc=float(accuracy(trainable, x_tr[:1024], y_tr[:1024])),
                    test_acc=float(accuracy(trainable, x_te, y_te)), seconds=time.perf_counter() - t0)
      log(f"{mode:>11} step {i + 1}/{steps}: loss {result['loss']:.3f}  train acc {result['train_acc']:.3f}  "
          f"test acc {result['test_acc']:.3f}  ({result['seconds']:.0f} s)")
  return result


def main(argv):
  del argv
  for mode in FLAGS.modes:
    parse_mode(mode)  # fail before building any data
  data = synthetic.shape_corpus(FLAGS.train, seed=0), synthetic.shape_corpus(FLAGS.test, seed=1)
  results = {"chance": 1 / len(synthetic.SHAPES), "steps": FLAGS.steps, "train": FLAGS.train, "test": FLAGS.test}
  for mode in FLAGS.modes:
    results[mode] = run_mode(mode, data, FLAGS.steps)
  print(json.dumps(results))
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    reporting.write_atomic(FLAGS.out, json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
