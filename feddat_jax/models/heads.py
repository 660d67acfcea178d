"""Per-client answer heads on ViLT's pooled output (personal in every algorithm: answer spaces differ).

The reference's VQA head: Linear(d -> 2d) -> LayerNorm -> GELU -> Linear(2d -> answers), PyTorch default
initialisation. For two-image examples (NLVR2-like) the pooled outputs of the images are concatenated
(a missing image contributes zeros), so one head serves clients with one or two images per example.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's nn.Linear default: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_kernel = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _torch_bias(fan_in):
  bound = 1.0 / jnp.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class VQAHead(nn.Module):
  """features [B, N_img, d], image_present [B, N_img] -> logits [B, num_answers]."""

  num_answers: int
  hidden: int  # 2 * d in the reference
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features, image_present=None):
    if image_present is not None:
      features = features * image_present[..., None].astype(features.dtype)
    x = features.reshape(features.shape[:-2] + (-1,)).astype(self.dtype)
    x = nn.Dense(self.hidden, kernel_init=_torch_kernel, bias_init=_torch_bias(x.shape[-1]), dtype=self.dtype,
                 name="dense_in")(x)
    x = jax.nn.gelu(nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="LayerNorm")(x), approximate=False)
    x = nn.Dense(self.num_answers, kernel_init=_torch_kernel, bias_init=_torch_bias(self.hidden),
                 dtype=self.dtype, name="dense_out")(x)
    return x.astype(jnp.float32)
