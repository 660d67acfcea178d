"""The registry, and every algorithm family / PEFT method learning a toy task in two rounds."""
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from feddat_jax.federated import algorithms as registry
from feddat_jax.federated import engine
from feddat_jax.federated import optim
from feddat_jax.federated.algorithms import fedavg
from feddat_jax.models import peft

C, S = helpers.C, helpers.S
# Every family and every PEFT method at least once.
REPRESENTATIVE = ["feddat"] + [f"fedavg_{m}" for m in peft.METHODS] + [
    "fedprox_adapter", "fedavgm_adapter", "fedadam_adapter", "fedyogi_adapter", "local_adapter",
    "centralized_adapter"]


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  with helpers.fast_compile():
    yield


def test_representative_set_covers_the_registry():
  families = {n.partition("_")[0] for n in REPRESENTATIVE}
  assert families == set(registry.FAMILIES) | {"feddat"}
  assert {registry.peft_method(n) for n in REPRESENTATIVE} == set(peft.METHODS)
  assert set(REPRESENTATIVE) <= set(registry.names())


def test_every_name_builds():
  names = registry.names()
  assert len(names) == len(set(names)) == 1 + len(registry.FAMILIES) * len(peft.METHODS)
  models = {m: helpers.tiny_model(m) for m in peft.METHODS}
  for name in names:
    method = registry.peft_method(name)
    algo = registry.make(name, models[method], helpers.OPTIM, total_rounds=2)
    assert algo.model.peft.method == method
    assert algo.name == name
    assert algo.centralized == name.startswith("centralized_")
    assert algo.variants == (("dat", "personal", "shared") if name == "feddat" else
                             ("local",) if name.startswith("local_") else ("shared",))
    if not algo.centralized:
      assert all(callable(f) for f in (algo.begin, algo.step, algo.end, algo.aggregate))
  assert registry.peft_method("feddat") == "adapter"
  assert registry.peft_method("fedyogi_layernorm") == "layernorm"


@pytest.mark.parametrize("name,match", [
    ("fedsgd_adapter", "unknown algorithm 'fedsgd_adapter'"),
    ("fedavg_prefix", "unknown algorithm 'fedavg_prefix'"),
    ("fedavg", "unknown algorithm 'fedavg'"),
    ("FedDAT", "unknown algorithm 'FedDAT'"),
])
def test_unknown_names(name, match):
  with pytest.raises(ValueError, match=match):
    registry.peft_method(name)
  with pytest.raises(ValueError, match=match):
    registry.make(name, helpers.tiny_model(), helpers.OPTIM, total_rounds=2)


def test_bad_options_and_mismatched_models():
  adapter, lora = helpers.tiny_model("adapter"), helpers.tiny_model("lora")
  with pytest.raises(ValueError, match=r"fedavg_lora trains PEFT method 'lora' but the model was built for "
                                       r"'adapter'"):
    registry.make("fedavg_lora", adapter, helpers.OPTIM, total_rounds=2)
  with pytest.raises(ValueError, match="trains PEFT method 'adapter'"):
    registry.make("feddat", lora, helpers.OPTIM, total_rounds=2)
  with pytest.raises(ValueError, match=r"feddat: unknown options \['temprature'\]"):
    registry.make("feddat", adapter, helpers.OPTIM, total_rounds=2, options={"temprature": 2.0})
  with pytest.raises(ValueError, match=r"fedavg_adapter: unknown options \['prox_mu'\]"):
    registry.make("fedavg_adapter", adapter, helpers.OPTIM, total_rounds=2, options={"prox_mu": 0.1})
  with pytest.raises(ValueError, match=r"unknown options \['server_lr'\]"):
    registry.make("local_adapter", adapter, helpers.OPTIM, total_rounds=2, options={"server_lr": 0.1})
  with pytest.raises(ValueError, match="FedProx needs mu > 0"):
    registry.make("fedprox_adapter", adapter, helpers.OPTIM, total_rounds=2, options={"prox_mu": 0.0})
  with pytest.raises(ValueError, match="unknown server optimizer 'sgd'"):
    fedavg.server_tx("sgd", 1.0)
  with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
    optim.OptimConfig(schedule="cosine")
  # Known options are accepted.
  algo = registry.make("fedadam_adapter", adapter, helpers.OPTIM, total_rounds=2, options={"server_lr": 0.1})
  assert algo.name == "fedadam_adapter"
  assert registry.make("feddat", adapter, helpers.OPTIM, total_rounds=2,
                       options={"temperature": 2.0, "zero_grad_adam_steps": True}).variants[0] == "dat"


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_two_rounds_learn_the_toy_task(name):
  """Round 2's mean training loss on the same batches is below round 1's; the trained trees moved."""
  ns = helpers.setup(name)
  batches, step_mask, cohort = helpers.toy_batches(30), jnp.ones((C, S), bool), jnp.arange(C, dtype=jnp.int32)
  server, clients, losses = ns.server, ns.clients, []
  for r in range(2):
    server, clients, metrics = ns.round(ns.frozen, server, clients, cohort, batches, step_mask, jnp.ones(C),
                                        jax.random.key(r))
    np.testing.assert_array_equal(metrics["steps"], [S] * C)
    assert np.all(np.isfinite(metrics["loss"]))
    losses.append(float(metrics["loss"].mean()))
  assert losses[1] < losses[0] - 0.05, losses
  assert int(server["round"]) == 2
  assert helpers.max_abs_diff(clients["head"], ns.clients["head"]) > 1e-4
  if name.startswith("local_"):
    assert "shared" not in server
    assert helpers.max_abs_diff(clients["local"], ns.clients["local"]) > 1e-4
    assert helpers.max_abs_diff(helpers.take(clients["local"], 0), helpers.take(clients["local"], 1)) > 1e-5
  elif not name.endswith("_head"):
    assert helpers.max_abs_diff(server["shared"], ns.server["shared"]) > 1e-4
  else:
    assert jax.tree_util.tree_leaves(server["shared"]) == []  # "head" trains nothing in the backbone
  # Evaluation runs on the trained states and counts every example once.
  out = ns.eval(ns.frozen, server, clients, cohort, batches, step_mask)
  assert set(out) == set(ns.algo.variants)
  for scores, counts in out.values():
    np.testing.assert_array_equal(counts, [S * helpers.B] * C)
    assert np.all((scores >= 0) & (scores <= counts))


def test_server_optimisers_by_hand():
  """First server step on the pseudo-gradient g = global - mean(uploads): FedAvgM (lr 1) lands on the mean,
  FedAdam moves each parameter by server_lr * g / (|g| + 1e-3)."""
  model = helpers.tiny_model("bitfit")
  tree = {"bias": jnp.array([0.5, -1.0, 2.0])}
  uploads = {"shared": {"bias": jnp.array([[0.3, -1.0, 2.4], [0.5, -0.6, 2.2]])}}
  weights = jnp.array([1.0, 3.0])
  mean = np.array([0.45, -0.7, 2.25])
  g = np.array([0.5, -1.0, 2.0]) - mean
  for family, lr, expected in (("fedavg", 1.0, mean), ("fedavgm", 1.0, mean),
                               ("fedadam", 0.1, np.array([0.5, -1.0, 2.0]) - 0.1 * g / (np.abs(g) + 1e-3))):
    algo = registry.make(f"{family}_bitfit", model, helpers.OPTIM, total_rounds=2,
                         options={} if family == "fedavg" else {"server_lr": lr})
    server = {"round": jnp.zeros((), jnp.int32), "shared": tree}
    if family != "fedavg":
      server["opt"] = fedavg.server_tx({"fedavgm": "momentum", "fedadam": "adam"}[family], lr).init(tree)
    new = algo.aggregate(server, uploads, weights)
    np.testing.assert_allclose(new["shared"]["bias"], expected, rtol=1e-5, err_msg=family)
    assert int(new["round"]) == 1
    # Nobody reported: the server's parameters (and optimiser) stay as they were.
    idle = algo.aggregate(server, uploads, jnp.zeros(2))
    np.testing.assert_array_equal(idle["shared"]["bias"], tree["bias"])
    if family != "fedavg":
      assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(idle["opt"]),
                                                      jax.tree_util.tree_leaves(server["opt"])))
  assert isinstance(fedavg.server_tx("yogi", 0.1), optax.GradientTransformation)


def test_centralized_trains_every_round():
  """The pooled model's learning-rate schedule spans the whole run: its last round still moves it."""
  ns = helpers.setup("centralized_adapter")
  batches, step_mask, cohort = helpers.toy_batches(31), jnp.ones((C, S), bool), jnp.arange(C, dtype=jnp.int32)
  server, clients = ns.server, ns.clients
  for r in range(helpers.TOTAL_ROUNDS):
    new_server, clients, _ = ns.round(ns.frozen, server, clients, cohort, batches, step_mask, jnp.ones(C),
                                      jax.random.key(r))
    assert helpers.max_abs_diff(new_server["shared"], server["shared"]) > 1e-6, r
    server = new_server
  assert int(server["count"]) == helpers.TOTAL_ROUNDS * S


@pytest.mark.parametrize("name", ["feddat", "fedavg_adapter", "centralized_adapter"])
def test_head_lr_mult_scales_only_the_head(name):
  """One real step: with head_lr_mult = 4 the head's first Adam step is 4x as long, the adapters' the same.
  (FedDAT's second update of the head starts from the moved head, so there only the adapters are compared.)"""
  ns = helpers.setup(name)
  algo = registry.make(name, ns.model, optim.OptimConfig(lr=1e-3, head_lr_mult=4.0),
                       total_rounds=helpers.TOTAL_ROUNDS, options={})
  round_fn = helpers.with_cohort(engine.build_round(algo, donate=False))
  batches, cohort = helpers.toy_batches(32), jnp.arange(C, dtype=jnp.int32)
  step_mask = jnp.zeros((C, S), bool).at[:, 0].set(True)
  outs = [f(ns.frozen, ns.server, ns.clients, cohort, batches, step_mask, jnp.ones(C), jax.random.key(0))
          for f in (ns.round, round_fn)]
  (server1, clients1, _), (server4, clients4, _) = outs
  helpers.assert_trees_close(server4["shared"], server1["shared"], atol=1e-7)
  assert helpers.max_abs_diff(server1["shared"], ns.server["shared"]) > 1e-5
  moved = [jax.tree_util.tree_map(lambda a, b: a - b, c["head"], ns.clients["head"]) for c in (clients1, clients4)]
  if name == "feddat":
    assert helpers.max_abs_diff(moved[1], moved[0]) > 1e-5
  else:
    helpers.assert_trees_close(moved[1], jax.tree_util.tree_map(lambda d: 4 * d, moved[0]), atol=1e-6)
  with pytest.raises(ValueError, match="head_lr_mult=0"):
    optim.OptimConfig(head_lr_mult=0)
