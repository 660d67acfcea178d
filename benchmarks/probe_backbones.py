r"""Do a backbone's frozen image features carry what the twins ask about? Linear probes (issue #19, item 2):

  python benchmarks/probe_backbones.py --out=docs/results/probe_backbones

For each backbone and each probe of `synthetic.PROBES` (the shape or the colour of one object, the number of
objects, one object's quadrant; images in the shape benchmarks' styles, disjoint from every benchmark and from
the pretraining captions), the backbone runs frozen on "[CLS] [SEP]" + image, and a linear softmax classifier
is trained on its pooled output beside the mean and the max of its image-patch outputs (the max keeps what one
object's patches hold, which the mean over the image dilutes) and their mean over each quadrant of the patch
grid (where things are), the features standardised on the training images. Test accuracy on held-out images is reported beside the majority class's share.

Backbones: <size> (`backbone=pretrained`: the shipped weights where there are some, else pretrained here and
cached) or <size>_random (the same architecture, randomly initialised): mini is the default job's backbone,
tiny the one it used before. Writes <out>.json and <out>.md (the command at the top).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from feddat_jax import config_utils, experiment, reporting
from feddat_jax.data import synthetic
from feddat_jax.data.tokenizer import SyntheticTokenizer
from feddat_jax.models import vilt

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags, defined only when run as a script (so importing this module, as its tests do,
  adds no global absl flags that could clash with another module's)."""
  flags.DEFINE_list("backbones", ["mini", "mini_random", "tiny"], "<size> (pretrained) or <size>_random.")
  flags.DEFINE_list("probes", list(synthetic.PROBES), "Probes (synthetic.PROBES).")
  flags.DEFINE_integer("train", 4096, "Training images per probe.")
  flags.DEFINE_integer("test", 1024, "Held-out images per probe.")
  flags.DEFINE_integer("steps", 1000, "Full-batch Adam steps of the linear classifier.")
  flags.DEFINE_string("cache_dir", "~/.cache/feddat_jax/foundation", "Where backbones pretrained here are cached.")
  flags.DEFINE_string("out", "", "Write <out>.json and <out>.md.")
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "vqa.py")


def parse_backbone(spec: str) -> tuple[str, bool]:
  """"mini" -> ("mini", True); "tiny_random" -> ("tiny", False); a one-line UsageError otherwise."""
  size, _, rest = spec.partition("_")
  if size not in vilt.PRESETS or size == "base" or rest not in ("", "random"):
    raise app.UsageError(f"--backbones: unknown backbone {spec!r}; use tiny, mini or small, optionally followed by "
                         "_random")
  return size, rest == ""


def load_backbone(spec: str, cache_dir: str):
  """-> (ViltConfig, params) of the frozen backbone `spec`."""
  size, pretrained = parse_backbone(spec)
  config = config_utils.load_config(f"{CONFIG}:size={size},backbone={'pretrained' if pretrained else 'random'}")
  config.pretrain.cache_dir = cache_dir
  cfg, params = experiment.build_backbone(config, SyntheticTokenizer(), num_images=1)
  if params is None:
    s = cfg.image_size
    params = vilt.ViLT(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32),
                                 jnp.zeros((1, s, s, 3)), jnp.ones((1, s, s), bool))["params"]
  return cfg, params


def features(cfg, params, images: np.ndarray, batch: int = 256) -> np.ndarray:
  """float32 [N, 7 * hidden]: [pooled; mean and max of the image-patch outputs; their mean over each quadrant of
  the patch grid] of the frozen backbone."""
  tok = SyntheticTokenizer()
  n_patches = (cfg.image_size // cfg.patch_size) ** 2

  @jax.jit
  def run(pixels):
    b = pixels.shape[0]
    ids = jnp.tile(jnp.array([[tok.cls_token_id, tok.sep_token_id]], jnp.int32), (b, 1))
    if pixels.shape[1] != cfg.image_size:
      pixels = jax.image.resize(pixels.astype(jnp.float32), (b, cfg.image_size, cfg.image_size, 3), "linear")
    out = vilt.ViLT(cfg).apply({"params": params}, ids, jnp.ones_like(ids),
                               pixels.astype(jnp.float32) / 127.5 - 1.0, jnp.ones((b, cfg.image_size, cfg.image_size),
                                                                                  bool))
    g = cfg.image_size // cfg.patch_size
    patches = out["last_hidden_state"][:, -n_patches:]
    quads = patches.reshape(b, 2, g // 2, 2, g // 2, -1).mean((2, 4)).reshape(b, -1)
    return jnp.concatenate([out["pooler_output"], patches.mean(1), patches.max(1), quads], -1)

  pad = -len(images) % batch
  padded = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
  return np.concatenate([np.asarray(run(padded[i:i + batch])) for i in range(0, len(padded), batch)])[:len(images)]


def linear_probe(f_tr, y_tr, f_te, y_te, classes: int, steps: int) -> dict:
  """A softmax classifier on standardised features, full-batch Adam with a little weight decay."""
  mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
  x_tr, x_te = jnp.asarray((f_tr - mu) / sd), jnp.asarray((f_te - mu) / sd)
  params = dict(w=jnp.zeros((f_tr.shape[1], classes)), b=jnp.zeros(classes))
  opt = optax.adamw(1e-2, weight_decay=1e-3)
  logits = lambda p, x: x @ p["w"] + p["b"]

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(
        lambda p: optax.softmax_cross_entropy_with_integer_labels(logits(p, x_tr), y_tr).mean())(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state = opt.init(params)
  for _ in range(steps):
    params, state, loss = step(params, state)
  acc = lambda x, y: float((logits(params, x).argmax(-1) == y).mean())
  return dict(train_acc=acc(x_tr, y_tr), test_acc=acc(x_te, y_te), loss=float(loss))


def to_markdown(results: dict, command: str) -> str:
  probes, specs = results["probes"], results["backbones"]
  lines = [f"```bash\n{command}\n```", "",
           f"Linear probes on frozen features, {results['train']} training and {results['test']} held-out images per "
           "probe; test accuracy (majority class: the share of the most frequent test label).", "",
           "| probe | classes | majority class | " + " | ".join(specs) + " |",
           "|---|---|---|" + "---|" * len(specs)]
  for p in probes:
    r = results["results"][p]
    lines.append(f"| {p} | {len(synthetic.PROBES[p])} | {r['majority']:.3f} | "
                 + " | ".join(f"{r[s]['test_acc']:.3f}" for s in specs) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  for spec in FLAGS.backbones:
    parse_backbone(spec)
  unknown = [p for p in FLAGS.probes if p not in synthetic.PROBES]
  if unknown:
    raise app.UsageError(f"--probes: unknown probe(s) {unknown}; use some of {','.join(synthetic.PROBES)}")
  command = "python benchmarks/probe_backbones.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  cache_dir = os.path.expanduser(FLAGS.cache_dir)
  data = {p: (synthetic.probe_corpus(FLAGS.train, p, seed=0), synthetic.probe_corpus(FLAGS.test, p, seed=1))
          for p in FLAGS.probes}
  results = dict(command=command, train=FLAGS.train, test=FLAGS.test, steps=FLAGS.steps, probes=FLAGS.probes,
                 backbones=FLAGS.backbones,
                 results={p: dict(majority=float(np.bincount(te[1]).max() / len(te[1]))) for p, (_, te) in data.items()})
  for spec in FLAGS.backbones:
    t0 = time.perf_counter()
    cfg, params = load_backbone(spec, cache_dir)
    for p, ((x_tr, y_tr), (x_te, y_te)) in data.items():
      r = linear_probe(features(cfg, params, x_tr), y_tr, features(cfg, params, x_te), y_te,
                       len(synthetic.PROBES[p]), FLAGS.steps)
      results["results"][p][spec] = r
      print(f"{spec:>12} {p:>9}: test acc {r['test_acc']:.3f} (train {r['train_acc']:.3f}, majority "
            f"{results['results'][p]['majority']:.3f})", flush=True)
    print(f"{spec}: {time.perf_counter() - t0:.0f} s", flush=True)
  print(to_markdown(results, command))
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)) or ".", exist_ok=True)
    reporting.write_atomic(FLAGS.out + ".json", json.dumps(results, indent=1))
    reporting.write_atomic(FLAGS.out + ".md", "# Linear probes of frozen backbones\n\n" + to_markdown(results, command))


if __name__ == "__main__":
  define_flags()
  app.run(main)
