"""Robust aggregation: exact values on small cases, weight-0 clients ignored, and one bad client out of five."""
import functools

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feddat_jax.federated import aggregators
from feddat_jax.federated import algorithms as registry

NAMES = ("mean", "median", "trimmed_mean", "norm_bounded_mean", "dp_mean")


def _agg(name, **params):
  return jax.jit(aggregators.make(name, **params))


def test_small_cases_match_numpy():
  """Coordinate-wise: median (odd and even counts), trimmed mean, weighted median, clipping."""
  x = jnp.array([[1.0, 10.0], [2.0, -5.0], [7.0, 0.0], [3.0, 1.0], [100.0, 2.0]])
  ones = jnp.ones(5)
  cur = jnp.zeros(2)
  np.testing.assert_allclose(_agg("median")(x, ones, cur, 0), np.median(x, 0))
  np.testing.assert_allclose(_agg("median")(x[:4], ones[:4], cur, 0), np.median(x[:4], 0))
  # Weights count like repetitions: client 4 with weight 5 of 8.5 holds the weighted median.
  w = jnp.array([1.0, 1.0, 1.0, 0.5, 5.0])
  np.testing.assert_allclose(_agg("median")(x, w, cur, 0), [100.0, 2.0])
  # 5 equal clients, trim 0.2: drop the min and the max of each coordinate.
  trimmed = np.sort(np.asarray(x), 0)[1:4].mean(0)
  np.testing.assert_allclose(_agg("trimmed_mean", trim_fraction=0.2)(x, ones, cur, 0), trimmed, rtol=1e-6)
  np.testing.assert_allclose(_agg("trimmed_mean", trim_fraction=0.0)(x, w, cur, 0),
                             aggregators.weighted_mean(x, w, cur), rtol=1e-6)
  # Norm bound 1: every update here is longer, so each becomes a unit vector.
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  np.testing.assert_allclose(_agg("norm_bounded_mean", max_norm=1.0)(x, ones, cur, 0), unit.mean(0), rtol=1e-6)


def test_default_is_the_weighted_mean():
  """aggregators.make() gives the weighted mean's numbers exactly, so existing runs are unchanged bit for bit."""
  rng = np.random.default_rng(0)
  tree = {"a": jnp.asarray(rng.normal(size=(4, 3, 5)), jnp.float32), "b": jnp.asarray(rng.normal(size=(4, 2)))}
  w = jnp.array([1.0, 0.0, 2.0, 0.5])
  cur = helpers.take(tree, 0)
  assert aggregators.make() is aggregators.mean
  assert helpers.leaves_equal(aggregators.make()(tree, w, cur, 3), aggregators.weighted_mean(tree, w, cur))


@pytest.mark.parametrize("name", NAMES)
def test_weight_zero_clients_are_ignored(name):
  """A weight-0 client (dummy, dropped, NaN upload) changes nothing, even holding NaN and Inf; none: unchanged."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  cur = jnp.asarray(rng.normal(size=6), jnp.float32)
  w = jnp.array([1.0, 2.0, 1.0, 1.0])
  params = {"noise_multiplier": 0.0, "clip_norm": 0.5} if name == "dp_mean" else {}
  agg = _agg(name, **params)
  base = agg(x, w, cur, 0)
  junk = jnp.array([np.nan, np.inf, -np.inf, 1e30, 0.0, 5.0])
  padded = agg(jnp.concatenate([x, junk[None]]), jnp.concatenate([w, jnp.zeros(1)]), cur, 0)
  np.testing.assert_allclose(padded, base, rtol=1e-6, atol=1e-7)
  assert np.all(np.isfinite(padded))
  np.testing.assert_array_equal(agg(x, jnp.zeros(4), cur, 0), cur)


def _adapter_tree():
  """The tiny model's adapter tree (the shared parameters FedAvg / FedDAT upload)."""
  ns = helpers.setup("fedavg_adapter")
  return ns, ns.server["shared"]


def _norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree))))


@pytest.mark.parametrize("attack", ["scaled", "random"])
def test_one_bad_client_of_five(attack):
  """Four honest clients move the adapter a little; the fifth sends its update x100 or random noise.

  Stated distance: per coordinate, the median and the 20%-trimmed mean of five values of which four are honest
  lie between the honest values, so their distance to the honest mean is at most the L2 norm of the honest
  per-coordinate range. The plain mean lands more than 5x that far away. Runs through the algorithm's
  aggregate (registry.make(..., aggregator=...)), i.e. what the jitted round calls.
  """
  ns, current = _adapter_tree()
  rng = np.random.default_rng(2)
  honest = [jax.tree_util.tree_map(lambda c: c + 0.01 * rng.normal(size=c.shape).astype(np.float32), current)
            for _ in range(4)]
  if attack == "scaled":
    bad = jax.tree_util.tree_map(lambda c, h: c + 100 * (h - c), current, honest[0])
  else:
    bad = jax.tree_util.tree_map(lambda c: c + rng.normal(size=c.shape).astype(np.float32), current)
  uploads = helpers.stack(honest + [bad])
  weights = jnp.ones(5)
  honest_mean = jax.tree_util.tree_map(lambda *h: sum(h) / 4, *honest)
  spread = _norm(jax.tree_util.tree_map(lambda *h: jnp.max(jnp.stack(h), 0) - jnp.min(jnp.stack(h), 0), *honest))

  def aggregated(name, **params):
    algo = registry.make("fedavg_adapter", ns.model, helpers.OPTIM, total_rounds=helpers.TOTAL_ROUNDS,
                         aggregator=aggregators.make(name, **params))
    server = jax.jit(algo.aggregate)(ns.server, {"shared": uploads}, weights)
    return _norm(jax.tree_util.tree_map(jnp.subtract, server["shared"], honest_mean))

  plain = aggregated("mean")
  median = aggregated("median")
  trimmed = aggregated("trimmed_mean", trim_fraction=0.2)
  assert median <= spread and trimmed <= spread, (median, trimmed, spread)
  assert plain > 5 * spread, (plain, spread)
  # The norm bound caps the bad client's pull at max_norm / 5 (honest updates are far shorter than 0.05).
  bounded = aggregated("norm_bounded_mean", max_norm=0.05)
  assert bounded <= 0.05 / 5 + spread, (bounded, spread)


def test_quorum_skips_the_round():
  """min_clients=3 with two counted clients: the server keeps its parameters; the round counter advances."""
  ns = helpers.setup("fedavg_adapter")
  algo = registry.make("fedavg_adapter", ns.model, helpers.OPTIM, total_rounds=helpers.TOTAL_ROUNDS, min_clients=3)
  moved = jax.tree_util.tree_map(lambda c: jnp.stack([c + 1.0] * 3), ns.server["shared"])
  aggregate = jax.jit(algo.aggregate)
  skipped = aggregate(ns.server, {"shared": moved}, jnp.array([1.0, 1.0, 0.0]))
  assert helpers.leaves_equal(skipped["shared"], ns.server["shared"])
  assert int(skipped["round"]) == int(ns.server["round"]) + 1
  done = aggregate(ns.server, {"shared": moved}, jnp.ones(3))
  helpers.assert_trees_close(done["shared"], jax.tree_util.tree_map(lambda c: c + 1.0, ns.server["shared"]),
                             atol=1e-6)


@functools.lru_cache(maxsize=None)
def _server_opt(name):
  ns = helpers.setup("fedadam_adapter")
  return ns, registry.make("fedadam_adapter", ns.model, helpers.OPTIM, total_rounds=helpers.TOTAL_ROUNDS,
                           aggregator=aggregators.make(name))


def test_server_optimizer_steps_on_the_robust_aggregate():
  """FedAdam with the median: its pseudo-gradient is global - median; no counted client: nothing moves."""
  ns, algo = _server_opt("median")
  uploads = {"shared": jax.tree_util.tree_map(lambda c: jnp.stack([c + 1.0, c + 2.0, c + 1e6]),
                                              ns.server["shared"])}
  aggregate = jax.jit(algo.aggregate)
  new = aggregate(ns.server, uploads, jnp.ones(3))
  assert np.isfinite(_norm(new["shared"]))
  # Adam's first step moves each coordinate by about lr (0.01) towards the median (+2), whatever the outlier.
  step = jax.tree_util.tree_map(jnp.subtract, new["shared"], ns.server["shared"])
  assert all(np.allclose(np.asarray(x), 0.01, atol=1e-3) for x in jax.tree_util.tree_leaves(step))
  none = aggregate(ns.server, uploads, jnp.zeros(3))
  assert helpers.leaves_equal(none["shared"], ns.server["shared"])
  assert helpers.leaves_equal(none["opt"], ns.server["opt"])
