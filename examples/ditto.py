"""Ditto (Li et al., "Ditto: Fair and Robust Federated Learning Through Personalization", ICML 2021).

Each client keeps a personal model v trained on its own data with a proximal term towards the global model w,

    min_v  F_k(v) + lambda / 2 * ||v - w||^2,

while the global model w is trained FedAvg-style: every client runs local steps on F_k from the round's w and
the server averages the results. Both updates are taken on every batch (Algorithm 1 of the paper, with the
personal update pulled towards w as received at the start of the round).

Here a "model" is an adapter tree plus an answer head, on a frozen backbone. The global adapters are shared
(uploaded, aggregated); answer heads stay on the clients, as in every algorithm of this project (each client has
its own answer space), so the global model of client k is (global adapters, k's global head) and the proximal
term spans adapters and head. Evaluation variants: "personal" (v) and "global" (w with the client's global head).

Written in one file against the public API (base.Algorithm, optim, peft, aggregators); docs/algorithms.md
explains the contract. Run it from the repository root:

    python -m feddat_jax.main --config=configs/vqa.py:algorithm=examples.ditto:make
    python -m feddat_jax.main --config=configs/vqa.py:algorithm=examples.ditto:make --config.options.prox_mu=0.5

lambda is the config option `prox_mu` (the weight of a proximal term, as in FedProx): configs/vqa.py sets it
to 0.01 unless overridden, as above; make() without it takes DEFAULT_LAMBDA. The paper tunes lambda in
about [0.05, 2]; lambda = 0 makes the personal model plain local training.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from feddat_jax.federated import aggregators
from feddat_jax.federated import optim as optim_lib
from feddat_jax.federated.algorithms import base
from feddat_jax.models import peft as peft_lib

PEFT_METHOD = "adapter"  # the registry builds the model with adapters for this algorithm
OPTIONS = ("prox_mu",)  # the config options (config.options.<name>) that make() reads
DEFAULT_LAMBDA = 0.1
VARIANTS = ("personal", "global")


def _sq_dist(a, b):
  return sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def make(model, optim: optim_lib.OptimConfig, *, total_rounds: int, options=None,
         aggregator: aggregators.Aggregator = aggregators.mean) -> base.Algorithm:
  """Ditto on `model` (built with PEFT method "adapter"); options: {"prox_mu": lambda} (default 0.1)."""
  lam = float((options or {}).get("prox_mu", DEFAULT_LAMBDA))
  if lam < 0:
    raise ValueError(f"Ditto needs lambda = prox_mu >= 0, got {lam}")
  if model.peft.method != PEFT_METHOD:
    raise ValueError(f"Ditto here trains adapters; the model was built for {model.peft.method!r}")

  def fresh_opt(adapters, head):
    params = (adapters, head)
    return {"global": optim_lib.adamw(optim, params).init(params),
            "personal": optim_lib.adamw(optim, params).init(params)}

  def init(rng, num_clients, pretrained=None):
    frozen, adapters, head = base.init_model(model, rng, pretrained)
    server = {"shared": adapters, "round": jnp.zeros((), jnp.int32)}
    # v starts at w (the paper's initialisation): personal adapters and head copy the global ones.
    client = {"global_head": head, "personal": adapters, "personal_head": head}
    if optim.keep_state:
      client["opt"] = fresh_opt(adapters, head)
    return frozen, server, base.stack_clients(client, num_clients)

  def begin(frozen, server, client, num_steps):
    del frozen
    w = (server["shared"], client["global_head"])  # the global model as received: trained and anchor
    opt = client["opt"] if optim.keep_state else fresh_opt(*w)
    return {"global": w, "anchor": w, "personal": (client["personal"], client["personal_head"]), "opt": opt,
            "count": jnp.zeros((), jnp.int32), "num_steps": num_steps}

  def step(frozen, server, carry, batch, rng):
    del rng

    def task_loss(params):
      adapters, head = params
      feats = model.features(peft_lib.merge(frozen, adapters), batch)
      return model.task_loss(model.logits(head, feats, batch), batch)

    def personal_loss(params):
      task = task_loss(params)
      return task + 0.5 * lam * _sq_dist(params, carry["anchor"]), task

    loss_w, g_w = jax.value_and_grad(task_loss)(carry["global"])
    (_, loss_v), g_v = jax.value_and_grad(personal_loss, has_aux=True)(carry["personal"])
    lr = optim_lib.learning_rate(optim, round_idx=server["round"], step=carry["count"],
                                 steps_per_round=carry["num_steps"], opt_steps_per_batch=1,
                                 total_rounds=total_rounds)
    lrs = optim_lib.lr_pair(optim, lr)  # (adapters, head) pairs
    w, opt_w = optim_lib.apply_updates(optim, carry["global"], g_w, carry["opt"]["global"], lrs)
    v, opt_v = optim_lib.apply_updates(optim, carry["personal"], g_v, carry["opt"]["personal"], lrs)
    carry = {**carry, "global": w, "personal": v, "opt": {"global": opt_w, "personal": opt_v},
             "count": carry["count"] + 1}
    return carry, {"loss": loss_w, "loss_personal": loss_v}

  def end(frozen, server, carry):
    del frozen, server
    (w_adapters, w_head), (v_adapters, v_head) = carry["global"], carry["personal"]
    client = {"global_head": w_head, "personal": v_adapters, "personal_head": v_head}
    if optim.keep_state:
      client["opt"] = carry["opt"]
    return {"shared": w_adapters}, client

  def aggregate(server, uploads, weights):
    shared = aggregator(uploads["shared"], weights, server["shared"], server["round"])
    return {**server, "shared": shared, "round": server["round"] + 1}

  def eval_params(frozen, server, client):
    return {"personal": base.Variant(peft_lib.merge(frozen, client["personal"]), client["personal_head"]),
            "global": base.Variant(peft_lib.merge(frozen, server["shared"]), client["global_head"])}

  sent = lambda server: {"shared": server["shared"]}  # the global adapters as received: upload - sent = update
  return base.Algorithm("ditto", model, init, begin, step, end, aggregate, eval_params, VARIANTS, sent=sent)
