"""Centralized training, the upper reference: one model trained on all clients' data pooled.

The PEFT parameters are one tree trained on every client's examples; heads stay per client (answer spaces
differ). Each optimiser step takes the step's batch of every client at once and minimises the mean loss
over all real examples of the pooled batch; there are no uploads and no averaging. Adam state persists across
rounds (a round is one pass over the clients' data). The engine runs it with `pooled_step` instead of the
per-client vmap (`engine.build_round` picks it), with the same round signature as every other algorithm.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from feddat_jax.federated import optim as optim_lib
from feddat_jax.federated.algorithms import base
from feddat_jax.models import peft as peft_lib


def make(model, optim: optim_lib.OptimConfig, *, total_rounds: int, name: str = "centralized"):

  def init(rng, num_clients, pretrained=None):
    frozen, trainable, head = base.init_model(model, rng, pretrained)
    server = {"shared": trainable, "opt": optim_lib.adamw(optim, trainable).init(trainable),
              "round": jnp.zeros((), jnp.int32), "count": jnp.zeros((), jnp.int32)}
    client = {"head": head, "opt": optim_lib.adamw(optim, head).init(head)}
    return frozen, server, base.stack_clients(client, num_clients)

  def pooled_step(frozen, server, clients, batch, real, steps_per_round):
    """batch: [C, B, ...] (answer_mask [C, A]); real: bool [C]. -> (server, clients, per-client task loss [C])."""

    def loss_fn(shared, heads):
      def client_loss(head, b):
        feats = model.features(peft_lib.merge(frozen, shared), b)
        return model.task_loss(model.logits(head, feats, b), b)
      em = batch["example_mask"] * real[:, None]
      per_client = jax.vmap(client_loss)(heads, {**batch, "example_mask": em})
      n = em.sum(1)
      return (per_client * n).sum() / jnp.maximum(n.sum(), 1.0), per_client

    (_, per_client), (g_shared, g_heads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        server["shared"], clients["head"])
    # `count` runs over the whole run (never reset, like the Adam state), so it is the position: round 0.
    lr = optim_lib.learning_rate(optim, round_idx=0, step=server["count"],
                                 steps_per_round=steps_per_round, opt_steps_per_batch=1, total_rounds=total_rounds)
    any_real = real.any()
    shared, opt = optim_lib.apply_updates(optim, server["shared"], g_shared, server["opt"], lr)
    heads, head_opt = jax.vmap(lambda h, g, o: optim_lib.apply_updates(optim, h, g, o, optim_lib.head_lr(optim, lr)))(
        clients["head"], g_heads, clients["opt"])
    server = base.tree_where(any_real, {**server, "shared": shared, "opt": opt, "count": server["count"] + 1},
                             server)
    new_clients = jax.vmap(base.tree_where)(real, {"head": heads, "opt": head_opt}, clients)
    return server, new_clients, per_client

  def eval_params(frozen, server, client):
    return {"shared": base.Variant(peft_lib.merge(frozen, server["shared"]), client["head"])}

  return base.Algorithm(name, model, init, None, None, None, None, eval_params, ("shared",),
                        pooled_step=pooled_step)
