"""ViLT preprocessing for real data (feddat_jax/data/vilt_preprocess.py): parity with transformers' processor."""
import numpy as np
import pytest

from feddat_jax.data import vilt_preprocess as vp

# (height, width): 500x375, 375x500, 640x480, 300x300 and 1000x200 (width x height), plus one already at size.
SHAPES = [(375, 500), (500, 375), (480, 640), (300, 300), (200, 1000), (384, 384)]


def _image(h, w, seed):
  """A smooth gradient plus noise, so bicubic resampling has structure to get wrong."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([255 * y / h, 255 * x / w, 127 + 100 * np.sin((x + y) / 17)], -1)
  return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def _processor():
  transformers = pytest.importorskip("transformers")
  # The PIL backend: the processor's reference path (transformers >= 5 without torchvision, and every 4.x).
  cls = getattr(transformers, "ViltImageProcessorPil", None) or transformers.ViltImageProcessor
  return cls()


def test_resized_shape_rule():
  assert [vp.resized_shape(h, w) for h, w in SHAPES] == [
      (384, 512), (512, 384), (384, 512), (384, 384), (128, 608), (384, 384)]
  assert vp.longest_edge() == 639 and vp.canvas_shapes() == ((384, 384), (384, 608), (608, 384), (608, 608))
  assert vp.resized_shape(10, 3000) == (32, 608)  # floors to 0 in the processor (which then fails); kept at 32
  assert vp.choose_canvas([(384, 512), (128, 608)]) == (384, 608)
  assert vp.choose_canvas([(512, 384)]) == (608, 384)
  assert vp.choose_canvas([(384, 512), (512, 384)]) == (608, 608)
  assert vp.choose_canvas([(384, 384), (96, 64)]) == (384, 384)
  with pytest.raises(ValueError, match="no canvas"):
    vp.choose_canvas([(384, 512)], [(384, 384)])


def test_parity_with_vilt_image_processor():
  processor = _processor()
  images = [_image(h, w, i) for i, (h, w) in enumerate(SHAPES)]
  worst = 0.0
  for image in images:
    want = processor(image, return_tensors="np")
    want_pixels = want["pixel_values"][0].transpose(1, 2, 0)  # [h, w, 3]; one image: no padding
    want_mask = want["pixel_mask"][0].astype(bool)
    h, w = want_pixels.shape[:2]
    canvas = vp.choose_canvas([vp.resized_shape(*image.shape[:2])])
    pixels, mask = vp.preprocess(image, canvas)
    assert pixels.dtype == np.float32 and mask.dtype == bool and pixels.shape[:2] == mask.shape == canvas
    padded = np.zeros(canvas + (3,), np.float32)
    padded[:h, :w] = want_pixels
    padded_mask = np.zeros(canvas, bool)
    padded_mask[:h, :w] = want_mask
    worst = max(worst, float(np.abs(pixels - padded).max()))
    np.testing.assert_array_equal(mask, padded_mask)
    # Patch count as ViLT counts it: the mask at each 32x32 patch's top-left pixel (nearest downsampling).
    assert vp.valid_patches(mask) == int(want_mask[::32, ::32].sum()) == (h // 32) * (w // 32)
    # The uint8 path normalised as on device (x / 127.5 - 1) matches on every valid pixel.
    raw, raw_mask = vp.preprocess(image, canvas, normalize_pixels=False)
    assert raw.dtype == np.uint8 and np.array_equal(raw_mask, mask)
    on_device = raw.astype(np.float32) / np.float32(127.5) - np.float32(1)
    worst = max(worst, float(np.abs(on_device - pixels)[mask].max()))
  assert worst <= 1e-5, worst

  # A batch: the processor pads to the batch's largest image; ours pads to a fixed canvas holding it.
  want = processor(images[:3], return_tensors="np")
  pixels, mask = vp.preprocess_batch(images[:3])
  bh, bw = want["pixel_mask"].shape[1:]
  assert mask.shape == (3, 608, 608) and (bh, bw) == (512, 512)
  np.testing.assert_array_equal(mask[:, :bh, :bw], want["pixel_mask"].astype(bool))
  assert not mask[:, bh:].any() and not mask[:, :, bw:].any()
  np.testing.assert_allclose(pixels[:, :bh, :bw], want["pixel_values"].transpose(0, 2, 3, 1), rtol=0, atol=1e-5)


def test_pipeline_vilt_path_is_uint8_on_a_fixed_canvas():
  from feddat_jax.data import pipeline
  image = _image(200, 1000, 0)
  pixels, mask = pipeline.preprocess_image_vilt(image, (384, 608))
  assert pixels.dtype == np.uint8 and pixels.shape == (384, 608, 3) and mask.shape == (384, 608)
  assert vp.valid_patches(mask) == 4 * 19 and mask[:128, :608].all() and not mask[128:].any()
  assert not pixels[128:].any()
  with pytest.raises(ValueError, match=r"resized image \(128, 608\) does not fit the canvas \(384, 384\)"):
    pipeline.preprocess_image_vilt(image, (384, 384))
