"""FedAvg with any PEFT method, and its relatives on the same functions.

The PEFT method's trainable backbone tree is shared (uploaded, averaged); the answer head is personal, as in
every algorithm here (clients have their own answer spaces). Options:
- prox_mu > 0: FedProx's proximal term (mu / 2) * ||w - w_global||^2 in the local loss (see fedprox.py);
- server_optimizer: FedAvgM ("momentum"), FedAdam ("adam"), FedYogi ("yogi"): an optax optimiser on the
  server applied to the pseudo-gradient (global - weighted mean of uploads), as in Reddi et al. 2021;
- share=False: local-only training, nothing uploaded or averaged (see local.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from feddat_jax.federated import aggregators
from feddat_jax.federated import optim as optim_lib
from feddat_jax.federated.algorithms import base
from feddat_jax.models import peft as peft_lib

SERVER_OPTIMIZERS = ("none", "momentum", "adam", "yogi")
# Server learning rates used when none is given: FedAvgM's classic 1.0; adaptive ones take steps of about lr per
# coordinate, so they need a small one (Reddi et al. 2021 tune it around 1e-2).
DEFAULT_SERVER_LR = {"momentum": 1.0, "adam": 0.01, "yogi": 0.01}


def server_tx(name: str, lr: float | None = None, momentum: float = 0.9) -> optax.GradientTransformation:
  """The server optimiser; `lr` None or <= 0 takes DEFAULT_SERVER_LR."""
  lr = lr if lr and lr > 0 else DEFAULT_SERVER_LR.get(name, 1.0)
  if name == "momentum":
    return optax.sgd(lr, momentum=momentum)
  if name == "adam":
    return optax.adam(lr, b1=0.9, b2=0.99, eps=1e-3)
  if name == "yogi":
    return optax.yogi(lr, b1=0.9, b2=0.99, eps=1e-3)
  raise ValueError(f"unknown server optimizer {name!r}; use one of {SERVER_OPTIMIZERS}")


def make(model, optim: optim_lib.OptimConfig, *, total_rounds: int, name: str = "fedavg", prox_mu: float = 0.0,
         server_optimizer: str = "none", server_lr: float | None = None, share: bool = True,
         aggregator: aggregators.Aggregator = aggregators.mean) -> base.Algorithm:
  """aggregator: how the server combines the shared uploads (`aggregators.make`); the server optimiser, if any,
  steps on global - aggregate."""
  tx = None if server_optimizer == "none" else server_tx(server_optimizer, server_lr)
  own = "shared" if share else "local"  # where the trained backbone tree lives between rounds

  def init(rng, num_clients, pretrained=None):
    frozen, trainable, head = base.init_model(model, rng, pretrained)
    server = {"round": jnp.zeros((), jnp.int32)}
    client = {"head": head}
    if share:
      server["shared"] = trainable
      if tx is not None:
        server["opt"] = tx.init(trainable)
    else:
      client["local"] = trainable
    if optim.keep_state:
      client["opt"] = optim_lib.adamw(optim, (trainable, head)).init((trainable, head))
    return frozen, server, base.stack_clients(client, num_clients)

  def begin(frozen, server, client, num_steps):
    del frozen
    params = (server["shared"] if share else client["local"], client["head"])
    opt = client["opt"] if optim.keep_state else optim_lib.adamw(optim, params).init(params)
    return {"params": params, "opt": opt, "count": jnp.zeros((), jnp.int32), "num_steps": num_steps}

  def step(frozen, server, carry, batch, rng):
    del rng

    def loss_fn(params):
      trainable, head = params
      feats = model.features(peft_lib.merge(frozen, trainable), batch)
      task = model.task_loss(model.logits(head, feats, batch), batch)
      prox = 0.0
      if prox_mu > 0:
        sq = jax.tree_util.tree_map(lambda w, g: jnp.sum((w - g) ** 2), trainable, server["shared"])
        prox = 0.5 * prox_mu * sum(jax.tree_util.tree_leaves(sq))
      return task + prox, task

    (_, task), grads = jax.value_and_grad(loss_fn, has_aux=True)(carry["params"])
    lr = optim_lib.learning_rate(optim, round_idx=server["round"], step=carry["count"],
                                 steps_per_round=carry["num_steps"], opt_steps_per_batch=1,
                                 total_rounds=total_rounds)
    params, opt = optim_lib.apply_updates(optim, carry["params"], grads, carry["opt"], optim_lib.lr_pair(optim, lr))
    return {**carry, "params": params, "opt": opt, "count": carry["count"] + 1}, {"loss": task}

  def end(frozen, server, carry):
    del frozen, server
    trainable, head = carry["params"]
    client = {"head": head}
    if not share:
      client["local"] = trainable
    if optim.keep_state:
      client["opt"] = carry["opt"]
    return ({"shared": trainable} if share else {}), client

  def aggregate(server, uploads, weights):
    round_idx = server["round"]
    server = {**server, "round": round_idx + 1}
    if not share:
      return server
    mean = aggregator(uploads["shared"], weights, server["shared"], round_idx)
    if tx is None:
      return {**server, "shared": mean}
    pseudo_grad = jax.tree_util.tree_map(lambda g, m: g - m, server["shared"], mean)
    updates, opt = tx.update(pseudo_grad, server["opt"], server["shared"])
    # A round where nobody reported leaves the server as it was.
    shared = optax.apply_updates(server["shared"], updates)
    reported = weights.sum() > 0
    return {**server, "shared": base.tree_where(reported, shared, server["shared"]),
            "opt": base.tree_where(reported, opt, server["opt"])}

  def eval_params(frozen, server, client):
    trainable = server["shared"] if share else client["local"]
    return {own: base.Variant(peft_lib.merge(frozen, trainable), client["head"])}

  # The shared tree as every client received it (upload - sent: its update); local training uploads nothing.
  sent = (lambda server: {"shared": server["shared"]}) if share else None
  return base.Algorithm(name, model, init, begin, step, end, aggregate, eval_params, (own,), sent=sent)
