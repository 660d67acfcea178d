"""Load ALBEF's official PyTorch checkpoint (`ALBEF.pth`) into the Flax trees of `albef.AlbefModel`.

The pretraining checkpoint holds the ViT (`visual_encoder.*`, timm names, fused `attn.qkv`), the BERT text
encoder with its fusion layers (`text_encoder.bert.*`) and its MLM head (`text_encoder.cls.predictions.*`),
plus pretraining-only parts that the VQA model does not use (`SKIPPED_PREFIXES`, skipped on purpose).
As ALBEF's VQA finetuning loads it:
- `pos_embed` is resized bicubically to the configured image size (CLS position kept; `albef.resize_pos_embed`
  reproduces torch's `interpolate(mode="bicubic", align_corners=False)`);
- the answer decoder is initialised from the text encoder: decoder embeddings <- text embeddings, decoder
  layer j <- text layer fusion_layer + j (self-attention, cross-attention, intermediate, output);
- the LM head (personal "head" tree) <- `text_encoder.cls.predictions.*` (`decoder.bias` is BERT's tied alias
  of `predictions.bias`).
Also accepted: keys without `.bert.` (ALBEF's VQA checkpoints name the encoder `text_encoder.embeddings...`),
a finetuned VQA checkpoint's own decoder and head (`text_decoder.bert.*`, `text_decoder.cls.*`, used instead
of the copies), and a state dict wrapped as {"model": state_dict}.

feddat_jax never downloads: the checkpoint must be a local file.

Example:
  >>> cfg = albef.AlbefConfig.preset("base")
  >>> pretrained = load_albef("/ckpt/ALBEF.pth", cfg, peft.PeftConfig("adapter"))
  >>> params = albef.AlbefModel(cfg, peft.PeftConfig("adapter"), num_answers=100).init(rng, pretrained)
"""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from feddat_jax.models import albef as albef_lib
from feddat_jax.models.convert import CheckpointError

# In ALBEF.pth but not part of the VQA model: momentum encoders, contrastive projections and queues, the ITM
# head, the temperature, and BERT's position-id buffers. Skipped on purpose.
SKIPPED_PREFIXES = (
    "visual_encoder_m.", "text_encoder_m.", "text_decoder_m.", "vision_proj", "text_proj", "vision_proj_m",
    "text_proj_m", "itm_head.", "temp", "image_queue", "text_queue", "idx_queue", "queue_ptr",
    "text_encoder.bert.embeddings.position_ids", "text_encoder.embeddings.position_ids",
    "text_decoder.bert.embeddings.position_ids",
)
_FIX = "is the config the checkpoint's size? ALBEF.pth is AlbefConfig.preset('base')"

# timm ViT names -> HF ViTModel names (our Flax tree), applied to the key after "visual_encoder.".
_VIT_RENAMES = (
    (r"^cls_token$", "embeddings/cls_token"),
    (r"^pos_embed$", "embeddings/position_embeddings"),
    (r"^patch_embed\.proj\.", "embeddings/patch_embeddings/projection/"),
    (r"^norm\.", "layernorm/"),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder/layer_\1/layernorm_before/"),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder/layer_\1/layernorm_after/"),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder/layer_\1/attention/attention/qkv/"),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder/layer_\1/attention/output/dense/"),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"encoder/layer_\1/intermediate/dense/"),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"encoder/layer_\1/output/dense/"),
)


def _abstract(cfg: albef_lib.AlbefConfig) -> dict:
  """Flat {"backbone/...": ShapeDtypeStruct, "head/...": ...} of the model without PEFT sites."""
  def init():
    model = albef_lib.AlbefModel(cfg, peft=None, num_answers=1)
    return model.init(jax.random.key(0))
  return traverse_util.flatten_dict(jax.eval_shape(init), sep="/")


def _vit_path(rest: str) -> str | None:
  for pattern, repl in _VIT_RENAMES:
    if re.search(pattern, rest):
      return "backbone/visual_encoder/" + re.sub(pattern, repl, rest).replace(".", "/")
  return None


def _bert_path(rest: str) -> str:
  """"encoder.layer.3.attention.self.query.weight" -> "encoder/layer_3/attention/self/query/weight"."""
  return re.sub(r"(^|\.)layer\.(\d+)\.", r"\1layer_\2.", rest).replace(".", "/")


def _route(key: str, from_decoder: bool) -> str | None:
  """An ALBEF key -> our flat path with a torch leaf name ("weight"/"bias"), or None if it is not ours."""
  if key.startswith("visual_encoder."):
    return _vit_path(key[len("visual_encoder."):])
  for prefix, tree in (("text_decoder.bert.", "text_decoder"), ("text_encoder.bert.", "text_encoder")):
    if key.startswith(prefix):
      return f"backbone/{tree}/" + _bert_path(key[len(prefix):])
  for prefix, own in (("text_decoder.cls.predictions.", True), ("text_encoder.cls.predictions.", False)):
    if key.startswith(prefix):
      if own != from_decoder:
        return "skip"  # the pretraining MLM head when the checkpoint has its own decoder head
      rest = key[len(prefix):]
      return "head/decoder/bias" if rest in ("bias", "decoder.bias") else "head/" + rest.replace(".", "/")
  if key.startswith("text_encoder.") and not key.startswith("text_encoder.cls."):
    return "backbone/text_encoder/" + _bert_path(key[len("text_encoder."):])
  return None


def _leaf(path: str, value: np.ndarray, expected: dict):
  """torch leaf -> [(flax path, flax value, torch-layout expected shape)] (one entry, three for a fused qkv)."""
  stem, leaf = path.rsplit("/", 1)
  if stem.endswith("/qkv"):  # timm's fused [3d, d_in] projection: query, key, value stacked on the out axis
    base = stem[: -len("/qkv")]
    if f"{base}/query/bias" not in expected:
      return [(path, value, None)]
    out = []
    for name, part in zip(("query", "key", "value"), np.split(value, 3, axis=0) if value.shape[0] % 3 == 0
                          else [value] * 3):
      target = f"{base}/{name}/{'kernel' if leaf == 'weight' else 'bias'}"
      shape = expected[target].shape
      torch_shape = (3 * shape[-1],) + tuple(shape[:1]) if leaf == "weight" else (3 * shape[0],)
      out.append((target, part.T if leaf == "weight" else part, torch_shape))
    return out
  if leaf == "bias" or path.endswith(("cls_token", "position_embeddings")):
    target = path
    return [(target, value, expected[target].shape if target in expected else None)]
  for name in ("scale", "embedding", "kernel"):
    target = f"{stem}/{name}"
    if target in expected:
      shape = expected[target].shape
      if name != "kernel":
        return [(target, value, shape)]
      if len(shape) == 4:  # conv: torch [out, in, kh, kw] <-> flax [kh, kw, in, out]
        return [(target, np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value,
                 (shape[3], shape[2], shape[0], shape[1]))]
      return [(target, value.T if value.ndim == 2 else value, (shape[1], shape[0]))]
  return [(path, value, None)]


def convert_state_dict(state_dict: dict, cfg: albef_lib.AlbefConfig, peft=None, source: str = "checkpoint"):
  """ALBEF state dict (numpy arrays) -> {"backbone": ..., "head": ...} Flax trees for `AlbefModel.init`.

  `peft` (the model's PeftConfig) is accepted for symmetry with the model: no ALBEF checkpoint holds PEFT
  parameters, so the result never contains them and they keep their fresh initialisation in `init`.
  Raises CheckpointError (one line) on unknown keys, missing parameters and shape mismatches.
  """
  del peft
  if set(state_dict) == {"model"} and isinstance(state_dict["model"], dict):
    state_dict = state_dict["model"]
  expected = _abstract(cfg)
  from_decoder = any(k.startswith("text_decoder.") and not k.startswith(SKIPPED_PREFIXES) for k in state_dict)
  got, origin, unexpected = {}, {}, []
  for key, value in state_dict.items():
    if key.startswith(SKIPPED_PREFIXES):
      continue
    path = _route(key, from_decoder)
    if path == "skip":
      continue
    if path is None:
      unexpected.append(key)
      continue
    value = np.asarray(value)
    for target, v, want in _leaf(path, value, expected):
      if want is None:
        unexpected.append(key)
        continue
      if target.endswith("embeddings/position_embeddings") and target.startswith("backbone/visual_encoder"):
        v = _resize_pos(key, v, cfg, source)
      elif tuple(value.shape) != tuple(want) or tuple(v.shape) != tuple(expected[target].shape):
        raise CheckpointError(f"{source}: shape mismatch for {key}: checkpoint {tuple(value.shape)}, model "
                              f"expects {tuple(want)} ({_FIX})")
      if target in got and not np.array_equal(got[target], v):
        raise CheckpointError(f"{source}: {key} and {origin[target]} both give {target} with different values; "
                              "pass a checkpoint with one of them")
      got[target], origin[target] = v, key
  if unexpected:
    raise CheckpointError(f"{source}: unexpected keys not in ALBEF's VQA model: {', '.join(sorted(unexpected)[:5])}"
                          f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all)")
  if not from_decoder:
    _decoder_from_encoder(got, cfg, source)
  for path, value in got.items():  # the decoder copies too: their shapes were checked as encoder layers
    if tuple(value.shape) != tuple(expected[path].shape):
      raise CheckpointError(f"{source}: {path} initialised from {origin.get(path, 'the text encoder')} has shape "
                            f"{tuple(value.shape)}, the model expects {tuple(expected[path].shape)} (the decoder "
                            "copies the fusion layers, which needs vision_hidden == hidden_size)")
  missing = sorted(set(expected) - set(got))
  if missing:
    raise CheckpointError(f"{source}: missing parameters: {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
  flat = {k: jnp.asarray(v, jnp.float32) for k, v in got.items()}
  return traverse_util.unflatten_dict(flat, sep="/")


def _resize_pos(key, value, cfg, source):
  """pos_embed [1, 1 + n*n, d] -> the configured grid; anything else is a shape error."""
  d, n = cfg.vision_hidden, int(round((value.shape[1] - 1) ** 0.5)) if value.ndim == 3 else 0
  if value.ndim != 3 or value.shape[0] != 1 or value.shape[2] != d or n * n != value.shape[1] - 1:
    raise CheckpointError(f"{source}: shape mismatch for {key}: checkpoint {tuple(value.shape)}, model expects "
                          f"(1, 1 + n*n, {d}) for a square patch grid ({_FIX})")
  return albef_lib.resize_pos_embed(value.astype(np.float32), cfg.grid)


def _decoder_from_encoder(got: dict, cfg, source):
  """ALBEF's VQA initialisation: decoder embeddings and layers copied from the text encoder's fusion layers."""
  fusion = cfg.text_layers - cfg.fusion_layer
  if cfg.decoder_layers > fusion:
    raise CheckpointError(f"{source}: the decoder's {cfg.decoder_layers} layers are initialised from the text "
                          f"encoder's fusion layers, of which there are only {fusion}; set decoder_layers <= {fusion}")
  enc = "backbone/text_encoder/"
  for path, value in list(got.items()):
    if path.startswith(enc + "embeddings/"):
      got["backbone/text_decoder/" + path[len(enc):]] = value
    m = re.match(re.escape(enc) + r"encoder/layer_(\d+)/(.*)$", path)
    if m and cfg.fusion_layer <= int(m.group(1)) < cfg.fusion_layer + cfg.decoder_layers:
      got[f"backbone/text_decoder/encoder/layer_{int(m.group(1)) - cfg.fusion_layer}/{m.group(2)}"] = value


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A local ALBEF `.pth` -> {key: numpy array} (floats as float32), unwrapping {"model": ...}."""
  if not os.path.isfile(path):
    raise CheckpointError(f"ALBEF checkpoint {path!r} does not exist; pass a local ALBEF.pth (the official "
                          "pretraining checkpoint); feddat_jax never downloads")
  try:
    import torch
  except ImportError:
    raise CheckpointError(f"{path}: reading an ALBEF .pth needs torch (pip install torch)") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises pickle and zip errors of several types
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointError(f"{path}: torch.load(weights_only=True) failed ({first})") from None
  if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
    obj = obj["model"]
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: expected a state dict (or {{'model': state_dict}}), got {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if not hasattr(v, "numpy"):
      raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    out[k] = v.float().numpy() if v.is_floating_point() else v.numpy()
  return out


def load_albef(path: str, cfg: albef_lib.AlbefConfig, peft=None):
  """A local ALBEF.pth -> {"backbone": ..., "head": ...}, the `pretrained` argument of `AlbefModel.init`."""
  return convert_state_dict(read_state_dict(path), cfg, peft, source=path)
