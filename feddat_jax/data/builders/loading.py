"""`load_clients`: build (once) and read back a benchmark's or dataset's clients through tfds array_record.

Specs:
  "synthetic/<benchmark>"  the procedural benchmark (domain | function | scene | task), no files needed;
  "<benchmark>"            the real benchmark, from `<manual_dir>/<dataset>/` for each of its datasets
                           (`REAL_BENCHMARKS`);
  "<dataset>"              one real dataset (`real.BUILDERS`), from `<manual_dir>/<dataset>/`.

Example:
  clients = load_clients("synthetic/domain", "/tmp/tfds", scale=0.05)
  clients = load_clients("domain", "/tmp/tfds", manual_dir="/data/feddat")  # /data/feddat/vizwiz/train.json...
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time

import tensorflow_datasets as tfds

from feddat_jax.data import schema
from feddat_jax.data.builders import common
from feddat_jax.data.builders import real
from feddat_jax.data.builders import synthetic_builder

# Client order follows the FedDAT code for "domain" (art, abstract, vizwiz, toronto, gqa) and the HFLB dataset
# card for "task" (the paper's task client list is unverified; docs/real_data.md).
REAL_BENCHMARKS = {
    "domain": ("aqua", "vqa_abstract", "vizwiz", "coco_qa", "gqa"),
    "function": ("clove_function",),
    "scene": ("clove_scene",),
    "task": ("gqa", "vqa_abstract", "snli_ve", "coco_qa", "nlvr2", "vizwiz"),
}


def load_clients(spec: str, data_dir: str | os.PathLike, *, manual_dir: str | os.PathLike | None = None,
                 **config) -> list[schema.ClientData]:
  """The clients of `spec`, each split a random-access sequence of schema examples (decoded on access).

  Args:
    spec: "synthetic/<benchmark>", "<benchmark>" or "<dataset>" (see the module docstring).
    data_dir: where the tfds array_record files are written once and read from afterwards.
    manual_dir: for real data, the root holding one folder of official files per dataset.
    **config: synthetic: seed, scale, image_size, num_answers (`synthetic_builder.synthetic_config`); real:
      "config" = "fed" (default, FedDAT-sized) or "full" (`real.RealConfig`).

  Raises:
    real.DataFormatError: a manual folder, annotation file or image is missing or malformed.
  """
  if spec.startswith("synthetic/"):
    config = synthetic_builder.synthetic_config(spec.removeprefix("synthetic/"), **config)
    # tfds takes a registered config only by name (an equal object is refused as a clash).
    registered = {c.name for c in synthetic_builder.Synthetic.BUILDER_CONFIGS}
    return _prepare(lambda: synthetic_builder.Synthetic(
        data_dir=data_dir, file_format=common.FILE_FORMAT, config=config.name if config.name in registered else config))
  datasets = REAL_BENCHMARKS.get(spec, (spec,))
  unknown = [d for d in datasets if d not in real.BUILDERS]
  if unknown:
    raise ValueError(f"unknown spec {spec!r}; use synthetic/<benchmark>, one of {sorted(REAL_BENCHMARKS)} or one "
                     f"of {sorted(real.BUILDERS)}")
  if manual_dir is None:
    raise ValueError(f"{spec!r} is real data: pass manual_dir, the folder holding one folder per dataset")
  clients = []
  for d in datasets:
    make = lambda d=d: real.BUILDERS[d](data_dir=data_dir, file_format=common.FILE_FORMAT, **config)
    clients += _prepare(make, tfds.download.DownloadConfig(manual_dir=os.path.join(manual_dir, d)))
  return clients


def _prepare(make_builder, download_config=None) -> list[schema.ClientData]:
  """Generates the dataset unless it is there already (a progress bar, then one summary line), reads it back.
  Processes that share a local data_dir take turns: the first generates, the others then read its files (with
  a builder made after the wait, which finds them)."""
  start = time.perf_counter()
  with _preparing(os.path.dirname(os.fspath(make_builder().data_dir))):
    builder = make_builder()
    try:
      builder.download_and_prepare(download_config=download_config)
    finally:
      builder.finish_progress()
  if builder.examples_written:
    seconds = time.perf_counter() - start
    print(f"data: built {builder.name}/{builder.builder_config.name}: {builder.examples_written} examples in "
          f"{seconds:.1f}s ({builder.examples_written / max(seconds, 1e-9):.0f} examples/s) under {builder.data_dir}",
          flush=True)
  return common.client_data(builder)


@contextlib.contextmanager
def _preparing(config_dir: str):
  """An exclusive lock on `<config_dir>/.prepare.lock` while a dataset is generated there: without it, two
  processes preparing the same dataset at once (a sweep's runs, a pod's hosts) both generate it, and the second
  to finish fails to rename its copy onto the first's (FileExistsError). Remote paths (gs://) are not locked."""
  if "://" in config_dir:
    yield
    return
  os.makedirs(config_dir, exist_ok=True)
  fd = os.open(os.path.join(config_dir, ".prepare.lock"), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)
