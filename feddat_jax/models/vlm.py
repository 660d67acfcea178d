"""The vision-language model every algorithm calls: a ViLT backbone with PEFT sites and an answer head.

Used functionally: parameters are explicit trees, `{"backbone": ..., "head": ...}`; algorithms split the
backbone tree into frozen and trainable parts with `peft.split` and merge them back before each call.

The model interface the algorithms use (ALBEF, `albef.AlbefModel`, has the same one):
  init(rng, pretrained) -> {"backbone", "head"};  features(backbone, batch, adapter_weights) -> float arrays;
  logits(head, features, batch) -> outputs;  task_loss(outputs, batch);  kd_loss(student, teacher, batch, T);
  scores(backbone, head, batch, adapter_weights) -> per-example evaluation score [B].
Here outputs are answer logits [B, A] (a classifier over the client's answers); for ALBEF they are the answer
decoder's token logits. An algorithm never looks inside them.

Batch layout (one client's step, the engine adds leading [clients, steps] axes):
  input_ids, attention_mask: int32 [B, L]; pixel_values: uint8 [B, N_img, H, W, 3];
  pixel_mask: bool [B, N_img, H, W] (all False for a missing image).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import traverse_util

from feddat_jax.models import heads as heads_lib
from feddat_jax.models import losses
from feddat_jax.models import peft as peft_lib
from feddat_jax.models import vilt as vilt_lib


# What the answer head reads per image. "cls": ViLT's pooled [CLS] output (ViLT's and the reference's VQA head).
# "cls_image": that and the mean of the image-patch outputs: a frozen backbone's patch tokens can hold what its
# [CLS] does not (tried in docs/foundation_model.md#attempts-to-make-the-backbone-more-useful; not the default).
READOUTS = ("cls", "cls_image")


@dataclasses.dataclass(frozen=True)
class VisionLanguageModel:
  """ViLT + PEFT sites + VQA head, with the functions the algorithms need."""

  vilt: vilt_lib.ViltConfig
  peft: peft_lib.PeftConfig
  num_answers: int
  num_images: int = 1
  readout: str = "cls"  # what the head reads per image: see READOUTS

  def __post_init__(self):
    if self.readout not in READOUTS:
      raise ValueError(f"readout={self.readout!r} is not one of {READOUTS}")
    if self.num_images >= self.vilt.modality_type_vocab_size:
      raise ValueError(f"{self.num_images} images per example need modality_type_vocab_size > {self.num_images} "
                       f"(have {self.vilt.modality_type_vocab_size}); set it in the ViLT config")

  @property
  def backbone(self) -> vilt_lib.ViLT:
    return vilt_lib.ViLT(self.vilt, self.peft)

  @property
  def head(self) -> heads_lib.VQAHead:
    return heads_lib.VQAHead(self.num_answers, 2 * self.vilt.hidden_size, dtype=self.vilt.compute_dtype)

  def dummy_batch(self, batch_size: int = 1, text_len: int = 8):
    s = self.vilt.image_size
    return {
        "input_ids": jnp.zeros((batch_size, text_len), jnp.int32),
        "attention_mask": jnp.ones((batch_size, text_len), jnp.int32),
        "pixel_values": jnp.zeros((batch_size, self.num_images, s, s, 3), jnp.uint8),
        "pixel_mask": jnp.ones((batch_size, self.num_images, s, s), bool),
    }

  def init(self, rng, pretrained=None):
    """-> {"backbone": params, "head": params}. `pretrained` backbone params (e.g. from `convert.load_vilt`)
    replace the random backbone; the PEFT parameters it lacks keep their fresh initialisation."""
    k_backbone, k_head = jax.random.split(rng)
    b = self.dummy_batch()
    backbone = self.backbone.init(k_backbone, b["input_ids"], b["attention_mask"],
                                  jnp.zeros(b["pixel_values"].shape[:1] + b["pixel_values"].shape[2:]),
                                  b["pixel_mask"][:, 0])["params"]
    if pretrained is not None:
      backbone = overlay(backbone, pretrained)
    head = self.head.init(k_head, jnp.zeros((1, self.num_images, self.feature_size)))["params"]
    return {"backbone": backbone, "head": head}

  @property
  def feature_size(self) -> int:
    return self.vilt.hidden_size * (2 if self.readout == "cls_image" else 1)

  def features(self, backbone_params, batch, adapter_weights=None, train=False, rng=None):
    """ViLT outputs per image, [B, N_img, feature_size]: the pooled [CLS] ("cls"), and with "cls_image" the
    mean of the valid image-patch outputs after it. Pixels are normalised here (mean = std = 0.5)."""
    pixels = batch["pixel_values"].astype(jnp.float32) / 127.5 - 1.0
    rngs = {"dropout": rng} if rng is not None else {}
    pooled = []
    for i in range(self.num_images):
      out = self.backbone.apply({"params": backbone_params}, batch["input_ids"], batch["attention_mask"],
                                pixels[:, i], batch["pixel_mask"][:, i], image_token_type_idx=i + 1,
                                adapter_weights=adapter_weights, train=train, rngs=rngs)
      feats = out["pooler_output"]
      if self.readout == "cls_image":  # the patches are the last tokens (prompts sit after the [CLS] tokens)
        k = (pixels.shape[2] // self.vilt.patch_size) * (pixels.shape[3] // self.vilt.patch_size)
        valid = out["mask"][:, -k:, None].astype(feats.dtype)
        patches = (out["last_hidden_state"][:, -k:] * valid).sum(1) / jnp.maximum(valid.sum(1), 1.0)
        feats = jnp.concatenate([feats, patches.astype(feats.dtype)], -1)
      pooled.append(feats)
    return jnp.stack(pooled, axis=1)

  def logits(self, head_params, features, batch):
    """Answer logits [B, A] from features [B, N_img, d]; images absent from an example contribute zeros."""
    present = batch["pixel_mask"].any(axis=(-2, -1))
    return self.head.apply({"params": head_params}, features, present).astype(jnp.float32)

  def task_loss(self, logits, batch):
    """BCE with soft targets over the client's answers (reference 1.4), mean over real examples."""
    return losses.task_loss(logits, batch["targets"], batch["answer_mask"], batch["example_mask"])

  def kd_loss(self, student, teacher, batch, temperature=3.0):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) over the client's answers; teacher detached."""
    return losses.kd_loss(student, teacher, batch["answer_mask"], batch["example_mask"], temperature)

  def scores(self, backbone_params, head_params, batch, adapter_weights=None):
    """Per-example VQA score [B]: the soft target of the argmax answer (score rules: feddat_jax/data/schema.py)."""
    z = self.logits(head_params, self.features(backbone_params, batch, adapter_weights), batch)
    return losses.vqa_scores(z, batch["targets"], batch["answer_mask"])


def overlay(params, pretrained):
  """`params` with every leaf that `pretrained` has replaced by it; shapes must agree, nothing may be extra."""
  flat = traverse_util.flatten_dict(params, sep="/")
  for k, v in traverse_util.flatten_dict(pretrained, sep="/").items():
    if k not in flat:
      raise ValueError(f"pretrained parameter {k} does not exist in the model")
    if flat[k].shape != v.shape:
      raise ValueError(f"pretrained parameter {k} has shape {v.shape}, the model expects {flat[k].shape}")
    flat[k] = v
  return traverse_util.unflatten_dict(flat, sep="/")
