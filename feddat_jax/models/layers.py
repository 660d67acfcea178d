"""Layers shared by ViLT and ALBEF, with HF's parameter names (projection, query / key / value, dense).

The residual adds, LayerNorms and PEFT adapters stay in the models' layers (vilt.py, albef.py): they sit in
different places in the two architectures.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from feddat_jax.models import peft as peft_lib


def lora_config(peft: Optional[peft_lib.PeftConfig]) -> Optional[peft_lib.PeftConfig]:
  """`peft` when it asks for LoRA, else None (what MultiHeadAttention's `lora` expects)."""
  return peft if peft is not None and peft.has_lora else None


class PatchEmbeddings(nn.Module):
  """pixels [N, H, W, C] -> patch tokens [N, H/p, W/p, features]: one strided convolution, `projection`."""

  features: int
  patch_size: int

  @nn.compact
  def __call__(self, pixels):
    p = self.patch_size
    return nn.Conv(self.features, (p, p), strides=(p, p), padding="VALID", name="projection")(pixels)


class MultiHeadAttention(nn.Module):
  """Queries from x [B, Tq, *], keys and values from kv [B, Tk, *] (kv = x for self-attention) -> [B, Tq, d].

  bias: additive attention bias broadcastable to [B, heads, Tq, Tk] (0 or a large negative number).
  Parameters query / key / value (HF names); LoRA deltas `lora_query` / `lora_value` when `lora` is given.
  """

  features: int
  num_heads: int
  dropout: float = 0.0
  lora: Optional[peft_lib.PeftConfig] = None
  dtype: jnp.dtype = jnp.float32
  qkv_bias: bool = True

  @nn.compact
  def __call__(self, x, kv, bias, train):
    d, h, dt = self.features, self.num_heads, self.dtype
    dense = lambda name: nn.Dense(d, use_bias=self.qkv_bias, dtype=dt, name=name)
    q, k, v = dense("query")(x), dense("key")(kv), dense("value")(kv)
    if self.lora is not None:
      lora = lambda name: peft_lib.LoRA(d, self.lora.lora_rank, self.lora.lora_alpha, dtype=dt, name=name)
      q = q + lora("lora_query")(x)
      v = v + lora("lora_value")(kv)
    # Heads go next to the batch ([B, h, T, d/h]) so both products are plain batched matmuls, and the queries
    # are scaled rather than the [B, h, Tq, Tk] scores (one pass less over the biggest tensor): faster on CPU
    # under vmap (BENCHMARKS.md, "Attention layout").
    split = lambda t: jnp.swapaxes(t.reshape(t.shape[:-1] + (h, d // h)), -3, -2)
    q = q / jnp.sqrt(d // h).astype(dt)
    scores = jnp.einsum("bhqd,bhkd->bhqk", split(q), split(k))
    probs = jax.nn.softmax(scores.astype(jnp.float32) + bias, axis=-1).astype(dt)
    probs = nn.Dropout(self.dropout)(probs, deterministic=not train)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs, split(v))
    return jnp.swapaxes(out, -3, -2).reshape(x.shape[:-1] + (d,))


class DenseDropout(nn.Module):
  """dense -> dropout (HF's *SelfOutput / *Output sublayers, without the residual)."""

  features: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(self.features, dtype=self.dtype, name="dense")(x)
    return nn.Dropout(self.dropout)(x, deterministic=not train)


class Intermediate(nn.Module):
  """dense -> exact GELU (HF's *Intermediate)."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return jax.nn.gelu(nn.Dense(self.features, dtype=self.dtype, name="dense")(x), approximate=False)
