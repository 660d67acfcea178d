"""Client optimiser: AdamW with the reference's hyperparameters and learning-rate schedule.

AdamW (lr 1e-4, betas (0.9, 0.98), eps 1e-8, weight decay 0.01 except biases and LayerNorm scales), one
state per parameter group, so that a group updates (and counts Adam steps) only when its gradient is taken,
as PyTorch does for parameters whose `.grad` is None. The learning rate is computed from an explicit
position in the run, so one compiled round serves every round:

- default: linear warm-up over the first `warmup_frac` of the whole run, then linear decay to 0 at its end;
- `restart_each_round` (the released code, docs/released_code.md#learning-rate-schedule-restarted-every-round):
  the schedule restarts every round with a horizon of `horizon_epochs` local epochs, stepped once per
  optimiser step; like `get_polynomial_decay_schedule_with_warmup`, the very first step has learning rate 0.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 1e-4
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-8
  weight_decay: float = 0.01
  schedule: str = "warmup_linear"  # warmup_linear | constant
  warmup_frac: float = 0.1
  restart_each_round: bool = False  # the released code's per-round restart (docs/released_code.md)
  horizon_epochs: float = 15.0  # schedule length in local epochs when restarting each round (reference: 15)
  keep_state: bool = False  # keep Adam moments across rounds (the reference starts fresh every round)
  head_lr_mult: float = 1.0  # the answer head's learning rate over the rest's (ViLT finetunes its heads at 10x)

  def __post_init__(self):
    if not self.head_lr_mult > 0:
      raise ValueError(f"head_lr_mult={self.head_lr_mult} must be > 0")
    if self.schedule not in ("warmup_linear", "constant"):
      raise ValueError(f"unknown schedule {self.schedule!r}; use 'warmup_linear' or 'constant'")


def _decays(path: str) -> bool:
  leaf = path.rsplit("/", 1)[-1]
  return not (leaf.endswith("bias") or (leaf == "scale" and "norm" in path.lower()))


def decay_mask(params):
  """True where weight decay applies: not on biases and LayerNorm scales. Any pytree of dicts/tuples."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _decays(jax.tree_util.keystr(path, simple=True,
                                                                                         separator="/")), params)


def adamw(cfg: OptimConfig, params) -> optax.GradientTransformation:
  """AdamW direction without the learning rate (applied by `apply_updates`)."""
  return optax.chain(optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps),
                     optax.add_decayed_weights(cfg.weight_decay, decay_mask(params)))


def apply_updates(cfg: OptimConfig, params, grads, opt_state, lr):
  """One AdamW step with learning rate `lr` (traced) -> (params, opt_state).

  `lr` is a scalar, or a tree that is a prefix of `params` (e.g. a pair for (trainable, head) params: see
  `lr_pair`) giving each subtree its own rate; the Adam state is the same either way."""
  updates, opt_state = adamw(cfg, params).update(grads, opt_state, params)
  step = lambda rate, p, u: jax.tree_util.tree_map(lambda p, u: p - rate * u.astype(p.dtype), p, u)
  return jax.tree_util.tree_map(step, lr, params, updates), opt_state


def head_lr(cfg: OptimConfig, lr):
  """The answer head's learning rate when the rest's is `lr` (at the default 1, `lr` itself: the same program
  as before the option existed, so compiled programs and their caches carry over)."""
  return lr if cfg.head_lr_mult == 1.0 else lr * cfg.head_lr_mult


def lr_pair(cfg: OptimConfig, lr):
  """`apply_updates`'s lr for params that are a (trainable, head) pair."""
  return (lr, head_lr(cfg, lr))


def learning_rate(cfg: OptimConfig, *, round_idx, step, steps_per_round, opt_steps_per_batch, total_rounds):
  """Learning rate of the optimiser step `step` (0-based, counted within the round; several per batch).

  `steps_per_round` is the client's number of real local steps (batches) this round; all args may be traced.
  """
  if cfg.schedule == "constant":
    return jnp.asarray(cfg.lr, jnp.float32)
  step = jnp.asarray(step, jnp.float32)
  steps_per_round = jnp.maximum(jnp.asarray(steps_per_round, jnp.float32), 1.0)
  if cfg.restart_each_round:
    total = cfg.horizon_epochs * steps_per_round
    pos = step
  else:
    total = total_rounds * steps_per_round * opt_steps_per_batch
    pos = round_idx * steps_per_round * opt_steps_per_batch + step + 1.0
  warmup = cfg.warmup_frac * total
  frac = jnp.where(pos < warmup, pos / jnp.maximum(warmup, 1.0),
                   jnp.clip((total - pos) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0))
  return cfg.lr * frac
