"""The HF checkpoint converter and the model wrapper: every error is triggered and its message checked."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from feddat_jax.models import convert
from feddat_jax.models import peft
from feddat_jax.models import vilt
from feddat_jax.models import vlm

TINY_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_vilt")
QUERY = "encoder.layer.0.attention.attention.query.weight"


@pytest.fixture(scope="module")
def reference():
  """The fixture's config, converted params and raw state dict."""
  cfg, params = convert.load_vilt(TINY_DIR)
  return cfg, params, load_file(os.path.join(TINY_DIR, "model.safetensors"))


@pytest.fixture
def ckpt(tmp_path):
  """A writable copy of the tiny checkpoint directory."""
  path = tmp_path / "ckpt"
  shutil.copytree(TINY_DIR, path)
  return path


def _error(fn, *args, **kwargs):
  with pytest.raises(convert.CheckpointError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message, message
  return message


def _save(path, state_dict):
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path / "model.safetensors"))


def _assert_same_params(a, b):
  fa, fb = traverse_util.flatten_dict(a, sep="/"), traverse_util.flatten_dict(b, sep="/")
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_converts_names_and_layouts(reference):
  cfg, params, sd = reference
  assert cfg.vocab_size == 64 and cfg.num_layers == 2 and cfg.max_image_length == -1
  q = params["encoder"]["layer_0"]["attention"]["attention"]["query"]
  np.testing.assert_array_equal(np.asarray(q["kernel"]), sd[QUERY].T)
  conv = params["embeddings"]["patch_embeddings"]["projection"]["kernel"]
  np.testing.assert_array_equal(np.asarray(conv), sd["embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(params["embeddings"]["text_embeddings"]["LayerNorm"]["scale"]),
                                sd["embeddings.text_embeddings.LayerNorm.weight"])
  assert peft.count(params) == sum(v.size for v in sd.values())


def test_missing_directory(tmp_path):
  message = _error(convert.load_vilt, str(tmp_path / "nope"))
  assert "does not exist" in message and "nope" in message


@pytest.mark.parametrize("fn", [convert.load_vilt, convert.load_tokenizer, convert.read_state_dict,
                                convert.config_from_hf])
def test_hub_name_is_refused_offline(fn, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no such relative directory here
  message = _error(fn, "dandelin/vilt-b32-mlm")
  assert "hub name" in message and "never downloads" in message
  assert "save_pretrained(DIR)" in message and "pass DIR" in message


def test_missing_config(ckpt):
  os.remove(ckpt / "config.json")
  message = _error(convert.load_vilt, str(ckpt))
  assert "config.json" in message and "missing" in message


def test_wrong_model_type(ckpt):
  cfg = json.loads((ckpt / "config.json").read_text())
  cfg["model_type"] = "bert"
  (ckpt / "config.json").write_text(json.dumps(cfg))
  message = _error(convert.load_vilt, str(ckpt))
  assert "model_type is 'bert', expected 'vilt'" in message


def test_missing_weights(ckpt):
  os.remove(ckpt / "model.safetensors")
  message = _error(convert.load_vilt, str(ckpt))
  assert "no model.safetensors or pytorch_model.bin" in message


def test_corrupt_safetensors(ckpt):
  (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
  message = _error(convert.load_vilt, str(ckpt))
  assert "cannot read safetensors file" in message and "model.safetensors" in message


def test_unexpected_keys_are_named(ckpt, reference):
  sd = dict(reference[2])
  sd["encoder.layer.0.extra.weight"] = np.zeros((2, 2), np.float32)
  sd["pooler.dense.scale"] = np.zeros((2,), np.float32)
  _save(ckpt, sd)
  message = _error(convert.load_vilt, str(ckpt))
  assert "unexpected keys" in message
  assert "encoder.layer.0.extra.weight" in message and "pooler.dense.scale" in message and "(2 in all)" in message


def test_missing_keys_are_named(ckpt, reference):
  sd = dict(reference[2])
  del sd["pooler.dense.bias"]
  del sd[QUERY]
  _save(ckpt, sd)
  message = _error(convert.load_vilt, str(ckpt))
  assert "missing keys" in message and "(2 in all)" in message
  assert "pooler/dense/bias" in message and "encoder/layer_0/attention/attention/query/kernel" in message


def test_shape_mismatch_names_key_and_shapes(ckpt, reference):
  sd = dict(reference[2])
  sd["embeddings.text_embeddings.word_embeddings.weight"] = np.zeros((70, 64), np.float32)
  _save(ckpt, sd)
  message = _error(convert.load_vilt, str(ckpt))
  assert "shape mismatch for embeddings.text_embeddings.word_embeddings.weight" in message
  assert "(70, 64)" in message and "(64, 64)" in message


def test_pytorch_bin_loads_with_torch(ckpt, reference):
  torch = pytest.importorskip("torch")
  os.remove(ckpt / "model.safetensors")
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in reference[2].items()}, ckpt / "pytorch_model.bin")
  cfg, params = convert.load_vilt(str(ckpt))
  assert cfg == reference[0]
  _assert_same_params(params, reference[1])


def test_masked_lm_checkpoint_with_heads_loads(ckpt, reference):
  """A ViltForMaskedLM-style state dict: "vilt." prefix, mlm_score / itm_score heads, old buffers."""
  d = reference[0].hidden_size
  sd = {f"vilt.{k}": v for k, v in reference[2].items()}
  sd.update({
      "mlm_score.bias": np.zeros((64,), np.float32),
      "mlm_score.transform.dense.weight": np.zeros((d, d), np.float32),
      "mlm_score.transform.LayerNorm.weight": np.ones((d,), np.float32),
      "mlm_score.decoder.weight": np.zeros((64, d), np.float32),
      "itm_score.fc.weight": np.zeros((2, d), np.float32),
      "vilt.embeddings.text_embeddings.position_ids": np.arange(16)[None],
  })
  _save(ckpt, sd)
  cfg_json = json.loads((ckpt / "config.json").read_text())
  cfg_json["architectures"] = ["ViltForMaskedLM"]
  (ckpt / "config.json").write_text(json.dumps(cfg_json))
  _, params = convert.load_vilt(str(ckpt))
  _assert_same_params(params, reference[1])


def test_tokenizer_missing_vocab(ckpt):
  for name in ("tokenizer.json", "tokenizer_config.json"):
    os.remove(ckpt / name)
  message = _error(convert.load_tokenizer, str(ckpt))
  assert "no vocab.txt or tokenizer.json" in message


def test_tokenizer_vocab_size_mismatch(reference):
  message = _error(convert.load_tokenizer, TINY_DIR, vocab_size=30522)
  assert "64 tokens" in message and "vocab_size is 30522" in message
  tok = convert.load_tokenizer(TINY_DIR, vocab_size=reference[0].vocab_size)
  assert tok.convert_tokens_to_ids("[CLS]") == 2 and len(tok) == 64


# ----------------------------------------------------------------------------------------------------------
# VisionLanguageModel.


def _vlm(num_images, modality_types):
  cfg = vilt.ViltConfig.preset("tiny", vocab_size=64, max_position_embeddings=16,
                               modality_type_vocab_size=modality_types)
  return vlm.VisionLanguageModel(cfg, peft.PeftConfig("adapter"), num_answers=5, num_images=num_images)


def test_two_images_need_three_modality_types():
  with pytest.raises(ValueError, match=r"2 images per example need modality_type_vocab_size > 2 \(have 2\)"):
    _vlm(2, 2)
  cfg = vilt.ViltConfig.preset("tiny", vocab_size=64)
  with pytest.raises(ValueError, match="image_token_type_idx=2 needs modality_type_vocab_size > 2"):
    vilt.ViLT(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32),
                        jnp.zeros((1, 64, 64, 3)), jnp.ones((1, 64, 64)), image_token_type_idx=2)


def test_missing_second_image_is_finite_and_ignored(reference):
  model = _vlm(2, 3)
  # The fixture's weights, with a third modality type row (as one extends a 2-type checkpoint).
  pretrained = jax.tree_util.tree_map(lambda x: x, reference[1])
  types = pretrained["embeddings"]["token_type_embeddings"]["embedding"]
  pretrained["embeddings"]["token_type_embeddings"]["embedding"] = jnp.concatenate([types, types[1:]], 0)
  # An rbg key: its initialisers compile much faster on CPU than threefry ones.
  params = jax.jit(lambda k: model.init(k, pretrained))(jax.random.key(0, impl="rbg"))
  np.testing.assert_array_equal(np.asarray(params["backbone"]["pooler"]["dense"]["kernel"]),
                                np.asarray(reference[1]["pooler"]["dense"]["kernel"]))
  batch = model.dummy_batch(batch_size=2, text_len=6)
  rng = np.random.default_rng(0)
  batch["input_ids"] = jnp.asarray(rng.integers(5, 64, (2, 6)), jnp.int32)
  batch["pixel_values"] = jnp.asarray(rng.integers(0, 256, batch["pixel_values"].shape), jnp.uint8)
  batch["pixel_mask"] = batch["pixel_mask"].at[1, 1].set(False)  # example 1 has no second image

  @jax.jit
  def run(params, batch):
    feats = model.features(params["backbone"], batch)
    return feats, model.logits(params["head"], feats, batch)

  feats, logits = run(params, batch)
  assert feats.shape == (2, 2, 64) and logits.shape == (2, 5)
  assert bool(jnp.all(jnp.isfinite(feats))) and bool(jnp.all(jnp.isfinite(logits)))
  # The absent image's pixels do not reach the logits; a present image's do.
  other = dict(batch, pixel_values=batch["pixel_values"].at[:, 1].set(255 - batch["pixel_values"][:, 1]))
  logits2 = run(params, other)[1]
  np.testing.assert_array_equal(np.asarray(logits2[1]), np.asarray(logits[1]))
  assert np.abs(np.asarray(logits2[0]) - np.asarray(logits[0])).max() > 1e-6


def test_overlay_errors(reference):
  params = {"a": {"kernel": jnp.zeros((2, 3))}}
  with pytest.raises(ValueError, match="pretrained parameter b/kernel does not exist in the model"):
    vlm.overlay(params, {"b": {"kernel": jnp.zeros((2, 3))}})
  with pytest.raises(ValueError, match=r"a/kernel has shape \(3, 2\), the model expects \(2, 3\)"):
    vlm.overlay(params, {"a": {"kernel": jnp.zeros((3, 2))}})
  out = vlm.overlay(params, {"a": {"kernel": jnp.ones((2, 3))}})
  np.testing.assert_array_equal(np.asarray(out["a"]["kernel"]), 1)
