"""FedDAT: Federated Dual-Adapter Teacher (Chen et al., AAAI 2024), as the paper describes it.

Per client: a personal adapter A_C and answer head; the server: the shared adapter A_S. In a round each client
starts from the global A_S, keeps a frozen copy Â_S of it, and per batch makes two updates:
  (1) A_S and head:  0.5 * (L_task(z_S) + L_KD(student = z_S, teacher = stop_grad(z_DAT)))
  (2) A_C and head:  0.5 * (L_task(z_DAT) + L_KD(student = z_DAT, teacher = stop_grad(z_S before (1))))
where the Dual-Adapter Teacher (DAT) mixes A_C and Â_S 0.5/0.5 inside every adapter site. Only A_S is
uploaded and averaged. A_C is trained in every round (the released code stops after round 0: see
docs/released_code.md#personal-adapter-frozen-after-round-0).

One backbone pass of the DAT per batch, not two as in the reference: its features do not depend on the head,
the only thing update (1) changes that the DAT uses, so update (2) reuses the pass through its `jax.vjp`
(except with zero_grad_adam_steps, where update (1) also moves A_C and the pass is redone).

Switches that reproduce the released code on purpose (all off by default; docs/released_code.md, one section
each):
- freeze_personal_after_first_round: A_C trains only in round 0 (#personal-adapter-frozen-after-round-0);
- eval_stale_frozen_copy: the evaluated DAT uses the client's Â_S from the start of its last round
  (#stale-frozen-copy-at-evaluation);
- zero_grad_adam_steps: in each update the other adapter also takes an AdamW step with a zero gradient
  (#zero-gradient-adamw-steps).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from feddat_jax.federated import aggregators
from feddat_jax.federated import optim as optim_lib
from feddat_jax.federated.algorithms import base
from feddat_jax.models import peft as peft_lib

VARIANTS = ("dat", "personal", "shared")  # DAT (A_C + A_S), A_C alone, A_S alone; each with the client's head


def make(model, optim: optim_lib.OptimConfig, *, total_rounds: int, temperature: float = 3.0,
         freeze_personal_after_first_round: bool = False, eval_stale_frozen_copy: bool = False,
         zero_grad_adam_steps: bool = False, single_pass_dat: bool = True,
         aggregator: aggregators.Aggregator = aggregators.mean) -> base.Algorithm:
  """single_pass_dat=False runs the reference's second DAT pass for update (2): same numbers, more FLOPs
  (for benchmarks/step_flops.py). aggregator: how the server combines the A_S uploads (`aggregators.make`)."""
  if model.peft.method != "adapter":
    raise ValueError(f"FedDAT needs PEFT method 'adapter', got {model.peft.method!r}")
  half = jnp.array([0.5, 0.5], jnp.float32)

  def features(frozen, adapters, batch, weights=None):
    return model.features(peft_lib.merge(frozen, adapters), batch, adapter_weights=weights)

  def mixture(personal, frozen_copy):
    return jax.tree_util.tree_map(lambda c, s: jnp.concatenate([c, s], 0), personal, frozen_copy)

  def init(rng, num_clients, pretrained=None):
    k_model, k_personal = jax.random.split(rng)
    frozen, shared, head = base.init_model(model, k_model, pretrained)
    # A_C gets its own random draw, as in the reference; all clients start from the same one.
    _, personal, _ = base.init_model(model, k_personal, pretrained)
    server = {"shared": shared, "round": jnp.zeros((), jnp.int32)}
    client = {"personal": personal, "head": head}
    if optim.keep_state:
      client["opt"] = fresh_opt_state(shared, personal, head)
    if eval_stale_frozen_copy:
      client["frozen_copy"] = shared
    return frozen, server, base.stack_clients(client, num_clients)

  def fresh_opt_state(shared, personal, head):
    return {name: optim_lib.adamw(optim, p).init(p)
            for name, p in (("shared", shared), ("personal", personal), ("head", head))}

  def begin(frozen, server, client, num_steps):
    del frozen
    opt = client["opt"] if optim.keep_state else fresh_opt_state(server["shared"], client["personal"],
                                                                  client["head"])
    return {"shared": server["shared"], "personal": client["personal"], "head": client["head"], "opt": opt,
            "count": jnp.zeros((), jnp.int32), "num_steps": num_steps, "frozen_copy": server["shared"]}

  def lr(server, carry, offset):
    return optim_lib.learning_rate(optim, round_idx=server["round"], step=carry["count"] + offset,
                                   steps_per_round=carry["num_steps"], opt_steps_per_batch=2,
                                   total_rounds=total_rounds)

  def step(frozen, server, carry, batch, rng):
    del rng
    opt = dict(carry["opt"])
    dat_features = lambda a_c: features(frozen, mixture(a_c, carry["frozen_copy"]), batch, half)
    f_dat, dat_vjp = jax.vjp(dat_features, carry["personal"])
    z_dat = model.logits(carry["head"], f_dat, batch)

    # (1) A_S and head, distilled from the DAT.
    def loss_shared(params):
      z = model.logits(params[1], features(frozen, params[0], batch), batch)
      l_task = model.task_loss(z, batch)
      l_kd = model.kd_loss(z, z_dat, batch, temperature)
      return 0.5 * (l_task + l_kd), (z, l_task, l_kd)

    (_, (z_s, task_s, kd_s)), (g_shared, g_head) = jax.value_and_grad(loss_shared, has_aux=True)(
        (carry["shared"], carry["head"]))
    lr1 = lr(server, carry, 0)
    shared, opt["shared"] = optim_lib.apply_updates(optim, carry["shared"], g_shared, opt["shared"], lr1)
    head, opt["head"] = optim_lib.apply_updates(optim, carry["head"], g_head, opt["head"],
                                                optim_lib.head_lr(optim, lr1))
    personal = carry["personal"]
    train_personal = True
    if freeze_personal_after_first_round:
      train_personal = server["round"] == 0
    if zero_grad_adam_steps:
      # Only while A_C is in the optimiser; the step moves it, so update (2) needs a fresh DAT pass.
      new_personal, new_opt_personal = optim_lib.apply_updates(optim, personal, base.zeros_like(personal),
                                                               opt["personal"], lr1)
      personal = base.tree_where(train_personal, new_personal, personal)
      opt["personal"] = base.tree_where(train_personal, new_opt_personal, opt["personal"])
    if zero_grad_adam_steps or not single_pass_dat:
      f_dat, dat_vjp = jax.vjp(dat_features, personal)

    # (2) A_C (through the DAT) and head, distilled from A_S's logits before update (1).
    def loss_dat(f, h):
      z = model.logits(h, f, batch)
      l_task = model.task_loss(z, batch)
      l_kd = model.kd_loss(z, z_s, batch, temperature)
      return 0.5 * (l_task + l_kd), (l_task, l_kd)

    (_, (task_d, kd_d)), (g_f, g_head) = jax.value_and_grad(loss_dat, argnums=(0, 1), has_aux=True)(f_dat, head)
    (g_personal,) = dat_vjp(g_f)
    lr2 = lr(server, carry, 1)
    new_personal, new_opt_personal = optim_lib.apply_updates(optim, personal, g_personal, opt["personal"], lr2)
    personal = base.tree_where(train_personal, new_personal, personal)
    opt["personal"] = base.tree_where(train_personal, new_opt_personal, opt["personal"])
    head, opt["head"] = optim_lib.apply_updates(optim, head, g_head, opt["head"], optim_lib.head_lr(optim, lr2))
    if zero_grad_adam_steps:
      shared, opt["shared"] = optim_lib.apply_updates(optim, shared, base.zeros_like(shared), opt["shared"], lr2)

    carry = {**carry, "shared": shared, "personal": personal, "head": head, "opt": opt,
             "count": carry["count"] + 2}
    metrics = {"loss_shared_task": task_s, "loss_shared_kd": kd_s, "loss_dat_task": task_d, "loss_dat_kd": kd_d,
               "loss": task_s}
    return carry, metrics

  def end(frozen, server, carry):
    del frozen, server
    client = {"personal": carry["personal"], "head": carry["head"]}
    if optim.keep_state:
      client["opt"] = carry["opt"]
    if eval_stale_frozen_copy:
      client["frozen_copy"] = carry["frozen_copy"]
    return {"shared": carry["shared"]}, client

  def aggregate(server, uploads, weights):
    shared = aggregator(uploads["shared"], weights, server["shared"], server["round"])
    return {**server, "shared": shared, "round": server["round"] + 1}

  def eval_params(frozen, server, client):
    frozen_copy = client["frozen_copy"] if eval_stale_frozen_copy else server["shared"]
    head = client["head"]
    return {
        "dat": base.Variant(peft_lib.merge(frozen, mixture(client["personal"], frozen_copy)), head, half),
        "personal": base.Variant(peft_lib.merge(frozen, client["personal"]), head),
        "shared": base.Variant(peft_lib.merge(frozen, server["shared"]), head),
    }

  sent = lambda server: {"shared": server["shared"]}  # A_S as each client received it: upload - sent is its update
  return base.Algorithm("feddat", model, init, begin, step, end, aggregate, eval_params, VARIANTS, sent=sent)
