"""Host-side data pipeline: image preprocessing and the per-round `[clients, steps, batch, ...]` arrays.

The engine's contract (names, dtypes, shapes) for one round or one evaluation pass:

  batches = {
    "input_ids":      int32   [C, S, B, L],
    "attention_mask": int32   [C, S, B, L],
    "pixel_values":   uint8   [C, S, B, N_img, H, W, 3],  # normalised (mean = std = 0.5) on device
    "pixel_mask":     bool    [C, S, B, N_img, H, W],     # all False for a missing second image
    "targets":        float32 [C, S, B, A],               # soft scores, zero-padded to A
    "example_mask":   float32 [C, S, B],                  # 0 for padding in a partial last batch
  }
  step_mask: bool [C, S]   # False on the steps a smaller client does not have (S = max over clients)
  answer_mask: float32 [C, A]  # 1 where the client's answer vocabulary has an entry
  answer_ids:  int32 [C, A, La]  # each candidate answer tokenized "[CLS] answer [SEP]" (only with answer_len,
                                 # for answer-generating backbones such as ALBEF)
`client_constants(indices)` gives the last two for a round's clients; the engine passes them to every step.

Padding slots (partial batches, missing steps) repeat a real example of the client so every row is a valid
model input (no all-masked attention rows), with example_mask = 0 and targets = 0.

Loading (`FederatedData(..., loading=)`): "memory" preprocesses every example of every client once, at start-up,
and keeps it in host RAM; "stream" keeps only each dataset's example indices, labels and image sizes (a few
bytes an example, read without decoding a pixel) and reads a call's examples by random access from their
sources (the tfds array_record data sources), decoded and preprocessed by the same functions in grain's worker
threads, only for the clients asked for, keeping the most recently used preprocessed examples up to a fixed
budget (`cache_mb`) for later rounds. Both give bitwise the same arrays.
"""
from __future__ import annotations

import collections
import math
import os
import threading
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from feddat_jax.data import answers as answers_lib
from feddat_jax.data import partition as partition_lib
from feddat_jax.data import schema
from feddat_jax.data import tokenizer as tokenizer_lib
from feddat_jax.data import vilt_preprocess


def preprocess_image(image: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """ViLT-style resize into (H, W): uint8 [H, W, 3] pixels and bool [H, W] valid-region mask.

  The shorter side goes to min(H, W) unless the longer side would then overflow, in which case the image is
  scaled to fit; aspect ratio is kept and the rest is padded bottom/right with zeros (mask False). A square
  image into a square target is a plain resize with an all-True mask.
  """
  h, w = image.shape[:2]
  th, tw = hw
  s = min(min(th, tw) / min(h, w), th / h, tw / w)
  nh, nw = min(th, max(1, round(h * s))), min(tw, max(1, round(w * s)))
  if (nh, nw) != (h, w):
    image = np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((nw, nh), Image.BICUBIC))
  pixels = np.zeros((th, tw, 3), np.uint8)
  mask = np.zeros((th, tw), bool)
  pixels[:nh, :nw] = image
  mask[:nh, :nw] = True
  return pixels, mask


def preprocess_image_vilt(image: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """ViLT's real-data rule into the padded canvas (H, W): uint8 [H, W, 3] pixels and bool [H, W] mask.

  Same contract as `preprocess_image` (uint8, normalised on device with mean = std = 0.5), with
  transformers' `ViltImageProcessor` resize: shorter side 384, longer at most 639, both floored to multiples
  of 32 (`vilt_preprocess.py`); `hw` should be one of `vilt_preprocess.canvas_shapes()`, e.g. the one
  `vilt_preprocess.choose_canvas` picks for a dataset. Raises ValueError if the image does not fit `hw`.
  """
  return vilt_preprocess.preprocess(image, hw, normalize_pixels=False)


IMAGE_PREPROCESS = ("square", "vilt")
DATA_LOADING = ("memory", "stream")
_READ_CHUNK = 16  # examples per grain element when streaming: its per-element cost is a few tenths of a ms


def _encode_split(examples: Sequence[schema.Example], client: schema.ClientData, tokenizer, *, image_hw,
                  text_len: int, num_images: int, num_answers: int, image_preprocess: str = "square",
                  size_divisor: int = vilt_preprocess.SIZE_DIVISOR) -> dict[str, np.ndarray]:
  """All examples of one split as arrays with a leading [n] axis (the cache rounds are cut from).

  "square": pixel_values/pixel_mask at `image_hw` (`preprocess_image`). "vilt": instead an object array
  "images" [n, num_images] of uint8 images resized by ViLT's rule (shorter side min(image_hw), sides multiples
  of `size_divisor`; None for a missing second image), padded onto the run's canvas when batches are cut.
  """
  n = len(examples)
  h, w = image_hw
  out = tokenizer([ex["question"] for ex in examples], max_length=text_len)
  if image_preprocess == "vilt":
    out["images"] = np.full((n, num_images), None, object)
  else:
    out["pixel_values"] = np.zeros((n, num_images, h, w, 3), np.uint8)
    out["pixel_mask"] = np.zeros((n, num_images, h, w), bool)
  vocab_index = {a: i for i, a in enumerate(client.answers)}
  out["targets"] = np.zeros((n, num_answers), np.float32)
  for i, ex in enumerate(examples):
    for j, img in enumerate(ex["images"]):
      if image_preprocess == "vilt":
        out["images"][i, j] = vilt_preprocess.resize(np.asarray(img), min(image_hw), size_divisor)
      else:
        out["pixel_values"][i, j], out["pixel_mask"][i, j] = preprocess_image(np.asarray(img), image_hw)
    out["targets"][i] = answers_lib.soft_scores(ex["answers"], vocab_index, client.score_rule, num_answers)
  return out


def pad_images(images: np.ndarray, canvas: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Object array [..., N_img] of resized uint8 images (or None) -> uint8 pixels [..., N_img, H, W, 3] and bool
  pixel_mask [..., N_img, H, W] on `canvas` (H, W), each image at the top left (ViLT's padding)."""
  ch, cw = canvas
  pixels = np.zeros(images.shape + (ch, cw, 3), np.uint8)
  mask = np.zeros(images.shape + (ch, cw), bool)
  for index, image in np.ndenumerate(images):
    if image is not None:
      h, w = image.shape[:2]
      if h > ch or w > cw:
        raise ValueError(f"resized image ({h}, {w}) does not fit the canvas ({ch}, {cw})")
      pixels[index][:h, :w] = image
      mask[index][:h, :w] = True
  return pixels, mask


def _labels(targets: np.ndarray) -> np.ndarray:
  """Each example's label for partitioning: its best answer id (num_answers: none of the answer space)."""
  return np.where(targets.max(1) > 0, targets.argmax(1), targets.shape[1])


class _LockedTokenizer:
  """The tokenizer called under a lock: streaming tokenizes in grain's threads, and a transformers fast tokenizer
  called from two threads at once can fail ("Already borrowed": each call sets its truncation and padding)."""

  def __init__(self, tokenizer):
    self._tokenizer, self._lock = tokenizer, threading.Lock()

  def __call__(self, *args, **kwargs):
    with self._lock:
      return self._tokenizer(*args, **kwargs)


def _header(examples: Sequence[schema.Example], index: int) -> tuple[list[str], list[tuple[int, int]]]:
  """An example's answers and its images' (height, width): without decoding pixels where the sequence can
  (`builders.common.Examples.header`), else from the decoded example."""
  header = getattr(examples, "header", None)
  parsed = header(index) if header is not None else None
  if parsed is not None:
    return parsed
  ex = examples[index]
  return list(ex["answers"]), [tuple(np.asarray(im).shape[:2]) for im in ex["images"]]


def _split_header(examples: Sequence[schema.Example], client: schema.ClientData, num_answers: int, *,
                  image_preprocess: str, shortest_edge: int, size_divisor: int):
  """(labels int [n] as `_labels` gives them, the set of resized image shapes for "vilt") of one split, read
  example by example (streaming's start-up pass: nothing of the size of the data is kept)."""
  vocab_index = {a: i for i, a in enumerate(client.answers)}
  labels = np.zeros(len(examples), np.int64)
  shapes = set()
  for i in range(len(examples)):
    answers, sizes = _header(examples, i)
    labels[i] = _labels(answers_lib.soft_scores(answers, vocab_index, client.score_rule, num_answers)[None])[0]
    if image_preprocess == "vilt":
      shapes |= {vilt_preprocess.resized_shape(h, w, shortest_edge, size_divisor) for h, w in sizes}
  return labels, shapes


class FederatedData:
  """The population's data: each dataset preprocessed once (or streamed), its clients (partition.py) as index lists.

  Cuts deterministic per-round arrays for any clients of the population.

  Example:
    data = FederatedData(datasets, SyntheticTokenizer(), image_hw=(64, 64), text_len=40, batch_size=8,
                         population="dirichlet:20:0.5")
    batches, step_mask = data.round_batches(0, [0, 17, 42])
  """

  loading = "memory"  # (a class default too, for subclasses that fill `_cache` themselves: benchmarks/population.py)

  def __init__(self, datasets: Sequence[schema.ClientData], tokenizer, *, image_hw: tuple[int, int],
               text_len: int, batch_size: int, num_answers: Optional[int] = None, seed: int = 0,
               answer_len: int = 0, population: str = "natural", image_preprocess: str = "square",
               size_divisor: int = vilt_preprocess.SIZE_DIVISOR, loading: str = "memory", workers: int = 0,
               cache_mb: float = 0):
    """loading: "memory" or "stream" (module docstring); workers: grain's reader threads when streaming (0: one
    per CPU core, at most 16); cache_mb: when streaming, the preprocessed examples kept for reuse (least recently
    used dropped first; 0: none), a bound that does not grow with the data.

    image_preprocess: "square" fits every image into `image_hw` (the synthetic job's small squares);
    "vilt" resizes as transformers' ViltImageProcessor does, with shortest edge min(image_hw) (384 for
    ViLT-B/32), the longer side at most int(1333 / 800 * shortest edge), both sides multiples of
    `size_divisor` (the patch size, 32), and pads every image onto one canvas for the whole run: the smallest
    of `vilt_preprocess.canvas_shapes` holding every image of every dataset and split, so that all rounds and
    evaluations keep one shape. `self.image_hw` is then that canvas. Images are kept resized but unpadded and
    padded when a round's batches are cut."""
    if image_preprocess not in IMAGE_PREPROCESS:
      raise ValueError(f"image_preprocess={image_preprocess!r} is not one of {IMAGE_PREPROCESS}")
    if loading not in DATA_LOADING:
      raise ValueError(f"loading={loading!r} is not one of {DATA_LOADING}")
    self.image_preprocess, self.loading = image_preprocess, loading
    self.workers = workers or min(16, os.cpu_count() or 1)
    self.cache_bytes = int(cache_mb * 2 ** 20)
    self._lru: collections.OrderedDict = collections.OrderedDict()  # (dataset, split, row) -> (arrays, bytes)
    self._lru_bytes, self._lru_lock = 0, threading.Lock()  # the feeder's round and evaluation threads share it
    self.datasets = list(datasets)
    self.batch_size = batch_size
    self.seed = seed
    self.num_answers = num_answers or max(len(c.answers) for c in self.datasets)
    if any(len(c.answers) > self.num_answers for c in self.datasets):
      raise ValueError(f"a client has more than num_answers={self.num_answers} answers")
    self.num_images = max(c.num_images for c in self.datasets)
    self.answer_mask = np.zeros((len(self.datasets), self.num_answers), np.float32)
    for i, c in enumerate(self.datasets):
      self.answer_mask[i, :len(c.answers)] = 1.0
    self.answer_ids = None
    if answer_len:
      self.answer_ids = np.stack([tokenizer_lib.tokenize_answers(tokenizer, c.answers, self.num_answers, answer_len)
                                  for c in self.datasets])
    kw = dict(image_hw=tuple(image_hw), text_len=text_len, num_images=self.num_images,
              num_answers=self.num_answers, image_preprocess=image_preprocess, size_divisor=size_divisor)
    self._tokenizer, self._kw = _LockedTokenizer(tokenizer), kw
    if loading == "memory":
      self._cache = [{split: _encode_split(getattr(c, split), c, tokenizer, **kw) for split in ("train", "test")}
                     for c in self.datasets]
      labels = {split: [_labels(c[split]["targets"]) for c in self._cache] for split in ("train", "test")}
      shapes = {im.shape[:2] for c in self._cache for split in c.values() for im in split["images"].flat
                if im is not None} if image_preprocess == "vilt" else set()
    else:
      labels, shapes = {"train": [], "test": []}, set()
      for c in self.datasets:
        for split in ("train", "test"):
          split_labels, split_shapes = _split_header(
              getattr(c, split), c, self.num_answers, image_preprocess=image_preprocess,
              shortest_edge=min(image_hw), size_divisor=size_divisor)
          labels[split].append(split_labels)
          shapes |= split_shapes
    self.image_hw = tuple(image_hw)
    if image_preprocess == "vilt":
      self.image_hw = vilt_preprocess.choose_canvas(
          shapes or [(min(image_hw),) * 2], vilt_preprocess.canvas_shapes(min(image_hw), size_divisor))
    self.parts = partition_lib.partition(population, labels["train"], labels["test"], seed)
    self.names = [partition_lib.client_name(self.datasets[p.dataset].name, p, population) for p in self.parts]
    self.dataset_of = np.array([p.dataset for p in self.parts], np.int32)
    self.num_examples = np.array([len(p.train) for p in self.parts], np.int64)
    self.num_test = np.array([len(p.test) for p in self.parts], np.int64)

  @property
  def num_clients(self) -> int:
    return len(self.parts)

  def client_constants(self, indices) -> dict[str, np.ndarray]:
    """Per-client arrays of the clients at `indices` (their dataset's; a dummy index >= K repeats the last)."""
    rows = self.dataset_of[np.minimum(np.asarray(indices, np.int64), self.num_clients - 1)]
    out = {"answer_mask": self.answer_mask[rows]}
    if self.answer_ids is not None:
      out["answer_ids"] = self.answer_ids[rows]
    return out

  def _rows(self, part, split: str, positions: np.ndarray) -> np.ndarray:
    """Rows of the dataset's preprocessed `split` holding the client's examples at `positions`."""
    return getattr(part, split)[positions]

  def _encode_one(self, task: tuple[int, str, int]) -> dict[str, np.ndarray]:
    """(dataset, split, row) -> that example read from its source and preprocessed, arrays with a leading [1]."""
    d, split, row = task
    c = self.datasets[d]
    return _encode_split([getattr(c, split)[row]], c, self._tokenizer, **self._kw)

  def _stream(self, split: str, client_ids: Sequence[int], rows: list[np.ndarray]) -> list[tuple[dict, np.ndarray]]:
    """Each client's distinct examples at `rows` read and preprocessed in grain's worker threads, as (arrays
    with a leading [n_distinct] axis, positions of `rows` in them).

    Examples in the cache are not read again. Threads, not grain's worker processes: those would start and
    receive the sources and tokenizer at every call and pickle every preprocessed image back; only part of the
    work (the array_record reads, PIL's decode and resize) runs outside the GIL, the rest (tfds's record
    parsing, tokenizing) does not (BENCHMARKS.md has what that costs). The whole read runs in the feeder's
    prefetch thread, one round ahead of the compute."""
    import grain

    distinct = [np.unique(r, return_inverse=True) for r in rows]
    tasks = [(self.parts[c].dataset, split, int(row)) for c, (u, _) in zip(client_ids, distinct) for row in u]
    with self._lru_lock:
      encoded = [self._lru.get(t) for t in tasks]
      for t, hit in zip(tasks, encoded):
        if hit is not None:
          self._lru.move_to_end(t)
    misses = [t for t, e in zip(tasks, encoded) if e is None]
    chunks = [misses[i:i + _READ_CHUNK] for i in range(0, len(misses), _READ_CHUNK)]
    read = grain.MapDataset.source(chunks).map(lambda chunk: [self._encode_one(t) for t in chunk]).to_iter_dataset(
        grain.ReadOptions(num_threads=self.workers, prefetch_buffer_size=2 * self.workers)) if chunks else ()
    fresh = [e for chunk in read for e in chunk]
    it = iter(fresh)
    encoded = [e[0] if e is not None else next(it) for e in encoded]
    if self.cache_bytes:
      self._remember(misses, fresh)
    out, start = [], 0
    for u, inverse in distinct:
      chunk = encoded[start:start + len(u)]
      start += len(u)
      out.append(({name: np.concatenate([e[name] for e in chunk]) for name in chunk[0]}, inverse.reshape(-1)))
    return out

  def _remember(self, tasks: list, encoded: list[dict]) -> None:
    """Keeps freshly read examples in the cache, dropping the least recently used beyond `cache_bytes`."""
    with self._lru_lock:
      for t, arrays in zip(tasks, encoded):
        size = sum(sum(im.nbytes for im in a.flat if im is not None) if a.dtype == object else a.nbytes
                   for a in arrays.values())
        if t in self._lru or size > self.cache_bytes:
          continue
        self._lru[t] = (arrays, size)
        self._lru_bytes += size
        while self._lru_bytes > self.cache_bytes:
          self._lru_bytes -= self._lru.popitem(last=False)[1][1]

  def _gather(self, split: str, client_ids: Sequence[int], orders: list[np.ndarray], num_steps: int):
    """Stacks per-client index orders (each <= S*B long) into the round arrays and the step mask."""
    b = self.batch_size
    out = {}
    example_mask = np.zeros((len(client_ids), num_steps * b), np.float32)
    rows = []
    for k, order in enumerate(orders):
      example_mask[k, :len(order)] = 1.0
      idx = np.zeros(num_steps * b, np.int64)  # padding slots repeat the client's first example (module doc)
      idx[:len(order)] = order
      rows.append(self._rows(self.parts[client_ids[k]], split, idx))
    if self.loading == "stream":
      sources = self._stream(split, client_ids, rows)
    else:
      sources = [(self._cache[self.parts[c].dataset][split], r) for c, r in zip(client_ids, rows)]
    for k, (arrays, idx) in enumerate(sources):
      cut = {name: arr[idx] for name, arr in arrays.items() if name != "images"}
      if "images" in arrays:  # "vilt": resized images padded onto the run's canvas here
        cut["pixel_values"], cut["pixel_mask"] = pad_images(arrays["images"][idx], self.image_hw)
      for name, value in cut.items():
        if name not in out:
          out[name] = np.empty((len(client_ids), num_steps, b) + value.shape[1:], value.dtype)
        out[name][k] = value.reshape((num_steps, b) + value.shape[1:])
    out["targets"] *= example_mask.reshape(len(client_ids), num_steps, b, 1)
    out["example_mask"] = example_mask.reshape(len(client_ids), num_steps, b)
    step_mask = out["example_mask"].max(axis=-1) > 0
    return out, step_mask

  def local_steps(self, client_ids=None, *, local_epochs: int = 1, local_steps: Optional[int] = None,
                  max_steps: Optional[int] = None) -> np.ndarray:
    """int [len(ids)]: the real local steps of each client in a round (see round_batches)."""
    n = self.num_examples if client_ids is None else self.num_examples[np.asarray(client_ids, np.int64)]
    steps = np.full(n.shape, local_steps) if local_steps else -(-local_epochs * n // self.batch_size)
    return np.minimum(steps, max_steps) if max_steps else steps

  def round_batches(self, round_idx: int, client_ids: Sequence[int], *, local_epochs: int = 1,
                    local_steps: Optional[int] = None, max_steps: Optional[int] = None,
                    num_steps: Optional[int] = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One round's training arrays for `client_ids` ([C, S, B, ...], step_mask bool [C, S]).

    Each client's train set is reshuffled every epoch with a stream keyed by (seed, round, client, epoch).
    Without `local_steps`, a client makes ceil(local_epochs * n / B) steps (the last possibly partial), at
    most `max_steps`; with `local_steps`, every client makes that many, cycling through its data. S is
    `num_steps` (the program's fixed step count, >= every client's steps) or else the cohort's maximum.
    """
    b = self.batch_size
    steps = self.local_steps(client_ids, local_epochs=local_epochs, local_steps=local_steps, max_steps=max_steps)
    orders = []
    for c, s in zip(client_ids, steps):
      n = int(self.num_examples[c])
      total = s * b if local_steps else min(local_epochs * n, s * b)
      perms = [np.random.default_rng([self.seed, round_idx, c, e]).permutation(n) for e in range(-(-total // n))]
      orders.append(np.concatenate(perms)[:total])
    num_steps = num_steps or int(steps.max())
    if steps.max() > num_steps:
      raise ValueError(f"a client makes {steps.max()} local steps, more than the round's {num_steps}")
    return self._gather("train", client_ids, orders, num_steps)

  def eval_batches(self, split: str = "test", client_ids: Optional[Sequence[int]] = None,
                   num_steps: Optional[int] = None):
    """Every example of `split` once, in order, in the round layout: (batches, step_mask)."""
    client_ids = list(range(self.num_clients)) if client_ids is None else list(client_ids)
    orders = [np.arange(len(getattr(self.parts[c], split))) for c in client_ids]
    num_steps = num_steps or max(math.ceil(len(o) / self.batch_size) for o in orders)
    return self._gather(split, client_ids, orders, num_steps)

  def eval_steps(self, split: str = "test") -> int:
    """Steps that cover the largest client's `split` (the evaluation program's fixed step count)."""
    return int(-(-max(len(getattr(p, split)) for p in self.parts) // self.batch_size))
