"""FedDAT: the local step against a naive reading of reference 1.5, aggregation, losses, switches."""
import math

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feddat_jax.federated import optim
from feddat_jax.models import losses
from feddat_jax.models import peft

C = helpers.C
RNG = jax.random.key(3)
FREEZE, STALE, ZERO = "freeze_personal_after_first_round", "eval_stale_frozen_copy", "zero_grad_adam_steps"


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  with helpers.fast_compile():
    yield


@pytest.fixture(scope="module")
def dat():
  return helpers.setup("feddat")


def _all_clients():
  return jnp.arange(C, dtype=jnp.int32)


def _naive_step(model, frozen, state, batch, round_idx, count, num_steps, train_personal, zero_grad):
  """Reference 1.5 for one batch, spelled out: three backbone passes and four AdamW group updates.

  state: {shared, personal, head, frozen_copy, opt: {shared, personal, head}}; the flags are traced bools:
  train_personal False = A_C out of the optimiser (the released code after round 0), zero_grad True = every
  parameter in the optimiser steps in both updates, with a zero gradient where it is not trained.
  """
  cfg = helpers.OPTIM
  y, am, em = batch["targets"], batch["answer_mask"], batch["example_mask"]
  zeros = lambda t: jax.tree_util.tree_map(jnp.zeros_like, t)
  pick = lambda p, a, b: jax.tree_util.tree_map(lambda x, z: jnp.where(p, x, z), a, b)

  def logits(adapters, head, weights=None):
    return model.logits(head, model.features(peft.merge(frozen, adapters), batch, adapter_weights=weights), batch)

  def dat_logits(personal, head):
    # Two adapter sets per site, A_C and the frozen copy of the received A_S, their deltas averaged 0.5/0.5.
    sets = jax.tree_util.tree_map(lambda c, s: jnp.concatenate([c, s]), personal, state["frozen_copy"])
    return logits(sets, head, jnp.array([0.5, 0.5]))

  def objective(z, teacher):
    task, kd = losses.task_loss(z, y, am, em), losses.kd_loss(z, teacher, am, em, 3.0)
    return 0.5 * (task + kd), (task, kd)

  def lr(offset):
    return optim.learning_rate(cfg, round_idx=round_idx, step=count + offset, steps_per_round=num_steps,
                               opt_steps_per_batch=2, total_rounds=helpers.TOTAL_ROUNDS)

  shared, personal, head, opt = state["shared"], state["personal"], state["head"], dict(state["opt"])
  # Pass 1: the DAT as teacher, no gradient.
  teacher = jax.lax.stop_gradient(dat_logits(personal, head))
  # Pass 2: update (1) of A_S and the head; its logits before the update are the teacher of update (2).
  z_shared = logits(shared, head)
  (_, (task_s, kd_s)), (g_s, g_h) = jax.value_and_grad(
      lambda s, h: objective(logits(s, h), teacher), argnums=(0, 1), has_aux=True)(shared, head)
  shared, opt["shared"] = optim.apply_updates(cfg, shared, g_s, opt["shared"], lr(0))
  head, opt["head"] = optim.apply_updates(cfg, head, g_h, opt["head"], lr(0))
  moved = optim.apply_updates(cfg, personal, zeros(personal), opt["personal"], lr(0))
  personal, opt["personal"] = pick(zero_grad & train_personal, moved, (personal, opt["personal"]))
  # Pass 3: update (2) of A_C and the head, through a fresh DAT forward and backward.
  (_, (task_d, kd_d)), (g_p, g_h) = jax.value_and_grad(
      lambda p, h: objective(dat_logits(p, h), jax.lax.stop_gradient(z_shared)), argnums=(0, 1),
      has_aux=True)(personal, head)
  moved = optim.apply_updates(cfg, personal, g_p, opt["personal"], lr(1))
  personal, opt["personal"] = pick(train_personal, moved, (personal, opt["personal"]))
  head, opt["head"] = optim.apply_updates(cfg, head, g_h, opt["head"], lr(1))
  moved = optim.apply_updates(cfg, shared, zeros(shared), opt["shared"], lr(1))
  shared, opt["shared"] = pick(zero_grad, moved, (shared, opt["shared"]))
  new = {**state, "shared": shared, "personal": personal, "head": head, "opt": opt}
  return new, {"loss_shared_task": task_s, "loss_shared_kd": kd_s, "loss_dat_task": task_d, "loss_dat_kd": kd_d}


@pytest.mark.parametrize("options,round_idx", [({}, 0), ({ZERO: True}, 0), ({FREEZE: True}, 1),
                                               ({FREEZE: True, ZERO: True}, 1)],
                         ids=["default", "zero_grad", "frozen_personal", "frozen_personal_zero_grad"])
def test_step_matches_naive_reference(options, round_idx):
  """Two local steps of FedDAT's one-pass step == the naive three-pass step of reference 1.5 (to 1e-6)."""
  ns = helpers.setup("feddat", **options)
  batches = helpers.toy_batches(20)
  per_step, answer_mask = helpers.client_batches(batches, 0)
  server = {**ns.server, "round": jnp.asarray(round_idx, jnp.int32)}
  client = helpers.take(ns.clients, 0)
  num_steps = jnp.asarray(helpers.S, jnp.int32)
  shared, personal, head = server["shared"], client["personal"], client["head"]
  state = {"shared": shared, "personal": personal, "head": head, "frozen_copy": shared,
           "opt": {k: optim.adamw(helpers.OPTIM, p).init(p)
                   for k, p in (("shared", shared), ("personal", personal), ("head", head))}}
  naive = jax.jit(_naive_step, static_argnums=0)
  carry = ns.begin(ns.frozen, server, client, num_steps)
  for i in range(2):
    batch = {**helpers.take(per_step, i), "answer_mask": answer_mask}
    carry, metrics = ns.step(ns.frozen, server, carry, batch, jax.random.key(i))
    state, expected = naive(ns.model, ns.frozen, state, batch, server["round"], 2 * i, num_steps,
                            jnp.asarray(round_idx == 0 or not options.get(FREEZE, False)),
                            jnp.asarray(options.get(ZERO, False)))
    for k, v in expected.items():
      np.testing.assert_allclose(metrics[k], v, rtol=1e-6, atol=1e-6, err_msg=k)
  assert int(carry["count"]) == 4
  for k in ("shared", "personal", "head", "opt"):
    helpers.assert_trees_close(carry[k], state[k], atol=1e-6, rtol=1e-6)
  assert helpers.max_abs_diff(carry["shared"], shared) > 1e-4 and helpers.max_abs_diff(carry["head"], head) > 1e-4
  if options.get(FREEZE) and round_idx > 0:
    assert helpers.leaves_equal(carry["personal"], personal)
  else:
    assert helpers.max_abs_diff(carry["personal"], personal) > 1e-4


def test_aggregate_is_weighted_mean_of_shared_uploads(dat):
  """After a round A_S is sum_k w_k A_S^k / sum_k w_k of the uploads, with non-uniform weights."""
  batches, step_mask, weights = helpers.toy_batches(21), jnp.ones((C, helpers.S), bool), jnp.array([1., 3., .5])
  _, _, uploads, _ = helpers.client_loop(dat, dat.server, dat.clients, batches, step_mask, weights, RNG)
  server, _, _ = dat.round(dat.frozen, dat.server, dat.clients, _all_clients(), batches, step_mask, weights, RNG)
  w = np.array([1., 3., .5]) / 4.5
  expected = jax.tree_util.tree_map(lambda u: np.tensordot(w, np.asarray(u), axes=1), uploads["shared"])
  helpers.assert_trees_close(dat.aggregate(dat.server, uploads, weights)["shared"], expected, atol=1e-7,
                             rtol=1e-6)
  helpers.assert_trees_close(server["shared"], expected, atol=1e-5, rtol=1e-5)
  uniform = jax.tree_util.tree_map(lambda u: np.asarray(u).mean(0), uploads["shared"])
  assert helpers.max_abs_diff(uniform, expected) > 1e-5  # the weights mattered
  assert int(server["round"]) == 1


def test_personal_state_stays_with_the_client(dat):
  """Uploads hold only "shared"; A_C and the heads start equal, differ per client after a round."""
  batches, step_mask = helpers.toy_batches(22), jnp.ones((C, helpers.S), bool)
  _, loop_clients, uploads, _ = helpers.client_loop(dat, dat.server, dat.clients, batches, step_mask,
                                                    jnp.ones(C), RNG)
  assert set(uploads) == {"shared"}
  assert jax.tree_util.tree_structure(helpers.take(uploads["shared"], 0)) == jax.tree_util.tree_structure(
      dat.server["shared"])
  assert set(dat.clients) == set(loop_clients) == {"personal", "head"}
  assert set(dat.server) == {"shared", "round"}
  _, clients, _ = dat.round(dat.frozen, dat.server, dat.clients, _all_clients(), batches, step_mask,
                            jnp.ones(C), RNG)
  for k in ("personal", "head"):
    assert helpers.leaves_equal(helpers.take(dat.clients[k], 0), helpers.take(dat.clients[k], 1))
    for a, b in ((0, 1), (0, 2), (1, 2)):
      assert helpers.max_abs_diff(helpers.take(clients[k], a), helpers.take(clients[k], b)) > 1e-5, (k, a, b)
  # A_C (drawn apart from A_S) is nowhere in what the clients upload.
  for c in range(C):
    assert helpers.max_abs_diff(helpers.take(uploads["shared"], c), helpers.take(clients["personal"], c)) > 1e-3


def test_task_loss_by_hand():
  """BCE with soft targets summed over the client's answers, mean over real examples."""
  logits = jnp.array([[0.0, 2.0, -1.0, 5.0], [1.0, -1.0, 3.0, -4.0]])
  targets = jnp.array([[0.0, 1.0, 0.3, 0.0], [1.0, 0.0, 0.0, 1.0]])
  answer_mask, both = jnp.array([1.0, 1.0, 1.0, 0.0]), jnp.array([1.0, 1.0])
  # softplus(z) - z * t per answer; answer 3 is outside the vocabulary.
  ex0 = math.log(2) + (math.log1p(math.exp(2)) - 2) + (math.log1p(math.exp(-1)) + 0.3)  # 1.4333372
  ex1 = (math.log1p(math.exp(1)) - 1) + math.log1p(math.exp(-1)) + math.log1p(math.exp(3))  # 3.6751110
  assert ex0 == pytest.approx(1.4333372, abs=1e-6) and ex1 == pytest.approx(3.6751110, abs=1e-6)
  np.testing.assert_allclose(losses.task_loss(logits, targets, answer_mask, both), (ex0 + ex1) / 2, rtol=1e-6)
  np.testing.assert_allclose(losses.task_loss(logits, targets, answer_mask, jnp.array([1.0, 0.0])), ex0,
                             rtol=1e-6)
  np.testing.assert_allclose(losses.task_loss(logits, targets, jnp.ones(4), jnp.array([0.0, 1.0])),
                             ex1 + math.log1p(math.exp(4)), rtol=1e-6)  # answer 3: softplus(-4) + 4
  np.testing.assert_allclose(losses.task_loss(logits, targets, answer_mask, jnp.zeros(2)), 0.0)


def test_kd_loss_by_hand():
  """T^2 * mean over real examples of KL(softmax(teacher / T) || softmax(student / T)), T = 3."""
  student = jnp.array([[0.0, 3.0, 0.0, 50.0], [1.0, 2.0, 3.0, -7.0]])
  teacher = jnp.array([[3.0, 0.0, 0.0, -50.0], [1.0, 2.0, 3.0, 9.0]])
  answer_mask = jnp.array([1.0, 1.0, 1.0, 0.0])
  # Example 0 over answers 0..2: teacher / 3 = (1, 0, 0), student / 3 = (0, 1, 0); the log-normalisers are equal,
  # so KL = sum_i p_i (t_i - s_i) / 3 = (e - 1) / (e + 2). Example 1: teacher == student, KL = 0.
  kl0 = (math.e - 1) / (math.e + 2)  # 0.3641753
  assert 9 * kl0 == pytest.approx(3.2775779, abs=1e-6)
  np.testing.assert_allclose(losses.kd_loss(student, teacher, answer_mask, jnp.ones(2)), 9 * kl0 / 2, rtol=1e-6)
  np.testing.assert_allclose(losses.kd_loss(student, teacher, answer_mask, jnp.array([1.0, 0.0])), 9 * kl0,
                             rtol=1e-6)
  # T = 1: KL = (3 e^3 - 3) / (e^3 + 2), and T^2 = 1.
  np.testing.assert_allclose(losses.kd_loss(student, teacher, answer_mask, jnp.array([1.0, 0.0]), 1.0),
                             (3 * math.exp(3) - 3) / (math.exp(3) + 2), rtol=1e-6)
  g_teacher = jax.grad(lambda t: losses.kd_loss(student, t, answer_mask, jnp.ones(2)))(teacher)
  np.testing.assert_array_equal(g_teacher, 0.0)  # the teacher is detached


def test_freeze_personal_after_first_round():
  """A_C trains in round 0 only; the head still trains in round 1 (zero-gradient steps on: A_C stays put)."""
  ns = helpers.setup("feddat", **{FREEZE: True, ZERO: True})
  batches, step_mask = helpers.toy_batches(23), jnp.ones((C, helpers.S), bool)
  server, clients = ns.server, ns.clients
  history = [clients]
  for r in range(2):
    server, clients, _ = ns.round(ns.frozen, server, clients, _all_clients(), batches, step_mask, jnp.ones(C),
                                  jax.random.key(r))
    history.append(clients)
  assert helpers.max_abs_diff(history[1]["personal"], history[0]["personal"]) > 1e-4
  assert helpers.leaves_equal(history[2]["personal"], history[1]["personal"])
  assert helpers.max_abs_diff(history[2]["head"], history[1]["head"]) > 1e-4


def test_zero_grad_adam_steps_change_the_round(dat):
  """The released code's zero-gradient AdamW steps move A_C and A_S differently from the default."""
  ns = helpers.setup("feddat", **{ZERO: True})
  batches, step_mask = helpers.toy_batches(24), jnp.ones((C, helpers.S), bool)
  args = (_all_clients(), batches, step_mask, jnp.ones(C), RNG)
  server, clients, _ = dat.round(dat.frozen, dat.server, dat.clients, *args)
  server_z, clients_z, _ = ns.round(ns.frozen, ns.server, ns.clients, *args)
  assert helpers.leaves_equal(ns.clients, dat.clients) and helpers.leaves_equal(ns.server, dat.server)
  assert helpers.max_abs_diff(server_z["shared"], server["shared"]) > 1e-5
  assert helpers.max_abs_diff(clients_z["personal"], clients["personal"]) > 1e-5


def test_eval_stale_frozen_copy(dat):
  """The evaluated DAT uses the start-of-round A_S copy instead of the aggregated A_S; other variants agree."""
  ns = helpers.setup("feddat", **{STALE: True})
  batches, step_mask = helpers.toy_batches(25), jnp.ones((C, helpers.S), bool)
  args = (_all_clients(), batches, step_mask, jnp.ones(C), RNG)
  server, clients, _ = dat.round(dat.frozen, dat.server, dat.clients, *args)
  server_s, clients_s, _ = ns.round(ns.frozen, ns.server, ns.clients, *args)
  helpers.assert_trees_close(server_s, server, atol=1e-6)
  helpers.assert_trees_close({k: clients_s[k] for k in clients}, clients, atol=1e-6)
  assert helpers.leaves_equal(clients_s["frozen_copy"], helpers.stack([dat.server["shared"]] * C))

  batch = {**helpers.take(helpers.client_batches(batches, 1)[0], 0), "answer_mask": batches["answer_mask"][1]}
  model = dat.algo.model

  def logits_of(algo):
    def f(frozen, server, client, batch):
      return {v: model.logits(p.head, model.features(p.backbone, batch, p.adapter_weights), batch)
              for v, p in algo.eval_params(frozen, server, client).items()}
    return jax.jit(f)

  eval_default, eval_stale = logits_of(dat.algo), logits_of(ns.algo)
  default = eval_default(dat.frozen, server, helpers.take(clients, 1), batch)
  stale = eval_stale(ns.frozen, server_s, helpers.take(clients_s, 1), batch)
  assert float(jnp.abs(stale["dat"] - default["dat"]).max()) > 1e-4
  np.testing.assert_allclose(stale["personal"], default["personal"], atol=1e-5)
  np.testing.assert_allclose(stale["shared"], default["shared"], atol=1e-5)
  # The stale DAT is the default DAT with the server's A_S put back to the one the round started from.
  old = eval_default(dat.frozen, {**server, "shared": dat.server["shared"]}, helpers.take(clients, 1), batch)
  np.testing.assert_allclose(stale["dat"], old["dat"], atol=1e-5)
