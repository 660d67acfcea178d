"""The jitted federated round: vmap over clients, scan over local steps, aggregate — one XLA program.

The clients may also run one after the other inside the program (`client_parallelism="scan"`, faster on CPU:
see CLIENT_PARALLELISM).

Data contract (from `feddat_jax.data.pipeline`): `batches` is a dict of arrays shaped [C, S, B, ...]
(input_ids, attention_mask, pixel_values, pixel_mask, targets, example_mask) plus the per-client constants
`answer_mask` [C, A] and, for answer-generating models, `answer_ids` [C, A, La] (PER_CLIENT);
`step_mask` bool [C, S] marks real steps (a client with less data does fewer; masked steps leave its state
untouched, fedjax's padding trick moved inside vmap + scan).

Cohorts: `cohort` int32 [C] holds the indices of this round's clients into the stacked client states [K, ...];
an index >= K is a dummy client (padding to a fixed cohort size: no state, no weight). Client states of
the cohort are gathered, updated and scattered back inside the program.

Example:
  >>> round_fn = build_round(algo)
  >>> server, clients, metrics = round_fn(frozen, server, clients, cohort, batches, step_mask, weights, rng)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from feddat_jax.federated.algorithms import base


# How a round runs its clients' local steps: "vmap" batches them (every op takes all clients at once: the
# choice for accelerators and for a mesh, where clients are sharded); "scan" runs them one after the other
# inside the same program (`lax.map`). Same results up to float rounding. On a CPU one client's batch already
# makes matmuls of 840 rows, so batching clients buys no arithmetic intensity, while the vmapped program's
# matmuls ran slower per FLOP (benchmarks/profile_round.py: XLA:CPU fuses its backward matmuls with the
# LayerNorm backward into large YNNPACK fusions, and every activation is C times larger); "scan" took 22-24%
# less time per FedDAT round at size small, C = 5, on 2 cores.
CLIENT_PARALLELISM = ("vmap", "scan")


def _check_parallelism(client_parallelism: str):
  if client_parallelism not in CLIENT_PARALLELISM:
    raise ValueError(f"unknown client_parallelism {client_parallelism!r}; use one of {CLIENT_PARALLELISM}")


def _gather(tree, cohort):
  return jax.tree_util.tree_map(lambda x: jnp.take(x, cohort, axis=0, mode="clip"), tree)


def _scatter(tree, cohort, new):
  return jax.tree_util.tree_map(lambda x, n: x.at[cohort].set(n, mode="drop"), tree, new)


PER_CLIENT = ("answer_mask", "answer_ids")  # batch keys shaped [C, ...] (constant over a client's steps)


def _per_step(batches):
  """Split the per-client constants [C, ...] (PER_CLIENT) from the per-step arrays [C, S, ...]."""
  batches = dict(batches)
  return batches, {k: batches.pop(k) for k in PER_CLIENT if k in batches}


def run_steps(algo: base.Algorithm, frozen, server, carry, batches, step_mask, constants, rng):
  """One client's local steps: scan `algo.step` over [S, ...] with masked steps leaving the carry untouched.

  constants: the client's PER_CLIENT arrays, added to every step's batch. Returns (carry, metric sums over
  real steps).
  """
  keys = jax.random.split(rng, step_mask.shape[0])

  def body(carry, xs):
    batch, real, key = xs
    new, metrics = algo.step(frozen, server, carry, {**batch, **constants}, key)
    return base.tree_where(real, new, carry), jax.tree_util.tree_map(lambda m: jnp.where(real, m, 0.0), metrics)

  carry, metrics = jax.lax.scan(body, carry, (batches, step_mask, keys))
  return carry, jax.tree_util.tree_map(lambda m: m.sum(0), metrics)


def _client_keys(rng, cohort):
  return jax.vmap(lambda c: jax.random.fold_in(rng, c))(cohort)


def begin_round(algo, frozen, server, clients, cohort, step_mask):
  """Carries [C, ...] of the cohort's clients at the start of a round."""
  num_steps = step_mask.sum(1).astype(jnp.int32)
  return jax.vmap(algo.begin, in_axes=(None, None, 0, 0))(frozen, server, _gather(clients, cohort), num_steps)


def chunk_round(algo, frozen, server, carries, batches, step_mask, rng, cohort, client_parallelism="vmap"):
  """Advance every client's carry by a chunk of local steps: batches [C, S_chunk, ...].

  client_parallelism: "vmap" (clients batched) or "scan" (one after the other); see CLIENT_PARALLELISM.
  """
  _check_parallelism(client_parallelism)
  batches, constants = _per_step(batches)
  client = functools.partial(run_steps, algo, frozen, server)
  xs = (carries, batches, step_mask, constants, _client_keys(rng, cohort))
  if client_parallelism == "scan":
    return jax.lax.map(lambda x: client(*x), xs)
  return jax.vmap(client)(*xs)


def upload_finite(uploads, num_clients: int):
  """bool [C]: every value of the client's upload is finite (no NaN or Inf)."""
  ok = jnp.ones((num_clients,), bool)
  for x in jax.tree_util.tree_leaves(uploads):
    ok = ok & jnp.isfinite(x).reshape(num_clients, -1).all(1)
  return ok


def end_round(algo, frozen, server, clients, cohort, carries, active, weights):
  """Uploads -> (aggregated server, clients, upload_finite bool [C]); the cohort's new client states are
  scattered back (inactive ones unchanged).

  Clients that count in the aggregate: active (reported: had steps; the host masks dropped-out clients' steps)
  with a finite upload, weighted by `weights`.
  """
  uploads, new = jax.vmap(algo.end, in_axes=(None, None, 0))(frozen, server, carries)
  # A non-finite upload is excluded as if its client had not reported: weight 0, client state unchanged, and
  # the upload zeroed so that 0 * NaN cannot reach any aggregate.
  finite = upload_finite(uploads, active.shape[0])
  active = active & finite
  uploads = jax.tree_util.tree_map(
      lambda x: jnp.where(finite.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x)), uploads)
  old = _gather(clients, cohort)
  new = jax.vmap(base.tree_where)(active, new, old)
  weights = jnp.where(active, weights, 0.0)
  return algo.aggregate(server, uploads, weights), _scatter(clients, cohort, new), finite


def _metrics(sums, step_mask):
  steps = step_mask.sum(1)
  means = jax.tree_util.tree_map(lambda s: s / jnp.maximum(steps, 1), sums)
  return {**means, "steps": steps}


def build_round(algo: base.Algorithm, donate: bool = True, client_parallelism: str = "vmap"):
  """round_fn(frozen, server, clients, cohort, batches, step_mask, weights, rng) -> (server, clients, metrics).

  weights [C]: aggregation weights (uniform as the reference, or example counts); 0 for dummy clients.
  client_parallelism: "vmap" or "scan" over the cohort's clients (CLIENT_PARALLELISM; centralized algorithms
  pool the clients' batches and ignore it).
  metrics: per-client means over real steps, [C] each, "steps" [C] and "upload_finite" bool [C] (False: the
  client's upload held NaN or Inf and was excluded, see end_round).
  """
  _check_parallelism(client_parallelism)
  if algo.centralized:
    return jax.jit(functools.partial(_pooled_round, algo), donate_argnums=(1, 2) if donate else ())

  def round_fn(frozen, server, clients, cohort, batches, step_mask, weights, rng):
    carries = begin_round(algo, frozen, server, clients, cohort, step_mask)
    carries, sums = chunk_round(algo, frozen, server, carries, batches, step_mask, rng, cohort, client_parallelism)
    server, clients, finite = end_round(algo, frozen, server, clients, cohort, carries, step_mask.any(1), weights)
    return server, clients, {**_metrics(sums, step_mask), "upload_finite": finite}

  return jax.jit(round_fn, donate_argnums=(1, 2) if donate else ())


def _pooled_round(algo, frozen, server, clients, cohort, batches, step_mask, weights, rng):
  """A centralized algorithm's round: step s trains on the pooled step-s batches of all clients."""
  del weights, rng
  batches, constants = _per_step(batches)
  cohort_clients = _gather(clients, cohort)
  steps_per_round = step_mask.sum(1).max()

  def body(state, xs):
    server, cohort_clients = state
    batch, real = xs  # [C, B, ...], [C]
    server, cohort_clients, loss = algo.pooled_step(frozen, server, cohort_clients,
                                                    {**batch, **constants}, real, steps_per_round)
    return (server, cohort_clients), jnp.where(real, loss, 0.0)

  swap = lambda x: jnp.swapaxes(x, 0, 1)  # scan over steps: [S, C, ...]
  (server, cohort_clients), loss = jax.lax.scan(
      body, (server, cohort_clients), (jax.tree_util.tree_map(swap, batches), swap(step_mask)))
  server = {**server, "round": server["round"] + 1}
  return server, _scatter(clients, cohort, cohort_clients), _metrics({"loss": loss.sum(0)}, step_mask)


class ChunkedRound:
  """The same round as `build_round`, for rounds whose data do not fit one call: feed chunks of steps.

  >>> chunked = ChunkedRound(algo)            # client_parallelism="scan": see CLIENT_PARALLELISM
  >>> carries = chunked.begin(frozen, server, clients, cohort, step_mask)
  >>> for i, (b, m) in enumerate(chunks):     # b: [C, S_chunk, ...], m: [C, S_chunk]
  ...   carries, sums = chunked.chunk(frozen, server, carries, b, m, jax.random.fold_in(rng, i), cohort)
  >>> server, clients, finite = chunked.end(frozen, server, clients, cohort, carries, step_mask.any(1), weights)

  `finite` is build_round's "upload_finite" [C]: False where a client's upload held NaN or Inf (excluded).
  """

  def __init__(self, algo: base.Algorithm, client_parallelism: str = "vmap"):
    _check_parallelism(client_parallelism)
    self.begin = jax.jit(functools.partial(begin_round, algo))
    self.chunk = jax.jit(functools.partial(chunk_round, algo, client_parallelism=client_parallelism),
                         donate_argnums=(2,))
    self.end = jax.jit(functools.partial(end_round, algo), donate_argnums=(1, 2, 4))


def build_eval(algo: base.Algorithm):
  """eval_fn(frozen, server, clients, cohort, batches, step_mask) -> {variant: (score_sum [C], count [C])}.

  score: the VQA score of each real example (the soft target of the argmax answer; accuracy for one-hot
  targets), summed over the client's eval batches.
  """

  def client_eval(frozen, server, client, batches, step_mask, constants):
    def body(acc, xs):
      batch, real = xs
      batch = {**batch, **constants}
      em = batch["example_mask"] * real
      scores = {v: (algo.model.scores(p.backbone, p.head, batch, p.adapter_weights) * em).sum()
                for v, p in algo.eval_params(frozen, server, client).items()}
      return jax.tree_util.tree_map(jnp.add, acc, scores), em.sum()

    zeros = {v: jnp.zeros((), jnp.float32) for v in algo.variants}
    sums, counts = jax.lax.scan(body, zeros, (batches, step_mask))
    return {v: (sums[v], counts.sum()) for v in algo.variants}

  def eval_fn(frozen, server, clients, cohort, batches, step_mask):
    batches, constants = _per_step(batches)
    return jax.vmap(client_eval, in_axes=(None, None, 0, 0, 0, 0))(
        frozen, server, _gather(clients, cohort), batches, step_mask, constants)

  return jax.jit(eval_fn)


def sample_cohort(seed: int, round_idx: int, num_clients: int, cohort_size: int | None) -> np.ndarray:
  """This round's client indices, reproducible from (seed, round); padded with dummies (index num_clients).

  cohort_size None or >= num_clients with no padding wanted: all clients, in order.
  """
  if cohort_size is None or cohort_size == num_clients:
    return np.arange(num_clients, dtype=np.int32)
  rng = np.random.default_rng([seed, round_idx])
  chosen = np.sort(rng.choice(num_clients, size=min(cohort_size, num_clients), replace=False))
  pad = np.full(max(cohort_size - num_clients, 0), num_clients)
  return np.concatenate([chosen, pad]).astype(np.int32)
