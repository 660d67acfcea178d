"""tfds builder writing `synthetic.make_benchmark`'s clients to array_record, one config per benchmark.

Splits are "<client>_train" / "<client>_test"; each client's answers, score rule, images per example and task
are in `info.metadata["clients"]`.
"""
from __future__ import annotations

import dataclasses

import PIL.Image
import tensorflow_datasets as tfds

from feddat_jax.data import synthetic
from feddat_jax.data.builders import common


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  """`synthetic.make_benchmark`'s arguments."""

  benchmark: str = "domain"
  seed: int = 0
  scale: float = 1.0
  image_size: int = 64
  num_answers: int = 100


def synthetic_config(benchmark: str, *, seed: int = 0, scale: float = 1.0, image_size: int = 64,
                     num_answers: int = 100) -> SyntheticConfig:
  """The config for these arguments; its name encodes any non-default one and the generator's version
  (`synthetic.GENERATOR`, a hash of its source), so each gets its own data dir and an edited generator's data
  are prepared anew."""
  if benchmark not in synthetic.BENCHMARKS:
    raise ValueError(f"unknown synthetic benchmark {benchmark!r}; use one of {synthetic.BENCHMARKS}")
  defaults = {f.name: f.default for f in dataclasses.fields(SyntheticConfig)}
  given = dict(seed=seed, scale=scale, image_size=image_size, num_answers=num_answers)
  name = "-".join([benchmark] + [f"{k}{v:g}" for k, v in given.items() if v != defaults[k]]
                  + [f"gen{synthetic.GENERATOR}"])
  return SyntheticConfig(name=name, benchmark=benchmark, **given)


class Synthetic(common.Builder):
  """The procedural benchmarks of `feddat_jax.data.synthetic` (domain / function / scene / task)."""

  name = "feddat_synthetic"
  BUILDER_CONFIGS = [synthetic_config(b) for b in synthetic.BENCHMARKS]
  IMAGE_ENCODING = "png"  # lossless: examples read back bit-exactly

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    clients = synthetic.make_benchmark(cfg.benchmark, seed=cfg.seed, scale=cfg.scale, image_size=cfg.image_size,
                                       num_answers=cfg.num_answers)
    self.info.metadata["clients"] = [
        common.client_meta(c.name, c.answers, c.score_rule, c.num_images, c.task) for c in clients]
    splits = {}
    for c in clients:
      splits[f"{c.name}_train"] = self._generate_examples(c.train)
      splits[f"{c.name}_test"] = self._generate_examples(c.test)
    return self._with_progress(splits, sum(len(c.train) + len(c.test) for c in clients))

  def _generate_examples(self, examples):
    for i, ex in enumerate(examples):
      # tfds encodes numpy images with TensorFlow; PIL images it encodes with PIL.
      yield i, dict(ex, images=[PIL.Image.fromarray(im) for im in ex["images"]])
