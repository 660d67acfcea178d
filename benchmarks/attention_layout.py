"""Attention as `layers.MultiHeadAttention` computes it, beside the layout it replaced, under vmap over clients.

  python benchmarks/attention_layout.py --size=small --clients=5 --batch=8 --json

The previous layout kept the heads after the tokens ([B, T, h, d/h], einsums "bqhd,bkhd->bhqk" and
"bhqk,bkhd->bqhd") and divided the [B, h, Tq, Tk] scores by sqrt(d/h). The current one moves the heads next
to the batch ([B, h, T, d/h]) and scales the queries. Both run on the same random queries, keys and values
(the tokens a ViLT of --size sees: --text_len text tokens and one image's patches plus its class token), vmapped
over --clients as in a round, jitted; the forward alone and the gradient with respect to q, k, v are timed
(median of --repeats calls, the two layouts interleaved so machine noise hits both). The outputs are checked
equal to float rounding first.
"""
from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from feddat_jax.models import layers, vilt

flags.DEFINE_enum("size", "small", ["tiny", "small", "base"], "ViLT size preset.")
flags.DEFINE_integer("clients", 5, "Clients vmapped over.")
flags.DEFINE_integer("batch", 8, "Batch per client B.")
flags.DEFINE_integer("text_len", 40, "Text tokens.")
flags.DEFINE_integer("repeats", 20, "Timed calls per layout.")
flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
FLAGS = flags.FLAGS


def heads_last(q, k, v, bias, heads):
  """The previous layout: heads after the tokens, the scores divided."""
  split = lambda t: t.reshape(t.shape[:-1] + (heads, t.shape[-1] // heads))
  scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / jnp.sqrt(q.shape[-1] // heads)
  probs = jax.nn.softmax(scores + bias, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, split(v)).reshape(q.shape)


def main(argv):
  del argv
  cfg = vilt.ViltConfig.preset(FLAGS.size)
  heads, d = cfg.num_heads, cfg.hidden_size
  tokens = FLAGS.text_len + (cfg.image_size // cfg.patch_size)**2 + 1
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((FLAGS.clients, FLAGS.batch, tokens, d)), jnp.float32)
  bias = jnp.zeros((FLAGS.clients, FLAGS.batch, 1, 1, tokens), jnp.float32)

  # Both layouts behind the same random query / key / value projections of x.
  module = layers.MultiHeadAttention(d, heads)
  params = module.init(jax.random.key(0), x[0], x[0], bias[0], False)
  p = params["params"]
  project = lambda name, t: t @ p[name]["kernel"] + p[name]["bias"]
  ours = lambda x, bias: module.apply(params, x, x, bias, False)
  before = lambda x, bias: heads_last(project("query", x), project("key", x), project("value", x), bias, heads)

  programs = {}
  for name, f in (("heads_last", before), ("current", ours)):
    fwd = jax.jit(jax.vmap(f))
    grad = jax.jit(jax.grad(lambda x, bias, f=f: (jax.vmap(f)(x, bias)**2).sum()))
    programs[name] = (fwd, grad)
  diff = float(jnp.abs(programs["current"][0](x, bias) - programs["heads_last"][0](x, bias)).max())
  if diff > 1e-4:
    raise SystemExit(f"the two layouts disagree (max |diff| {diff:.2e}): fix layers.MultiHeadAttention first")

  times = {name: {"forward": [], "grad": []} for name in programs}
  for name, (fwd, grad) in programs.items():
    jax.block_until_ready((fwd(x, bias), grad(x, bias)))
  for _ in range(FLAGS.repeats):
    for name, (fwd, grad) in programs.items():
      for kind, fn in (("forward", fwd), ("grad", grad)):
        t = time.perf_counter()
        jax.block_until_ready(fn(x, bias))
        times[name][kind].append(time.perf_counter() - t)

  out = {"size": FLAGS.size, "clients": FLAGS.clients, "batch": FLAGS.batch, "tokens": tokens, "heads": heads,
         "max_abs_diff": diff}
  for name in programs:
    for kind in ("forward", "grad"):
      out[f"{name}_{kind}_ms"] = 1e3 * statistics.median(times[name][kind])
  for kind in ("forward", "grad"):
    out[f"{kind}_speedup"] = out[f"heads_last_{kind}_ms"] / out[f"current_{kind}_ms"]
  print(f"attention, size={FLAGS.size} ({tokens} tokens, {heads} heads), vmapped over C={FLAGS.clients}, "
        f"B={FLAGS.batch}; median of {FLAGS.repeats} (max |diff| {diff:.1e})")
  for kind in ("forward", "grad"):
    print(f"  {kind:8s} heads last {out[f'heads_last_{kind}_ms']:8.2f} ms   heads by the batch "
          f"{out[f'current_{kind}_ms']:8.2f} ms   {out[f'{kind}_speedup']:.2f}x")
  if FLAGS.json:
    print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
