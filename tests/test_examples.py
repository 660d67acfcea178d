"""examples/: outside algorithms reached by "module:function" names; Ditto learns the toy task."""
import os

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import ditto
from feddat_jax import config_utils, experiment
from feddat_jax.federated import algorithms as registry
from feddat_jax.federated import engine

C, S, B = helpers.C, helpers.S, helpers.B
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "examples.ditto:make"


def test_registry_resolves_outside_names():
  assert registry.peft_method(NAME) == "adapter"
  assert registry.options_for(NAME, {"prox_mu": 0.3, "temperature": 3.0}) == {"prox_mu": 0.3}
  assert NAME not in registry.names()  # the listing stays the built-in one
  algo = registry.make(NAME, helpers.tiny_model("adapter"), helpers.OPTIM, total_rounds=2, min_clients=2)
  assert (algo.name, algo.variants) == ("ditto", ("personal", "global"))
  with pytest.raises(ValueError, match=r"examples.ditto:make trains PEFT method 'adapter' but the model was built "
                                       r"for 'lora'"):
    registry.make(NAME, helpers.tiny_model("lora"), helpers.OPTIM, total_rounds=2)
  with pytest.raises(ValueError, match=r"unknown options \['temperature'\]; it accepts \['prox_mu'\]"):
    registry.make(NAME, helpers.tiny_model("adapter"), helpers.OPTIM, total_rounds=2, options={"temperature": 1.0})


@pytest.mark.parametrize("name, match", [
    ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
    ("examples.ditto:nope", "module 'examples.ditto' has no function 'nope'"),
    ("examples.ditto:DEFAULT_LAMBDA", "has no function 'DEFAULT_LAMBDA'"),
    ("examples:make", "has no function 'make'"),
    (":make", "is named 'module:function'"),
])
def test_bad_outside_names_are_one_line_config_errors(name, match):
  with pytest.raises(ValueError, match=match):
    registry.resolve(name)
  config = config_utils.load_config(os.path.join(REPO, "configs/vqa.py"))
  config.algorithm = name
  with pytest.raises(experiment.ConfigError, match=match) as info:
    experiment.validate(config)
  assert "\n" not in str(info.value)


def test_config_accepts_the_example():
  config = config_utils.load_config(os.path.join(REPO, f"configs/vqa.py:algorithm={NAME}"))
  assert config.algorithm == NAME
  experiment.validate(config)


def test_ditto_learns_the_toy_task():
  """Two rounds: both models' training losses fall, both variants score above the initial states, the personal
  model leaves the global one, and a dropped client (weight 0, no real steps) keeps its state."""
  model = helpers.tiny_model(registry.peft_method(NAME))
  algo = registry.make(NAME, model, helpers.OPTIM, total_rounds=helpers.TOTAL_ROUNDS, options={"prox_mu": 0.1})
  with helpers.fast_compile():
    round_fn = helpers.with_cohort(engine.build_round(algo, donate=False))
    eval_fn = helpers.eval_with_cohort(engine.build_eval(algo))
    frozen, server0, clients0 = jax.jit(algo.init, static_argnums=1)(jax.random.key(0), C)
    batches, mask, cohort = helpers.toy_batches(30), jnp.ones((C, S), bool), jnp.arange(C, dtype=jnp.int32)
    before = eval_fn(frozen, server0, clients0, cohort, batches, mask)
    server, clients, losses = server0, clients0, []
    for r in range(2):
      server, clients, metrics = round_fn(frozen, server, clients, cohort, batches, mask, jnp.ones(C),
                                          jax.random.key(r))
      losses.append((float(metrics["loss"].mean()), float(metrics["loss_personal"].mean())))
    after = eval_fn(frozen, server, clients, cohort, batches, mask)
    # A round in which client 2 drops out: its row and the server's weights ignore it.
    dropped_mask = mask.at[2].set(False)
    _, dropped, _ = round_fn(frozen, server, clients, cohort, batches, dropped_mask, jnp.array([1.0, 1.0, 0.0]),
                             jax.random.key(2))
  assert losses[1][0] < losses[0][0] - 0.05 and losses[1][1] < losses[0][1] - 0.05, losses
  assert int(server["round"]) == 2
  for v in algo.variants:
    assert after[v][0].sum() > before[v][0].sum(), (v, before[v], after[v])
    np.testing.assert_array_equal(after[v][1], [S * B] * C)
  assert helpers.max_abs_diff(server["shared"], server0["shared"]) > 1e-4
  assert helpers.max_abs_diff(clients["personal"], clients0["personal"]) > 1e-4
  assert helpers.max_abs_diff(clients["personal"], helpers.stack([server["shared"]] * C)) > 1e-5
  assert helpers.leaves_equal(helpers.take(dropped, 2), helpers.take(clients, 2))
  assert not helpers.leaves_equal(helpers.take(dropped, 0), helpers.take(clients, 0))

