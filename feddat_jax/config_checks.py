"""Every config value checked once, before any work: `check(config)` raises a one-line ConfigError naming the
field, its value and what is allowed (configs/vqa.py documents the fields).

Three layers: every number must be finite; each numeric field has a range (RANGES: a field without one fails
tests/test_config_checks.py, so a new field gets its range where it is added); then the choices and the rules
that tie several fields together. What needs files or the dataset (backbone directories, the number of clients)
is checked later by experiment._validate_sources and `check_population`, still before any expensive work.
"""
from __future__ import annotations

import math

from flax import traverse_util


class ConfigError(ValueError):
  """A config value that cannot be used; the message names it and the fix."""


# field -> (low, high, bounds): bounds "[)" etc. say whether each end is allowed; None: unbounded on that side.
_POS, _NONNEG = (0, None, "()"), (0, None, "[)")
_PROBABILITY = (0, 1, "[)")
RANGES = {
    # The run.
    "seed": _NONNEG, "rounds": _POS, "local_epochs": _POS, "local_steps": _NONNEG, "batch_size": _POS,
    "eval_every": _POS, "checkpoint_every": _NONNEG,
    # Population and cohort (fields that say how many clients exist and how many train per round go here).
    "cohort_size": _NONNEG, "max_local_steps": _NONNEG, "step_buckets": (1, 16, "[]"), "eval_clients": _NONNEG,
    "lanes": _NONNEG,
    # Faults and robustness.
    "trim_fraction": (0, 0.5, "[)"), "max_update_norm": _POS, "dropout": _PROBABILITY, "min_clients": (1, None, "[)"),
    "dp.clip_norm": _NONNEG, "dp.noise_multiplier": _NONNEG, "dp.delta": (0, 1, "()"),
    # The model.
    "text_len": _POS, "num_answers": _POS, "image_size": _NONNEG, "patch_size": _NONNEG,
    "peft.reduction_factor": _POS, "peft.lora_rank": _POS, "peft.lora_alpha": _POS, "peft.prompt_length": _POS,
    # Optimisation.
    "optim.lr": _POS, "optim.weight_decay": _NONNEG, "optim.b1": _PROBABILITY, "optim.b2": _PROBABILITY,
    "optim.eps": _POS, "optim.warmup_frac": (0, 1, "[]"), "optim.horizon_epochs": _POS,
    "optim.head_lr_mult": _POS,
    "options.temperature": _POS, "options.prox_mu": _NONNEG, "options.server_lr": _NONNEG,
    "albef.answer_len": _POS, "albef.answers_per_example": _POS, "albef.rank_k": _POS,
    # Data and pretraining.
    "stream_cache_mb": _NONNEG, "synthetic.seed": _NONNEG, "synthetic.scale": _POS, "synthetic.image_size": _POS,
    "pretrain.steps": _NONNEG, "pretrain.mask_prob": _PROBABILITY,
    # Scale-out.
    "distributed.data_parallel": (1, None, "[)"), "distributed.num_processes": (1, None, "[)"),
    "distributed.process_id": _NONNEG,
}
# Why a value is refused, where the range alone does not say it.
_WHY = {
    "dropout": ": the probability that a client does not report in a round",
    "pretrain.mask_prob": ", or 0 for ViLT's 0.15",
    "options.temperature": ": the distillation divides the logits by it",
    "optim.b1": ": Adam's moment decay (1 never forgets the first gradient)",
    "optim.b2": ": Adam's moment decay (1 never forgets the first gradient)",
}


def _choices():
  from feddat_jax.data import pipeline
  from feddat_jax.federated import aggregators, engine
  from feddat_jax.models import vilt, vlm
  return {
      "benchmark": ("domain", "function", "scene", "task"), "size": tuple(vilt.PRESETS),
      "aggregation": ("uniform", "examples"), "client_parallelism": ("auto",) + engine.CLIENT_PARALLELISM,
      "compute_dtype": ("float32", "bfloat16"), "aggregator": aggregators.NAMES,
      "image_preprocess": pipeline.IMAGE_PREPROCESS,
      "data_loading": pipeline.DATA_LOADING,
      "optim.schedule": ("warmup_linear", "constant"), "head_readout": vlm.READOUTS,
      "peft.adapter_init": ("normal", "zero_up"), "peft.prompt_generator": ("mlp", "direct"),
  }


def describe_range(low, high, bounds: str) -> str:
  if high is None:
    return f"{'>=' if bounds[0] == '[' else '>'} {low}"
  return f"in {bounds[0]}{low}, {high}{bounds[1]}"


def in_range(value, low, high, bounds: str) -> bool:
  above = value >= low if bounds[0] == "[" else value > low
  below = high is None or (value <= high if bounds[1] == "]" else value < high)
  return above and below


def numeric_fields(config) -> dict[str, float]:
  """{dotted name: value} of every int or float field (booleans aside)."""
  flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
  return {k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def check(config) -> None:
  """Raise ConfigError for the first value the run cannot use (ranges, choices, rules across fields)."""
  for name, value in numeric_fields(config).items():
    if not math.isfinite(value):
      raise ConfigError(f"config {name}={value} must be a finite number"
                        + (f" {describe_range(*RANGES[name])}" if name in RANGES else ""))
  for name, (low, high, bounds) in RANGES.items():
    value = _get(config, name)
    if value is not None and not in_range(value, low, high, bounds):
      raise ConfigError(f"config {name}={value} must be {describe_range(low, high, bounds)}{_WHY.get(name, '')}")
  for name, choices in _choices().items():
    if _get(config, name) not in choices:
      raise ConfigError(f"config {name}={_get(config, name)!r} is not one of {tuple(choices)}")
  _check_rules(config)


def _get(config, name):
  node = config
  for part in name.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


def _is_albef(config) -> bool:
  from feddat_jax.models import backbones
  return backbones.parse(config.backbone).is_albef


def _check_rules(config) -> None:
  from feddat_jax.federated import algorithms as registry
  from feddat_jax.models import peft
  from feddat_jax.data import partition
  if ":" in config.algorithm:  # an outside algorithm, module:function: it must import and name a factory
    try:
      registry.resolve(config.algorithm)
    except ValueError as e:
      raise ConfigError(f"config {e}") from None
  elif config.algorithm not in registry.names():
    raise ConfigError(f"config algorithm={config.algorithm!r} is unknown; use 'feddat', '<family>_<method>' or "
                      f"'module:function': families {registry.FAMILIES}, methods {peft.METHODS}")
  try:
    partition.parse(config.population)
  except partition.PartitionError as e:
    raise ConfigError(f"config {e}") from None
  from feddat_jax.models import backbones
  try:
    backbones.parse(config.backbone)
  except ValueError as e:
    raise ConfigError(f"config {e}") from None
  if config.cohort_size and config.min_clients > config.cohort_size:
    raise ConfigError(f"config min_clients={config.min_clients} exceeds cohort_size={config.cohort_size}: "
                      "every round would be skipped")
  if config.aggregator == "dp_mean":
    if config.dp.noise_multiplier > 0 and config.dp.clip_norm == 0:
      raise ConfigError("config dp.noise_multiplier > 0 needs dp.clip_norm > 0: the noise is calibrated to it")
    if config.aggregation != "uniform":
      raise ConfigError("config aggregator=dp_mean counts every client once (bounded sensitivity); set "
                        "aggregation=uniform")
  if config.head_readout != "cls" and _is_albef(config):
    raise ConfigError("head_readout applies to ViLT; ALBEF answers with its decoder: leave head_readout=cls")
  if config.get("image_preprocess", "square") == "vilt" and _is_albef(config):
    raise ConfigError("config image_preprocess=vilt is ViLT's resize with a pixel mask; ALBEF's ViT takes "
                      "whole square images: use image_preprocess=square")
  if config.backbone in ("pretrained", "pretrained_tiny") and config.size == "base":
    raise ConfigError(f"backbone={config.backbone} is pretrained here at size tiny, mini or small; for base use "
                      "backbone=hf:<local vilt-b32-mlm dir> (or random)")
  if config.image_size and config.patch_size and config.image_size % config.patch_size:
    raise ConfigError(f"config image_size={config.image_size} is not a multiple of patch_size={config.patch_size}: "
                      "the image must split into whole patches")
  dist = config.get("distributed")
  if dist is not None and dist.process_id >= dist.num_processes:
    raise ConfigError(f"config distributed.process_id={dist.process_id} must be < distributed.num_processes="
                      f"{dist.num_processes}")


def check_population(config, num_clients: int) -> None:
  """The rules that need the number of clients (known once the data is listed)."""
  if config.cohort_size > num_clients:
    raise ConfigError(f"config cohort_size={config.cohort_size} exceeds the {num_clients} clients: a round cannot "
                      f"sample more clients than exist; use cohort_size <= {num_clients} (0: all)")
  round_size = config.cohort_size or num_clients
  if config.min_clients > round_size:
    raise ConfigError(f"config min_clients={config.min_clients} exceeds the {round_size} clients of a round: every "
                      "round would be skipped")


def check_backbone(vocab_rows: int, positions: int, image_size: int, patch_size: int, *, tokenizer_vocab: int,
                   text_len: int, what: str) -> None:
  """The backbone `what` fits the data: the tokenizer's ids index its word embedding, the text fits its position
  embeddings and the image splits into its patches."""
  if tokenizer_vocab > vocab_rows:
    raise ConfigError(f"{what}: the tokenizer's {tokenizer_vocab} token ids do not fit the backbone's {vocab_rows}-row "
                      "word embedding; use the tokenizer that came with the checkpoint (real data) or another backbone")
  if text_len > positions:
    raise ConfigError(f"text_len={text_len} exceeds the backbone's {positions} positions ({what})")
  if patch_size <= 0 or image_size % patch_size:
    raise ConfigError(f"{what}: image size {image_size} is not a multiple of patch size {patch_size}")
