"""Server-side aggregation of client uploads stacked on a leading clients axis.

Every aggregator here takes (uploads, weights, current[, ...]): uploads a pytree of [C, ...], weights [C] with
0 for clients that do not count (dummies, dropped, non-finite uploads; their values are ignored, whatever they
hold), current the server's pytree of [...], returned unchanged when no client counts.

`make(name, **params)` gives the one function an algorithm's `aggregate` calls on its shared parameters,
    aggregator(uploads, weights, current, round_idx) -> new,
chosen by config (`c.aggregator`):
- "mean": the weighted mean (FedAvg; the default, exactly `weighted_mean`);
- "median": coordinate-wise weighted median;
- "trimmed_mean": coordinate-wise mean after trimming `trim_fraction` of the weight at each end;
- "norm_bounded_mean": each client's update (upload - current) clipped to L2 norm `max_norm`, then averaged;
- "dp_mean": DP-FedAvg (McMahan et al. 2018): updates clipped to `clip_norm`, Gaussian noise of std
  `noise_multiplier * clip_norm` added to their sum, divided by the number of counted clients; the noise key is
  derived from (seed, round_idx), so a resumed run draws the same noise.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

NAMES = ("mean", "median", "trimmed_mean", "norm_bounded_mean", "dp_mean")
# Salt of the DP noise stream, so that it never coincides with the training stream fold_in(key(seed), round).
_DP_STREAM = 0x0D9

Aggregator = Callable[..., object]  # (uploads, weights, current, round_idx) -> new


def weighted_mean(uploads, weights, fallback):
  """sum_c w_c x_c / sum_c w_c over the clients axis; `fallback` where all weights are zero.

  uploads: pytree of [C, ...]; weights: [C] (0 for dummy or absent clients); fallback: pytree of [...].
  """
  total = weights.sum()
  w = weights / jnp.maximum(total, 1e-12)

  def mean(x, old):
    new = jnp.tensordot(w.astype(x.dtype), x, axes=1)
    return jnp.where(total > 0, new, old)

  return jax.tree_util.tree_map(mean, uploads, fallback)


def _per_client(v, x):
  """[C] -> [C, 1, ..., 1], broadcastable against x [C, ...]."""
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _zero_absent(uploads, weights):
  """uploads with the values of weight-0 clients replaced by 0 (they may be NaN or Inf)."""
  return jax.tree_util.tree_map(lambda x: jnp.where(_per_client(weights > 0, x), x, jnp.zeros_like(x)), uploads)


def _sorted_with_weights(x, weights):
  """x [C, ...] sorted along clients per coordinate, with each value's weight and the cumulative weight.

  Values of weight-0 clients are replaced by 0 first (they may be NaN); they sort somewhere but carry no weight.
  """
  x = _zero_absent(x, weights)
  order = jnp.argsort(x, axis=0)
  xs = jnp.take_along_axis(x, order, axis=0)
  ws = jnp.take_along_axis(jnp.broadcast_to(_per_client(weights, x), x.shape), order, axis=0).astype(jnp.float32)
  return xs, ws, jnp.cumsum(ws, axis=0)


def coordinate_median(uploads, weights, fallback):
  """Per coordinate, the weighted median of the counted clients' values (the mean of the two middle ones when
  the weight splits exactly in half, as the ordinary median of an even count)."""
  total = weights.sum()

  def median(x, old):
    xs, _, cum = _sorted_with_weights(x, weights)
    half = total / 2
    # First positions where the cumulative weight reaches / passes half; both land on counted clients.
    lo = jnp.argmax(cum >= half, axis=0)[None]
    hi = jnp.argmax(cum > half, axis=0)[None]
    new = 0.5 * (jnp.take_along_axis(xs, lo, 0)[0] + jnp.take_along_axis(xs, hi, 0)[0])
    return jnp.where(total > 0, new.astype(x.dtype), old)

  return jax.tree_util.tree_map(median, uploads, fallback)


def trimmed_mean(uploads, weights, fallback, trim_fraction: float = 0.1):
  """Per coordinate, the weighted mean of the values left after removing `trim_fraction` of the total weight
  from each end (fractional weights at the cut); with 5 equal clients and 0.2: drop the min and the max."""
  if not 0 <= trim_fraction < 0.5:
    raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
  total = weights.sum()
  lo, hi = trim_fraction * total, (1 - trim_fraction) * total

  def mean(x, old):
    xs, ws, cum = _sorted_with_weights(x, weights)
    kept = jnp.clip(cum, lo, hi) - jnp.clip(cum - ws, lo, hi)  # each value's weight inside [lo, hi]
    new = (kept * jnp.where(kept > 0, xs, 0)).sum(0) / jnp.maximum(hi - lo, 1e-12)
    return jnp.where(total > 0, new.astype(x.dtype), old)

  return jax.tree_util.tree_map(mean, uploads, fallback)


def _deltas(uploads, current, weights):
  """Client updates (upload - current), zero for weight-0 clients (whose uploads may be NaN)."""
  def delta(x, c):
    return jnp.where(_per_client(weights > 0, x), x - c[None], jnp.zeros_like(x))
  return jax.tree_util.tree_map(delta, uploads, current)


def update_norms(deltas):
  """deltas: pytree of [C, ...] -> [C], each client's L2 norm over the whole tree."""
  sq = [jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
        for x in jax.tree_util.tree_leaves(deltas)]
  return jnp.sqrt(sum(sq))


def clip_updates(deltas, max_norm: float):
  """Scale each client's update so its L2 norm (over the whole tree) is at most max_norm."""
  scale = jnp.minimum(1.0, max_norm / jnp.maximum(update_norms(deltas), 1e-12))
  return jax.tree_util.tree_map(lambda x: x * _per_client(scale, x).astype(x.dtype), deltas)


def norm_bounded_mean(uploads, weights, current, max_norm: float = 1.0):
  """current + weighted mean of the updates, each clipped to L2 norm max_norm (bounds any one client's pull)."""
  clipped = clip_updates(_deltas(uploads, current, weights), max_norm)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, current)
  mean = weighted_mean(clipped, weights, zeros)
  return jax.tree_util.tree_map(lambda c, m: c + m, current, mean)


def dp_mean(uploads, weights, current, key, clip_norm: float = 1.0, noise_multiplier: float = 1.0):
  """DP-FedAvg's server step: current + (sum of clipped updates + N(0, (noise_multiplier * clip_norm)^2)) / n.

  Every counted client (weight > 0) contributes one clipped update whatever its weight (weights would change
  the sensitivity); n is the number of counted clients. clip_norm <= 0: no clipping (only with no noise).
  Nothing is released, and no noise drawn, when no client counts.
  """
  counted = (weights > 0).astype(jnp.float32)
  deltas = _deltas(uploads, current, weights)
  if clip_norm > 0:
    deltas = clip_updates(deltas, clip_norm)
  n = counted.sum()
  leaves, treedef = jax.tree_util.tree_flatten(current)
  keys = jax.random.split(key, len(leaves))
  std = noise_multiplier * max(clip_norm, 0.0)

  def step(c, d, k):
    total = jnp.tensordot(counted.astype(d.dtype), d, axes=1)
    if std > 0:
      total = total + std * jax.random.normal(k, c.shape, c.dtype)
    return jnp.where(n > 0, c + total / jnp.maximum(n, 1.0).astype(c.dtype), c)

  new = [step(c, d, k) for c, d, k in zip(leaves, treedef.flatten_up_to(deltas), keys)]
  return jax.tree_util.tree_unflatten(treedef, new)


def mean(uploads, weights, current, round_idx):
  """The default aggregator: `weighted_mean`, with weight-0 clients' values zeroed first (0 * NaN is NaN);
  the same numbers as `weighted_mean` wherever that is finite. round_idx: unused."""
  del round_idx
  return weighted_mean(_zero_absent(uploads, weights), weights, current)


def make(name: str = "mean", *, trim_fraction: float = 0.1, max_norm: float = 1.0, clip_norm: float = 1.0,
         noise_multiplier: float = 0.0, seed: int = 0) -> Aggregator:
  """The aggregator `name` with its parameters: (uploads, weights, current, round_idx) -> new."""
  if name == "mean":
    return mean
  if name == "median":
    return lambda u, w, c, r: coordinate_median(u, w, c)
  if name == "trimmed_mean":
    if not 0 <= trim_fraction < 0.5:
      raise ValueError(f"trimmed_mean: trim_fraction must be in [0, 0.5), got {trim_fraction}")
    return lambda u, w, c, r: trimmed_mean(u, w, c, trim_fraction)
  if name == "norm_bounded_mean":
    if max_norm <= 0:
      raise ValueError(f"norm_bounded_mean: max_norm must be > 0, got {max_norm}")
    return lambda u, w, c, r: norm_bounded_mean(u, w, c, max_norm)
  if name == "dp_mean":
    if noise_multiplier < 0:
      raise ValueError(f"dp_mean: noise_multiplier must be >= 0, got {noise_multiplier}")
    if noise_multiplier > 0 and clip_norm <= 0:
      raise ValueError("dp_mean: noise needs a clip norm > 0 (the noise is calibrated to it)")
    return functools.partial(_dp, seed=seed, clip_norm=clip_norm, noise_multiplier=noise_multiplier)
  raise ValueError(f"unknown aggregator {name!r}; use one of {NAMES}")


def noise_key(seed: int, round_idx):
  """The DP noise key of a round: a function of (seed, round) only."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _DP_STREAM), round_idx)


def _dp(uploads, weights, current, round_idx, *, seed, clip_norm, noise_multiplier):
  return dp_mean(uploads, weights, current, noise_key(seed, round_idx), clip_norm, noise_multiplier)


def with_quorum(aggregate, min_clients: int):
  """An algorithm's aggregate(server, uploads, weights) that treats a round with fewer than `min_clients`
  counted clients (weight > 0) as one where nobody reported: every algorithm then leaves its server
  parameters (and server optimiser) unchanged, and only the round counter advances."""
  if min_clients <= 1:
    return aggregate

  def gated(server, uploads, weights):
    quorum = (weights > 0).sum() >= min_clients
    return aggregate(server, uploads, jnp.where(quorum, weights, jnp.zeros_like(weights)))

  return gated
