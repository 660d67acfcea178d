"""Parity at real size: the Flax ViLT at ViLT-B/32's configuration against transformers' PyTorch ViLT.

`transformers.ViltConfig()`'s defaults are dandelin/vilt-b32-mlm's configuration (hidden 768, 12 layers, 12
heads, MLP 3072, patch 32, pretraining grid 12 x 12, vocabulary 30522). A `ViltForMaskedLM` of it gets random
weights (every parameter, position embeddings and CLS token included, `scripts/make_parity_fixture.randomize_`
at std 0.02), is saved with `save_pretrained` as the hub checkpoint ships (keys "vilt.*" plus the MLM head) and
loaded back with our converter (`convert.load_vilt`). Both models then see the same batch in f32:

- two photos of different aspect ratios, 500x800 and 480x640 (height x width), preprocessed by transformers'
  `ViltImageProcessor`: 384x608 and 384x512 after its resize, the second padded to the first with a zero pixel
  mask. The batch is then padded on the right to a 384x640 canvas (a 12 x 20 patch grid; 608 is the widest the
  processor's rule produces, so the 640 column of patches is padding in both images);
- 40 text tokens, the second text padded after 17.

Compared (max absolute difference): the pooler output, and the last hidden state on every token with mask 1,
text tokens (the padded text positions too, as both models compute them), the image CLS token and every valid
image patch. HF does not keep the image tokens in grid order: it keeps as many image tokens as the image with
most valid patches has, shuffles that image's valid patches and fills the other images' spare slots with
randomly drawn *masked* patches, while our port keeps all 240 patches in grid order with a mask. So each HF
image token is matched to our token through the exact grid index HF's `visual_embed` returns for it (recorded
by `make_parity_fixture.run_hf`), and masked image tokens, which nobody reads (masked out of attention, not
pooled), are not compared.

Also run: our model on the pixels of our own uint8 path (`vilt_preprocess.preprocess(..., normalize_pixels=False)`
onto the 384x640 canvas, normalised as on device by x / 127.5 - 1, so its padding is -1.0 where the processor's
is 0.0), compared with HF in the same way: the padding's value does not reach a valid token.

  python benchmarks/real_size_parity.py [--layers 12] [--json]

Prints the differences and, with --json, one JSON line last. Needs torch and transformers (no network).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from feddat_jax.data import vilt_preprocess  # noqa: E402
from feddat_jax.models import convert  # noqa: E402
from feddat_jax.models import vilt  # noqa: E402

IMAGE_SHAPES = ((500, 800), (480, 640))  # (height, width) of the two photos
CANVAS = (384, 640)
TEXT_LEN = 40
TEXT_LENGTHS = (TEXT_LEN, 17)
TOL = 1e-4


def _fixture_script():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "make_parity_fixture.py")
  spec = importlib.util.spec_from_file_location("make_parity_fixture", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def photo(h: int, w: int, seed: int) -> np.ndarray:
  """A smooth gradient plus noise (structure for the bicubic resize), uint8 [h, w, 3]."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([255 * y / h, 255 * x / w, 127 + 100 * np.sin((x + y) / 17)], -1)
  return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def make_inputs(seed: int = 0) -> dict[str, np.ndarray]:
  """The batch: processor pixels padded to CANVAS (float32 NHWC), pixel mask, text, and our uint8 pixels."""
  import transformers
  cls = getattr(transformers, "ViltImageProcessorPil", None) or transformers.ViltImageProcessor
  images = [photo(h, w, seed + i) for i, (h, w) in enumerate(IMAGE_SHAPES)]
  out = cls()(images, return_tensors="np")
  pv, pm = out["pixel_values"].transpose(0, 2, 3, 1), out["pixel_mask"]
  b, h, w = pm.shape
  assert (h, w) == (384, 608), (h, w)  # the processor pads the batch to its largest image
  pixel_values = np.zeros((b,) + CANVAS + (3,), np.float32)
  pixel_values[:, :h, :w] = pv
  pixel_mask = np.zeros((b,) + CANVAS, np.int64)
  pixel_mask[:, :h, :w] = pm
  ours = [vilt_preprocess.preprocess(im, CANVAS, normalize_pixels=False) for im in images]
  rng = np.random.default_rng(seed)
  input_ids = rng.integers(1000, 30522, (b, TEXT_LEN)).astype(np.int64)
  input_ids[:, 0] = 101  # [CLS]
  attention_mask = np.zeros((b, TEXT_LEN), np.int64)
  for i, n in enumerate(TEXT_LENGTHS):
    attention_mask[i, :n] = 1
    input_ids[i, n - 1] = 102  # [SEP]
    input_ids[i, n:] = 0  # [PAD]
  return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
          "pixel_mask": pixel_mask, "pixels_uint8": np.stack([p for p, _ in ours]),
          "pixel_mask_uint8_path": np.stack([m for _, m in ours])}


def differences(ours, hf_hidden, hf_pooled, hf_index, hf_mask, text_len) -> dict[str, float]:
  """Max abs differences on text tokens, pooler, image CLS, and valid image tokens matched by grid index."""
  assert hf_hidden.shape[1] == text_len + 1 + hf_index.shape[1]
  image = 0.0
  for b in range(hf_hidden.shape[0]):
    valid = hf_mask[b] > 0
    pos = text_len + 1 + hf_index[b][valid]
    assert (ours["mask"][b, pos] == 1).all() and ours["mask"][b, text_len + 1:].sum() == valid.sum()
    image = max(image, float(np.abs(ours["last_hidden_state"][b, pos] - hf_hidden[b, text_len + 1:][valid]).max()))
  return {
      "text": float(np.abs(ours["last_hidden_state"][:, :text_len] - hf_hidden[:, :text_len]).max()),
      "image_cls": float(np.abs(ours["last_hidden_state"][:, text_len] - hf_hidden[:, text_len]).max()),
      "image": image,
      "pooler": float(np.abs(ours["pooler_output"] - hf_pooled).max()),
  }


def run(num_layers: int = 12, seed: int = 0, log=print) -> dict:
  """Builds, converts and compares; returns the figures (see the module docstring)."""
  import torch
  import transformers
  script = _fixture_script()
  t0 = time.perf_counter()
  hf_config = transformers.ViltConfig(num_hidden_layers=num_layers)
  torch.manual_seed(seed)
  mlm = script.randomize_(transformers.ViltForMaskedLM(hf_config), seed=seed, std=0.02).eval()
  with tempfile.TemporaryDirectory() as path:
    mlm.save_pretrained(path)
    cfg, params = convert.load_vilt(path)
  assert (cfg.hidden_size, cfg.num_layers, cfg.patch_size, cfg.image_size) == (768, num_layers, 32, 384), cfg
  t_build = time.perf_counter() - t0

  inputs = make_inputs(seed)
  t0 = time.perf_counter()
  hf = script.run_hf(mlm.vilt, inputs, seed=seed)
  t_hf = time.perf_counter() - t0

  model = vilt.ViLT(cfg)
  forward = jax.jit(lambda p, ids, am, pix, pm: model.apply({"params": p}, ids, am, pix, pm))
  ids, am = jnp.asarray(inputs["input_ids"], jnp.int32), jnp.asarray(inputs["attention_mask"], jnp.int32)
  t0 = time.perf_counter()
  ours = jax.tree_util.tree_map(np.asarray, forward(params, ids, am, jnp.asarray(inputs["pixel_values"]),
                                                    jnp.asarray(inputs["pixel_mask"], jnp.int32)))
  t_ours = time.perf_counter() - t0
  uint8_pix = inputs["pixels_uint8"].astype(np.float32) / np.float32(127.5) - np.float32(1)
  ours_uint8 = jax.tree_util.tree_map(np.asarray, forward(params, ids, am, jnp.asarray(uint8_pix),
                                                          jnp.asarray(inputs["pixel_mask_uint8_path"], jnp.int32)))
  np.testing.assert_array_equal(inputs["pixel_mask_uint8_path"], inputs["pixel_mask"] > 0)
  padding = inputs["pixel_mask"] == 0
  assert (uint8_pix[padding] == -1).all() and (inputs["pixel_values"][padding] == 0).all()  # they differ there

  args = (hf["last_hidden_state"], hf["pooler_output"], hf["image_index"], hf["image_mask"], TEXT_LEN)
  diffs = differences(ours, *args)
  diffs_uint8 = differences(ours_uint8, *args)
  valid_patches = [int(m.sum()) for m in hf["image_mask"]]
  result = {
      "layers": num_layers, "hidden": cfg.hidden_size, "patch": cfg.patch_size, "canvas": list(CANVAS),
      "images": [list(s) for s in IMAGE_SHAPES], "valid_patches": valid_patches,
      "hf_image_tokens": int(hf["image_index"].shape[1]), "our_image_tokens": int(ours["mask"].shape[1] - TEXT_LEN - 1),
      "max_abs_diff": max(diffs.values()), "diffs": diffs,
      "max_abs_diff_uint8_path": max(diffs_uint8.values()), "diffs_uint8_path": diffs_uint8,
      "hidden_scale": float(np.abs(hf["last_hidden_state"]).max()), "tolerance": TOL,
      "seconds": {"build_and_convert": round(t_build, 1), "hf_forward": round(t_hf, 2),
                  "ours_compile_and_forward": round(t_ours, 2)},
  }
  log(f"ViLT-B/32 config ({num_layers} layers), batch {IMAGE_SHAPES} -> canvas {CANVAS}, valid patches "
      f"{valid_patches} of {result['our_image_tokens']} (HF keeps {result['hf_image_tokens']} image tokens)")
  log("max |ours - HF| (processor pixels): " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
  log("max |ours - HF| (our uint8 pixels, padding -1): " + ", ".join(f"{k} {v:.2e}" for k, v in diffs_uint8.items()))
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=12, help="encoder layers (12: ViLT-B/32)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", action="store_true", help="print the figures as one JSON line last")
  args = parser.parse_args(argv)
  result = run(args.layers, args.seed)
  ok = result["max_abs_diff"] <= TOL and result["max_abs_diff_uint8_path"] <= TOL
  print(f"{'PASS' if ok else 'FAIL'}: max abs diff {result['max_abs_diff']:.2e} "
        f"(uint8 path {result['max_abs_diff_uint8_path']:.2e}), tolerance {TOL}")
  if args.json:
    print(json.dumps(result))
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
