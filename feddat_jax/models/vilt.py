"""ViLT in flax.linen: the same model as transformers' `ViltModel`, with PEFT sites.

Parameter names mirror the HF module tree ("encoder/layer_3/attention/attention/query/kernel" is HF's
"encoder.layer.3.attention.attention.query.weight", transposed), so `convert.py` is a renaming.

Differences from HF that do not change any unmasked output:
- Image patches stay in grid order, all of them, with a patch mask. HF (with `max_image_length=-1`) keeps as
  many patches as the image with most valid patches has, pads the others with randomly drawn *masked* patches
  and shuffles the valid patches of the fullest image. Attention is permutation-equivariant and masked keys
  are ignored, so text tokens, the pooled output and every valid image token agree; masked tokens hold values
  nobody reads. With `max_image_length = K > 0` we keep K tokens: valid patches first (grid order, or a random
  subset when `train` and a "dropout" rng are given, as HF samples), then masked ones.
- Shapes are static: the position embeddings are resized per image to its own valid patch grid with an
  explicit align-corners bilinear matrix (HF's `interpolate(..., align_corners=True)`), zero-padded.

Example:
  >>> cfg = ViltConfig.preset("tiny")
  >>> model = ViLT(cfg)
  >>> out = model.apply(variables, input_ids, attention_mask, pixel_values, pixel_mask)
  >>> out["pooler_output"].shape   # [B, hidden]
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from feddat_jax.models import layers
from feddat_jax.models import peft as peft_lib

# The size presets shared by models, configs, tests and benchmarks (DESIGN.md).
PRESETS = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=2, mlp_dim=128, image_size=64, patch_size=16),
    # tiny's width at patch 8 (an 8x8 grid on 64-pixel images: the synthetic shapes need it) and twice its depth;
    # the default job's backbone, pretrained longer than a job can afford and shipped (feddat_jax/foundation/).
    "mini": dict(hidden_size=64, num_layers=4, num_heads=2, mlp_dim=256, image_size=64, patch_size=8),
    "small": dict(hidden_size=256, num_layers=4, num_heads=4, mlp_dim=1024, image_size=128, patch_size=16),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, image_size=384, patch_size=32),
}


@dataclasses.dataclass(frozen=True)
class ViltConfig:
  """ViLT hyperparameters; the defaults are `dandelin/vilt-b32-mlm`'s."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  image_size: int = 384  # the pretraining image size: position embeddings form a (image/patch)^2 grid
  patch_size: int = 32
  num_channels: int = 3
  max_position_embeddings: int = 40  # text tokens
  type_vocab_size: int = 2  # BERT token types
  modality_type_vocab_size: int = 2  # 0 text, 1 image (2: a second image)
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.0
  attention_dropout: float = 0.0
  qkv_bias: bool = True
  max_image_length: int = -1  # image tokens kept; -1: all patches of the input grid
  dtype: str = "float32"  # compute dtype; parameters stay float32

  @classmethod
  def preset(cls, name: str, **overrides) -> "ViltConfig":
    if name not in PRESETS:
      raise ValueError(f"unknown ViLT size {name!r}; use one of {tuple(PRESETS)}")
    return cls(**{**PRESETS[name], **overrides})

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


def align_corners_matrix(n_out: jax.Array, size_out: int, size_in: int) -> jax.Array:
  """Bilinear align-corners resize of length `size_in` to the first `n_out` of `size_out` rows, as a matrix.

  Row i < n_out samples source coordinate i * (size_in - 1) / (n_out - 1); rows >= n_out are zero (padding).
  Returns [size_out, size_in]; `n_out` may be traced.
  """
  i = jnp.arange(size_out, dtype=jnp.float32)
  scale = jnp.where(n_out > 1, (size_in - 1) / jnp.maximum(n_out - 1, 1).astype(jnp.float32), 0.0)
  src = i * scale
  lo = jnp.clip(jnp.floor(src).astype(jnp.int32), 0, size_in - 1)
  hi = jnp.minimum(lo + 1, size_in - 1)
  frac = src - lo
  m = jax.nn.one_hot(lo, size_in) * (1 - frac)[:, None] + jax.nn.one_hot(hi, size_in) * frac[:, None]
  return jnp.where((i < n_out)[:, None], m, 0.0)


def nearest_indices(size_out: int, size_in: int) -> jax.Array:
  """Source indices of PyTorch's default `interpolate(mode="nearest")` from size_in to size_out."""
  return jnp.floor(jnp.arange(size_out) * (size_in / size_out)).astype(jnp.int32)


class TextEmbeddings(nn.Module):
  """BERT embeddings: word + position + token type, LayerNorm, dropout."""

  cfg: ViltConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, train):
    cfg = self.cfg
    d = cfg.hidden_size
    x = nn.Embed(cfg.vocab_size, d, name="word_embeddings")(input_ids)
    x = x + nn.Embed(cfg.type_vocab_size, d, name="token_type_embeddings")(token_type_ids)
    x = x + nn.Embed(cfg.max_position_embeddings, d, name="position_embeddings")(
        jnp.arange(input_ids.shape[1])[None])
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="LayerNorm")(x)
    return nn.Dropout(cfg.hidden_dropout)(x, deterministic=not train)


class ViltEmbeddings(nn.Module):
  """Text and image tokens with modality-type embeddings; returns (embeddings [B, T, d], mask [B, T])."""

  cfg: ViltConfig
  peft: Optional[peft_lib.PeftConfig] = None

  def setup(self):
    cfg = self.cfg
    d, grid = cfg.hidden_size, cfg.image_size // cfg.patch_size
    self.text_embeddings = TextEmbeddings(cfg)
    self.patch_embeddings = layers.PatchEmbeddings(cfg.hidden_size, cfg.patch_size)
    self.cls_token = self.param("cls_token", nn.initializers.zeros, (1, 1, d))
    self.position_embeddings = self.param("position_embeddings", nn.initializers.normal(0.02),
                                          (1, grid * grid + 1, d))
    self.token_type_embeddings = nn.Embed(cfg.modality_type_vocab_size, d)
    self.dropout = nn.Dropout(cfg.hidden_dropout)
    if self.peft is not None and self.peft.has_prompt:
      self.text_prompts = peft_lib.PromptGenerator(self.peft.prompt_length, d, self.peft.prompt_generator)
      self.image_prompts = peft_lib.PromptGenerator(self.peft.prompt_length, d, self.peft.prompt_generator)

  def visual_embed(self, pixel_values, pixel_mask, train):
    """pixel_values [B, H, W, C], pixel_mask [B, H, W] -> (tokens [B, 1+K, d], mask [B, 1+K])."""
    cfg = self.cfg
    x = self.patch_embeddings(pixel_values)  # [B, Hp, Wp, d]
    b, hp, wp, d = x.shape
    rows = nearest_indices(hp, pixel_mask.shape[1])
    cols = nearest_indices(wp, pixel_mask.shape[2])
    patch_mask = pixel_mask[:, rows][:, :, cols].astype(jnp.int32)  # [B, Hp, Wp]
    valid_h = patch_mask[:, :, 0].sum(1)
    valid_w = patch_mask[:, 0, :].sum(1)

    grid = cfg.image_size // cfg.patch_size
    spatial = self.position_embeddings[0, 1:].reshape(grid, grid, d)

    def resize(h, w):
      return jnp.einsum("ip,pqd,jq->ijd", align_corners_matrix(h, hp, grid), spatial,
                        align_corners_matrix(w, wp, grid))

    pos = jax.vmap(resize)(valid_h, valid_w).reshape(b, hp * wp, d)
    x = x.reshape(b, hp * wp, d)
    mask = patch_mask.reshape(b, hp * wp)

    n = hp * wp
    k = n if cfg.max_image_length is None or cfg.max_image_length < 0 else min(cfg.max_image_length, n)
    if k < n:
      # Valid patches first (random order when sampling, as HF does in training), then the masked ones.
      rank = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32), (b, n))
      if train and self.has_rng("dropout"):
        rank = jax.random.uniform(self.make_rng("dropout"), (b, n)) * n
      order = jnp.argsort(jnp.where(mask > 0, rank, rank + 2 * n), axis=1)[:, :k]
      take = lambda a: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)
      x, pos, mask = take(x), take(pos), take(mask)

    cls = jnp.broadcast_to(self.cls_token, (b, 1, d))
    cls_pos = jnp.broadcast_to(self.position_embeddings[:, :1], (b, 1, d))
    x = jnp.concatenate([cls, x], 1) + jnp.concatenate([cls_pos, pos], 1)
    x = self.dropout(x, deterministic=not train)
    return x, jnp.concatenate([jnp.ones((b, 1), mask.dtype), mask], 1)

  def __call__(self, input_ids, attention_mask, token_type_ids, pixel_values, pixel_mask,
               image_token_type_idx, train):
    text = self.text_embeddings(input_ids, token_type_ids, train)
    image, image_mask = self.visual_embed(pixel_values, pixel_mask, train)
    text = text + self.token_type_embeddings(jnp.zeros_like(attention_mask))
    image = image + self.token_type_embeddings(jnp.full_like(image_mask, image_token_type_idx))
    text_mask = attention_mask
    if self.peft is not None and self.peft.has_prompt:
      types = self.token_type_embeddings.embedding
      text, text_mask = peft_lib.insert_after_cls(text, text_mask, self.text_prompts() + types[0])
      image, image_mask = peft_lib.insert_after_cls(image, image_mask,
                                                    self.image_prompts() + types[image_token_type_idx])
    return jnp.concatenate([text, image], 1), jnp.concatenate([text_mask, image_mask.astype(text_mask.dtype)], 1)


class Attention(nn.Module):
  cfg: ViltConfig
  peft: Optional[peft_lib.PeftConfig] = None

  @nn.compact
  def __call__(self, x, bias, train):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    x = layers.MultiHeadAttention(cfg.hidden_size, cfg.num_heads, cfg.attention_dropout,
                                  layers.lora_config(self.peft), dt, cfg.qkv_bias, name="attention")(x, x, bias, train)
    return layers.DenseDropout(cfg.hidden_size, cfg.hidden_dropout, dt, name="output")(x, train)


class ViltLayer(nn.Module):
  """Pre-LN block; FedDAT's adapter acts on the stream after the FFN residual add (reference 1.3)."""

  cfg: ViltConfig
  peft: Optional[peft_lib.PeftConfig] = None

  @nn.compact
  def __call__(self, x, bias, adapter_weights, train):
    cfg = self.cfg
    ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, name=name)
    x = x + Attention(cfg, self.peft, name="attention")(ln("layernorm_before")(x), bias, train)
    y = layers.Intermediate(cfg.mlp_dim, cfg.compute_dtype, name="intermediate")(ln("layernorm_after")(x))
    x = x + layers.DenseDropout(cfg.hidden_size, cfg.hidden_dropout, cfg.compute_dtype, name="output")(y, train)
    if self.peft is not None and self.peft.has_adapter:
      bottleneck = cfg.hidden_size // self.peft.reduction_factor
      x = peft_lib.Adapter(bottleneck, self.peft.adapter_init, cfg.compute_dtype, name="adapter")(
          x, adapter_weights)
    return x


class Encoder(nn.Module):
  cfg: ViltConfig
  peft: Optional[peft_lib.PeftConfig] = None

  @nn.compact
  def __call__(self, x, bias, adapter_weights, train):
    for i in range(self.cfg.num_layers):
      x = ViltLayer(self.cfg, self.peft, name=f"layer_{i}")(x, bias, adapter_weights, train)
    return x


class Pooler(nn.Module):
  """dense + tanh on the first (text CLS) token."""

  cfg: ViltConfig

  @nn.compact
  def __call__(self, first_token):
    return jnp.tanh(nn.Dense(self.cfg.hidden_size, dtype=self.cfg.compute_dtype, name="dense")(first_token))


class ViLT(nn.Module):
  """HF `ViltModel` (embeddings, pre-LN encoder, final LayerNorm, pooler) with PEFT sites.

  Call:
    input_ids, attention_mask: int [B, L]; pixel_values: float [B, H, W, C] (normalised);
    pixel_mask: [B, H, W] (1 = real pixel); token_type_ids: optional int [B, L];
    image_token_type_idx: 1, or 2 for the second image of a two-image example;
    adapter_weights: [S] mixing weights of the adapter sets (default: one set, weight 1).
  Returns dict: last_hidden_state [B, T, d], pooler_output [B, d], mask [B, T].
  """

  cfg: ViltConfig
  peft: Optional[peft_lib.PeftConfig] = None

  @nn.compact
  def __call__(self, input_ids, attention_mask, pixel_values, pixel_mask, token_type_ids=None,
               image_token_type_idx: int = 1, adapter_weights=None, train: bool = False):
    cfg = self.cfg
    if not 0 < image_token_type_idx < cfg.modality_type_vocab_size:
      raise ValueError(f"image_token_type_idx={image_token_type_idx} needs modality_type_vocab_size > "
                       f"{image_token_type_idx} (have {cfg.modality_type_vocab_size}); extend the modality "
                       "type embeddings for multi-image inputs")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if adapter_weights is None:
      adapter_weights = jnp.ones((1,), jnp.float32)
    x, mask = ViltEmbeddings(cfg, self.peft, name="embeddings")(
        input_ids, attention_mask, token_type_ids, pixel_values.astype(jnp.float32), pixel_mask,
        image_token_type_idx, train)
    # Additive mask with the dtype minimum, as HF's eager attention does.
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    x = Encoder(cfg, self.peft, name="encoder")(x.astype(cfg.compute_dtype), bias, adapter_weights, train)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, name="layernorm")(x)
    pooled = Pooler(cfg, name="pooler")(x[:, 0])
    return {"last_hidden_state": x, "pooler_output": pooled, "mask": mask}
