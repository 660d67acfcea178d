"""Shared pieces of the federated tests: a tiny model, a learnable toy task, cached algorithms.

The toy task: each example's answer `a` is written twice into its input, as the question token `KEY + a`
at position 1 and as the image's colour, so a few AdamW steps lower the task loss for every PEFT method
(even "head", which only trains the answer head). Client `c` names answer `a` as label `(a + c) % A`, so the
clients' heads have to differ.

`setup(name, **options)` builds (once per test session) the algorithm, its initial states and its jitted
round and eval functions, so that the three federated test modules share every compiled program.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import os
import types

import jax
import jax.numpy as jnp
import numpy as np

from feddat_jax.federated import engine
from feddat_jax.federated import optim as optim_lib
from feddat_jax.federated import algorithms as registry
from feddat_jax.models import peft as peft_lib
from feddat_jax.models import vilt as vilt_lib
from feddat_jax.models import vlm as vlm_lib

C, S, B, L, A = 3, 3, 4, 8, 6  # clients, local steps, batch, text length, answers
VOCAB, IMAGE, KEY = 50, 32, 10  # vocabulary, image side, first key token
TOTAL_ROUNDS = 4
OPTIM = optim_lib.OptimConfig(lr=1e-3)
PALETTE = np.array([[220, 20, 20], [20, 220, 20], [20, 20, 220], [220, 220, 20], [20, 220, 220],
                    [220, 20, 220]], np.uint8)
# Options without which an algorithm could not learn the toy task in two rounds (server lr 1 is for SGD).
DEFAULT_OPTIONS = {}
PER_STEP = ("input_ids", "attention_mask", "pixel_values", "pixel_mask", "targets", "example_mask")


@contextlib.contextmanager
def fast_compile():
  """XLA with most optimisations off: these programs are tiny, compiling them is what takes time."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", old)


def tiny_model(method: str = "adapter") -> vlm_lib.VisionLanguageModel:
  cfg = vilt_lib.ViltConfig.preset("tiny", vocab_size=VOCAB, image_size=IMAGE, num_layers=1, hidden_size=32,
                                   mlp_dim=64)
  return vlm_lib.VisionLanguageModel(cfg, peft_lib.PeftConfig(method, reduction_factor=4, lora_rank=4,
                                                              prompt_length=2), A)


def toy_batches(seed: int, num_clients: int = C, steps: int = S, batch: int = B):
  """A round's learnable batches, [clients, steps, batch, ...] plus answer_mask [clients, A]."""
  rng = np.random.default_rng(seed)
  shape = (num_clients, steps, batch)
  answer = rng.integers(0, A, shape)
  ids = rng.integers(KEY + A, VOCAB, shape + (L,))
  ids[..., 0] = 1
  ids[..., 1] = KEY + answer
  noise = rng.integers(-20, 21, shape + (1, IMAGE, IMAGE, 3))
  pixels = np.clip(PALETTE[answer][..., None, None, None, :] + noise, 0, 255).astype(np.uint8)
  label = (answer + np.arange(num_clients)[:, None, None]) % A
  return {
      "input_ids": jnp.asarray(ids, jnp.int32),
      "attention_mask": jnp.ones(shape + (L,), jnp.int32),
      "pixel_values": jnp.asarray(pixels),
      "pixel_mask": jnp.ones(shape + (1, IMAGE, IMAGE), bool),
      "targets": jnp.asarray(np.eye(A)[label], jnp.float32),
      "example_mask": jnp.ones(shape, jnp.float32),
      "answer_mask": jnp.ones((num_clients, A), jnp.float32),
  }


def client_batches(batches, c):
  """Client c's per-step arrays [S, ...] and its answer mask [A]."""
  return {k: batches[k][c] for k in PER_STEP}, batches["answer_mask"][c]


def take(tree, i):
  return jax.tree_util.tree_map(lambda x: x[i], tree)


def stack(trees):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def leaves_equal(a, b) -> bool:
  """Bitwise equality of two pytrees of the same structure."""
  if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
    return False
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def assert_trees_close(a, b, atol, rtol=0.0):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  for (path, x), y in zip(flat_a, jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol,
                               err_msg=jax.tree_util.keystr(path))


def max_abs_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                            jax.tree_util.tree_leaves(b)))


def with_cohort(round_fn):
  """The round contract seen from stacked states: round(frozen, server, clients [K, ...], cohort [C], batches,
  step_mask, weights, rng) -> (server, clients [K, ...], metrics). It gathers the cohort's rows (a dummy,
  id >= K, gets the last client's row), runs `round_fn(frozen, server, rows, RoundInputs)` and scatters the
  rows back (dummies dropped): what the host store does in a run, done here with arrays."""
  def run(frozen, server, clients, cohort, batches, step_mask, weights, rng):
    cohort = jnp.asarray(cohort, jnp.int32)
    rows = jax.tree_util.tree_map(lambda x: jnp.take(x, cohort, axis=0, mode="clip"), clients)
    server, rows, metrics = round_fn(frozen, server, rows,
                                     engine.RoundInputs.make(cohort, batches, step_mask, weights, rng))
    clients = jax.tree_util.tree_map(lambda x, n: x.at[cohort].set(n, mode="drop"), clients, rows)
    return server, clients, metrics
  run.inner = round_fn
  return run


def eval_with_cohort(eval_fn):
  """eval(frozen, server, clients [K, ...], cohort, batches, step_mask) over eval_fn(frozen, server, rows, inputs)."""
  def run(frozen, server, clients, cohort, batches, step_mask):
    cohort = jnp.asarray(cohort, jnp.int32)
    rows = jax.tree_util.tree_map(lambda x: jnp.take(x, cohort, axis=0, mode="clip"), clients)
    return eval_fn(frozen, server, rows, engine.RoundInputs.make(cohort, batches, step_mask))
  return run


@functools.lru_cache(maxsize=None)
def _setup(name: str, options: tuple):
  family = name.partition("_")[0]
  opts = {**DEFAULT_OPTIONS.get(family, {}), **dict(options)}
  model = tiny_model(registry.peft_method(name))
  algo = registry.make(name, model, OPTIM, total_rounds=TOTAL_ROUNDS, options=opts)
  frozen, server, clients = algo.init(jax.random.key(0), C)
  ns = types.SimpleNamespace(name=name, model=model, algo=algo, frozen=frozen, server=server, clients=clients,
                             round=with_cohort(engine.build_round(algo, donate=False)),
                             eval=eval_with_cohort(engine.build_eval(algo)))
  if not algo.centralized:
    ns.begin = jax.jit(algo.begin)
    ns.run_steps = jax.jit(functools.partial(engine.run_steps, algo))
    ns.end = jax.jit(algo.end)
    ns.aggregate = jax.jit(algo.aggregate)
    ns.step = jax.jit(algo.step)
  return ns


def setup(name: str, **options):
  """The algorithm `name` on the tiny model, with initial states and jitted functions (cached)."""
  return _setup(name, tuple(sorted(options.items())))


def client_loop(ns, server, clients, batches, step_mask, weights, rng):
  """The round done by hand: each client's begin / run_steps / end one at a time, then aggregate.

  Cohort = all clients in order. Returns (server, clients, uploads [C, ...], metric sums [C]).
  """
  uploads, new_clients, sums = [], [], []
  for c in range(step_mask.shape[0]):
    carry = ns.begin(ns.frozen, server, take(clients, c), step_mask[c].sum().astype(jnp.int32))
    per_step, answer_mask = client_batches(batches, c)
    carry, s = ns.run_steps(ns.frozen, server, carry, per_step, step_mask[c], {"answer_mask": answer_mask},
                            jax.random.fold_in(rng, c))
    upload, client = ns.end(ns.frozen, server, carry)
    uploads.append(upload)
    new_clients.append(client)
    sums.append(s)
  uploads = stack(uploads)
  return ns.aggregate(server, uploads, weights), stack(new_clients), uploads, stack(sums)


def flip_bytes(step_dir: str, count: int = 64) -> str:
  """Invert `count` bytes in the middle of the largest array file of an orbax checkpoint step (size unchanged)."""
  path = max(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  mid = len(data) // 2
  data[mid:mid + count] = bytes(b ^ 0xFF for b in data[mid:mid + count])
  with open(path, "wb") as f:
    f.write(data)
  return path


def load_script(name: str, folder: str = "benchmarks") -> types.ModuleType:
  """<folder>/<name>.py imported as a module (the scripts are not a package), for testing their functions."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f"_{name}", os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), folder, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
