"""Client-level DP (DP-FedAvg): no noise + no clipping == FedAvg, noise only on A_S, clipping, the reported epsilon."""
import os

import dp_accounting
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feddat_jax import config_utils, experiment
from feddat_jax.federated import aggregators
from feddat_jax.federated import algorithms as registry
from feddat_jax.federated import engine, privacy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, S = helpers.C, helpers.S


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  with helpers.fast_compile():
    yield


def _round(name, aggregator, seed=3):
  """One round of `name` from the initial states with `aggregator`, uniform weights."""
  ns = helpers.setup(name)
  algo = registry.make(name, ns.model, helpers.OPTIM, total_rounds=helpers.TOTAL_ROUNDS, aggregator=aggregator)
  round_fn = helpers.with_cohort(engine.build_round(algo, donate=False))
  return round_fn(ns.frozen, ns.server, ns.clients, jnp.arange(C, dtype=jnp.int32), helpers.toy_batches(seed),
                  jnp.ones((C, S), bool), jnp.ones(C), jax.random.key(0))


@pytest.mark.parametrize("name", ["fedavg_adapter", "feddat"])
def test_no_noise_no_clipping_equals_fedavg(name):
  """dp_mean with noise multiplier 0 and clip 0 (off): current + mean(upload - current) == the mean upload
  (equal up to float rounding: 1e-6 on parameters of size ~0.1)."""
  ns = helpers.setup(name)
  server, clients, _ = _round(name, aggregators.make("dp_mean", clip_norm=0.0, noise_multiplier=0.0))
  plain_server, plain_clients, _ = ns.round(ns.frozen, ns.server, ns.clients, jnp.arange(C, dtype=jnp.int32),
                                            helpers.toy_batches(3), jnp.ones((C, S), bool), jnp.ones(C),
                                            jax.random.key(0))
  helpers.assert_trees_close(server, plain_server, atol=1e-6)
  assert helpers.leaves_equal(clients, plain_clients)


def test_feddat_noise_only_on_the_shared_adapter():
  """With noise, FedDAT's clients (A_C, heads) are bitwise those of the noiseless round; only A_S moves, by
  noise of std noise_multiplier * clip / n per coordinate (no update is clipped at clip 10)."""
  z, clip = 0.1, 10.0
  server, clients, _ = _round("feddat", aggregators.make("dp_mean", clip_norm=clip, noise_multiplier=z))
  quiet, quiet_clients, _ = _round("feddat", aggregators.make("dp_mean", clip_norm=clip, noise_multiplier=0.0))
  assert helpers.leaves_equal(clients, quiet_clients)
  assert int(server["round"]) == int(quiet["round"]) == 1
  noise = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree_util.tree_leaves(server["shared"]),
                                                          jax.tree_util.tree_leaves(quiet["shared"]))])
  assert noise.size > 500  # std estimate within 10%: > 3 standard errors
  assert abs(noise.std() / (z * clip / C) - 1) < 0.1
  assert abs(noise.mean()) < 3 * z * clip / C / np.sqrt(noise.size)


def test_noise_is_a_function_of_seed_and_round():
  agg = jax.jit(aggregators.make("dp_mean", clip_norm=1.0, noise_multiplier=1.0, seed=5))
  other_seed = jax.jit(aggregators.make("dp_mean", clip_norm=1.0, noise_multiplier=1.0, seed=6))
  x, w, cur = jnp.zeros((3, 50)), jnp.ones(3), jnp.zeros(50)
  a = agg(x, w, cur, 4)
  np.testing.assert_array_equal(a, agg(x, w, cur, 4))
  assert not np.allclose(a, agg(x, w, cur, 5))
  assert not np.allclose(a, other_seed(x, w, cur, 4))


def test_clipping_bounds_each_client():
  """An update of norm 1000 moves the noiseless aggregate by at most clip / n; dropped clients count for none."""
  x = jnp.zeros((4, 10)).at[0, 0].set(1000.0)
  w = jnp.array([1.0, 1.0, 1.0, 0.0])
  out = aggregators.make("dp_mean", clip_norm=2.0, noise_multiplier=0.0)(x, w, jnp.zeros(10), 0)
  np.testing.assert_allclose(out, np.eye(10)[0] * 2.0 / 3, rtol=1e-6)


def _direct_epsilon(z, cohort, clients, rounds, delta):
  """The accountant called directly: dp_accounting's RDP accountant on a cohort of `cohort` of `clients` sampled
  without replacement (replace-one neighbours: the clipped sum's sensitivity is 2 * clip, the noise z * clip)."""
  accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  event = dp_accounting.SampledWithoutReplacementDpEvent(clients, cohort, dp_accounting.GaussianDpEvent(z / 2))
  accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
  return accountant.get_epsilon(delta)


def test_epsilon_matches_the_accountant():
  assert privacy.epsilon(1.1, 3, 5, 30, 1e-5) == pytest.approx(_direct_epsilon(1.1, 3, 5, 30, 1e-5), rel=1e-12)
  assert privacy.epsilon(1.1, 3, 5, 60, 1e-5) > privacy.epsilon(1.1, 3, 5, 30, 1e-5)
  assert privacy.epsilon(2.0, 3, 5, 30, 1e-5) < privacy.epsilon(1.1, 3, 5, 30, 1e-5)
  assert privacy.epsilon(1.1, 2, 5, 30, 1e-5) < privacy.epsilon(1.1, 3, 5, 30, 1e-5)  # smaller cohorts amplify more
  assert privacy.epsilon(0.0, 3, 5, 30, 1e-5) == float("inf")


def test_epsilon_models_the_sampling_done():
  """Not Poisson sampling at rate cohort / clients (what the accountant was told before): the fixed-size cohort
  without replacement, which gives a larger epsilon here; every client every round: the plain Gaussian."""
  poisson = dp_accounting.rdp.RdpAccountant()
  poisson.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.6, dp_accounting.GaussianDpEvent(1.1)), 30))
  assert privacy.epsilon(1.1, 3, 5, 30, 1e-5) > poisson.get_epsilon(1e-5)
  full = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  full.compose(dp_accounting.GaussianDpEvent(1.1 / 2), 30)
  assert privacy.epsilon(1.1, 5, 5, 30, 1e-5) == pytest.approx(full.get_epsilon(1e-5), rel=1e-12)
  assert privacy.epsilon(1.1, 8, 5, 30, 1e-5) == privacy.epsilon(1.1, 5, 5, 30, 1e-5)  # padded cohort: all clients
  report = privacy.report(1.1, 1.0, 3, 5, 30, 1e-5)
  assert report["sampling"].startswith("fixed-size cohort") and report["sampling_rate"] == 0.6
  assert report["epsilon"] == privacy.epsilon(1.1, 3, 5, 30, 1e-5)


def test_run_reports_epsilon(tmp_path, capsys):
  """A DP run (3 of 5 clients per round, 2 rounds, z = 1.1) prints (epsilon, delta) and writes it to results.json,
  equal to the accountant called directly."""
  config = config_utils.load_config(os.path.join(REPO, "configs/vqa.py:runlocal=true,backbone=random"))
  config.aggregator, config.cohort_size, config.dp.noise_multiplier, config.dp.delta = "dp_mean", 3, 1.1, 1e-5
  config.checkpoint_every, config.local_steps = 0, 1
  results = experiment.run(config, str(tmp_path))
  expected = _direct_epsilon(1.1, 3, 5, 2, 1e-5)
  assert results["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-12)
  assert results["privacy"]["sampling_rate"] == 0.6 and results["privacy"]["rounds"] == 2
  assert f"(epsilon, delta) = ({expected:.3f}, 1e-05)" in capsys.readouterr().out
