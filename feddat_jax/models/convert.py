"""Load a local Hugging Face ViLT directory into Flax variables, and its tokenizer.

A directory written by transformers' `save_pretrained` holds `config.json` and `model.safetensors` (or an
older `pytorch_model.bin`, read with `torch.load(weights_only=True)` when torch is installed). Both plain
`ViltModel` checkpoints and task checkpoints (`ViltForMaskedLM` such as `dandelin/vilt-b32-mlm`, whose keys
start with "vilt.") load; their task heads are skipped by name.

feddat_jax never downloads anything: a hub name gives an error saying how to fetch the directory once.

Example:
  >>> cfg, params = load_vilt("/ckpt/vilt-b32-mlm")
  >>> tok = load_tokenizer("/ckpt/vilt-b32-mlm", vocab_size=cfg.vocab_size)
"""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from feddat_jax.models import vilt as vilt_lib

# Heads of HF's ViLT task models: not part of the backbone, skipped on purpose.
_TASK_HEADS = ("mlm_score.", "itm_score.", "classifier.", "rank_output.")
# Non-persistent buffers that some older checkpoints still carry.
_BUFFERS = ("embeddings.text_embeddings.position_ids", "embeddings.text_embeddings.token_type_ids")
_CONFIG_FIELDS = {  # HF ViltConfig field -> ViltConfig field
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "intermediate_size": "mlp_dim", "image_size": "image_size",
    "patch_size": "patch_size", "num_channels": "num_channels",
    "max_position_embeddings": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
    "modality_type_vocab_size": "modality_type_vocab_size", "layer_norm_eps": "layer_norm_eps",
    "hidden_dropout_prob": "hidden_dropout", "attention_probs_dropout_prob": "attention_dropout",
    "qkv_bias": "qkv_bias", "max_image_length": "max_image_length",
}


class CheckpointError(ValueError):
  """A checkpoint directory or file that cannot be used; the message says why and what to do."""


def _require_local_dir(path: str) -> str:
  if os.path.isdir(path):
    return path
  if not os.path.isabs(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not os.path.exists(path):
    raise CheckpointError(
        f"{path!r} looks like a Hugging Face hub name, not a local directory; feddat_jax never downloads: "
        f"save it once where you have internet (transformers: ViltModel.from_pretrained({path!r})"
        f".save_pretrained(DIR), and the tokenizer likewise) and pass DIR")
  raise CheckpointError(f"ViLT checkpoint directory {path!r} does not exist; pass a directory written by "
                        "transformers' save_pretrained (config.json + model.safetensors)")


def config_from_hf(path: str, **overrides) -> vilt_lib.ViltConfig:
  """ViltConfig from `<path>/config.json`."""
  path = _require_local_dir(path)
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise CheckpointError(f"{file}: missing; a HF ViLT directory needs config.json beside the weights")
  try:
    with open(file) as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{file}: not valid JSON ({e})") from None
  if hf.get("model_type") != "vilt":
    raise CheckpointError(f"{file}: model_type is {hf.get('model_type')!r}, expected 'vilt'")
  if hf.get("hidden_act", "gelu") != "gelu":
    raise CheckpointError(f"{file}: hidden_act {hf['hidden_act']!r} is not supported (only 'gelu')")
  fields = {ours: hf[theirs] for theirs, ours in _CONFIG_FIELDS.items() if theirs in hf}
  return vilt_lib.ViltConfig(**{**fields, **overrides})


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The weights of a HF directory as numpy arrays (safetensors preferred; .bin via torch, weights only)."""
  path = _require_local_dir(path)
  st = os.path.join(path, "model.safetensors")
  binf = os.path.join(path, "pytorch_model.bin")
  if os.path.isfile(st):
    from safetensors.numpy import load_file
    try:
      return load_file(st)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
      raise CheckpointError(f"{st}: cannot read safetensors file ({e})") from None
  if os.path.isfile(binf):
    try:
      import torch
    except ImportError:
      raise CheckpointError(f"{binf}: reading pytorch_model.bin needs torch (pip install '.[parity]'); "
                            "or save the model with safetensors") from None
    sd = torch.load(binf, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}
  raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin; pass a directory written by "
                        "transformers' save_pretrained")


def check_dir(path: str) -> vilt_lib.ViltConfig:
  """A HF ViLT directory checked without reading its weights: config.json, and a weights file whose header
  (safetensors) reads. -> its ViltConfig. Raises CheckpointError naming the file and the problem."""
  cfg = config_from_hf(path)
  st = os.path.join(path, "model.safetensors")
  if os.path.isfile(st):
    from safetensors import safe_open
    try:
      with safe_open(st, framework="numpy") as f:
        f.keys()
    except Exception as e:  # safetensors raises its own error types for corrupt headers
      raise CheckpointError(f"{st}: cannot read safetensors file ({e})") from None
  elif not os.path.isfile(os.path.join(path, "pytorch_model.bin")):
    raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin; pass a directory written by "
                          "transformers' save_pretrained")
  return cfg


def _flax_path(key: str) -> str:
  key = re.sub(r"\.layer\.(\d+)\.", r".layer_\1.", key)
  return key.replace(".", "/")


def convert_state_dict(state_dict: dict[str, np.ndarray], cfg: vilt_lib.ViltConfig, source: str = "checkpoint"):
  """HF ViltModel state dict -> Flax params of `ViLT(cfg)` (no PEFT sites). Checks names and shapes."""
  expected = traverse_util.flatten_dict(_abstract_params(cfg), sep="/")
  got, unexpected = {}, []
  for key, value in state_dict.items():
    key = key[len("vilt."):] if key.startswith("vilt.") else key
    if key.startswith(_TASK_HEADS) or key in _BUFFERS:
      continue
    path = _flax_path(key)
    if path.endswith("/weight"):
      stem = path[: -len("/weight")]
      if f"{stem}/scale" in expected:
        path, value = f"{stem}/scale", value
      elif f"{stem}/embedding" in expected:
        path = f"{stem}/embedding"
      elif f"{stem}/kernel" in expected:
        path = f"{stem}/kernel"
        value = np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value.T
    if path not in expected:
      unexpected.append(key)
      continue
    if tuple(value.shape) != tuple(expected[path].shape):
      raise CheckpointError(f"{source}: shape mismatch for {key}: checkpoint {tuple(value.shape)}, model "
                            f"{tuple(expected[path].shape)} (is config.json the checkpoint's own?)")
    got[path] = jnp.asarray(value, jnp.float32)
  if unexpected:
    raise CheckpointError(f"{source}: unexpected keys not in ViLT: {', '.join(sorted(unexpected)[:5])}"
                          f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all)")
  missing = sorted(set(expected) - set(got))
  if missing:
    raise CheckpointError(f"{source}: missing keys: {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
  return traverse_util.unflatten_dict(got, sep="/")


def _abstract_params(cfg):
  b, size = 1, cfg.image_size
  args = (jnp.zeros((b, 4), jnp.int32), jnp.ones((b, 4), jnp.int32), jnp.zeros((b, size, size, cfg.num_channels)),
          jnp.ones((b, size, size), jnp.int32))
  return jax.eval_shape(lambda: vilt_lib.ViLT(cfg).init(jax.random.key(0), *args))["params"]


def load_vilt(path: str, **overrides):
  """A local HF ViLT directory -> (ViltConfig, Flax params of the backbone)."""
  cfg = config_from_hf(path, **overrides)
  return cfg, convert_state_dict(read_state_dict(path), cfg, source=path)


def load_tokenizer(path: str, vocab_size: int | None = None):
  """The checkpoint's BERT WordPiece tokenizer, checked to be the real vocabulary (never a toy fallback)."""
  path = _require_local_dir(path)
  if not any(os.path.isfile(os.path.join(path, f)) for f in ("vocab.txt", "tokenizer.json")):
    raise CheckpointError(f"{path}: no vocab.txt or tokenizer.json; save the tokenizer into the checkpoint "
                          "directory (BertTokenizerFast.from_pretrained(...).save_pretrained(DIR))")
  from transformers import BertTokenizerFast
  tok = BertTokenizerFast.from_pretrained(path, local_files_only=True)
  if vocab_size is not None and len(tok) != vocab_size:
    raise CheckpointError(f"{path}: tokenizer has {len(tok)} tokens but the model's vocab_size is {vocab_size}; "
                          "the tokenizer is not this checkpoint's")
  for special in ("[CLS]", "[SEP]", "[PAD]", "[MASK]"):
    if tok.convert_tokens_to_ids(special) in (None, tok.unk_token_id):
      raise CheckpointError(f"{path}: tokenizer lacks {special}; expected a BERT WordPiece vocabulary")
  return tok
