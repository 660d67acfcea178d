"""What an algorithm is: a handful of pure functions over explicit pytree states (fedjax's shape).

States are nested dicts of arrays, so checkpointing is "save the states":
- server state: what the server keeps (e.g. the shared adapter A_S) plus `round`, the round counter;
- client states: one tree per client, stacked on a leading clients axis (e.g. A_C and the answer head).

The engine runs, for each client of a round (vmapped) and inside one jitted program:
  carry = begin(frozen, server, client, num_steps)             # num_steps: the client's real steps this round
  carry, metrics = step(frozen, server, carry, batch, rng)      # scanned over local steps, masked
  upload, client = end(frozen, server, carry)
then `server = aggregate(server, uploads, weights)` over the clients axis.
`frozen` is the frozen backbone, shared by every client and never copied per client.
`sent(server)` (optional): the server's copy of what a client uploads, so that upload - sent is its update.
`eval_params(frozen, server, client)` names the parameters of each evaluation variant ({name: Variant}); the
engine scores a batch with `model.scores(v.backbone, v.head, batch, v.adapter_weights)`.
Losses come from the model (`model.task_loss`, `model.kd_loss`), so the same algorithm runs on ViLT and ALBEF.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from feddat_jax.models import peft as peft_lib
from feddat_jax.models import vlm as vlm_lib


class Variant(NamedTuple):
  """One evaluated model: full backbone parameters, answer head, adapter-set weights (None: one set)."""
  backbone: Any
  head: Any
  adapter_weights: Any = None


@dataclasses.dataclass(frozen=True)
class Algorithm:
  name: str
  model: vlm_lib.VisionLanguageModel
  init: Callable[..., Any]  # (rng, num_clients, pretrained=None) -> (frozen, server, clients)
  begin: Callable[..., Any]
  step: Callable[..., Any]
  end: Callable[..., Any]
  aggregate: Callable[..., Any]
  eval_params: Callable[..., Any]  # (frozen, server, client) -> {variant: Variant}
  variants: tuple[str, ...]  # evaluation variants, in the order eval_params returns them
  # Set only by algorithms that train one model on all clients' data pooled (then begin/step/end/aggregate
  # are None): (frozen, server, clients [C], batch [C, B, ...], real [C], steps_per_round)
  #   -> (server, clients, per-client loss [C]).
  pooled_step: Callable[..., Any] | None = None
  # (server) -> what the server sent a client of this round in the place of its upload: a tree shaped like one
  # client's upload (no clients axis), e.g. {"shared": server["shared"]}. Set: the engine measures client drift,
  # each client's update upload - sent and its cosine to the round's aggregated update (metrics "update_norm",
  # "update_cosine"). None: the upload is not parameters the server sent (or nothing is uploaded); not measured.
  sent: Callable[..., Any] | None = None

  @property
  def centralized(self) -> bool:
    return self.pooled_step is not None


def stack_clients(tree, num_clients: int):
  """The same tree for every client, stacked on a new leading axis (all clients start identical)."""
  return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), tree)


def init_model(model: vlm_lib.VisionLanguageModel, rng, pretrained=None):
  """-> (frozen backbone, trainable backbone tree, head) for the model's PEFT method."""
  params = model.init(rng, pretrained)
  frozen, trainable = peft_lib.split(params["backbone"], model.peft.method)
  return frozen, trainable, params["head"]


def zeros_like(tree):
  return jax.tree_util.tree_map(jnp.zeros_like, tree)


def tree_where(pred, new, old):
  return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), new, old)
