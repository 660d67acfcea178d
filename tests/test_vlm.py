"""The model interface's readouts: what the answer head reads from the ViLT outputs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feddat_jax.models import vlm

from helpers import A, IMAGE, L, tiny_model, toy_batches


@pytest.fixture(scope="module")
def batch():
  b = jax.tree_util.tree_map(lambda x: x[0, 0], toy_batches(0))  # client 0, step 0: [B, ...]
  # A padded image: its right half is not image, so those patches must not count in the mean.
  return dict(b, pixel_mask=b["pixel_mask"].at[1, :, :, IMAGE // 2:].set(False))


@pytest.mark.parametrize("method", ["adapter", "prompt"])
def test_cls_image_readout_adds_the_mean_of_the_valid_patches(batch, method):
  model = dataclasses.replace(tiny_model(method), readout="cls_image")
  params = model.init(jax.random.PRNGKey(0))
  feats = model.features(params["backbone"], batch)
  d = model.vilt.hidden_size
  assert feats.shape == (len(batch["input_ids"]), 1, 2 * d) and model.feature_size == 2 * d

  # Independently: the ViLT outputs, cut by hand after the text, the text and image prompts and the image [CLS].
  out = model.backbone.apply({"params": params["backbone"]}, batch["input_ids"], batch["attention_mask"],
                             batch["pixel_values"][:, 0].astype(jnp.float32) / 127.5 - 1.0,
                             batch["pixel_mask"][:, 0], image_token_type_idx=1)
  prompts = model.peft.prompt_length if method == "prompt" else 0
  first_patch = L + prompts + 1 + prompts
  patches, valid = out["last_hidden_state"][:, first_patch:], out["mask"][:, first_patch:]
  grid = IMAGE // model.vilt.patch_size
  assert patches.shape[1] == grid * grid and int(valid[1].sum()) == grid * grid // 2
  want = (patches * valid[..., None]).sum(1) / valid.sum(1, keepdims=True)
  np.testing.assert_allclose(feats[:, 0, :d], out["pooler_output"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(feats[:, 0, d:], want, rtol=1e-5, atol=1e-6)
  logits = model.logits(params["head"], feats, batch)
  assert logits.shape == (len(batch["input_ids"]), A) and np.isfinite(logits).all()


def test_cls_readout_is_the_pooled_output(batch):
  model = tiny_model()
  assert model.readout == "cls" and model.feature_size == model.vilt.hidden_size
  params = model.init(jax.random.PRNGKey(0))
  cls_image = dataclasses.replace(model, readout="cls_image").features(params["backbone"], batch)
  cls = model.features(params["backbone"], batch)
  np.testing.assert_array_equal(cls, cls_image[..., :model.feature_size])


def test_unknown_readout_is_refused():
  with pytest.raises(ValueError, match="readout='mean' is not one of"):
    dataclasses.replace(tiny_model(), readout="mean")
  assert vlm.READOUTS == ("cls", "cls_image")
