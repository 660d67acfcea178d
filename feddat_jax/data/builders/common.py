"""What every FedDAT tfds builder shares: the stored features, the client metadata and the read-back view.

Every builder writes one split per client and subset, named "<client>_train" and "<client>_test", and
stores one entry per client in `info.metadata["clients"]` (name, answers, score_rule, num_images, task),
so one reader (`client_data`) turns any of them back into `schema.ClientData`.
"""
from __future__ import annotations

import collections.abc
import inspect
import io
import re
from typing import Any, Optional

from etils import epath
from PIL import Image
import tensorflow_datasets as tfds
from tqdm import tqdm

from feddat_jax.data import schema

FILE_FORMAT = "array_record"  # the only tfds format that writes and reads without TensorFlow

_CLIENT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of every FedDAT builder: the common example schema as features, and a `clients` metadata entry."""

  VERSION = tfds.core.Version("1.0.0")
  IMAGE_ENCODING = "jpeg"  # only used for images handed over as PIL images; bytes are stored as they are

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds's default probes `importlib_resources`, a Python < 3.9 backport it no longer installs, and fails
    # for builders defined in a package; for those it would return this same file path.
    return epath.Path(inspect.getfile(cls))

  examples_written = 0  # by the last generation in this process (0: the data was already prepared)

  def _with_progress(self, splits: dict[str, Any], total: int) -> dict[str, Any]:
    """Wraps `_split_generators`' example generators: a bar with examples/s while the dataset is generated
    (on a terminal; tfds's own bar is off in runs), counted into `examples_written` for `finish_progress`."""
    name = f"{self.name}/{self.builder_config.name}" if self.builder_config else self.name
    self._bar = tqdm(total=total, desc=f"building {name}", unit=" examples", dynamic_ncols=True, disable=None)

    def counted(examples):
      for item in examples:
        yield item
        self.examples_written += 1
        self._bar.update(1)

    return {split: counted(examples) for split, examples in splits.items()}

  def finish_progress(self) -> None:
    bar = getattr(self, "_bar", None)
    if bar is not None:
      bar.close()
      self._bar = None

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        "question_id": tfds.features.Text(),
        "images": tfds.features.Sequence(
            tfds.features.Image(shape=(None, None, 3), encoding_format=self.IMAGE_ENCODING)),
        "question": tfds.features.Text(),
        "answers": tfds.features.Sequence(tfds.features.Text()),
    })
    # Unshuffled so a split reads back in the order it was written (reproducible, testable round trips).
    return tfds.core.DatasetInfo(
        builder=self, features=features, metadata=tfds.core.MetadataDict(), disable_shuffling=True)


def client_meta(name: str, answers: list[str], score_rule: str, num_images: int, task: str) -> dict[str, Any]:
  """One client's entry in `info.metadata["clients"]`."""
  if not _CLIENT_NAME.match(name):
    raise ValueError(f"client name {name!r} must be lower-case snake_case (it becomes a tfds split name)")
  if score_rule not in schema.SCORE_RULES:
    raise ValueError(f"client {name!r}: unknown score_rule {score_rule!r}; use one of {schema.SCORE_RULES}")
  return dict(name=name, answers=list(answers), score_rule=score_rule, num_images=num_images, task=task)


class Examples(collections.abc.Sequence):
  """Random-access view of one tfds data source as schema examples (str text, uint8 [H, W, 3] images)."""

  def __init__(self, source: collections.abc.Sequence):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    if not -len(self) <= index < len(self):
      raise IndexError(f"example index {index} out of range for {len(self)} examples")
    ex = self._source[index % len(self)]
    return {
        "question_id": ex["question_id"].decode(),
        "images": list(ex["images"]),
        "question": ex["question"].decode(),
        "answers": [a.decode() for a in ex["answers"]],
    }

  def header(self, index: int) -> Optional[tuple[list[str], list[tuple[int, int]]]]:
    """The example's answers and its images' (height, width), read without decoding a pixel (the streaming
    loader's start-up pass, `data/pipeline.py`): the record parsed by tfds's own numpy parser, the image sizes
    from the encoded headers. None for sources without that parser (the caller decodes the example)."""
    parser = getattr(getattr(getattr(self._source, "dataset_info", None), "features", None),
                     "_example_parser_np", None)  # tfds's (private) parser of what `__getitem__` decodes
    raw = getattr(self._source, "data_source", None)
    if parser is None or raw is None:
      return None
    parsed = parser.parse_example(raw[index % len(self)])
    sizes = []
    for encoded in parsed["images"]:
      with Image.open(io.BytesIO(encoded)) as image:
        sizes.append((image.height, image.width))
    return [a.decode() for a in parsed["answers"]], sizes


def client_data(builder: tfds.core.DatasetBuilder) -> list[schema.ClientData]:
  """Reads a prepared builder back through `as_data_source` (the `tfds.data_source` path)."""
  sources = builder.as_data_source()
  return [
      schema.ClientData(
          name=c["name"],
          train=Examples(sources[f"{c['name']}_train"]),
          test=Examples(sources[f"{c['name']}_test"]),
          answers=list(c["answers"]),
          score_rule=c["score_rule"],
          num_images=c["num_images"],
          task=c["task"],
      )
      for c in builder.info.metadata["clients"]
  ]
