"""ViLT's image preprocessing for real data, in numpy/PIL, onto a few fixed padded canvases.

What transformers' `ViltImageProcessor` does with its default arguments (checked in
tests/test_vilt_preprocess.py against the processor itself):

  1. resize (PIL bicubic) so the shorter side is `shortest_edge` (384), unless the longer side would then
     exceed int(1333 / 800 * shortest_edge) (639), in which case both sides are scaled so the longer one is
     exactly that; each side is rounded half up and then floored to a multiple of `size_divisor` (32). The
     image is stretched to that (height, width), so the aspect ratio changes by less than one 32-pixel step;
  2. rescale by 1/255 and normalise with mean = std = 0.5 per channel, i.e. x / 127.5 - 1 in [-1, 1];
  3. pad bottom/right with zeros (after normalisation) to the largest image of the batch, with a pixel mask
     that is 1 on the image and 0 on the padding.

The processor pads to each batch's own largest image, so every batch could have a new shape (a new XLA
compilation). Here an image is instead padded to one of a small fixed set of canvases (`canvas_shapes`):
(384, 384), (384, 608) landscape, (608, 384) portrait and (608, 608) for a mix of both; 608 = 639 floored to
a multiple of 32 is the longest side the rule can produce, so a 640 canvas would only add a column of padded
patches. `choose_canvas` picks the smallest canvas that holds every image of a batch or a dataset, so a run
compiles at most once per canvas. Inside the canvas the pixels and mask equal the processor's on the image,
and because both the image's sides and the canvas are multiples of 32, every 32x32 patch is either all image
or all padding: the valid patch count is (height / 32) * (width / 32), as ViLT's pixel-mask downsampling
counts it.

uint8 storage: step 1 yields uint8 pixels, and mean = std = 0.5 makes step 2 exactly the on-device
normalisation the pipeline already uses for the synthetic job (`pixel_values / 127.5 - 1`, see pipeline.py).
So `preprocess(..., normalize=False)` gives uint8 pixels that normalise on device to the processor's values
(within float32 rounding, < 1e-6) on every valid pixel. Only the padding differs: the processor's padding is
0.0 after normalisation, a uint8 zero becomes -1.0. Padded pixels sit only in fully masked patches, which the
model masks out of attention, so the model's outputs do not depend on their value.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import PIL.Image

SHORTEST_EDGE = 384
SIZE_DIVISOR = 32
MEAN = STD = 0.5
# The longer side's cap, as a multiple of the shorter side (COCO's 1333 x 800).
_MAX_LONGER, _MAX_SHORTER = 1333, 800


def longest_edge(shortest_edge: int = SHORTEST_EDGE) -> int:
  """The cap on the longer side before rounding to the size divisor (639 for 384)."""
  return int(_MAX_LONGER / _MAX_SHORTER * shortest_edge)


def resized_shape(height: int, width: int, shortest_edge: int = SHORTEST_EDGE,
                  size_divisor: int = SIZE_DIVISOR) -> tuple[int, int]:
  """The (height, width) ViLT resizes an image of (height, width) to (module docstring, step 1).

  Sides that would floor to 0 (an image more than ~50 times longer than wide) are kept at one
  `size_divisor`; the processor fails on those images.
  """
  if height <= 0 or width <= 0:
    raise ValueError(f"image shape ({height}, {width}) must be positive")
  scale = shortest_edge / min(height, width)
  if height < width:
    new_h, new_w = float(shortest_edge), scale * width
  else:
    new_h, new_w = scale * height, float(shortest_edge)
  cap = longest_edge(shortest_edge)
  if max(new_h, new_w) > cap:
    shrink = cap / max(new_h, new_w)
    new_h, new_w = new_h * shrink, new_w * shrink
  new_h, new_w = int(new_h + 0.5), int(new_w + 0.5)
  return (max(size_divisor, new_h // size_divisor * size_divisor),
          max(size_divisor, new_w // size_divisor * size_divisor))


def canvas_shapes(shortest_edge: int = SHORTEST_EDGE, size_divisor: int = SIZE_DIVISOR) -> tuple[tuple[int, int], ...]:
  """The fixed padded canvases, smallest first: square, landscape, portrait, and large square (mixed)."""
  short = max(size_divisor, shortest_edge // size_divisor * size_divisor)
  long = max(short, longest_edge(shortest_edge) // size_divisor * size_divisor)
  return (short, short), (short, long), (long, short), (long, long)


def choose_canvas(shapes: Iterable[tuple[int, int]], canvases: Sequence[tuple[int, int]] | None = None
                  ) -> tuple[int, int]:
  """The smallest canvas (by area, then order) holding every resized (height, width) in `shapes`.

  Raises ValueError when none does (a custom canvas set too small for the images).
  """
  canvases = canvas_shapes() if canvases is None else canvases
  shapes = list(shapes)
  if not shapes:
    raise ValueError("choose_canvas needs at least one image shape")
  need_h, need_w = max(h for h, _ in shapes), max(w for _, w in shapes)
  fits = [c for c in canvases if c[0] >= need_h and c[1] >= need_w]
  if not fits:
    raise ValueError(f"no canvas of {list(canvases)} holds a resized image of ({need_h}, {need_w})")
  return min(fits, key=lambda c: (c[0] * c[1], list(canvases).index(c)))


def _rgb(image) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected uint8 pixels, got {image.dtype}")
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
  return image


def resize(image, shortest_edge: int = SHORTEST_EDGE, size_divisor: int = SIZE_DIVISOR) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [h, w, 3] at `resized_shape`, PIL bicubic (as the processor)."""
  image = _rgb(image)
  h, w = resized_shape(*image.shape[:2], shortest_edge, size_divisor)
  if (h, w) == image.shape[:2]:
    return image
  return np.asarray(PIL.Image.fromarray(image).resize((w, h), PIL.Image.BICUBIC))


def normalize(pixels: np.ndarray) -> np.ndarray:
  """uint8 -> float32 (x / 255 - 0.5) / 0.5, computed in the processor's order and dtypes."""
  x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
  return (x - np.float32(MEAN)) / np.float32(STD)


def preprocess(image, canvas: tuple[int, int], *, shortest_edge: int = SHORTEST_EDGE,
               size_divisor: int = SIZE_DIVISOR, normalize_pixels: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """One image -> (pixels [H, W, 3], mask bool [H, W]) on the padded canvas (H, W).

  normalize_pixels: True gives the processor's float32 values (padding 0.0); False gives the resized uint8
  pixels (padding 0) for on-device normalisation (module docstring).
  Raises ValueError if the resized image does not fit the canvas.
  """
  resized = resize(image, shortest_edge, size_divisor)
  h, w = resized.shape[:2]
  ch, cw = canvas
  if h > ch or w > cw:
    raise ValueError(f"resized image ({h}, {w}) does not fit the canvas ({ch}, {cw})")
  if normalize_pixels:
    pixels = np.zeros((ch, cw, 3), np.float32)
    pixels[:h, :w] = normalize(resized)
  else:
    pixels = np.zeros((ch, cw, 3), np.uint8)
    pixels[:h, :w] = resized
  mask = np.zeros((ch, cw), bool)
  mask[:h, :w] = True
  return pixels, mask


def preprocess_batch(images: Sequence, canvases: Sequence[tuple[int, int]] | None = None, *,
                     shortest_edge: int = SHORTEST_EDGE, size_divisor: int = SIZE_DIVISOR,
                     normalize_pixels: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Images -> (pixels [N, H, W, 3], mask bool [N, H, W]) on the smallest canvas holding them all.

  `canvases` defaults to `canvas_shapes(shortest_edge, size_divisor)`.
  """
  canvases = canvas_shapes(shortest_edge, size_divisor) if canvases is None else canvases
  canvas = choose_canvas([resized_shape(*np.shape(im)[:2], shortest_edge, size_divisor) for im in images], canvases)
  out = [preprocess(im, canvas, shortest_edge=shortest_edge, size_divisor=size_divisor,
                    normalize_pixels=normalize_pixels) for im in images]
  return np.stack([p for p, _ in out]), np.stack([m for _, m in out])


def valid_patches(mask: np.ndarray, patch_size: int = SIZE_DIVISOR) -> int:
  """Patches of `patch_size` whose pixels are all valid (the mask's height and width must be multiples)."""
  h, w = mask.shape[-2:]
  if h % patch_size or w % patch_size:
    raise ValueError(f"mask shape ({h}, {w}) is not a multiple of the patch size {patch_size}")
  blocks = np.asarray(mask, bool).reshape(mask.shape[:-2] + (h // patch_size, patch_size, w // patch_size, patch_size))
  return int(blocks.all(axis=(-3, -1)).sum())
