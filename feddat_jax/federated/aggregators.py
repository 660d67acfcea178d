"""Server-side aggregation of client uploads stacked on a leading clients axis."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_mean(uploads, weights, fallback):
  """sum_c w_c x_c / sum_c w_c over the clients axis; `fallback` where all weights are zero.

  uploads: pytree of [C, ...]; weights: [C] (0 for dummy or absent clients); fallback: pytree of [...].
  """
  total = weights.sum()
  w = weights / jnp.maximum(total, 1e-12)

  def mean(x, old):
    new = jnp.tensordot(w.astype(x.dtype), x, axes=1)
    return jnp.where(total > 0, new, old)

  return jax.tree_util.tree_map(mean, uploads, fallback)
