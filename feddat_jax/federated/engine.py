"""The jitted federated round: lanes of clients, scan over local steps, aggregate — one XLA program.

The round contract. A round takes the cohort's client states as rows and one typed input:

  round_fn(frozen, server, rows, inputs) -> (server, rows, metrics)

- `rows`: the cohort's client states, every leaf shaped [C, ...] (the client-state store on the host gathers
  them; dummy positions hold any valid row, usually the initial one, and their output is discarded);
- `inputs`: a `RoundInputs` (below): cohort ids, per-step arrays [C, S, B, ...], per-client constants [C, ...],
  the step mask [C, S] (masked steps leave a client's state untouched: fedjax's padding trick moved inside the
  program), aggregation weights [C] (0 for dummies and dropped clients) and the round's raw RNG key data.

Nothing in the program is shaped by the population size K: device memory depends on the cohort C only.
How the clients of a cohort run (`client_parallelism`): "vmap" batches them (every op takes all clients at
once: the choice for accelerators and for a mesh, where clients are sharded); "scan" runs them one after the
other inside the same program (`lax.map`). Same results up to float rounding; BENCHMARKS.md has the timings.

Example:
  >>> round_fn = build_round(algo)
  >>> server, rows, metrics = round_fn(frozen, server, rows, inputs)
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from feddat_jax.federated.algorithms import base

CLIENT_PARALLELISM = ("vmap", "scan", "lanes")
PER_CLIENT = ("answer_mask", "answer_ids")  # batch keys shaped [C, ...] (constant over a client's steps)


@struct.dataclass
class RoundInputs:
  """Everything a round (or an evaluation block) reads besides the states; every leaf but `rng` is [C, ...].

  cohort: int32 [C], the clients' ids in the population (>= K: a dummy), used for the per-client RNG streams;
  batches: {name: [C, S, B, ...]} per-step arrays (see feddat_jax.data.pipeline); constants: {name: [C, ...]}
  per-client arrays added to every step's batch (PER_CLIENT); step_mask: bool [C, S]; weights: float32 [C]
  aggregation weights (0: not counted); rng: uint32 raw key data (`jax.random.key_data`), shared by the cohort.
  """
  cohort: Any
  batches: Any
  constants: Any
  step_mask: Any
  weights: Any
  rng: Any
  schedule: Any = None  # lanes: {"slot", "step", "first", "last"} int/bool [L, T] (see `lane_schedule`)

  @classmethod
  def make(cls, cohort, batches, step_mask, weights=None, rng=None, schedule=None):
    """From a batch dict that may still hold the PER_CLIENT constants (the data pipeline's layout)."""
    batches = dict(batches)
    constants = {k: batches.pop(k) for k in PER_CLIENT if k in batches}
    weights = np.zeros(len(cohort), np.float32) if weights is None else weights
    rng = jax.random.key(0) if rng is None else rng
    if jnp.issubdtype(getattr(rng, "dtype", np.uint32), jax.dtypes.prng_key):
      rng = jax.random.key_data(rng)
    return cls(cohort, batches, constants, step_mask, weights, rng, schedule)

  @classmethod
  def shardings(cls, by_client, replicated) -> "RoundInputs":
    """A prefix of any RoundInputs for `jax.jit(in_shardings=...)`: `by_client` on every [C, ...] field,
    `replicated` on the RNG and the lane schedule."""
    return cls(by_client, by_client, by_client, by_client, by_client, replicated, replicated)

  @property
  def key(self):
    return jax.random.wrap_key_data(self.rng)


def _check_parallelism(client_parallelism: str):
  if client_parallelism not in CLIENT_PARALLELISM:
    raise ValueError(f"unknown client_parallelism {client_parallelism!r}; use one of {CLIENT_PARALLELISM}")


def resolve_parallelism(choice: str, num_shards: int = 1) -> str:
  """`choice`, or for "auto" the measured best per backend: lanes on a CPU whose clients axis is one device
  (BENCHMARKS.md, the default job's round), vmap otherwise (clients sharded over several devices; GPUs and
  TPUs, where batching clients fills the chip)."""
  if choice != "auto":
    return choice
  return "lanes" if num_shards == 1 and jax.default_backend() == "cpu" else "vmap"


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


def upload_finite(uploads, num_clients: int):
  """bool [C]: every value of the client's upload is finite (no NaN or Inf)."""
  ok = jnp.ones((num_clients,), bool)
  for x in jax.tree_util.tree_leaves(uploads):
    ok = ok & jnp.isfinite(x).reshape(num_clients, -1).all(1)
  return ok


def _client_round(algo, frozen, server, rows, inputs: RoundInputs, client_parallelism: str):
  """Every cohort client's begin / scanned steps / end -> (uploads [C, ...], new rows [C, ...], metric sums)."""
  keys = jax.vmap(lambda c: jax.random.fold_in(inputs.key, c))(inputs.cohort)

  def client(row, batches, step_mask, constants, key):
    carry = algo.begin(frozen, server, row, step_mask.sum().astype(jnp.int32))
    carry, sums = run_steps(algo, frozen, server, carry, batches, step_mask, constants, key)
    upload, new = algo.end(frozen, server, carry)
    return upload, new, sums

  xs = (rows, inputs.batches, inputs.step_mask, inputs.constants, keys)
  if client_parallelism == "scan":
    return jax.lax.map(lambda x: client(*x), xs)
  return jax.vmap(client)(*xs)


def _lane_map(f, in_axes=0, *, num_lanes: int):
  """`jax.vmap(f, in_axes)` over the lanes; for one lane, f itself on the lane's values (the lane axis sliced off
  and put back), so that one lane runs the same ops as one client's scan: XLA:CPU ran a vmapped lane of one
  slower, its reductions most (BENCHMARKS.md, "One lane is one client's scan")."""
  if num_lanes > 1:
    return jax.vmap(f, in_axes=in_axes)

  def one_lane(*args):
    axes = in_axes if isinstance(in_axes, tuple) else (in_axes,) * len(args)
    args = [a if ax is None else jax.tree_util.tree_map(lambda x: x[0], a) for a, ax in zip(args, axes)]
    return jax.tree_util.tree_map(lambda x: x[None], f(*args))

  return one_lane


def _lane_round(algo, frozen, server, rows, inputs: RoundInputs):
  """The cohort's clients packed into L lanes (`inputs.schedule`, [L, T]): the lanes run vmapped, each its clients
  back to back in one scan of T steps. At a client's first step its carry begins from its row, at its last its
  upload and new row are written to the [C, ...] outputs. Same results as `_client_round` (per-client steps,
  keys and step counts are the same) without the masked steps of smaller clients."""
  sched, c_total = inputs.schedule, inputs.step_mask.shape[0]
  lane_map = functools.partial(_lane_map, num_lanes=sched["slot"].shape[0])
  num_steps = inputs.step_mask.sum(1).astype(jnp.int32)
  client_keys = jax.vmap(lambda c: jax.random.split(jax.random.fold_in(inputs.key, c),
                                                    inputs.step_mask.shape[1]))(inputs.cohort)
  take = lambda tree, idx: jax.tree_util.tree_map(lambda x: x[idx], tree)
  begin = lane_map(algo.begin, in_axes=(None, None, 0, 0))
  first = jnp.minimum(sched["slot"][:, 0], c_total - 1)
  carry = begin(frozen, server, take(rows, first), num_steps[first])
  upload_like = jax.eval_shape(lambda c: algo.end(frozen, server, c)[0], take(carry, 0))
  uploads = jax.tree_util.tree_map(lambda x: jnp.zeros((c_total,) + x.shape, x.dtype), upload_like)
  sums = jax.tree_util.tree_map(lambda x: jnp.zeros((c_total,), x.dtype), jax.eval_shape(
      lambda c: algo.step(frozen, server, c, {**take(take(inputs.batches, 0), 0), **take(inputs.constants, 0)},
                          client_keys[0, 0])[1], take(carry, 0)))

  def body(state, xs):
    carry, new_rows, uploads, sums = state
    slot, step, starts, ends = xs  # [L] each; slot == C: the lane is idle at this step
    c = jnp.minimum(slot, c_total - 1)
    carry = lane_map(base.tree_where)(starts, begin(frozen, server, take(rows, c), num_steps[c]), carry)
    batch = {**jax.tree_util.tree_map(lambda x: x[c, step], inputs.batches), **take(inputs.constants, c)}
    new, metrics = lane_map(algo.step, in_axes=(None, None, 0, 0, 0))(frozen, server, carry, batch,
                                                                       client_keys[c, step])
    real = (slot < c_total) & inputs.step_mask[c, step]
    carry = lane_map(base.tree_where)(real, new, carry)
    sums = jax.tree_util.tree_map(lambda s, m: s.at[jnp.where(real, slot, c_total)].add(m, mode="drop"), sums,
                                  metrics)
    upload, row = lane_map(algo.end, in_axes=(None, None, 0))(frozen, server, carry)
    out = jnp.where(ends & (slot < c_total), slot, c_total)  # index C: dropped by the scatter
    put = lambda buf, x: buf.at[out].set(x, mode="drop")
    return (carry, jax.tree_util.tree_map(put, new_rows, row), jax.tree_util.tree_map(put, uploads, upload),
            sums), None

  xs = tuple(jnp.swapaxes(sched[k], 0, 1) for k in ("slot", "step", "first", "last"))  # scan over T: [T, L]
  (_, new_rows, uploads, sums), _ = jax.lax.scan(body, (carry, rows, uploads, sums), xs)
  return uploads, new_rows, sums


def lane_schedule(step_mask, num_lanes: int, length=None) -> dict[str, np.ndarray]:
  """Host side: pack the cohort's clients (their real steps: step_mask bool [C, S]) into `num_lanes` lanes of
  `length` steps: an int, the shortest of a sequence of lengths that fits (the compiled lane buckets), or None
  for exactly the longest lane.

  Balanced bin-packing (`pack_lanes`); in a lane, larger clients first. Returns {"slot": the client (cohort
  position; C: idle), "step": its step index into S, "first"/"last": its first/last step}, each
  [num_lanes, length]. A ValueError if they do not fit (`length` must be >= `lane_length(...)`).
  """
  step_mask = np.asarray(step_mask, bool)
  c = step_mask.shape[0]
  steps = step_mask.sum(1)
  lane_of = pack_lanes(steps, num_lanes)
  need = _longest_lane(steps, lane_of, num_lanes)
  if length is None:
    length = need
  elif not isinstance(length, (int, np.integer)):
    length = min((int(t) for t in length if t >= need), default=max(length, default=0))
  if need > length:
    raise ValueError(f"clients of {steps.tolist()} steps do not fit {num_lanes} lanes of {length} steps")
  out = {"slot": np.full((num_lanes, length), c, np.int32), "step": np.zeros((num_lanes, length), np.int32),
         "first": np.zeros((num_lanes, length), bool), "last": np.zeros((num_lanes, length), bool)}
  load = np.zeros(num_lanes, np.int64)
  for client in sorted(np.flatnonzero(steps > 0), key=lambda i: (-steps[i], i)):
    lane, n = lane_of[client], int(steps[client])
    start = int(load[lane])
    out["slot"][lane, start:start + n] = client
    out["step"][lane, start:start + n] = np.flatnonzero(step_mask[client])
    out["first"][lane, start], out["last"][lane, start + n - 1] = True, True
    load[lane] += n
  return out


def pack_lanes(steps, num_lanes: int, search: bool = True) -> np.ndarray:
  """The lane of every client (int [C]; -1 for a client without steps) in a packing of `steps` (int [C]) that
  keeps the longest lane short: largest first onto the least loaded lane (LPT), then, while one exists, a move of
  a client off the longest lane, or a swap of it with a smaller client of another lane, that leaves both lanes
  shorter than the longest was. LPT alone can be far from the best split: the default job's 113 / 94 / 75 / 57 /
  44 steps make lanes of 213 and 170 steps (90% real) where 195 and 188 exist (98%), which one swap finds.
  Each change lowers the longest lane or the number of lanes that long, so the search ends, never above LPT;
  it stops early at the lower bound (the mean load rounded up, or the largest client). `search=False`: LPT only
  (what `auto_lanes` weighs large cohorts by; the search can take a second per packing of a thousand clients)."""
  steps = np.asarray(steps, np.int64)
  lane_of = np.full(len(steps), -1, np.int64)
  load = np.zeros(num_lanes, np.int64)
  order = sorted(np.flatnonzero(steps > 0), key=lambda i: (-steps[i], i))
  for i in order:
    lane_of[i] = int(np.argmin(load))
    load[lane_of[i]] += steps[i]

  def improve() -> bool:
    top = int(np.argmax(load))
    members = [[] for _ in range(num_lanes)]
    for i in order:
      members[lane_of[i]].append(int(i))
    for i in members[top]:
      for lane in range(num_lanes):
        room = load[top] - load[lane]  # a change of delta steps helps if 0 < delta < room
        if lane == top or room <= 1:
          continue
        for j in [None] + members[lane]:
          delta = steps[i] - (0 if j is None else steps[j])
          if 0 < delta < room:
            lane_of[i], load[top], load[lane] = lane, load[top] - delta, load[lane] + delta
            if j is not None:
              lane_of[j] = top
            return True
    return False

  best = max(-(-int(steps.sum()) // num_lanes), int(steps.max(initial=0)))  # no packing has a shorter lane
  while search and load.max() > best and improve():
    pass
  return lane_of


# Per-client step work (batch x tokens x hidden^2 x layers) from which one client's step fills this project's
# 2-core CPU, so clients best run one after the other (lanes = 1); below it, more lanes batch more clients per
# step. Measured (BENCHMARKS.md, "How many lanes"): tiny ViLT (7.5e6 at B = 16, 3.7e6 at B = 8) runs fastest
# with the most lanes that stay >= 95% real; small (2.2e8 at B = 8) with one lane.
ONE_LANE_WORK = 4e7
# The largest cohort `auto_lanes` weighs by `pack_lanes`' full search (larger ones: by largest first).
SEARCHED_COHORT = 64


def step_work(batch_size: int, tokens: int, hidden: int, layers: int) -> float:
  """A proxy of one client's step cost for `auto_lanes`: batch x tokens x hidden^2 x layers."""
  return float(batch_size) * tokens * hidden**2 * layers


def model_step_work(model, batch_size: int, text_len: int) -> float:
  """`step_work` of a model's step: its text tokens plus every image's patches and class token. Models
  without a ViLT backbone (ALBEF, base size only) count as heavy (`ONE_LANE_WORK`)."""
  cfg = getattr(model, "vilt", None)
  if cfg is None:
    return ONE_LANE_WORK
  tokens = text_len + model.num_images * ((cfg.image_size // cfg.patch_size)**2 + 1)
  return step_work(batch_size, tokens, cfg.hidden_size, cfg.num_layers)


def auto_lanes(steps, cohort_size: int, work: float, min_real: float = 0.95) -> int:
  """The lanes a CPU round runs (config `lanes=0`): one when a client's step is heavy enough to fill the CPU
  (`work >= ONE_LANE_WORK`); else the most lanes whose packing keeps at least `min_real` of the client-steps
  real: exactly for the whole population (`steps`: every client's steps) or clients of equal steps, by
  `lane_length_bound` for a cohort sampled from unequal clients (as `feeder.Feeder` sizes the lanes). Cohorts
  above `SEARCHED_COHORT` clients are weighed by largest-first packings (`pack_lanes(search=False)`, never
  shorter than the schedule's), which keeps this to seconds for a thousand clients."""
  steps = np.asarray(steps, np.int64)
  if work >= ONE_LANE_WORK or cohort_size <= 1:
    return 1
  real = steps.sum() if cohort_size >= len(steps) else cohort_size * steps.mean()
  best = 1
  for lanes in range(2, cohort_size + 1):
    if real < min_real * lanes * steps.max():  # no lane is shorter than the largest client
      continue
    length = exact_lane_length(steps, cohort_size, lanes, search=cohort_size <= SEARCHED_COHORT)
    if length is None:
      length = lane_length_bound(cohort_size, int(steps.max()), lanes)
    if real >= min_real * lanes * length:
      best = lanes
  return best


def exact_lane_length(steps, cohort_size: int, num_lanes: int, search: bool = True) -> int | None:
  """The longest lane of every cohort of `cohort_size` of the clients of `steps` (int: every client's steps)
  when it is the same for all: the whole population, or clients of equal steps (every cohort packs like any
  other); None when cohorts differ (`lane_length_bound` bounds them)."""
  steps = np.asarray(steps, np.int64)
  if cohort_size >= len(steps):
    return lane_length(steps, num_lanes, search)
  if steps.min() == steps.max():
    return lane_length(steps[:cohort_size], num_lanes, search)
  return None


def lane_length_bound(num_clients: int, max_steps: int, num_lanes: int) -> int:
  """The longest lane `lane_schedule` can make for any `num_clients` clients of at most `max_steps` steps: LPT
  puts the j-th client on the least loaded lane, whose integer load is at most the floor of the mean load of
  the j <= C - 1 clients before it, so no lane ends above (C - 1) * S // L + S (nor above C * S); the search
  after LPT (`pack_lanes`) only shortens the longest lane."""
  return min(num_clients * max_steps, (num_clients - 1) * max_steps // num_lanes + max_steps)


def lane_length(steps, num_lanes: int, search: bool = True) -> int:
  """The longest lane's steps when `lane_schedule` packs clients of `steps` (int [C]) real steps (`search`:
  `pack_lanes`')."""
  steps = np.asarray(steps, np.int64)
  return _longest_lane(steps, pack_lanes(steps, num_lanes, search), num_lanes)


def _longest_lane(steps, lane_of, num_lanes: int) -> int:
  return int(max(steps[lane_of == lane].sum() for lane in range(num_lanes)))


def reporting_clients(uploads, inputs: RoundInputs):
  """-> (finite, active), bool [C] each: the upload is finite; the client counts this round (it had real steps,
  which dropped clients do not, and its upload is finite)."""
  finite = upload_finite(uploads, inputs.weights.shape[0])
  return finite, inputs.step_mask.any(1) & finite


def aggregate_uploads(algo, server, rows, uploads, new, inputs: RoundInputs, finite, active):
  """-> (server, rows). The `active` clients (`reporting_clients`) count, weighted by `inputs.weights`. A
  non-finite upload is excluded as if its client had not reported: weight 0, its row unchanged, and the upload
  zeroed so that 0 * NaN cannot reach any aggregate."""
  uploads = jax.tree_util.tree_map(
      lambda x: jnp.where(finite.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x)), uploads)
  rows = jax.vmap(base.tree_where)(active, new, rows)
  return algo.aggregate(server, uploads, jnp.where(active, inputs.weights, 0.0)), rows


def client_drift(algo, server, uploads, counted, weights):
  """Client drift: each client's update delta_c = upload_c - sent (`algo.sent(server)`: the server state the
  round started from; flattened over all leaves) -> {"update_norm": ||delta_c||, "update_cosine": cos(delta_c,
  mean)}, float32 [C] each, with mean = sum_c w_c delta_c / sum_c w_c over the counted clients (`counted` bool
  [C], `weights` [C]): the round's aggregated update under the mean aggregator (with a robust aggregator or a
  server optimiser, still the clients' mean update). NaN for clients that do not count (dummies, dropped,
  non-finite uploads); the cosine is NaN where either norm is 0."""
  w = jnp.where(counted, weights, 0.0).astype(jnp.float32)
  w = w / jnp.maximum(w.sum(), 1e-12)
  sq = dot = mean_sq = 0.0
  for x, ref in zip(jax.tree_util.tree_leaves(uploads), jax.tree_util.tree_leaves(algo.sent(server))):
    delta = (x.astype(jnp.float32) - ref.astype(jnp.float32)).reshape(x.shape[0], -1)
    delta = jnp.where(counted[:, None], delta, 0.0)  # an excluded upload may hold NaN
    mean = w @ delta
    sq, dot, mean_sq = sq + (delta * delta).sum(1), dot + delta @ mean, mean_sq + mean @ mean
  norm = jnp.sqrt(sq)
  cosine = dot / (norm * jnp.sqrt(mean_sq))
  nan = jnp.full_like(norm, jnp.nan)
  return {"update_norm": jnp.where(counted, norm, nan), "update_cosine": jnp.where(counted, cosine, nan)}


def _metrics(sums, step_mask):
  steps = step_mask.sum(1)
  means = jax.tree_util.tree_map(lambda s: s / jnp.maximum(steps, 1), sums)
  return {**means, "steps": steps}


def round_fn_for(algo: base.Algorithm, client_parallelism: str = "vmap"):
  """The un-jitted round(frozen, server, rows, inputs) -> (server, rows, metrics) (see the module docstring).

  metrics: per-client means over real steps, [C] each, "steps" [C] and "upload_finite" bool [C] (False: the
  client's upload held NaN or Inf and was excluded); if `algo.sent` is set, the client drift "update_norm" and
  "update_cosine" [C] (`client_drift`). Centralized algorithms pool the clients' batches.
  """
  _check_parallelism(client_parallelism)
  if algo.centralized:
    return functools.partial(_pooled_round, algo)

  def round_fn(frozen, server, rows, inputs):
    uploads, new, sums = (_lane_round(algo, frozen, server, rows, inputs) if client_parallelism == "lanes" else
                          _client_round(algo, frozen, server, rows, inputs, client_parallelism))
    finite, active = reporting_clients(uploads, inputs)
    drift = {}
    if algo.sent is not None:  # from the server the clients started from, before aggregate replaces it
      drift = client_drift(algo, server, uploads, active & (inputs.weights > 0), inputs.weights)
    server, rows = aggregate_uploads(algo, server, rows, uploads, new, inputs, finite, active)
    return server, rows, {**_metrics(sums, inputs.step_mask), "upload_finite": finite, **drift}

  return round_fn


def build_round(algo: base.Algorithm, donate: bool = True, client_parallelism: str = "vmap"):
  """round_fn(frozen, server, rows, inputs) -> (server, rows, metrics), jitted on the default device (for
  tests and benchmarks; a run uses `sharding.Placement.build_round`, the same function on a mesh)."""
  return jax.jit(round_fn_for(algo, client_parallelism), donate_argnums=(1, 2) if donate else ())


def _pooled_round(algo, frozen, server, rows, inputs):
  """A centralized algorithm's round: step s trains on the pooled step-s batches of all clients."""
  step_mask = inputs.step_mask
  steps_per_round = step_mask.sum(1).max()

  def body(state, xs):
    server, rows = state
    batch, real = xs  # [C, B, ...], [C]
    server, rows, loss = algo.pooled_step(frozen, server, rows, {**batch, **inputs.constants}, real,
                                          steps_per_round)
    return (server, rows), jnp.where(real, loss, 0.0)

  swap = lambda x: jnp.swapaxes(x, 0, 1)  # scan over steps: [S, C, ...]
  (server, rows), loss = jax.lax.scan(
      body, (server, rows), (jax.tree_util.tree_map(swap, inputs.batches), swap(step_mask)))
  server = {**server, "round": server["round"] + 1}
  return server, rows, _metrics({"loss": loss.sum(0)}, step_mask)


def eval_fn_for(algo: base.Algorithm):
  """The un-jitted eval(frozen, server, rows, inputs) -> {variant: (score_sum [C], count [C])}.

  score: the VQA score of each real example (the soft target of the argmax answer; accuracy for one-hot
  targets), summed over the client's eval batches. inputs.weights and inputs.rng are not read.
  """

  def eval_fn(frozen, server, rows, inputs):
    def client_eval(row, batches, step_mask, constants):
      def body(acc, xs):
        batch, real = xs
        batch = {**batch, **constants}
        em = batch["example_mask"] * real
        scores = {v: (algo.model.scores(p.backbone, p.head, batch, p.adapter_weights) * em).sum()
                  for v, p in algo.eval_params(frozen, server, row).items()}
        return jax.tree_util.tree_map(jnp.add, acc, scores), em.sum()

      zeros = {v: jnp.zeros((), jnp.float32) for v in algo.variants}
      sums, counts = jax.lax.scan(body, zeros, (batches, step_mask))
      return {v: (sums[v], counts.sum()) for v in algo.variants}

    return jax.vmap(client_eval)(rows, inputs.batches, inputs.step_mask, inputs.constants)

  return eval_fn


def build_eval(algo: base.Algorithm):
  """eval_fn(frozen, server, rows, inputs), jitted on the default device (see eval_fn_for)."""
  return jax.jit(eval_fn_for(algo))
