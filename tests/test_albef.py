"""ALBEF: parity of its parts with transformers' ViT and BERT, the FedDAT adapter site, the ALBEF.pth converter,
answer ranking and the generation losses. Tiny random models throughout."""
import dataclasses
import sys

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from feddat_jax.models import albef
from feddat_jax.models import convert_albef
from feddat_jax.models import peft
from feddat_jax.models.convert import CheckpointError

TOL = 1e-5
VOCAB = 64
CLS, SEP = 2, 3
# Text-only BERT (fusion_layer == text_layers) and no decoder: the config of the parity tests.
PARITY = albef.AlbefConfig.preset("tiny", vocab_size=VOCAB, max_position_embeddings=32, fusion_layer=2,
                                  decoder_layers=0)
TINY = albef.AlbefConfig.preset("tiny", vocab_size=VOCAB, max_position_embeddings=32, answer_len=6, rank_k=3)
A, B, L = 6, 3, 7
ANSWER_MASK = np.array([1, 1, 0, 1, 1, 0], np.float32)


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  with helpers.fast_compile():
    yield


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def _error(fn, *args, **kwargs):
  with pytest.raises(CheckpointError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message, message
  return message


def albef_state_dict(cfg, seed=0, grid=None, bert_prefix="text_encoder.bert.", extras=True):
  """A random state dict with ALBEF.pth's key names (and, with `extras`, its pretraining-only keys)."""
  rng = np.random.default_rng(seed)
  r = lambda *shape: (0.02 * rng.standard_normal(shape)).astype(np.float32)
  dv, d, p, v = cfg.vision_hidden, cfg.hidden_size, cfg.patch_size, cfg.vocab_size
  grid = cfg.grid if grid is None else grid
  sd = {"visual_encoder.cls_token": r(1, 1, dv), "visual_encoder.pos_embed": r(1, 1 + grid * grid, dv),
        "visual_encoder.patch_embed.proj.weight": r(dv, 3, p, p), "visual_encoder.patch_embed.proj.bias": r(dv),
        "visual_encoder.norm.weight": 1 + r(dv), "visual_encoder.norm.bias": r(dv)}
  for i in range(cfg.vision_layers):
    blk = f"visual_encoder.blocks.{i}."
    sd.update({blk + "norm1.weight": 1 + r(dv), blk + "norm1.bias": r(dv), blk + "norm2.weight": 1 + r(dv),
               blk + "norm2.bias": r(dv), blk + "attn.qkv.weight": r(3 * dv, dv), blk + "attn.qkv.bias": r(3 * dv),
               blk + "attn.proj.weight": r(dv, dv), blk + "attn.proj.bias": r(dv),
               blk + "mlp.fc1.weight": r(cfg.vision_mlp, dv), blk + "mlp.fc1.bias": r(cfg.vision_mlp),
               blk + "mlp.fc2.weight": r(dv, cfg.vision_mlp), blk + "mlp.fc2.bias": r(dv)})
  emb = bert_prefix + "embeddings."
  sd.update({emb + "word_embeddings.weight": r(v, d), emb + "position_embeddings.weight":
             r(cfg.max_position_embeddings, d), emb + "token_type_embeddings.weight": r(cfg.type_vocab_size, d),
             emb + "LayerNorm.weight": 1 + r(d), emb + "LayerNorm.bias": r(d)})

  def attention(prefix, kv_width):
    return {prefix + "self.query.weight": r(d, d), prefix + "self.query.bias": r(d),
            prefix + "self.key.weight": r(d, kv_width), prefix + "self.key.bias": r(d),
            prefix + "self.value.weight": r(d, kv_width), prefix + "self.value.bias": r(d),
            prefix + "output.dense.weight": r(d, d), prefix + "output.dense.bias": r(d),
            prefix + "output.LayerNorm.weight": 1 + r(d), prefix + "output.LayerNorm.bias": r(d)}

  for i in range(cfg.text_layers):
    layer = f"{bert_prefix}encoder.layer.{i}."
    sd.update(attention(layer + "attention.", d))
    if i >= cfg.fusion_layer:
      sd.update(attention(layer + "crossattention.", dv))
    sd.update({layer + "intermediate.dense.weight": r(cfg.mlp_dim, d), layer + "intermediate.dense.bias":
               r(cfg.mlp_dim), layer + "output.dense.weight": r(d, cfg.mlp_dim), layer + "output.dense.bias": r(d),
               layer + "output.LayerNorm.weight": 1 + r(d), layer + "output.LayerNorm.bias": r(d)})
  head, bias = "text_encoder.cls.predictions.", r(v)
  sd.update({head + "transform.dense.weight": r(d, d), head + "transform.dense.bias": r(d),
             head + "transform.LayerNorm.weight": 1 + r(d), head + "transform.LayerNorm.bias": r(d),
             head + "decoder.weight": sd[emb + "word_embeddings.weight"], head + "decoder.bias": bias,
             head + "bias": bias})
  if extras:  # in ALBEF.pth, not in the VQA model
    sd.update({"visual_encoder_m.cls_token": r(1, 1, dv), "text_encoder_m.bert.embeddings.word_embeddings.weight":
               r(v, d), "vision_proj.weight": r(8, dv), "vision_proj_m.bias": r(8), "text_proj.weight": r(8, d),
               "text_proj_m.weight": r(8, d), "itm_head.weight": r(2, d), "itm_head.bias": r(2),
               "temp": np.float32(0.07), "image_queue": r(8, 16), "text_queue": r(8, 16),
               "idx_queue": np.zeros((1, 16), np.int64), "queue_ptr": np.zeros((1,), np.int64),
               emb + "position_ids": np.arange(cfg.max_position_embeddings)[None]})
  return sd


# ----------------------------------------------------------------------------------------------------------
# Parity with transformers' ViTModel and BertModel (the same converter path as ALBEF.pth).


def _hf_state(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _vit_to_albef(hf, layers):
  """HF ViTModel weights (4.x "encoder.layer.i.attention.attention.query" or 5.x "layers.i.attention.q_proj")
  -> ALBEF's timm keys, with q, k, v fused into qkv."""
  def get(i, new, old):
    return hf[f"layers.{i}.{new}"] if f"layers.{i}.{new}" in hf else hf[f"encoder.layer.{i}.{old}"]

  sd = {"visual_encoder.cls_token": hf["embeddings.cls_token"],
        "visual_encoder.pos_embed": hf["embeddings.position_embeddings"],
        "visual_encoder.patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "visual_encoder.patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
        "visual_encoder.norm.weight": hf["layernorm.weight"], "visual_encoder.norm.bias": hf["layernorm.bias"]}
  names = {"q": ("attention.q_proj", "attention.attention.query"),
           "k": ("attention.k_proj", "attention.attention.key"),
           "v": ("attention.v_proj", "attention.attention.value"),
           "proj": ("attention.o_proj", "attention.output.dense"),
           "fc1": ("mlp.fc1", "intermediate.dense"), "fc2": ("mlp.fc2", "output.dense"),
           "norm1": ("layernorm_before", "layernorm_before"), "norm2": ("layernorm_after", "layernorm_after")}
  for i in range(layers):
    blk = f"visual_encoder.blocks.{i}."
    for leaf in ("weight", "bias"):
      sd[blk + f"attn.qkv.{leaf}"] = np.concatenate(
          [get(i, f"{names[n][0]}.{leaf}", f"{names[n][1]}.{leaf}") for n in "qkv"], 0)
      for ours, theirs in (("attn.proj", "proj"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"), ("norm1", "norm1"),
                           ("norm2", "norm2")):
        sd[blk + f"{ours}.{leaf}"] = get(i, f"{names[theirs][0]}.{leaf}", f"{names[theirs][1]}.{leaf}")
  return sd


def _randomize(model, torch, seed):
  """Non-trivial LayerNorm and bias values (HF initialises them to 1 and 0)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  return model.eval()


@pytest.fixture(scope="module")
def hf_parity():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  c = PARITY
  vit = _randomize(transformers.ViTModel(transformers.ViTConfig(
      hidden_size=c.vision_hidden, num_hidden_layers=c.vision_layers, num_attention_heads=c.vision_heads,
      intermediate_size=c.vision_mlp, image_size=c.image_size, patch_size=c.patch_size, hidden_act="gelu",
      layer_norm_eps=1e-6, qkv_bias=True, attn_implementation="eager"), add_pooling_layer=False), torch, 1)
  bert = _randomize(transformers.BertModel(transformers.BertConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.text_layers,
      num_attention_heads=c.num_heads, intermediate_size=c.mlp_dim, max_position_embeddings=c.max_position_embeddings,
      hidden_act="gelu", layer_norm_eps=1e-12, attn_implementation="eager"), add_pooling_layer=False), torch, 2)
  sd = albef_state_dict(c)
  sd.update(_vit_to_albef(_hf_state(vit), c.vision_layers))
  for k, v in _hf_state(bert).items():
    if "position_ids" not in k:
      sd["text_encoder.bert." + k] = v
  return torch, vit, bert, convert_albef.convert_state_dict(sd, c, None)


def test_vit_matches_hf(hf_parity):
  torch, vit, _, params = hf_parity
  pixels = np.random.default_rng(0).standard_normal((2, PARITY.image_size, PARITY.image_size, 3)).astype(np.float32)
  with torch.no_grad():
    want = vit(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
  got = albef.VisionTransformer(PARITY).apply({"params": params["backbone"]["visual_encoder"]}, jnp.asarray(pixels),
                                              jnp.ones((1,)))
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


def test_text_encoder_matches_hf_bert(hf_parity):
  torch, _, bert, params = hf_parity
  rng = np.random.default_rng(1)
  ids = rng.integers(5, VOCAB, (3, 9))
  mask = (np.arange(9)[None] < np.array([[9], [5], [2]])).astype(np.int64)
  with torch.no_grad():
    want = bert(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
  model = albef.BertModel(PARITY, None, PARITY.text_layers, PARITY.fusion_layer)
  got, _ = model.apply({"params": params["backbone"]["text_encoder"]}, jnp.asarray(ids), jnp.asarray(mask), None,
                       None, jnp.ones((1,)))
  np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Cross-attention and the adapter site, by hand.


def _ln(x, scale, bias, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def _dense(p, x):
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def test_cross_attention_sublayer_by_hand():
  cfg = TINY
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 5, cfg.hidden_size))
  image = rng.standard_normal((2, 8, cfg.vision_hidden))
  image_mask = np.ones((2, 8), np.int32)
  image_mask[1, 4:] = 0  # example 1: its second image is absent
  module = albef.BertAttention(cfg)
  params = module.init(jax.random.key(0), jnp.asarray(x, jnp.float32), jnp.asarray(image, jnp.float32),
                       albef.mask_bias(jnp.asarray(image_mask)), False)["params"]
  params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
  got = module.apply({"params": params}, jnp.asarray(x, jnp.float32), jnp.asarray(image, jnp.float32),
                     albef.mask_bias(jnp.asarray(image_mask)), False)

  att, h = params["self"], cfg.num_heads
  heads = lambda t: t.reshape(t.shape[:2] + (h, -1)).transpose(0, 2, 1, 3)  # [B, h, T, dh]
  q, k, v = heads(_dense(att["query"], x)), heads(_dense(att["key"], image)), heads(_dense(att["value"], image))
  scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
  scores = np.where(image_mask[:, None, None, :] > 0, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(x.shape)
  out = params["output"]
  want = _ln(_dense(out["dense"], ctx) + x, np.asarray(out["LayerNorm"]["scale"]), np.asarray(out["LayerNorm"]["bias"]),
             cfg.layer_norm_eps)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_bert_output_adapter_by_hand():
  """LN(y + sum_s w_s delta_s(LN(y))), the same LayerNorm twice; zero up-projections give plain LN(y)."""
  cfg = TINY
  rng = np.random.default_rng(3)
  inter = rng.standard_normal((2, 4, cfg.mlp_dim)).astype(np.float32)
  x = rng.standard_normal((2, 4, cfg.hidden_size)).astype(np.float32)
  weights = jnp.asarray([0.3, 0.7])
  module = albef.BertOutput(cfg, peft.PeftConfig("adapter", reduction_factor=4))
  params = module.init(jax.random.key(0), inter, x, weights, False)["params"]
  params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
  got = np.asarray(module.apply({"params": params}, inter, x, weights, False))

  norm = params["LayerNorm"]
  ln = lambda t: _ln(t, np.asarray(norm["scale"]), np.asarray(norm["bias"]), cfg.layer_norm_eps)
  ad = {k: np.asarray(v, np.float64) for k, v in params["adapter"].items()}
  y = _dense(params["dense"], inter) + x
  delta = sum(w * (np.maximum(ln(y) @ ad["down_kernel"][s] + ad["down_bias"][s], 0) @ ad["up_kernel"][s]
                   + ad["up_bias"][s]) for s, w in enumerate([0.3, 0.7]))
  np.testing.assert_allclose(got, ln(y + delta), atol=1e-5)

  zero = jax.tree_util.tree_map(lambda p: p, params)
  zero["adapter"] = dict(params["adapter"], up_kernel=jnp.zeros_like(params["adapter"]["up_kernel"]),
                         up_bias=jnp.zeros_like(params["adapter"]["up_bias"]))
  plain = albef.BertOutput(cfg, None).apply({"params": {k: v for k, v in params.items() if k != "adapter"}},
                                            inter, x, weights, False)
  np.testing.assert_allclose(np.asarray(module.apply({"params": zero}, inter, x, weights, False)),
                             np.asarray(plain), atol=1e-6)
  np.testing.assert_allclose(np.asarray(plain), ln(y), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# The ALBEF.pth converter.


@pytest.fixture(scope="module")
def converted():
  sd = albef_state_dict(TINY, grid=3)  # pretrained at 48 pixels, configured for 64: pos_embed interpolated
  return sd, convert_albef.convert_state_dict(sd, TINY, peft.PeftConfig("adapter"))


def test_converter_maps_every_key(converted):
  sd, params = converted
  flat = _flat(params)
  fresh = jax.eval_shape(lambda: albef.AlbefModel(TINY, None, num_answers=A).init(jax.random.key(0)))
  assert set(flat) == set(_flat(fresh))
  d = TINY.vision_hidden
  np.testing.assert_array_equal(flat["backbone/visual_encoder/encoder/layer_1/attention/attention/key/kernel"],
                                sd["visual_encoder.blocks.1.attn.qkv.weight"][d:2 * d].T)
  np.testing.assert_array_equal(flat["backbone/visual_encoder/embeddings/patch_embeddings/projection/kernel"],
                                sd["visual_encoder.patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(flat["head/decoder/kernel"], sd["text_encoder.cls.predictions.decoder.weight"].T)
  np.testing.assert_array_equal(flat["head/decoder/bias"], sd["text_encoder.cls.predictions.bias"])
  pos = flat["backbone/visual_encoder/embeddings/position_embeddings"]
  assert pos.shape == (1, 1 + TINY.grid ** 2, d)
  np.testing.assert_array_equal(pos[:, 0], sd["visual_encoder.pos_embed"][:, 0])  # CLS kept
  # The result is what AlbefModel.init takes; PEFT parameters keep their fresh values.
  model = albef.AlbefModel(TINY, peft.PeftConfig("adapter"), num_answers=A)
  out = jax.eval_shape(lambda: model.init(jax.random.key(0), params))
  assert "text_encoder/encoder/layer_0/output/adapter/up_kernel" in _flat(out["backbone"])


def test_decoder_initialised_from_fusion_layers(converted):
  _, params = converted
  b = params["backbone"]
  for j in range(TINY.decoder_layers):
    dec = b["text_decoder"]["encoder"][f"layer_{j}"]
    enc = b["text_encoder"]["encoder"][f"layer_{TINY.fusion_layer + j}"]
    assert set(_flat(dec)) == set(_flat(enc)) and "crossattention/self/key/kernel" in _flat(dec)
    for k, v in _flat(dec).items():
      np.testing.assert_array_equal(v, _flat(enc)[k], err_msg=k)
  for k, v in _flat(b["text_decoder"]["embeddings"]).items():
    np.testing.assert_array_equal(v, _flat(b["text_encoder"]["embeddings"])[k])


def test_vqa_checkpoint_names_and_wrapping(converted):
  """Keys without ".bert." and {"model": ...} give the same trees; a checkpoint's own decoder is used."""
  sd, params = converted
  renamed = {k.replace("text_encoder.bert.", "text_encoder."): v for k, v in sd.items()}
  again = convert_albef.convert_state_dict({"model": renamed}, TINY)
  for k, v in _flat(params).items():
    np.testing.assert_array_equal(v, _flat(again)[k], err_msg=k)
  # A finetuned VQA checkpoint: text_decoder.bert.* and text_decoder.cls.* (no encoder MLM head).
  vqa = {k: v for k, v in renamed.items() if not k.startswith("text_encoder.cls.")}
  for k, v in sd.items():
    if k.startswith("text_encoder.cls."):
      vqa[k.replace("text_encoder.", "text_decoder.")] = v + 1
  for k, v in albef_state_dict(dataclasses.replace(TINY, text_layers=1, fusion_layer=0), seed=5,
                               bert_prefix="text_decoder.bert.", extras=False).items():
    if k.startswith("text_decoder.bert."):
      vqa[k] = v
  out = convert_albef.convert_state_dict(vqa, TINY)
  np.testing.assert_array_equal(_flat(out)["head/decoder/bias"], sd["text_encoder.cls.predictions.bias"] + 1)
  np.testing.assert_array_equal(_flat(out)["backbone/text_decoder/encoder/layer_0/attention/self/query/kernel"],
                                vqa["text_decoder.bert.encoder.layer.0.attention.self.query.weight"].T)


def test_pos_embed_resize_matches_torch_bicubic():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(4)
  for n, g in ((16, 24), (3, 4), (6, 4)):  # ALBEF.pth 256 -> 384 pixels; up; down
    pos = rng.standard_normal((1, 1 + n * n, 5)).astype(np.float32)
    grid = torch.from_numpy(pos[:, 1:]).reshape(1, n, n, 5).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(1, g * g, 5).numpy()
    got = albef.resize_pos_embed(pos, g)
    np.testing.assert_allclose(got[:, 1:], want, atol=1e-5)
    np.testing.assert_array_equal(got[:, :1], pos[:, :1])
    np.testing.assert_allclose(np.asarray(albef.resize_pos_embed(jnp.asarray(pos), g)), got, atol=1e-5)


def test_converter_errors(converted):
  sd = converted[0]
  message = _error(convert_albef.convert_state_dict, {**sd, "visual_encoder.head.weight": np.zeros((2, 2)),
                                                      "text_encoder.bert.pooler.dense.weight": np.zeros((2, 2))}, TINY)
  assert "unexpected keys" in message and "visual_encoder.head.weight" in message
  assert "text_encoder.bert.pooler.dense.weight" in message and "(2 in all)" in message

  missing = {k: v for k, v in sd.items() if k != "text_encoder.bert.encoder.layer.1.crossattention.self.key.weight"}
  message = _error(convert_albef.convert_state_dict, missing, TINY)
  assert "missing parameters" in message and "text_encoder/encoder/layer_1/crossattention/self/key/kernel" in message
  # The decoder copy of that layer is missing too.
  assert "text_decoder/encoder/layer_0/crossattention/self/key/kernel" in message

  wrong = dict(sd, **{"visual_encoder.blocks.0.attn.qkv.weight": np.zeros((3 * 32, 64), np.float32)})
  message = _error(convert_albef.convert_state_dict, wrong, TINY)
  assert "shape mismatch for visual_encoder.blocks.0.attn.qkv.weight" in message
  assert "(96, 64)" in message and "(192, 64)" in message and "preset" in message
  message = _error(convert_albef.convert_state_dict, dict(sd, **{"visual_encoder.pos_embed": np.zeros((1, 11, 64))}),
                   TINY)
  assert "shape mismatch for visual_encoder.pos_embed" in message and "square" in message
  message = _error(convert_albef.convert_state_dict, sd, dataclasses.replace(TINY, decoder_layers=2))
  assert "only 1" in message and "decoder_layers <= 1" in message


def test_load_albef_file(tmp_path, converted, monkeypatch):
  message = _error(convert_albef.load_albef, str(tmp_path / "ALBEF.pth"), TINY)
  assert "does not exist" in message and "local ALBEF.pth" in message and "never downloads" in message
  torch = pytest.importorskip("torch")
  sd, params = converted
  path = tmp_path / "ALBEF.pth"
  torch.save({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, "epoch": 29}, path)
  loaded = convert_albef.load_albef(str(path), TINY)
  for k, v in _flat(params).items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(_flat(loaded)[k]), err_msg=k)
  monkeypatch.setitem(sys.modules, "torch", None)
  assert "pip install torch" in _error(convert_albef.load_albef, str(path), TINY)


# ----------------------------------------------------------------------------------------------------------
# The model: features, losses, ranking.


def _batch(seed=0, num_images=1):
  rng = np.random.default_rng(seed)
  answers = np.zeros((A, TINY.answer_len), np.int32)
  for a, n in enumerate([2, 2, 1, 2, 2, 3]):  # answers of 1-3 tokens; some share their first token
    answers[a, :n + 2] = [CLS] + list(rng.integers(5, 12, n)) + [SEP]
  targets = np.zeros((B, A), np.float32)
  targets[0, [0, 3]] = [1.0, 0.3]
  targets[1, 4] = 0.6
  targets[2, [1, 2]] = [0.9, 1.0]  # answer 2 is outside the client's list
  s = TINY.image_size
  mask = np.ones((B, L), np.int32)
  mask[1, 4:] = 0
  return {"input_ids": jnp.asarray(rng.integers(5, VOCAB, (B, L)), jnp.int32), "attention_mask": jnp.asarray(mask),
          "pixel_values": jnp.asarray(rng.integers(0, 256, (B, num_images, s, s, 3)), jnp.uint8),
          "pixel_mask": jnp.ones((B, num_images, s, s), bool), "targets": jnp.asarray(targets),
          "answer_mask": jnp.asarray(ANSWER_MASK), "example_mask": jnp.asarray([1.0, 1.0, 0.0]),
          "answer_ids": jnp.asarray(answers)}


def _fill(model, seed=0, std=0.02):
  """Random parameters of `model` without compiling its init: N(0, std), LayerNorm scales 1 + N(0, std)."""
  rng = np.random.default_rng(seed)
  shapes = _flat(jax.eval_shape(model.init, jax.random.key(0)))
  return traverse_util.unflatten_dict(
      {k: jnp.asarray(k.endswith("/scale") + std * rng.standard_normal(v.shape), jnp.float32)
       for k, v in shapes.items()}, sep="/")


@pytest.fixture(scope="module")
def model_and_params():
  model = albef.AlbefModel(TINY, peft.PeftConfig("adapter", reduction_factor=4), num_answers=A)
  return model, _fill(model)


@pytest.fixture(scope="module")
def jitted(model_and_params):
  model, _ = model_and_params
  run = jax.jit(lambda p, b: model.logits(p["head"], model.features(p["backbone"], b), b))
  return run


def test_chosen_answers_and_shapes(model_and_params, jitted):
  model, params = model_and_params
  batch = _batch()
  idx, w = model.chosen_answers(batch)
  assert model.k_train == 4 and idx.shape == (B, 4)
  np.testing.assert_array_equal(np.asarray(idx[0, :2]), [0, 3])
  np.testing.assert_allclose(np.asarray(w[0]), [1 / 1.3, 0.3 / 1.3, 0, 0], atol=1e-6)
  np.testing.assert_allclose(np.asarray(w[2]), [1, 0, 0, 0])  # answer 2 is masked out of the list
  logits = jitted(params, batch)
  assert logits.shape == (B, 4, TINY.answer_len, VOCAB) and bool(jnp.all(jnp.isfinite(logits)))


def test_task_loss_ignores_padding(model_and_params, jitted):
  model, params = model_and_params
  batch = _batch()
  logits = jitted(params, batch)
  loss = model.task_loss(logits, batch)
  assert float(loss) > 0
  idx, _ = model.chosen_answers(batch)
  # Positions whose next token is [PAD], and the whole padded example 2, are free to change.
  pad_next = np.asarray(batch["answer_ids"][idx][..., 1:] == 0)
  pad_next = np.concatenate([pad_next, np.ones(pad_next.shape[:2] + (1,), bool)], -1)
  pad_next[2] = True
  noise = 5 * jax.random.normal(jax.random.key(3), logits.shape)
  changed = jnp.where(jnp.asarray(pad_next)[..., None], logits + noise, logits)
  other = dict(batch, targets=batch["targets"].at[2].set(jnp.asarray([0.0, 0.0, 0.0, 1.0, 0.0, 0.0])))
  np.testing.assert_allclose(float(model.task_loss(changed, other)), float(loss), rtol=1e-6)
  # By hand for example 1: one answer (4), weight 1.
  logp = jax.nn.log_softmax(logits[1, 0], -1)
  tokens = np.asarray(batch["answer_ids"][4])
  want = -sum(float(logp[t, tokens[t + 1]]) for t in range(len(tokens) - 1) if tokens[t + 1] != 0)
  only1 = dict(batch, example_mask=jnp.asarray([0.0, 1.0, 0.0]))
  np.testing.assert_allclose(float(model.task_loss(logits, only1)), want, rtol=1e-5)


def test_pad_token_id_is_the_configs(model_and_params, jitted):
  """A tokenizer whose [PAD] is not 0: with pad_token_id set, padding is masked exactly as 0 is by default."""
  model, params = model_and_params
  batch = _batch()
  loss = model.task_loss(jitted(params, batch), batch)
  pad = 4  # not a token of any answer in _batch ([CLS] 2, [SEP] 3, words 5..11)
  padded = dict(batch, answer_ids=jnp.where(batch["answer_ids"] == 0, pad, batch["answer_ids"]))
  other = albef.AlbefModel(dataclasses.replace(TINY, pad_token_id=pad), model.peft, num_answers=A)
  run = lambda m: m.logits(params["head"], m.features(params["backbone"], padded), padded)
  np.testing.assert_allclose(float(other.task_loss(run(other), padded)), float(loss), rtol=1e-5)
  assert abs(float(model.task_loss(run(model), padded)) - float(loss)) > 1e-3  # pad 4 read as a token


def test_kd_loss_masked(model_and_params, jitted):
  model, params = model_and_params
  batch = _batch()
  student = jitted(params, batch)
  teacher = student + jax.random.normal(jax.random.key(4), student.shape)
  assert float(model.kd_loss(student, student, batch)) == pytest.approx(0.0, abs=1e-6)
  kd = model.kd_loss(student, teacher, batch)
  assert float(kd) > 0
  idx, w = model.chosen_answers(batch)
  free = np.asarray(batch["answer_ids"][idx][..., 1:] == 0) | (np.asarray(w)[..., None] == 0)
  free = np.concatenate([free, np.ones(free.shape[:2] + (1,), bool)], -1)
  noise = jax.random.normal(jax.random.key(5), student.shape)
  moved = lambda z: jnp.where(jnp.asarray(free)[..., None], z + 3 * noise, z)
  np.testing.assert_allclose(float(model.kd_loss(moved(student), moved(teacher), batch)), float(kd), rtol=1e-6)
  # The teacher gets no gradient.
  g = jax.grad(lambda t: model.kd_loss(student, t, batch))(teacher)
  assert float(jnp.abs(g).max()) == 0.0


def test_grad_reaches_every_adapter_only(model_and_params):
  model, params = model_and_params
  batch = _batch()
  frozen, trainable = peft.split(params["backbone"], "adapter")
  assert all("/adapter/" in k for k in _flat(trainable)) and not any("adapter" in k for k in _flat(frozen))
  assert len(_flat(trainable)) == 4 * (TINY.vision_layers + TINY.text_layers + TINY.decoder_layers)

  @jax.jit
  def grad(trainable):
    def loss(t):
      feats = model.features(peft.merge(frozen, t), batch)
      return model.task_loss(model.logits(params["head"], feats, batch), batch)
    return jax.grad(loss)(trainable)

  for k, g in _flat(grad(trainable)).items():
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0, k


def test_zero_up_adapters_equal_the_plain_model(model_and_params):
  model, params = model_and_params
  zero_up = peft.Adapter(4, "zero_up").init(jax.random.key(0), jnp.ones((2, 8)), jnp.ones((1,)))["params"]
  assert not np.any(np.asarray(zero_up["up_kernel"])) and not np.any(np.asarray(zero_up["up_bias"]))
  zeroed = traverse_util.unflatten_dict(
      {k: jnp.zeros_like(v) if "/adapter/up_" in k else v for k, v in _flat(params["backbone"]).items()}, sep="/")
  frozen, _ = peft.split(params["backbone"], "adapter")
  plain = albef.AlbefModel(TINY, peft.PeftConfig("head"), num_answers=A)
  batch = _batch()
  a = jax.jit(model.features)(zeroed, batch)
  b = jax.jit(plain.features)(frozen, batch)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert float(jnp.abs(jax.jit(model.features)(params["backbone"], batch) - b).max()) > 1e-4


def test_ranking_stays_in_the_client_list_and_matches_brute_force(model_and_params):
  model = model_and_params[0]
  params = _fill(model, seed=2, std=0.3)  # larger weights: the best candidate differs between examples
  full = dataclasses.replace(model, albef=dataclasses.replace(TINY, rank_k=64))
  batches = [_batch(seed) for seed in range(3)]
  batch = {k: jnp.concatenate([b[k] for b in batches]) if k not in ("answer_mask", "answer_ids") else batches[0][k]
           for k in batches[0]}
  run = jax.jit(lambda m, p, b: (m.predict(p["backbone"], p["head"], b), m.scores(p["backbone"], p["head"], b)),
                static_argnums=0)
  pred, score = run(model, params, batch)
  assert set(np.asarray(pred).tolist()) <= set(np.flatnonzero(ANSWER_MASK).tolist())
  assert bool(jnp.all((score >= 0) & (score <= 1)))
  np.testing.assert_array_equal(np.asarray(score), np.asarray(batch["targets"])[np.arange(len(pred)), np.asarray(pred)])

  # Brute force: the full-sequence log-likelihood of every candidate, argmax over the client's list.
  pred_full, _ = run(full, params, batch)
  n = batch["input_ids"].shape[0]
  every = jnp.broadcast_to(batch["answer_ids"], (n,) + batch["answer_ids"].shape)
  hidden = jax.jit(model.backbone.apply)({"params": params["backbone"]}, batch["input_ids"],
                                         batch["attention_mask"], model._pixels(batch), model._present(batch), every)
  logp = np.asarray(jax.nn.log_softmax(model.logits(params["head"], hidden), -1))
  ids = np.asarray(batch["answer_ids"])
  ll = np.array([[sum(logp[b, a, t, ids[a, t + 1]] for t in range(ids.shape[1] - 1) if ids[a, t + 1] != 0)
                  for a in range(A)] for b in range(n)])
  want = np.where(ANSWER_MASK > 0, ll, -np.inf).argmax(-1)
  np.testing.assert_array_equal(np.asarray(pred_full), want)
  assert len(set(want.tolist())) > 1  # the test can tell candidates apart


def test_absent_image_is_ignored(model_and_params):
  model = dataclasses.replace(model_and_params[0], num_images=2)
  params = model_and_params[1]
  batch = _batch(num_images=2)
  batch["pixel_mask"] = batch["pixel_mask"].at[1, 1].set(False)
  run = jax.jit(model.features)
  a = run(params["backbone"], batch)
  flipped = dict(batch, pixel_values=batch["pixel_values"].at[:, 1].set(255 - batch["pixel_values"][:, 1]))
  b = run(params["backbone"], flipped)
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
  assert float(jnp.abs(a[0] - b[0]).max()) > 1e-6


def test_init_pretrained_contract(converted):
  """init takes {"backbone", "head"} (what load_albef returns) and overlays it; a bare backbone tree is refused."""
  model = albef.AlbefModel(TINY, peft.PeftConfig("adapter"), num_answers=A)
  with pytest.raises(ValueError, match="convert_albef.load_albef"):
    model.init(jax.random.key(0), converted[1]["backbone"])
  seen = {}

  def init(rng):  # traced only (compiling the init takes seconds): pretrained leaves come back as they are
    params = model.init(rng, converted[1])
    seen["kernel"] = params["head"]["decoder"]["kernel"]
    seen["query"] = params["backbone"]["text_decoder"]["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]
    return params

  shapes = jax.eval_shape(init, jax.random.key(0))
  assert seen["kernel"] is converted[1]["head"]["decoder"]["kernel"]
  assert seen["query"] is converted[1]["backbone"]["text_decoder"]["encoder"]["layer_0"]["attention"]["self"][
      "query"]["kernel"]
  assert _flat(shapes["backbone"])["text_encoder/encoder/layer_0/output/adapter/up_kernel"].shape[0] == 1
  assert set(_flat(shapes["head"])) == set(_flat(converted[1]["head"]))


def test_peft_methods_run():
  batch = _batch()
  for method in ("lora", "prompt"):
    model = albef.AlbefModel(TINY, peft.PeftConfig(method, prompt_length=2, lora_rank=4), num_answers=A)
    params = _fill(model, seed=2)
    _, trainable = peft.split(params["backbone"], method)
    assert peft.count(trainable) > 0
    feats = jax.jit(model.features)(params["backbone"], batch)
    assert feats.shape == (B, 4, TINY.answer_len, TINY.hidden_size) and bool(jnp.all(jnp.isfinite(feats)))


def test_dropout_follows_the_rng():
  cfg = dataclasses.replace(TINY, hidden_dropout=0.1, attention_dropout=0.1)  # ALBEF's BERT dropout
  model = albef.AlbefModel(cfg, peft.PeftConfig("adapter"), num_answers=A)
  params, batch = _fill(model), _batch()
  run = jax.jit(lambda rng: model.features(params["backbone"], batch, train=True, rng=rng))
  a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(jnp.abs(a - c).max()) > 1e-3
