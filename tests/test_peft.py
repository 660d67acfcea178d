"""PEFT sites and the split/merge rule: identity at init, adapter mixtures, gradients, parameter counts."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from feddat_jax.models import convert
from feddat_jax.models import peft
from feddat_jax.models import vilt

CFG = vilt.ViltConfig.preset("tiny", vocab_size=64, max_position_embeddings=16)
D, LAYERS, MLP, GRID = 64, 2, 128, 64 // 16  # the tiny preset written out, for the hand counts
VOCAB, MAX_POS, CHANNELS, PATCH = 64, 16, 3, 16
TEXT_LEN, PROMPT = 8, 5
FIXTURE_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_vilt")


def _inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(5, VOCAB, (2, TEXT_LEN)).astype(np.int32)
  am = (np.arange(TEXT_LEN)[None] < np.array([[TEXT_LEN], [5]])).astype(np.int32)
  pix = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
  pm = np.ones((2, 64, 64), np.int32)
  pm[1, 40:] = 0
  pm[1, :, 30:] = 0
  return tuple(map(jnp.asarray, (ids, am, pix, pm)))


INPUTS = _inputs()


@functools.lru_cache(maxsize=None)
def _model(method):
  return vilt.ViLT(CFG, peft.PeftConfig(method, prompt_length=PROMPT))


@functools.lru_cache(maxsize=None)
def _apply(method):
  model = _model(method)
  return jax.jit(lambda params, w: model.apply({"params": params}, *INPUTS, adapter_weights=w))


@functools.lru_cache(maxsize=None)
def _backbone():
  """The fixture's random HF weights (all nonzero, LayerNorms too), converted: no full-model init to compile."""
  cfg, params = convert.load_vilt(FIXTURE_DIR)
  assert cfg == CFG
  return params


def _params(method, seed=0, **peft_kwargs):
  """Backbone weights plus fresh PEFT sites, each initialised by its own module (cheaper than `ViLT.init`).

  The result is checked against the structure and shapes of `ViLT(CFG, peft).init`.
  """
  pcfg = peft.PeftConfig(method, prompt_length=PROMPT, **peft_kwargs)
  expected = _flat(jax.eval_shape(lambda: vilt.ViLT(CFG, pcfg).init(jax.random.key(0), *INPUTS))["params"])
  flat = dict(_flat(_backbone()))
  sites = sorted({p[:p.index(s) + len(s)] for p in expected if p not in flat
                  for s in ("adapter", "lora_query", "lora_value", "text_prompts", "image_prompts") if s in p})
  x, key = jnp.zeros((1, D)), jax.random.key(seed)
  for i, site in enumerate(sites):
    k = jax.random.fold_in(key, i)
    name = site.rsplit("/", 1)[-1]
    if name == "adapter":
      module, args = peft.Adapter(D // pcfg.reduction_factor, pcfg.adapter_init), (x, jnp.ones((1,)))
    elif name.startswith("lora_"):
      module, args = peft.LoRA(D, pcfg.lora_rank, pcfg.lora_alpha), (x,)
    else:
      module, args = peft.PromptGenerator(PROMPT, D, pcfg.prompt_generator), ()
    for path, value in _flat(module.init(k, *args)["params"]).items():
      flat[f"{site}/{path}"] = value
  assert {k: v.shape for k, v in flat.items()} == {k: v.shape for k, v in expected.items()}
  return traverse_util.unflatten_dict(flat, sep="/")


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


@pytest.fixture(scope="module")
def base():
  """Backbone params (no PEFT sites) and the plain model's outputs."""
  params = _backbone()
  return params, jax.tree_util.tree_map(np.asarray, _apply("head")(params, None))


def _assert_outputs_equal(a, b):
  for key in ("last_hidden_state", "pooler_output", "mask"):
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_zero_up_adapter_is_identity(base):
  params = _params("adapter", adapter_init="zero_up")
  up = params["encoder"]["layer_0"]["adapter"]
  assert not np.any(np.asarray(up["up_kernel"])) and np.any(np.asarray(up["down_kernel"]))
  _assert_outputs_equal(_apply("adapter")(params, None), base[1])


def test_adapter_with_zeroed_up_projection_is_identity(base):
  params = _params("adapter")
  out = _apply("adapter")(params, None)
  assert np.abs(np.asarray(out["pooler_output"]) - base[1]["pooler_output"]).max() > 1e-6  # normal init acts
  for i in range(LAYERS):
    site = params["encoder"][f"layer_{i}"]["adapter"]
    site["up_kernel"] = jnp.zeros_like(site["up_kernel"])
    site["up_bias"] = jnp.zeros_like(site["up_bias"])
  _assert_outputs_equal(_apply("adapter")(params, None), base[1])


def test_lora_at_init_is_identity(base):
  params = _params("lora")
  site = params["encoder"]["layer_1"]["attention"]["attention"]["lora_value"]
  assert np.any(np.asarray(site["a"])) and not np.any(np.asarray(site["b"]))
  _assert_outputs_equal(_apply("lora")(params, None), base[1])
  # And a nonzero B changes the output, so the site is wired in.
  site["b"] = jnp.full_like(site["b"], 0.1)
  assert np.abs(np.asarray(_apply("lora")(params, None)["pooler_output"]) - base[1]["pooler_output"]).max() > 1e-4


def _stack_sets(params, second=None):
  """Adapter params with a second set appended (a copy of the first unless `second` gives one)."""
  out = jax.tree_util.tree_map(lambda x: x, params)
  for i in range(LAYERS):
    site = out["encoder"][f"layer_{i}"]["adapter"]
    other = site if second is None else second["encoder"][f"layer_{i}"]["adapter"]
    out["encoder"][f"layer_{i}"]["adapter"] = {k: jnp.concatenate([v, other[k]], 0) for k, v in site.items()}
  return out


def test_two_identical_adapter_sets_half_half_equal_one_set(base):
  params = _params("adapter")  # initialised with one set
  assert params["encoder"]["layer_0"]["adapter"]["up_kernel"].shape == (1, D // 16, D)
  single = _apply("adapter")(params, None)
  two = _stack_sets(params)
  assert two["encoder"]["layer_0"]["adapter"]["down_kernel"].shape == (2, D, D // 16)
  mixed = _apply("adapter")(two, jnp.array([0.5, 0.5]))
  for key in ("last_hidden_state", "pooler_output"):
    np.testing.assert_allclose(np.asarray(mixed[key]), np.asarray(single[key]), rtol=0, atol=1e-6)
  # Weights select: [1, 0] with a different second set is the first set alone; [0, 1] is not.
  other = _stack_sets(params, _params("adapter", seed=7))
  np.testing.assert_allclose(np.asarray(_apply("adapter")(other, jnp.array([1.0, 0.0]))["pooler_output"]),
                             np.asarray(single["pooler_output"]), rtol=0, atol=1e-6)
  assert np.abs(np.asarray(_apply("adapter")(other, jnp.array([0.0, 1.0]))["pooler_output"])
                - np.asarray(single["pooler_output"])).max() > 1e-5


def test_prompts_inserted_after_cls(base):
  params = _params("prompt")
  out = jax.tree_util.tree_map(np.asarray, _apply("prompt")(params, None))
  plain = base[1]
  n_image = plain["mask"].shape[1] - TEXT_LEN  # image CLS + patches
  assert out["last_hidden_state"].shape == (2, TEXT_LEN + PROMPT + n_image + PROMPT, D)
  text_cls, image_cls = 0, TEXT_LEN + PROMPT
  # Prompt tokens: mask 1, right after each CLS; every other token keeps its mask, in order.
  np.testing.assert_array_equal(out["mask"][:, text_cls + 1:text_cls + 1 + PROMPT], 1)
  np.testing.assert_array_equal(out["mask"][:, image_cls + 1:image_cls + 1 + PROMPT], 1)
  keep = np.r_[0, PROMPT + 1:TEXT_LEN + PROMPT + 1, TEXT_LEN + 2 * PROMPT + 1:out["mask"].shape[1]]
  np.testing.assert_array_equal(out["mask"][:, keep], plain["mask"])
  # The prompts act: text CLS output (and so the pooled output) changes.
  assert np.abs(out["last_hidden_state"][:, 0] - plain["last_hidden_state"][:, 0]).max() > 1e-4
  assert np.abs(out["pooler_output"] - plain["pooler_output"]).max() > 1e-4


# Hand counts from the tiny preset (d = 64, 2 layers, MLP 128, 4 x 4 patch grid, vocab 64, 16 text positions).
_M, _R = D // 16, 16  # adapter bottleneck (reduction 16), LoRA rank
_PER_LAYER_FULL = (4 * (D * D + D)  # q, k, v, attention output
                   + (D * MLP + MLP) + (MLP * D + D)  # intermediate, output
                   + 2 * 2 * D)  # layernorm_before, layernorm_after
HAND_COUNTS = {
    "adapter": LAYERS * (D * _M + _M + _M * D + D),
    "lora": LAYERS * 2 * (D * _R + _R * D),
    "prompt": 2 * (PROMPT * D + (D * (D // 4) + D // 4) + ((D // 4) * D + D)),
    "bitfit": LAYERS * (4 * D + MLP + D + 2 * D) + D + D + D + D,  # + text LN, patch conv, final LN, pooler
    "layernorm": 2 * D * (2 * LAYERS + 2),  # two per layer, the text embeddings' and the final one
    "full": (VOCAB * D + 2 * D + MAX_POS * D + 2 * D  # text embeddings with LayerNorm
             + CHANNELS * PATCH * PATCH * D + D  # patch projection
             + D + (GRID * GRID + 1) * D + 2 * D  # cls token, image positions, modality types
             + LAYERS * _PER_LAYER_FULL
             + 2 * D + D * D + D),  # final LayerNorm, pooler
    "head": 0,
}


def test_hand_counts_cover_every_method():
  assert set(HAND_COUNTS) == set(peft.METHODS)


@pytest.mark.parametrize("method", peft.METHODS)
def test_gradients_wrt_trainable_only(method):
  params = _params(method)
  frozen, trainable = peft.split(params, method)
  assert peft.count(trainable) == HAND_COUNTS[method]
  assert peft.count(frozen) + peft.count(trainable) == peft.count(params)
  mask = peft.trainable_mask(params, method)
  assert sum(int(np.size(x)) for x, m in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(mask))
             if m) == HAND_COUNTS[method]
  model = _model(method)

  def loss(t):
    out = model.apply({"params": peft.merge(frozen, t)}, *INPUTS)
    return jnp.sum(out["pooler_output"] ** 2) + jnp.mean(out["last_hidden_state"] ** 2)

  grads = jax.jit(jax.grad(loss))(trainable)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(trainable)
  for g, t in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(trainable)):
    assert g.shape == t.shape and bool(jnp.all(jnp.isfinite(g)))
  if method == "head":
    assert trainable == {}
  else:
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads)) > 0


@pytest.mark.parametrize("method", peft.METHODS)
def test_split_merge_round_trip(method):
  params = _params(method)
  frozen, trainable = peft.split(params, method)
  merged = peft.merge(frozen, trainable)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
  for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(params)):
    assert a is b
  paths = ["/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(trainable)]
  assert all(peft.is_trainable(p, method) for p in paths)
  if method in ("adapter", "lora", "prompt"):
    assert all(("adapter" in p) or ("lora_" in p) or ("_prompts" in p) for p in paths) and paths


def test_merge_refuses_overlap():
  params = _params("adapter")
  frozen, trainable = peft.split(params, "adapter")
  overlap = {"pooler": frozen["pooler"], **trainable}
  with pytest.raises(ValueError, match=r"both trees.*pooler/dense/(bias|kernel)"):
    peft.merge(frozen, overlap)


def test_unknown_method_errors():
  with pytest.raises(ValueError, match="unknown PEFT method 'lora2'"):
    peft.PeftConfig("lora2")
  with pytest.raises(ValueError, match="unknown PEFT method"):
    peft.split({"dense": {"bias": jnp.zeros(2)}}, "nope")
