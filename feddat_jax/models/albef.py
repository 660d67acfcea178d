"""ALBEF for VQA in flax.linen: ViT image encoder, BERT question encoder with fusion layers, answer decoder.

The paper's second foundation model (reference 1.3, 1.4, 2): ALBEF's VQA model (`albef_no_distill`, no
momentum model). Answers are generated, not classified:
- `visual_encoder`: timm-style ViT (pre-LN blocks, final LayerNorm). Parameter names follow HF's classic
  `ViTModel` tree ("encoder/layer_3/attention/attention/query/kernel"), so `convert_albef.py` maps ALBEF's
  fused `attn.qkv` onto query/key/value.
- `text_encoder`: post-LN BERT (ALBEF's xbert); layers >= `fusion_layer` cross-attend to the image tokens.
- `text_decoder`: BERT with causal self-attention and cross-attention to the question states (all layers),
  teacher-forced on tokenized candidate answers. Its LM head (BERT's `cls.predictions`) is a separate
  module and a separate tree, the client's personal "head"; the rest is the frozen "backbone".

PEFT sites (`peft.PeftConfig`): adapters after the ViT MLP residual (as in ViLT) and inside every BERT output
sublayer as FedDAT places them, `LN(y + delta(LN(y)))` with the same LayerNorm twice (12 + 12 + 6 sites at
"base"); LoRA on query and value of every self-attention; prompts after CLS in the question embeddings and
after CLS in every image's token sequence.

Generalisation: ALBEF sees one image. A batch here may hold N_img images per example; each is encoded by the
ViT on its own and the token sequences are concatenated for the cross-attention keys, the tokens of absent
images (pixel_mask all False) being masked. ALBEF has no pixel mask: a present image is used whole.

Differences from ALBEF that are deliberate:
- The LM head's decoder matrix is its own parameter, initialised from (not tied to) the word embeddings;
  the head is personal and trains while the decoder's embeddings stay frozen.
- Ranking counts the first answer token's log-probability once; ALBEF adds the first-token log-probability
  from its start-token pass to the full sequence log-likelihood, which already contains it.
- Dropout is `hidden_dropout` / `attention_dropout` in BERT (ALBEF: 0.1 each, our default 0.0); the ViT has
  none (ALBEF's ViT has none either).

Example:
  >>> cfg = AlbefConfig.preset("tiny", vocab_size=64)
  >>> model = AlbefModel(cfg, peft.PeftConfig("adapter"), num_answers=10)
  >>> params = model.init(jax.random.key(0))          # {"backbone": ..., "head": ...}
  >>> batch = model.dummy_batch(batch_size=2)
  >>> feats = model.features(params["backbone"], batch)  # [2, k_train, answer_len, 64]
  >>> loss = model.task_loss(model.logits(params["head"], feats, batch), batch)
  >>> acc = model.scores(params["backbone"], params["head"], batch)  # [2], VQA score of the ranked answer
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from feddat_jax.models import layers
from feddat_jax.models import peft as peft_lib
from feddat_jax.models import vlm

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # ALBEF's image normalisation (the CLIP statistics)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Size presets (DESIGN.md). "base" is ALBEF: BERT-base text encoder / decoder and ViT-B/16 at 384 pixels.
PRESETS = {
    "tiny": dict(hidden_size=64, num_heads=2, mlp_dim=128, text_layers=2, fusion_layer=1, decoder_layers=1,
                 vision_hidden=64, vision_layers=2, vision_heads=2, vision_mlp=128, image_size=64, patch_size=16),
    # ViLT mini's image path (patch 8, 4 layers, MLP 256) under tiny's text side.
    "mini": dict(hidden_size=64, num_heads=2, mlp_dim=128, text_layers=2, fusion_layer=1, decoder_layers=1,
                 vision_hidden=64, vision_layers=4, vision_heads=2, vision_mlp=256, image_size=64, patch_size=8),
    "small": dict(hidden_size=256, num_heads=4, mlp_dim=1024, text_layers=4, fusion_layer=2, decoder_layers=2,
                  vision_hidden=256, vision_layers=4, vision_heads=4, vision_mlp=1024, image_size=128,
                  patch_size=16),
    "base": dict(vocab_size=30522, hidden_size=768, num_heads=12, mlp_dim=3072, text_layers=12, fusion_layer=6,
                 decoder_layers=6, vision_hidden=768, vision_layers=12, vision_heads=12, vision_mlp=3072,
                 image_size=384, patch_size=16, pixel_mean=CLIP_MEAN, pixel_std=CLIP_STD),
}


@dataclasses.dataclass(frozen=True)
class AlbefConfig:
  """ALBEF hyperparameters; the defaults are ALBEF's VQA model (ALBEF.pth, 384-pixel images)."""

  vocab_size: int = 30522
  pad_token_id: int = 0  # the tokenizer's [PAD] (BERT's is 0): answer_ids padding, never a target
  hidden_size: int = 768  # text encoder and decoder width
  num_heads: int = 12
  mlp_dim: int = 3072
  text_layers: int = 12
  fusion_layer: int = 6  # text layers with index >= this cross-attend to the image
  decoder_layers: int = 6  # every decoder layer cross-attends to the question
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12  # BERT
  vision_hidden: int = 768
  vision_layers: int = 12
  vision_heads: int = 12
  vision_mlp: int = 3072
  vision_eps: float = 1e-6  # timm ViT
  image_size: int = 384  # the position embeddings form an (image_size / patch_size)^2 grid
  patch_size: int = 16
  num_channels: int = 3
  hidden_dropout: float = 0.0  # BERT only (ALBEF: 0.1)
  attention_dropout: float = 0.0  # BERT only (ALBEF: 0.1)
  answer_len: int = 8  # tokens per candidate answer: [CLS] answer [SEP] [PAD]...
  answers_per_example: int = 4  # k_train: training teacher-forces each example's top answers by soft target
  rank_k: int = 64  # evaluation: candidates kept by first-token probability, rescored by full likelihood
  # Pixel normalisation (x / 255 - mean) / std; 0.5 / 0.5 is x / 127.5 - 1 as for ViLT. "base" uses ALBEF's.
  pixel_mean: tuple = (0.5, 0.5, 0.5)
  pixel_std: tuple = (0.5, 0.5, 0.5)
  dtype: str = "float32"  # compute dtype; parameters stay float32

  def __post_init__(self):
    if not 0 <= self.fusion_layer <= self.text_layers:
      raise ValueError(f"fusion_layer={self.fusion_layer} must lie in [0, text_layers={self.text_layers}]")
    if self.hidden_size % self.num_heads or self.vision_hidden % self.vision_heads:
      raise ValueError("hidden sizes must be divisible by their numbers of heads")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
    if self.answer_len < 2:
      raise ValueError(f"answer_len={self.answer_len} leaves no room for [CLS] and an answer token")

  @classmethod
  def preset(cls, name: str, **overrides) -> "AlbefConfig":
    if name not in PRESETS:
      raise ValueError(f"unknown ALBEF size {name!r}; use one of {tuple(PRESETS)}")
    return cls(**{**PRESETS[name], **overrides})

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


def bicubic_matrix(size_out: int, size_in: int) -> np.ndarray:
  """PyTorch's `interpolate(mode="bicubic", align_corners=False)` along one axis, as a [size_out, size_in] matrix.

  Keys' cubic kernel with a = -0.75, source coordinate (i + 0.5) * in / out - 0.5, border indices clamped,
  no antialiasing. (`jax.image.resize(method="bicubic")` uses a = -0.5 and antialiases when shrinking, so it
  does not reproduce ALBEF's `interpolate_pos_embed`; this matrix does.)
  """
  a = -0.75
  src = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
  base = np.floor(src)
  t = src - base
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
  m = np.zeros((size_out, size_in))
  for k in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + k, 0, size_in - 1)
    np.add.at(m, (np.arange(size_out), idx), weights[:, k])
  return m


def resize_pos_embed(pos_embed, grid_h: int, grid_w: Optional[int] = None):
  """[1, 1 + n*n, d] position embeddings -> [1, 1 + grid_h*grid_w, d]: the CLS row kept, the n x n grid
  resized bicubically as ALBEF's `interpolate_pos_embed` does. numpy in -> numpy out, jax in -> jax out."""
  grid_w = grid_h if grid_w is None else grid_w
  xp = np if isinstance(pos_embed, np.ndarray) else jnp
  n = int(round((pos_embed.shape[1] - 1) ** 0.5))
  if n * n != pos_embed.shape[1] - 1:
    raise ValueError(f"position embeddings of shape {tuple(pos_embed.shape)} do not hold a square patch grid")
  if (n, n) == (grid_h, grid_w):
    return pos_embed
  d = pos_embed.shape[-1]
  spatial = pos_embed[0, 1:].reshape(n, n, d)
  mh = xp.asarray(bicubic_matrix(grid_h, n), pos_embed.dtype)
  mw = xp.asarray(bicubic_matrix(grid_w, n), pos_embed.dtype)
  spatial = xp.einsum("ip,pqd,jq->ijd", mh, spatial, mw).reshape(1, grid_h * grid_w, d)
  return xp.concatenate([pos_embed[:, :1], spatial], axis=1)


def mask_bias(mask):
  """Attention mask [B, Tk] (or [B, Tq, Tk]), 1 = attend -> additive bias [B, 1, 1 | Tq, Tk] (HF's dtype min)."""
  mask = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]
  return jnp.where(mask > 0, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# Shared pieces.


def _adapter(peft, width, dtype):
  if peft is None or not peft.has_adapter:
    return None
  return peft_lib.Adapter(width // peft.reduction_factor, peft.adapter_init, dtype, name="adapter")


# ----------------------------------------------------------------------------------------------------------
# Vision: ALBEF's timm VisionTransformer, with HF ViTModel parameter names.


class VitEmbeddings(nn.Module):
  """pixels [N, H, W, C] -> tokens [N, 1 (+P) + Hp*Wp, dv]: CLS, (prompts,) patches; positions added."""

  cfg: AlbefConfig
  peft: Optional[peft_lib.PeftConfig] = None

  @nn.compact
  def __call__(self, pixels):
    cfg, d = self.cfg, self.cfg.vision_hidden
    x = layers.PatchEmbeddings(cfg.vision_hidden, cfg.patch_size, name="patch_embeddings")(pixels)
    n, hp, wp, _ = x.shape
    x = x.reshape(n, hp * wp, d)
    cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, d))
    pos = self.param("position_embeddings", nn.initializers.normal(0.02), (1, cfg.grid * cfg.grid + 1, d))
    pos = resize_pos_embed(pos, hp, wp)  # a no-op at the configured image size
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, d)), x], 1) + pos
    if self.peft is not None and self.peft.has_prompt:
      prompts = peft_lib.PromptGenerator(self.peft.prompt_length, d, self.peft.prompt_generator,
                                         name="image_prompts")()
      x, _ = peft_lib.insert_after_cls(x, jnp.ones(x.shape[:2], jnp.int32), prompts)
    return x


class VitAttention(nn.Module):
  cfg: AlbefConfig
  peft: Optional[peft_lib.PeftConfig] = None

  @nn.compact
  def __call__(self, x, train):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    bias = jnp.zeros((1, 1, 1, x.shape[1]), jnp.float32)
    x = layers.MultiHeadAttention(cfg.vision_hidden, cfg.vision_heads, 0.0, layers.lora_config(self.peft), dt,
                                  name="attention")(x, x, bias, train)
    return layers.DenseDropout(cfg.vision_hidden, 0.0, dt, name="output")(x, train)


class VitLayer(nn.Module):
  """timm Block: x + attn(LN(x)); x + mlp(LN(x)); then FedDAT's adapter on the stream (reference 1.3)."""

  cfg: AlbefConfig
  peft: Optional[peft_lib.PeftConfig] = None

  @nn.compact
  def __call__(self, x, adapter_weights, train):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    ln = lambda name: nn.LayerNorm(epsilon=cfg.vision_eps, dtype=dt, name=name)
    x = x + VitAttention(cfg, self.peft, name="attention")(ln("layernorm_before")(x), train)
    y = layers.Intermediate(cfg.vision_mlp, dt, name="intermediate")(ln("layernorm_after")(x))
    x = x + layers.DenseDropout(cfg.vision_hidden, 0.0, dt, name="output")(y, train)
    adapter = _adapter(self.peft, cfg.vision_hidden, dt)
    return x if adapter is None else adapter(x, adapter_weights)


class VisionTransformer(nn.Module):
  """pixels [N, H, W, C] (normalised) -> last hidden state [N, T, dv] after the final LayerNorm."""

  cfg: AlbefConfig
  peft: Optional[peft_lib.PeftConfig] = None

  @nn.compact
  def __call__(self, pixels, adapter_weights, train=False):
    cfg = self.cfg
    x = VitEmbeddings(cfg, self.peft, name="embeddings")(pixels).astype(cfg.compute_dtype)
    x = VitEncoder(cfg, self.peft, name="encoder")(x, adapter_weights, train)
    return nn.LayerNorm(epsilon=cfg.vision_eps, dtype=cfg.compute_dtype, name="layernorm")(x)


class VitEncoder(nn.Module):
  cfg: AlbefConfig
  peft: Optional[peft_lib.PeftConfig] = None

  @nn.compact
  def __call__(self, x, adapter_weights, train):
    for i in range(self.cfg.vision_layers):
      x = VitLayer(self.cfg, self.peft, name=f"layer_{i}")(x, adapter_weights, train)
    return x


# ----------------------------------------------------------------------------------------------------------
# Text: ALBEF's xbert (post-LN BERT with cross-attention), used as question encoder and answer decoder.


class BertEmbeddings(nn.Module):
  """ids [B, L], mask [B, L] -> (x [B, L (+P), d], mask): word + position + type 0, LayerNorm, dropout."""

  cfg: AlbefConfig
  peft: Optional[peft_lib.PeftConfig] = None
  prompts: bool = False  # the question encoder takes prompt tokens after CLS; the decoder does not

  @nn.compact
  def __call__(self, input_ids, mask, train):
    cfg, d = self.cfg, self.cfg.hidden_size
    x = nn.Embed(cfg.vocab_size, d, name="word_embeddings")(input_ids)
    x = x + nn.Embed(cfg.max_position_embeddings, d, name="position_embeddings")(
        jnp.arange(input_ids.shape[1])[None])
    x = x + nn.Embed(cfg.type_vocab_size, d, name="token_type_embeddings")(jnp.zeros_like(input_ids))
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="LayerNorm")(x)
    x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=not train)
    if self.prompts and self.peft is not None and self.peft.has_prompt:
      p = peft_lib.PromptGenerator(self.peft.prompt_length, d, self.peft.prompt_generator, name="text_prompts")()
      x, mask = peft_lib.insert_after_cls(x, mask, p)
    return x, mask


class BertAttention(nn.Module):
  """Self- or cross-attention sublayer: LayerNorm(dropout(dense(attention(x, kv))) + x).

  Parameters: self/{query,key,value}, output/dense, output/LayerNorm (ALBEF's names).
  """

  cfg: AlbefConfig
  lora: Optional[peft_lib.PeftConfig] = None

  @nn.compact
  def __call__(self, x, kv, bias, train):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    ctx = layers.MultiHeadAttention(cfg.hidden_size, cfg.num_heads, cfg.attention_dropout, self.lora, dt,
                                    name="self")(x, kv, bias, train)
    return BertSelfOutput(cfg, name="output")(ctx, x, train)


class BertSelfOutput(nn.Module):
  """LayerNorm(dropout(dense(h)) + x)."""

  cfg: AlbefConfig

  @nn.compact
  def __call__(self, h, x, train):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    h = nn.Dense(cfg.hidden_size, dtype=dt, name="dense")(h)
    h = nn.Dropout(cfg.hidden_dropout)(h, deterministic=not train)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dt, name="LayerNorm")(h + x)


class BertOutput(nn.Module):
  """BERT's output sublayer with FedDAT's adapter (reference 1.3).

  h = dropout(dense(intermediate)), y = h + x (x: the attention sublayer's output), LN the sublayer's LayerNorm:
  with an adapter `LN(y + delta(LN(y)))`, the same LN applied twice; without one the plain `LN(y)`.
  """

  cfg: AlbefConfig
  peft: Optional[peft_lib.PeftConfig] = None

  @nn.compact
  def __call__(self, intermediate, x, adapter_weights, train):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    h = nn.Dense(cfg.hidden_size, dtype=dt, name="dense")(intermediate)
    y = nn.Dropout(cfg.hidden_dropout)(h, deterministic=not train) + x
    ln = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dt, name="LayerNorm")
    adapter = _adapter(self.peft, cfg.hidden_size, dt)
    return ln(y) if adapter is None else ln(adapter(ln(y), adapter_weights, residual=y))


class BertLayer(nn.Module):
  """self-attention (+ cross-attention) -> intermediate -> output (+ adapter)."""

  cfg: AlbefConfig
  peft: Optional[peft_lib.PeftConfig] = None
  cross: bool = False

  @nn.compact
  def __call__(self, x, self_bias, encoder_states, cross_bias, adapter_weights, train):
    cfg = self.cfg
    x = BertAttention(cfg, layers.lora_config(self.peft), name="attention")(x, x, self_bias, train)
    if self.cross:
      x = BertAttention(cfg, None, name="crossattention")(x, encoder_states, cross_bias, train)
    h = layers.Intermediate(cfg.mlp_dim, cfg.compute_dtype, name="intermediate")(x)
    return BertOutput(cfg, self.peft, name="output")(h, x, adapter_weights, train)


class BertModel(nn.Module):
  """Embeddings + `num_layers` post-LN layers; layers with index >= `first_cross` cross-attend.

  Call: ids, mask [B, L]; encoder_states [B, Tk, *], encoder_mask [B, Tk] (None when no layer cross-attends);
  causal: decoder self-attention.
  Returns (last hidden state [B, L (+P), d], its attention mask).
  """

  cfg: AlbefConfig
  peft: Optional[peft_lib.PeftConfig] = None
  num_layers: int = 12
  first_cross: int = 6
  prompts: bool = False

  @nn.compact
  def __call__(self, input_ids, mask, encoder_states, encoder_mask, adapter_weights, causal=False, train=False):
    cfg = self.cfg
    x, mask = BertEmbeddings(cfg, self.peft, self.prompts, name="embeddings")(input_ids, mask, train)
    x = x.astype(cfg.compute_dtype)
    self_mask = mask
    if causal:  # key j is visible from query i when j <= i and j is a real token
      length = mask.shape[1]
      self_mask = jnp.tril(jnp.ones((length, length), mask.dtype))[None] * mask[:, None, :]
    self_bias = mask_bias(self_mask)
    cross_bias = None if encoder_mask is None else mask_bias(encoder_mask)
    x = BertEncoder(cfg, self.peft, self.num_layers, self.first_cross, name="encoder")(
        x, self_bias, encoder_states, cross_bias, adapter_weights, train)
    return x, mask


class BertEncoder(nn.Module):
  cfg: AlbefConfig
  peft: Optional[peft_lib.PeftConfig] = None
  num_layers: int = 12
  first_cross: int = 6

  @nn.compact
  def __call__(self, x, self_bias, encoder_states, cross_bias, adapter_weights, train):
    for i in range(self.num_layers):
      x = BertLayer(self.cfg, self.peft, cross=i >= self.first_cross, name=f"layer_{i}")(
          x, self_bias, encoder_states, cross_bias, adapter_weights, train)
    return x


class LMHead(nn.Module):
  """BERT's `cls.predictions`: dense -> GELU -> LayerNorm -> decoder (vocabulary logits, with bias).

  hidden [..., d] -> logits [..., vocab_size] (float32). Parameters: transform/{dense, LayerNorm}, decoder.
  """

  cfg: AlbefConfig

  @nn.compact
  def __call__(self, hidden):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    x = Transform(cfg, name="transform")(hidden)
    return nn.Dense(cfg.vocab_size, dtype=dt, name="decoder")(x).astype(jnp.float32)


class Transform(nn.Module):
  """dense -> exact GELU -> LayerNorm."""

  cfg: AlbefConfig

  @nn.compact
  def __call__(self, x):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    x = jax.nn.gelu(nn.Dense(cfg.hidden_size, dtype=dt, name="dense")(x), approximate=False)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dt, name="LayerNorm")(x)


class AlbefBackbone(nn.Module):
  """Everything but the LM head: `visual_encoder`, `text_encoder`, `text_decoder`.

  Methods (apply with `method=`): `encode` (images + question -> question states), `decode` (answers,
  teacher-forced, against question states -> decoder hidden states); `__call__` chains both for B x k answers.
  """

  cfg: AlbefConfig
  peft: Optional[peft_lib.PeftConfig] = None

  def setup(self):
    cfg = self.cfg
    self.visual_encoder = VisionTransformer(cfg, self.peft)
    self.text_encoder = BertModel(cfg, self.peft, cfg.text_layers, cfg.fusion_layer, prompts=True)
    self.text_decoder = BertModel(cfg, self.peft, cfg.decoder_layers, 0)

  def encode_image(self, pixels, present, adapter_weights, train=False):
    """pixels [B, N_img, H, W, C] (normalised), present [B, N_img] -> tokens [B, N_img*T, dv], mask [B, N_img*T]."""
    b, n = pixels.shape[:2]
    x = self.visual_encoder(pixels.reshape((b * n,) + pixels.shape[2:]), adapter_weights, train)
    t = x.shape[1]
    mask = jnp.broadcast_to(present.astype(jnp.int32)[:, :, None], (b, n, t))
    return x.reshape(b, n * t, x.shape[-1]), mask.reshape(b, n * t)

  def encode(self, input_ids, attention_mask, pixels, present, adapter_weights, train=False):
    """-> question states [B, L (+P), d] (the fused text encoder output) and their mask."""
    image, image_mask = self.encode_image(pixels, present, adapter_weights, train)
    return self.text_encoder(input_ids, attention_mask, image, image_mask, adapter_weights, train=train)

  def decode(self, answer_ids, states, states_mask, adapter_weights, train=False):
    """answer_ids [N, La] (padded with cfg.pad_token_id), states [N, Lq, d], states_mask [N, Lq]
    -> hidden [N, La, d]."""
    answer_mask = (answer_ids != self.cfg.pad_token_id).astype(jnp.int32)
    return self.text_decoder(answer_ids, answer_mask, states, states_mask, adapter_weights, causal=True,
                             train=train)[0]

  def __call__(self, input_ids, attention_mask, pixels, present, answer_ids, adapter_weights=None, train=False):
    """answer_ids [B, k, La] per example -> decoder hidden states [B, k, La, d]."""
    if adapter_weights is None:
      adapter_weights = jnp.ones((1,), jnp.float32)
    states, mask = self.encode(input_ids, attention_mask, pixels, present, adapter_weights, train)
    b, k, la = answer_ids.shape
    hidden = self.decode(answer_ids.reshape(b * k, la), jnp.repeat(states, k, axis=0), jnp.repeat(mask, k, axis=0),
                         adapter_weights, train)
    return hidden.reshape(b, k, la, -1)


# ----------------------------------------------------------------------------------------------------------
# The model wrapper the algorithms call.


@dataclasses.dataclass(frozen=True)
class AlbefModel:
  """ALBEF backbone + PEFT sites + personal LM head, with the functions the algorithms need.

  Parameters: `{"backbone": {visual_encoder, text_encoder, text_decoder}, "head": {transform, decoder}}`.
  Batch (one client's step): input_ids, attention_mask int [B, L]; pixel_values uint8 [B, N_img, H, W, 3];
  pixel_mask bool [B, N_img, H, W]; targets float [B, A] (soft scores over the client's A candidates);
  answer_mask float [A]; example_mask float [B]; answer_ids int32 [A, answer_len], every row
  `[CLS] answer [SEP]` padded with `albef.pad_token_id` (`data.tokenizer.tokenize_answers` builds it);
  [CLS] is the decoder's start token.
  """

  albef: AlbefConfig
  peft: peft_lib.PeftConfig
  num_answers: int
  num_images: int = 1

  def __post_init__(self):
    if self.num_answers < 1 or self.num_images < 1:
      raise ValueError(f"num_answers={self.num_answers} and num_images={self.num_images} must be >= 1")

  @property
  def backbone(self) -> AlbefBackbone:
    return AlbefBackbone(self.albef, self.peft)

  @property
  def head(self) -> LMHead:
    return LMHead(self.albef)

  @property
  def hidden_size(self) -> int:
    return self.albef.hidden_size

  @property
  def k_train(self) -> int:
    """Answers teacher-forced per training example."""
    return min(self.albef.answers_per_example, self.num_answers)

  def dummy_batch(self, batch_size: int = 1, text_len: int = 8):
    s, a = self.albef.image_size, self.num_answers
    return {
        "input_ids": jnp.zeros((batch_size, text_len), jnp.int32),
        "attention_mask": jnp.ones((batch_size, text_len), jnp.int32),
        "pixel_values": jnp.zeros((batch_size, self.num_images, s, s, 3), jnp.uint8),
        "pixel_mask": jnp.ones((batch_size, self.num_images, s, s), bool),
        "targets": jnp.zeros((batch_size, a), jnp.float32),
        "answer_mask": jnp.ones((a,), jnp.float32),
        "example_mask": jnp.ones((batch_size,), jnp.float32),
        # Shape placeholders: a start token and one answer token per row.
        "answer_ids": jnp.zeros((a, self.albef.answer_len), jnp.int32).at[:, :2].set(1),
    }

  def init(self, rng, pretrained=None):
    """-> {"backbone": params, "head": params}.

    `pretrained`: None, or a dict with keys among "backbone" and "head" (what `convert_albef.load_albef`
    returns); each given tree replaces the matching leaves of the fresh initialisation (`vlm.overlay`), so
    PEFT parameters, absent from every checkpoint, keep their fresh values.
    """
    if pretrained is not None and (not isinstance(pretrained, dict) or not pretrained
                                   or set(pretrained) - {"backbone", "head"}):
      keys = sorted(pretrained) if isinstance(pretrained, dict) else type(pretrained).__name__
      raise ValueError(f"ALBEF pretrained must be {{'backbone': ..., 'head': ...}} as convert_albef.load_albef "
                       f"returns; got {keys}")
    k_backbone, k_head = jax.random.split(rng)
    b = self.dummy_batch()
    backbone = self.backbone.init(k_backbone, b["input_ids"], b["attention_mask"], self._pixels(b),
                                  self._present(b), b["answer_ids"][None, :1])["params"]
    head = self.head.init(k_head, jnp.zeros((1, self.albef.hidden_size)))["params"]
    if pretrained is not None and "backbone" in pretrained:
      backbone = vlm.overlay(backbone, pretrained["backbone"])
    if pretrained is not None and "head" in pretrained:
      head = vlm.overlay(head, pretrained["head"])
    return {"backbone": backbone, "head": head}

  # -- inputs ------------------------------------------------------------------------------------------

  def _pixels(self, batch):
    x = batch["pixel_values"].astype(jnp.float32)
    cfg = self.albef
    if tuple(cfg.pixel_mean) == (0.5,) * 3 and tuple(cfg.pixel_std) == (0.5,) * 3:
      return x / 127.5 - 1.0  # exactly vlm.py's arithmetic
    return (x / 255.0 - jnp.asarray(cfg.pixel_mean, jnp.float32)) / jnp.asarray(cfg.pixel_std, jnp.float32)

  @staticmethod
  def _present(batch):
    return batch["pixel_mask"].any(axis=(-2, -1))

  def chosen_answers(self, batch):
    """The k_train answers trained per example -> (indices int [B, k], weights [B, k]).

    `lax.top_k(targets * answer_mask)` (ties by lower index); weight = target / sum of the chosen targets,
    0 for every answer of an example whose chosen targets are all 0.
    """
    soft = batch["targets"].astype(jnp.float32) * batch["answer_mask"].astype(jnp.float32)[None]
    values, idx = jax.lax.top_k(soft, self.k_train)
    total = values.sum(-1, keepdims=True)
    return idx, jnp.where(total > 0, values / jnp.where(total > 0, total, 1.0), 0.0)

  # -- training ----------------------------------------------------------------------------------------

  def features(self, backbone_params, batch, adapter_weights=None, train=False, rng=None):
    """Decoder hidden states [B, k_train, answer_len, d] of each example's chosen answers, teacher-forced.

    adapter_weights [S] mix S adapter sets (default: one set, weight 1); rng drives dropout when train.
    """
    idx, _ = self.chosen_answers(batch)
    rngs = {"dropout": rng} if rng is not None else {}
    return self.backbone.apply({"params": backbone_params}, batch["input_ids"], batch["attention_mask"],
                               self._pixels(batch), self._present(batch), batch["answer_ids"][idx],
                               adapter_weights=adapter_weights, train=train, rngs=rngs)

  def logits(self, head_params, features, batch=None):
    """Token logits [..., answer_len, vocab] from decoder hidden states [..., answer_len, d]."""
    del batch  # the LM head needs no masks
    return self.head.apply({"params": head_params}, features)

  def _token_terms(self, batch):
    """-> (next-token targets int [B, k, La-1], weight per target token [B, k, La-1])."""
    idx, weights = self.chosen_answers(batch)
    targets = batch["answer_ids"][idx][..., 1:]
    real = (targets != self.albef.pad_token_id).astype(jnp.float32)
    return targets, real * weights[..., None]

  @staticmethod
  def _example_mean(per_example, batch):
    mask = batch["example_mask"].astype(jnp.float32)
    return (per_example * mask).sum() / jnp.maximum(mask.sum(), 1.0)

  def task_loss(self, outputs, batch):
    """ALBEF's answer-generation loss from token logits [B, k, La, V].

    Reference 1.4: token cross-entropy of predicting token t+1 at position t, summed over the answer's real
    (non-pad) tokens, times the answer's weight, summed over answers, divided by the number of images
    (= real examples here). ALBEF's weights (1/len(answers) accumulated per unique answer) are proportional to
    annotator counts; with soft targets the weight is the chosen answer's target / the sum of the example's
    chosen targets. Examples with example_mask 0 and pad tokens contribute nothing.
    """
    targets, weight = self._token_terms(batch)
    logp = jax.nn.log_softmax(outputs[..., :-1, :].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return self._example_mean((nll * weight).sum((-2, -1)), batch)

  def kd_loss(self, student, teacher, batch, temperature=3.0):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) over the vocabulary per token position.

    The teacher is detached. Positions are the ones the task loss scores (those predicting a real answer
    token), weighted by the answer's task-loss weight and summed; mean over real examples. The released code
    forgot the padding mask (it sums over every position, pads included, and divides by the number of answer
    sequences; docs/released_code.md#albef-distillation-over-padding); we mask, so pad positions and padded
    examples do not matter.
    """
    _, weight = self._token_terms(batch)
    t = jax.lax.stop_gradient(teacher[..., :-1, :].astype(jnp.float32)) / temperature
    s = student[..., :-1, :].astype(jnp.float32) / temperature
    log_t, log_s = jax.nn.log_softmax(t, axis=-1), jax.nn.log_softmax(s, axis=-1)
    kl = (jnp.exp(log_t) * (log_t - log_s)).sum(-1)
    return temperature**2 * self._example_mean((kl * weight).sum((-2, -1)), batch)

  # -- evaluation --------------------------------------------------------------------------------------

  def predict(self, backbone_params, head_params, batch, adapter_weights=None):
    """ALBEF's answer ranking (reference 2) -> predicted candidate index int [B], always with answer_mask 1.

    One encoder pass; the decoder on the start token alone gives each candidate's first-token log-prob
    (answer_ids[:, 1]); the top k = min(rank_k, A) candidates of the client's list are rescored by their full
    sequence log-likelihood (teacher-forced, real tokens after [CLS]); the best one wins.
    """
    cfg, ids = self.albef, batch["answer_ids"]
    if adapter_weights is None:
      adapter_weights = jnp.ones((1,), jnp.float32)
    apply = lambda method, *args: self.backbone.apply({"params": backbone_params}, *args, adapter_weights,
                                                      method=method)
    states, states_mask = apply(AlbefBackbone.encode, batch["input_ids"], batch["attention_mask"],
                                self._pixels(batch), self._present(batch))
    b, (a, la) = states.shape[0], ids.shape
    valid = batch["answer_mask"] > 0

    start = jnp.broadcast_to(ids[0, :1], (b, 1))
    first = jax.nn.log_softmax(self.logits(head_params, apply(AlbefBackbone.decode, start, states, states_mask)),
                               axis=-1)[:, 0]  # [B, V]
    first = jnp.where(valid[None], first[:, ids[:, 1]], -jnp.inf)  # [B, A]
    k = min(cfg.rank_k, a)
    _, top = jax.lax.top_k(first, k)  # [B, k]

    cand = ids[top]  # [B, k, La]
    hidden = apply(AlbefBackbone.decode, cand.reshape(b * k, la), jnp.repeat(states, k, axis=0),
                   jnp.repeat(states_mask, k, axis=0))
    logp = jax.nn.log_softmax(self.logits(head_params, hidden), axis=-1).reshape(b, k, la, -1)
    tokens = cand[..., 1:]
    seq = (jnp.take_along_axis(logp[:, :, :-1], tokens[..., None], axis=-1)[..., 0]
           * (tokens != self.albef.pad_token_id)).sum(-1)  # [B, k]
    seq = jnp.where(valid[top], seq, -jnp.inf)  # candidates outside the list, when k exceeds its length
    return jnp.take_along_axis(top, jnp.argmax(seq, axis=-1)[:, None], axis=-1)[:, 0]

  def scores(self, backbone_params, head_params, batch, adapter_weights=None):
    """Per-example score float [B]: the soft target of the ranked answer, in [0, 1].

    The reference's ALBEF metric counts a prediction matching any ground-truth answer as 1; for
    single-answer data (targets 1 on the answer) this is the same number.
    """
    pred = self.predict(backbone_params, head_params, batch, adapter_weights)
    return jnp.take_along_axis(batch["targets"].astype(jnp.float32), pred[:, None], axis=-1)[:, 0]
