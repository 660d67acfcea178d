"""One run: data -> model -> algorithm -> rounds -> evaluation -> checkpoints -> reports.

`run(config, workdir)` is what `python -m feddat_jax.main` calls and what the end-to-end test calls.
A rerun with the same workdir resumes from the last checkpoint and ends with the same results as an
uninterrupted run: data order, cohorts and step RNGs are functions of (seed, round).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from feddat_jax import checkpoint as ckpt_lib
from feddat_jax import config_checks
from feddat_jax import reporting
from feddat_jax import workdir_lock
from feddat_jax.config_checks import ConfigError  # experiment.ConfigError, as before
from feddat_jax.data import partition as partition_lib
from feddat_jax.data import pipeline
from feddat_jax.data import tokenizer as tokenizer_lib
from feddat_jax.federated import aggregators
from feddat_jax.federated import engine
from feddat_jax.federated import algorithms as registry
from feddat_jax.federated import feeder as feeder_lib
from feddat_jax.federated import faults
from feddat_jax.federated import optim as optim_lib
from feddat_jax.federated import privacy
from feddat_jax.federated import sharding
from feddat_jax.federated import store as store_lib
from feddat_jax.models import backbones, convert, peft, vilt, vlm


def user_errors() -> tuple[type[Exception], ...]:
  """Errors whose message is the whole story: the CLIs print them as one line and exit with status 2."""
  from feddat_jax.data.builders.formats import DataFormatError
  return (ConfigError, ckpt_lib.CheckpointError, convert.CheckpointError, DataFormatError, faults.DivergenceError,
          reporting.MetricsLogError)


_HOW_NOT_WHAT = ("distributed", "data_loading", "stream_cache_mb")  # config fields outside the fingerprint (below)
# Fields added after runs existed, omitted from the fingerprint at their default (what every run did before).
_NEW_AT_DEFAULT = {"image_preprocess": "square", "optim.head_lr_mult": 1.0}


def fingerprint(config) -> str:
  """A short hash of everything in the config (a resumed run must be the same run).

  Except `distributed` (where the run executes, not what it computes: every process must agree on it, and a
  run may resume on another mesh); without it the hash is what it was before that group existed. Likewise
  `data_loading` and `stream_cache_mb` (how the host reads the examples: the batches are bitwise the same), and
  the `_NEW_AT_DEFAULT` fields at their defaults.
  On synthetic data the generator's version (`synthetic.GENERATOR`) is hashed too: the same config on the data
  of an edited generator is another run.
  """
  d = {k: v for k, v in config.to_dict().items() if k not in _HOW_NOT_WHAT}  # to_dict copies: ours to edit
  for key, default in _NEW_AT_DEFAULT.items():
    group, _, leaf = key.rpartition(".")
    holder = d.get(group) if group else d
    if isinstance(holder, dict) and leaf in holder and holder[leaf] == default:
      del holder[leaf]
  config = ml_collections.ConfigDict(d)
  text = config.to_json(sort_keys=True)
  if config.get("data") == "synthetic":
    from feddat_jax.data import synthetic
    text += f"synthetic generator {synthetic.GENERATOR}"
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_differences(path: str, config, limit: int = 4) -> str:
  """What differs between the config a workdir's earlier run saved (`path`, its config.json) and `config`, as
  "key: A there, B here; ..." (at most `limit` keys, `_HOW_NOT_WHAT` aside as in `fingerprint`);
  "" if unknown."""
  try:
    with open(path) as f:
      there = json.load(f)
  except (OSError, ValueError):
    return ""
  if not isinstance(there, dict):
    return ""
  return _differences(there, json.loads(config.to_json()), limit)


def _differences(there: dict, here: dict, limit: int) -> str:
  """`config_differences` of two config dicts."""
  there, here = (traverse_util.flatten_dict(d, sep=".") for d in (there, here))
  show = lambda d, k: repr(d[k]) if k in d else "absent"
  keys = sorted(k for k in set(there) | set(here)
                if not k.startswith("distributed.") and k not in _HOW_NOT_WHAT and show(there, k) != show(here, k))
  text = "; ".join(f"{k}: {show(there, k)} there, {show(here, k)} here" for k in keys[:limit])
  return text + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def _say(msg: str) -> None:
  if jax.process_index() == 0:  # logs from process 0 only (several under jax.distributed)
    logging.info(msg)
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------- building

def validate(config) -> None:
  """Every value the run uses, checked before any work: a ConfigError names the field and the fix."""
  config_checks.check(config)  # ranges, choices, rules across fields
  _validate_sources(config)


def _validate_sources(config) -> None:
  """What the config's files and benchmark allow, from cheap reads only (before any expensive work)."""
  backbone = backbones.parse(config.backbone)
  if backbone.name == "hf":
    convert.check_dir(backbone.path)  # config.json and the weights' header
  if backbone.is_albef and backbone.path and not os.path.isfile(os.path.expanduser(backbone.path)):
    raise ConfigError(f"backbone={config.backbone!r}: no such file; pass a local copy of the official ALBEF.pth "
                      "(feddat_jax never downloads)")
  if backbone.is_albef and config.data != "synthetic" and not config.albef.tokenizer:
    raise ConfigError("ALBEF on real data needs its BERT WordPiece tokenizer: set albef.tokenizer=<local "
                      "bert-base-uncased dir>")
  try:
    per_dataset = partition_lib.parse(config.population)[1]
  except partition_lib.PartitionError as e:
    raise ConfigError(f"config {e}") from None
  if config.data == "synthetic" and not config.cohort_size:
    from feddat_jax.data import synthetic
    k = len(synthetic.client_names(config.benchmark)) * per_dataset
    if config.min_clients > k:
      raise ConfigError(f"config min_clients={config.min_clients} exceeds the {k} clients of a round: every "
                        "round would be skipped")


def load_data(config):
  """-> (datasets, tokenizer) for the config's benchmark and data source (one ClientData per dataset; the
  population's clients are cut from them by `config.population`)."""
  import tensorflow_datasets as tfds

  from feddat_jax.data import builders
  tfds.disable_progress_bar()  # the run prints its own progress
  tfds_dir = os.path.expanduser(config.tfds_dir)
  if config.data == "synthetic":  # generated once, then read back from array_record like real data
    clients = builders.load_clients(f"synthetic/{config.benchmark}", tfds_dir, seed=config.synthetic.seed,
                                    scale=config.synthetic.scale, image_size=config.synthetic.image_size,
                                    num_answers=config.num_answers)
    return clients, tokenizer_lib.SyntheticTokenizer()
  manual = os.path.expanduser(config.data)
  if not os.path.isdir(manual):
    raise ConfigError(f"data={config.data!r}: no such directory; use data=synthetic or a directory holding the "
                      "real datasets in their official formats (see feddat_jax/data/builders)")
  backbone = backbones.parse(config.backbone)
  if backbone.is_albef:
    tok = convert.load_tokenizer(os.path.expanduser(config.albef.tokenizer))
  elif backbone.name == "hf":
    tok = convert.load_tokenizer(backbone.path, vocab_size=convert.config_from_hf(backbone.path).vocab_size)
  else:
    raise ConfigError("real data needs the checkpoint's WordPiece tokenizer: set backbone=hf:<local ViLT dir>")
  clients = builders.load_clients(config.benchmark, tfds_dir, manual_dir=manual)
  return clients, tokenizer_lib.HFTokenizer(tok)


def _is_albef(config) -> bool:
  return backbones.parse(config.backbone).is_albef


def _extend_modality_types(params, needed: int):
  """Add modality-type rows for extra images (ViLT's NLVR2 recipe: copy the image row)."""
  table = params["embeddings"]["token_type_embeddings"]["embedding"]
  if table.shape[0] >= needed:
    return params
  extra = jnp.repeat(table[1:2], needed - table.shape[0], axis=0)
  emb = {**params["embeddings"], "token_type_embeddings": {"embedding": jnp.concatenate([table, extra])}}
  return {**params, "embeddings": emb}


def build_backbone(config, tokenizer, num_images: int):
  """-> (ViltConfig, pretrained backbone params or None) as the config's `backbone` says."""
  needed_types = num_images + 1
  backbone = backbones.parse(config.backbone)
  if backbone.name == "hf":
    cfg, params = convert.load_vilt(backbone.path)
  elif backbone.name == "pretrained":
    from feddat_jax import pretrain
    cfg, params = pretrain.pretrained_backbone(
        config.size, tokenizer, cache_dir=os.path.expanduser(config.pretrain.cache_dir),
        steps=config.pretrain.steps or pretrain.DEFAULT_STEPS[config.size], text_len=config.text_len,
        image_size=config.image_size or None, patch_size=config.patch_size or None,
        mask_prob=config.pretrain.mask_prob or None, log=_say)
  else:
    overrides = {k: config[k] for k in ("image_size", "patch_size") if config[k]}
    cfg = vilt.ViltConfig.preset(config.size, vocab_size=tokenizer.vocab_size,
                                 max_position_embeddings=config.text_len, **overrides)
    params = None
  config_checks.check_backbone(cfg.vocab_size, cfg.max_position_embeddings, cfg.image_size, cfg.patch_size,
                               tokenizer_vocab=tokenizer.vocab_size, text_len=config.text_len,
                               what=f"backbone={config.backbone}")
  if cfg.modality_type_vocab_size < needed_types:
    cfg = dataclasses.replace(cfg, modality_type_vocab_size=needed_types)
    params = None if params is None else _extend_modality_types(params, needed_types)
  return cfg, params


def build_model(config, tokenizer, num_images: int):
  """-> (model, pretrained params or None, image size, a one-line description) as `backbone` says.

  ViLT (pretrained_tiny | random | hf:<dir>): `vlm.VisionLanguageModel`, pretrained = backbone params.
  ALBEF (albef | albef:<ALBEF.pth>): `albef.AlbefModel`, pretrained = {"backbone", "head"} (the answer
  decoder's LM head comes with the checkpoint).
  """
  peft_cfg = peft.PeftConfig(method=registry.peft_method(config.algorithm), **config.peft.to_dict())
  if _is_albef(config):
    from feddat_jax.models import albef, convert_albef
    overrides = {k: config[k] for k in ("image_size", "patch_size") if config[k]}
    a = config.albef
    cfg = albef.AlbefConfig.preset(config.size, vocab_size=tokenizer.vocab_size,
                                   pad_token_id=tokenizer.pad_token_id, answer_len=a.answer_len,
                                   answers_per_example=a.answers_per_example, rank_k=a.rank_k,
                                   dtype=config.compute_dtype, **overrides)
    if cfg.max_position_embeddings < config.text_len:
      raise ConfigError(f"text_len={config.text_len} exceeds ALBEF's {cfg.max_position_embeddings} positions")
    pretrained = None
    checkpoint = backbones.parse(config.backbone).checkpoint
    if checkpoint:
      pretrained = convert_albef.load_albef(os.path.expanduser(checkpoint), cfg, peft_cfg)
    model = albef.AlbefModel(cfg, peft_cfg, config.num_answers, num_images)
    describe = (f"ALBEF {cfg.vision_hidden}d x {cfg.vision_layers} ViT, {cfg.hidden_size}d x {cfg.text_layers} "
                f"BERT ({cfg.text_layers - cfg.fusion_layer} fusion), {cfg.decoder_layers}-layer decoder")
    return model, pretrained, cfg.image_size, describe
  vilt_cfg, pretrained = build_backbone(config, tokenizer, num_images)
  vilt_cfg = dataclasses.replace(vilt_cfg, dtype=config.compute_dtype)
  model = vlm.VisionLanguageModel(vilt_cfg, peft_cfg, config.num_answers, num_images, readout=config.head_readout)
  return model, pretrained, vilt_cfg.image_size, f"ViLT {vilt_cfg.hidden_size}d x {vilt_cfg.num_layers}"


def _patch_size(model) -> int:
  """The model's image patch size (ViLT's rule pads images to multiples of it)."""
  cfg = getattr(model, "vilt", None) or getattr(model, "albef", None)
  return cfg.patch_size


def build_algorithm(config, model):
  optim = optim_lib.OptimConfig(**config.optim.to_dict())
  aggregator = aggregators.make(config.aggregator, trim_fraction=config.trim_fraction,
                                max_norm=config.max_update_norm, clip_norm=config.dp.clip_norm,
                                noise_multiplier=config.dp.noise_multiplier, seed=config.seed)
  return registry.make(config.algorithm, model, optim, total_rounds=config.rounds,
                       options=registry.options_for(config.algorithm, config.options.to_dict()),
                       aggregator=aggregator, min_clients=config.min_clients)


def count_params(algo, frozen, server, client) -> dict[str, int]:
  """Frozen backbone, trainable per client, communicated per client per round (parameters); `client`: one
  client's state (no clients axis)."""
  trained = {k: v for k, v in client.items() if k != "opt"}
  communicated = 0
  if not algo.centralized:
    carry = jax.eval_shape(algo.begin, frozen, server, client, jnp.int32(1))
    upload, _ = jax.eval_shape(algo.end, frozen, server, carry)
    communicated = peft.count(upload)
  return {"frozen_backbone": peft.count(frozen),
          "trainable_per_client": peft.count(trained) + peft.count(server.get("shared", {})),
          "communicated_per_client": communicated}


def init_states(algo, seed: int, pretrained, num_clients: int):
  """-> (frozen, server, store): the algorithm's initial states, every client's in a host store (one tree
  shared by all until a client trains; never [K, ...] anywhere)."""
  frozen, server, one = algo.init(jax.random.key(seed), 1, pretrained)
  return frozen, server, store_lib.ClientStore(jax.tree_util.tree_map(lambda x: np.asarray(x[0]), one), num_clients)


# ----------------------------------------------------------------------------------------------- the run


def _scores(eval_out, client_names, variants):
  """{variant: {client: 100 * mean VQA score}} from eval_fn's (sum, count) per client."""
  out = {}
  for v in variants:
    sums, counts = (np.asarray(x) for x in eval_out[v])
    out[v] = {c: float(100 * s / max(n, 1)) for c, s, n in zip(client_names, sums, counts)}
  return out


@dataclasses.dataclass
class _Run:
  """What a run carries from set-up through the rounds to the reports."""

  config: ml_collections.ConfigDict
  workdir: str  # this process's report directory (process 0: the config's workdir)
  placement: sharding.Placement
  fingerprint: str
  checkpointer: ckpt_lib.Checkpointer
  data: pipeline.FederatedData
  feeder: feeder_lib.Feeder
  names: list[str]
  algo: object
  frozen: object
  server: object
  store: store_lib.ClientStore
  counts: dict[str, int]
  dp_report: object
  start: int  # rounds already done (restored from a checkpoint)
  log: reporting.MetricsLog
  tb: reporting.TensorBoard


def run(config, workdir: str) -> dict:
  """Train and evaluate as `config` says; write reports to `workdir`; return the results dict."""
  try:
    r = _setup(config, workdir)
    seconds = _train(r)
    return _report(r, seconds)
  finally:
    workdir_lock.release(os.path.expanduser(workdir))  # taken in _setup; a no-op if this run did not take it


def check_seeds(configs) -> None:
  """Configs that `run_seeds` can run as one program: the same but for `seed` (each distinct), and no setting
  that puts the seed inside the round program (aggregator=dp_mean draws its noise from it)."""
  if not configs:
    raise ConfigError("no seeds to run")
  strip = lambda c: {k: v for k, v in json.loads(c.to_json()).items() if k != "seed"}
  for c in configs[1:]:
    if strip(c) != strip(configs[0]):
      raise ConfigError("vectorize_seeds runs seeds of one configuration; these configs differ in more than "
                        f"the seed: {config_differences_of(configs[0], c)}")
  seeds = [c.seed for c in configs]
  if len(set(seeds)) != len(seeds):
    raise ConfigError(f"vectorize_seeds: seeds {seeds} repeat")
  if configs[0].aggregator == "dp_mean":
    raise ConfigError("vectorize_seeds cannot run aggregator=dp_mean: its noise stream is drawn from the seed "
                      "inside the round program; run these seeds separately (without vectorize_seeds)")


def config_differences_of(a, b, limit: int = 4) -> str:
  """`config_differences` between two configs in memory."""
  return _differences(json.loads(a.to_json()), json.loads(b.to_json()), limit)


def run_seeds(configs, workdirs) -> list[dict]:
  """Seeds of one configuration (`configs`: the same but for `seed`) trained as ONE compiled round program,
  their states stacked on a leading seeds axis -> each seed's results dict, as `run(config, workdir)` returns.

  Each seed is a run of its own (set up by `_setup`: its data order, cohorts, host store, workdir, logs,
  checkpoints, reports, resume); only the round is shared: the engine's round vmapped over the seeds
  (`Placement.build_seeds_round`), the frozen backbone shared when every seed's is the same (a pretrained
  backbone), else stacked too. Evaluation runs per seed with one shared jitted function. Each seed's results
  equal a separate run's to float rounding (tests/test_sweep.py); docs/populations.md says more.
  """
  check_seeds(configs)
  runs = []
  try:
    for config, workdir in zip(configs, workdirs):
      runs.append(_setup(config, workdir))
    seconds = _train_seeds(runs)
    return [_report(r, s) for r, s in zip(runs, seconds)]
  finally:
    for workdir in workdirs:
      workdir_lock.release(os.path.expanduser(workdir))  # a no-op for those whose _setup did not take it


def _stack(trees):
  """Trees of the same structure -> one tree of numpy arrays stacked on a new leading axis."""
  return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _same(a, b) -> bool:
  if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
    return False
  return all(x is y or np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def pad_rounds(rounds: list[feeder_lib.Round], lanes: int) -> list[feeder_lib.Round]:
  """Host rounds of several seeds (same round index) made the same shapes for one program: the step axis S
  padded to the largest with masked steps (zeros; a masked step leaves a client untouched, and step keys are
  split per step index, so the real steps are unchanged), the lanes re-packed to the longest lane length
  (idle slots). Different S or lane lengths only arise with step_buckets > 1 or a sampled cohort."""
  s = max(rnd.inputs.step_mask.shape[1] for rnd in rounds)
  t = max((rnd.inputs.schedule["slot"].shape[1] for rnd in rounds if rnd.inputs.schedule is not None), default=0)
  out = []
  for rnd in rounds:
    inputs = rnd.inputs
    extra = s - inputs.step_mask.shape[1]
    if extra:
      pad = lambda x: np.pad(np.asarray(x), [(0, 0), (0, extra)] + [(0, 0)] * (np.ndim(x) - 2))
      inputs = inputs.replace(batches=jax.tree_util.tree_map(pad, inputs.batches), step_mask=pad(inputs.step_mask))
    if inputs.schedule is not None and inputs.schedule["slot"].shape[1] != t:
      inputs = inputs.replace(schedule=engine.lane_schedule(inputs.step_mask, lanes, t))
    out.append(dataclasses.replace(rnd, inputs=inputs))
  return out


def _train_seeds(runs: list[_Run]) -> list[list[float]]:
  """`_train` for seeds run as one program -> s per round per seed (a seed's share: the shared program's time
  over the seeds, plus its own host work)."""
  r0, n = runs[0], len(runs)
  config, placement = r0.config, r0.placement
  seconds = [[] for _ in runs]
  start = max(r.start for r in runs)
  for i, r in enumerate(runs):
    if r.start < start:  # resumed from an earlier checkpoint than the others (killed between their saves)
      _say(f"seed {r.config.seed}: rounds {r.start + 1}..{start} alone, to catch up with the other seeds")
      seconds[i] = _train(r, stop=start)
      r.start = start
  eval_fn = placement.build_eval(r0.algo)  # the seeds' algorithms are the same (check_seeds); one compile
  evaluators = [_evaluator(r, eval_fn) for r in runs]
  for r, evaluate in zip(runs, evaluators):
    if r.start == 0 and not r.log.evals():
      evaluate(0)  # the starting point of the learning curve
  shared = all(_same(r0.frozen, r.frozen) for r in runs[1:])  # a pretrained backbone: one copy for all seeds
  frozen = r0.frozen if shared else placement.put_replicated(_stack([r.frozen for r in runs]))
  server = placement.put_replicated(_stack([r.server for r in runs]))
  round_fn = placement.build_seeds_round(r0.algo, parallelism(config, placement), stacked_frozen=not shared)
  unstack = jax.jit(lambda tree: [jax.tree_util.tree_map(lambda x: x[i], tree) for i in range(n)],
                    out_shardings=placement.replicated)
  size = r0.feeder.size
  lanes = r0.feeder.lanes

  def prepare(round_idx):  # in the feeder's background thread, one round ahead
    rounds = pad_rounds([r.feeder.host_round(round_idx) for r in runs], lanes)
    return rounds, placement.put_seed_inputs(_stack([rnd.inputs for rnd in rounds]), size)

  _say(f"{n} seeds {[r.config.seed for r in runs]} as one program (states stacked on a seeds axis; frozen backbone "
       f"{'shared' if shared else 'stacked'})")
  for rounds, inputs in feeder_lib.prefetch(prepare, range(start, config.rounds)):
    t0 = time.perf_counter()
    rows = placement.put_seed_rows(_stack([r.store.gather(placement.hosted(rnd.cohort))
                                           for r, rnd in zip(runs, rounds)]), size)
    server, rows, metrics = round_fn(frozen, server, rows, inputs)
    servers = unstack(server)
    rows, metrics = jax.device_get((rows, metrics))
    share = (time.perf_counter() - t0) / n
    for i, (r, rnd) in enumerate(zip(runs, rounds)):
      r.server = servers[i]
      take = lambda tree: jax.tree_util.tree_map(lambda x: x[i], tree)
      _after_round(r, rnd, take(rows), take(metrics), time.perf_counter() - share, seconds[i], evaluators[i])
  for r, evaluate in zip(runs, evaluators):
    _end_training(r, evaluate)
  return seconds


def _setup(config, workdir: str) -> _Run:
  """Validates, loads data and model, initialises or restores the states, opens the logs."""
  validate(config)
  # [scale-out] Joins a jax.distributed job if configured (before any JAX work); the mesh placement.
  placement = sharding.from_config(config.distributed)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"workdir {workdir} exists and is not a directory")
  os.makedirs(workdir, exist_ok=True)
  if placement.is_main:  # one run per workdir; before the checkpointer, whose clean-up would delete a live save
    workdir_lock.acquire(workdir)
  fp = fingerprint(config)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), fp)  # every process takes part
  saved = os.path.join(workdir, "config.json")
  differences = config_differences(saved, config)
  if not differences and config.data == "synthetic" and os.path.exists(saved):  # the fingerprint's other part
    differences = ("no config field differs, so the data generator feddat_jax/data/synthetic.py has changed since "
                   "and its data with it")
  checkpointer.check_config(differences)  # before costly work
  if not placement.is_main:  # [scale-out] reports from process 0 only; the others' go to a scratch dir
    workdir = tempfile.mkdtemp(prefix=f"feddat_process{jax.process_index()}_")

  datasets, tokenizer = load_data(config)
  num_images = max(c.num_images for c in datasets)
  model, pretrained, image_size, describe = build_model(config, tokenizer, num_images)
  algo = build_algorithm(config, model)
  try:
    data = pipeline.FederatedData(datasets, tokenizer, image_hw=(image_size,) * 2, text_len=config.text_len,
                                  batch_size=config.batch_size, num_answers=config.num_answers, seed=config.seed,
                                  answer_len=config.albef.answer_len if _is_albef(config) else 0,
                                  population=config.population, image_preprocess=config.image_preprocess,
                                  size_divisor=_patch_size(model), loading=config.get("data_loading", "memory"),
                                  cache_mb=config.get("stream_cache_mb", 0))
  except partition_lib.PartitionError as e:
    raise ConfigError(f"config {e}") from None
  k, names = data.num_clients, data.names
  config_checks.check_population(config, k)  # cohort_size, min_clients vs the population's clients
  feeder = feeder_lib.Feeder(data, placement, seed=config.seed, cohort_size=config.cohort_size,
                             aggregation=config.aggregation, dropout=config.dropout,
                             local_epochs=config.local_epochs, local_steps=config.local_steps,
                             max_local_steps=config.max_local_steps, num_step_buckets=config.step_buckets,
                             eval_clients=config.eval_clients,
                             lanes=lanes_for(config, model, data) if parallelism(config, placement) == "lanes" else 0)
  frozen, server, store = init_states(algo, config.seed, pretrained, k)
  counts = count_params(algo, frozen, server, store.initial)
  counts["bytes_uploaded_per_round"] = 4 * counts["communicated_per_client"] * feeder.cohort_size
  dp_report = None
  if config.aggregator == "dp_mean":
    dp_report = privacy.report(config.dp.noise_multiplier, config.dp.clip_norm, feeder.cohort_size, k,
                               config.rounds, config.dp.delta)
    _say(f"DP-FedAvg: noise multiplier {config.dp.noise_multiplier}, clip {config.dp.clip_norm}, sampling rate "
         f"{dp_report['sampling_rate']:.3f}, {config.rounds} rounds: (epsilon, delta) = "
         f"({dp_report['epsilon']:.3f}, {config.dp.delta:g})")

  # The newest intact checkpoint; the store's rows: as many as the checkpoint holds (its meta says).
  start, state = checkpointer.restore_latest(
      lambda meta: {"server": server, "store": store.like(meta["shapes"]["['store']['ids']"][0][0])})
  if start:
    server = state["server"]
    store.load(state["store"])
    _say(f"resumed from {checkpointer.directory} after round {start}")
  frozen, server = placement.put_replicated((frozen, server))  # [scale-out] replicated
  reporting.write_atomic(os.path.join(workdir, "config.json"), config.to_json(indent=2, sort_keys=True))
  shown = names if k <= 10 else names[:3] + ["..."] + names[-2:]
  _say(f"{config.algorithm} on {config.benchmark} ({config.data}): {k} clients {shown}, cohort "
       f"{feeder.cohort_size}, train sizes {_sizes(data.num_examples)}, {feeder.buckets[-1]} local steps at most "
       f"(step buckets {list(feeder.buckets)}{f'; {feeder.lanes} lanes' if feeder.lanes else ''}); backbone {config.backbone} ({describe}); images "
       f"{data.image_hw[0]}x{data.image_hw[1]} ({config.image_preprocess}); "
       f"params: frozen {counts['frozen_backbone']:,}, trainable/client {counts['trainable_per_client']:,}, "
       f"communicated/client/round {counts['communicated_per_client']:,} "
       f"({counts['bytes_uploaded_per_round']:,} bytes uploaded per round)")
  return _Run(config, workdir, placement, fp, checkpointer, data, feeder, names, algo, frozen, server, store,
              counts, dp_report, start, reporting.MetricsLog(workdir, start), reporting.TensorBoard(workdir))


def parallelism(config, placement) -> str:
  """How the round runs its clients (engine.resolve_parallelism of the config's choice on this placement)."""
  return engine.resolve_parallelism(config.client_parallelism, placement.num_shards)


def lanes_for(config, model, data) -> int:
  """The config's `lanes`, or for 0 `engine.auto_lanes` of this run's client steps, cohort and model."""
  if config.lanes:
    return config.lanes
  steps = data.local_steps(local_epochs=config.local_epochs, local_steps=config.local_steps or None,
                           max_steps=config.max_local_steps or None)
  return engine.auto_lanes(steps, min(config.cohort_size or data.num_clients, data.num_clients),
                           engine.model_step_work(model, config.batch_size, config.text_len))


def _sizes(n: np.ndarray) -> str:
  """Client sizes, whole for a few clients, as a summary for many."""
  if len(n) <= 10:
    return str(n.tolist())
  return f"min {n.min()} / median {int(np.median(n))} / max {n.max()} (total {n.sum()})"


def _evaluator(r: _Run, eval_fn=None):
  """-> evaluate(rounds_done, final) -> scores: the clients' test splits in blocks of the cohort's size (a
  sample of them, or all for the final one), logged and written to TensorBoard. eval_fn: the jitted evaluation
  (default: built for `r`; seeds run as one program share one)."""
  eval_fn = eval_fn or r.placement.build_eval(r.algo)

  def evaluate(rounds_done, final=False):
    ids = r.feeder.eval_ids(rounds_done, final)
    outs = []
    for block, inputs in r.feeder.eval_blocks(ids):
      rows = r.placement.put_rows(r.store.gather(r.placement.hosted(block)), len(block))
      out = jax.device_get(eval_fn(r.frozen, r.server, rows, inputs))
      outs.append(jax.tree_util.tree_map(lambda x: x[:np.sum(block < r.feeder.num_clients)], out))
    out = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *outs)
    faults.pause_point("eval", rounds_done)  # test hook (tests/test_faults.py)
    scores = _scores(out, [r.names[i] for i in ids], r.algo.variants)
    mean = {v: float(np.mean(list(s.values()))) for v, s in scores.items()}
    r.log.add({"round": rounds_done, "kind": "eval", "scores": scores, "mean": mean})
    r.tb.scalars(rounds_done, {f"eval/{v}/{c}": x for v, s in scores.items() for c, x in s.items()}
                 | {f"eval/{v}/mean": x for v, x in mean.items()})
    _say(f"  eval after round {rounds_done}{'' if len(ids) == len(r.names) else f' ({len(ids)} clients)'}: "
         + ", ".join(f"{v} {m:.2f}" for v, m in mean.items()))
    return scores

  return evaluate


def _train(r: _Run, stop: int | None = None) -> list[float]:
  """The rounds from `r.start` on (states updated in `r`), with evaluations and checkpoints -> s per round.
  stop: end after that round, leaving the logs and checkpoints open (default: after the last, closing them)."""
  config, placement = r.config, r.placement
  end, stop = stop is None, config.rounds if stop is None else stop
  round_fn = placement.build_round(r.algo, client_parallelism=parallelism(config, placement))
  evaluate = _evaluator(r)
  if r.start == 0 and not r.log.evals():
    evaluate(0)  # the starting point of the learning curve
  seconds = []
  for rnd in r.feeder.rounds(r.start, stop):
    t0 = time.perf_counter()
    rows = placement.put_rows(r.store.gather(placement.hosted(rnd.cohort)), len(rnd.cohort))
    r.server, rows, metrics = round_fn(r.frozen, r.server, rows, rnd.inputs)
    _after_round(r, rnd, rows, metrics, t0, seconds, evaluate)
  if end:
    _end_training(r, evaluate)
  return seconds


def _after_round(r: _Run, rnd: feeder_lib.Round, rows, metrics, t0: float, seconds: list[float], evaluate) -> None:
  """The host work after a round's program (`r.server` already updated): the cohort's new rows into the store,
  the fault report, the divergence check, the logs, and the evaluation and checkpoint when due. `seconds` gets
  the round's time since `t0`."""
  config, names, k = r.config, r.names, len(r.names)
  r.store.scatter(rnd.cohort, jax.device_get(rows))
  done = rnd.index + 1
  faults.pause_point("round", done)  # test hook (tests/test_faults.py)
  metrics = jax.device_get(metrics)
  finite = np.asarray(metrics.get("upload_finite", np.ones(len(rnd.cohort), bool)))  # centralized: no uploads
  report = faults.round_report(names, rnd.cohort, k, rnd.dropped, finite, config.min_clients)
  for name in report["nonfinite"][:10]:
    logging.warning("round %d: client %s uploaded NaN or Inf; excluded from the aggregate", done, name)
    _say(f"round {done}: client {name} uploaded NaN or Inf; excluded from the aggregate")
  if report["skipped"]:
    _say(f"round {done}: skipped, {len(report['reported'])} client(s) reported (min_clients="
         f"{config.min_clients}); the server is unchanged")
  real = (rnd.cohort < k) & ~rnd.dropped
  trained = [(int(i), float(l)) for i, l in zip(rnd.cohort[real], np.asarray(metrics["loss"])[real])]
  faults.check_divergence(done, report, [l for _, l in trained], config)  # before anything is logged or saved
  loss = np.asarray([l for _, l in trained] or [np.nan])
  seconds.append(time.perf_counter() - t0)
  program = rnd.inputs.schedule["slot"] if rnd.inputs.schedule is not None else rnd.inputs.step_mask
  steps = {"real": int(np.sum(metrics["steps"])), "program": int(np.prod(program.shape))}  # client-steps
  drift = _drift(names, rnd.cohort, metrics)
  r.log.add({"round": done, "kind": "train", "clients": [names[i] for i in rnd.cohort[rnd.cohort < k]],
             "loss": {names[i]: l for i, l in trained}, **report, "client_steps": steps, "seconds": seconds[-1],
             **({"drift": drift} if drift else {})})
  r.tb.scalars(done, {f"train/loss/{names[i]}": l for i, l in trained}
               | {f"drift/{m}/{c}": x for c, d in drift.items() for m, x in d.items() if x is not None})
  last = r.log.evals()[-1] if r.log.evals() else None
  first = r.algo.variants[0]
  so_far = f"mean {first} {last['mean'][first]:.2f} (round {last['round']})" if last else ""
  eta = time.strftime("%H:%M:%S", time.gmtime(np.median(seconds) * (config.rounds - done)))
  _say(f"round {done}/{config.rounds}  loss {loss.mean():.4f}  {so_far}  {seconds[-1]:.1f} s/round, "
       f"{steps['real']}/{steps['program']} client-steps real, ETA {eta}")
  if done % config.eval_every == 0 or done == config.rounds:
    evaluate(done, final=done == config.rounds)
  if config.checkpoint_every and (done % config.checkpoint_every == 0 or done == config.rounds):
    r.checkpointer.save(done, {"server": r.server, "store": r.store.state()})


def _end_training(r: _Run, evaluate) -> None:
  """The final evaluation if the log lacks it (e.g. a rerun of a finished workdir); logs and checkpoints closed."""
  if not r.log.evals() or r.log.evals()[-1]["round"] != r.config.rounds:
    evaluate(r.config.rounds, final=True)
  r.checkpointer.close()
  r.tb.close()


def _drift(names, cohort, metrics) -> dict:
  """The round's client drift, {client: {"norm": ||update||, "cosine": to the aggregated update}} for the clients
  that counted (the engine's "update_norm" / "update_cosine"; {} where the algorithm does not measure it)."""
  if "update_norm" not in metrics:
    return {}
  norm, cosine = np.asarray(metrics["update_norm"]), np.asarray(metrics["update_cosine"])
  return {names[i]: {"norm": float(norm[j]), "cosine": float(cosine[j]) if np.isfinite(cosine[j]) else None}
          for j, i in enumerate(cohort) if i < len(names) and np.isfinite(norm[j])}


def _report(r: _Run, seconds: list[float]) -> dict:
  """results.json, summary.csv and the plots in the workdir; the final scores printed -> the results dict.

  A population of more clients than datasets is reported per dataset (the mean over its clients) in
  summary.csv and the plots, and per client in clients.csv.
  """
  config, names = r.config, r.names
  final, evals = r.log.evals()[-1], r.log.evals()
  seconds = seconds or [row["seconds"] for row in r.log.rows if row["kind"] == "train"]  # a rerun of a finished run
  results = {
      "config": json.loads(config.to_json()), "fingerprint": r.fingerprint, "clients": names,
      "train_examples": r.data.num_examples.tolist(), "params": r.counts, "final": final["scores"],
      "final_mean": final["mean"], "history": evals,
      "seconds_per_round_median": float(np.median(seconds)) if seconds else None,
  }
  columns = names
  if len(names) > len(r.data.datasets):
    group_of = {n: r.data.datasets[d].name for n, d in zip(names, r.data.dataset_of)}
    columns = [d.name for d in r.data.datasets]
    evals = [{**e, "scores": reporting.group_scores(e["scores"], group_of)} for e in evals]
    final = evals[-1]
    results["final_by_dataset"] = final["scores"]
    reporting.write_atomic(os.path.join(r.workdir, "clients.csv"),
                           reporting.clients_csv(r.log.evals()[-1]["scores"], names, group_of,
                                                 r.data.num_examples))
  if r.dp_report is not None:
    results["privacy"] = r.dp_report
  reporting.write_atomic(os.path.join(r.workdir, "results.json"), json.dumps(results, indent=2))
  reporting.write_atomic(os.path.join(r.workdir, "summary.csv"), reporting.summary_csv(final["scores"], columns))
  title = f"{config.algorithm} / {config.benchmark}"
  reporting.plot_history(evals, columns, os.path.join(r.workdir, "scores_vs_round.png"), title)
  reporting.plot_final(final["scores"], columns, os.path.join(r.workdir, "final_scores.png"), title)
  if any("drift" in row for row in r.log.rows):  # client drift, per dataset when clients outnumber datasets
    reporting.plot_drift(reporting.drift_curves(r.log.rows, None if columns is names else group_of),
                         os.path.join(r.workdir, "drift.png"), title)
  per = "" if columns is names else f" (mean over each dataset's clients; per client: {r.workdir}/clients.csv)"
  _say(f"final scores (VQA score, test){per}:\n" + reporting.summary_csv(final["scores"], columns))
  return results
