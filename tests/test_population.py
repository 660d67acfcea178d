"""Populations: partitioners, the host client-state store, the feeder's fixed shapes (one trace over rounds whose
cohorts differ in data size), and a run over a Dirichlet population with its per-dataset reports."""
import csv
import json
import os

import chex
import helpers
import jax
import numpy as np
import pytest

from feddat_jax import config_utils, experiment
from feddat_jax.data import partition, pipeline, synthetic, tokenizer
from feddat_jax.federated import algorithms as registry
from feddat_jax.federated import engine, feeder, sharding, store as store_lib
from feddat_jax.models import peft, vilt, vlm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _labels(seed, sizes=(600, 300), num_labels=8):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, num_labels, n) for n in sizes]


# ------------------------------------------------------------------------------------------------ partitioners


@pytest.mark.parametrize("spec", ["natural", "iid:7", "dirichlet:7:0.3"])
def test_partition_covers_every_example_once(spec):
  train, test = _labels(0), _labels(1, sizes=(120, 60))
  parts = partition.partition(spec, train, test, seed=3)
  n = partition.parse(spec)[1]
  assert len(parts) == 2 * n and [p.dataset for p in parts] == [0] * n + [1] * n
  for d in range(2):
    mine = [p for p in parts if p.dataset == d]
    for split, labels in (("train", train), ("test", test)):
      idx = np.concatenate([getattr(p, split) for p in mine])
      np.testing.assert_array_equal(np.sort(idx), np.arange(len(labels[d])))  # sizes add up, no repeats
      assert all(len(getattr(p, split)) >= 1 for p in mine)
  again = partition.partition(spec, train, test, seed=3)
  assert all(np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test) for a, b in zip(parts, again))
  if spec != "natural":
    other = partition.partition(spec, train, test, seed=4)
    assert any(not np.array_equal(a.train, b.train) for a, b in zip(parts, other))


def test_dirichlet_skew_grows_as_alpha_falls():
  train, test = _labels(0, sizes=(4000, 3000)), _labels(1, sizes=(800, 600))
  skew = {a: partition.label_skew(partition.partition(f"dirichlet:20:{a}", train, test, seed=0), train)
          for a in (0.05, 0.5, 5.0, 500.0)}
  iid = partition.label_skew(partition.partition("iid:20", train, test, seed=0), train)
  assert skew[0.05] > skew[0.5] > skew[5.0] > skew[500.0], skew
  assert skew[0.05] > 0.6 and skew[500.0] < 0.15 and iid < 0.15, (skew, iid)
  sizes = [len(p.train) for p in partition.partition("dirichlet:20:0.05", train, test, seed=0)]
  assert min(sizes) >= partition.MIN_SIZE and max(sizes) > 5 * np.median(sizes)  # unequal clients


def test_dirichlet_test_split_follows_the_training_mix():
  train, test = _labels(0, sizes=(6000,)), _labels(1, sizes=(3000,))
  parts = partition.partition("dirichlet:10:0.2", train, test, seed=0)
  for p in parts:
    mine = np.bincount(train[0][p.train], minlength=8) / len(p.train)
    seen = np.bincount(test[0][p.test], minlength=8) / len(p.test)
    assert 0.5 * np.abs(mine - seen).sum() < 0.25


@pytest.mark.parametrize("spec, words", [("dirichlet:5", "natural, iid:N or dirichlet:N:ALPHA"),
                                         ("dirichlet:5:0", "ALPHA must be"), ("iid:0", "N must be"),
                                         ("iid:700", "too few for 700 clients")])
def test_bad_population_specs(spec, words):
  with pytest.raises(partition.PartitionError, match=words):
    partition.partition(spec, _labels(0, sizes=(600,)), _labels(1, sizes=(300,)), seed=0)


# ------------------------------------------------------------------------------------------------ the store


def test_store_holds_only_clients_that_trained():
  initial = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": {"c": np.zeros((), np.int32)}}
  store = store_lib.ClientStore(initial, num_clients=10_000)
  rows = store.gather([5, 9_999, 10_000])  # 10_000: a dummy
  assert rows["a"].shape == (3, 2, 3) and len(store) == 0
  assert store.nbytes() == store.row_bytes()
  new = {"a": rows["a"] + np.array([1.0, 2.0, 3.0], np.float32)[:, None, None], "b": {"c": np.array([1, 2, 3],
                                                                                                     np.int32)}}
  store.scatter([5, 9_999, 10_000], new)
  assert len(store) == 2 and store.nbytes() == 3 * store.row_bytes()
  got = store.gather([9_999, 0, 5])
  np.testing.assert_array_equal(got["a"][0], initial["a"] + 2)
  np.testing.assert_array_equal(got["a"][1], initial["a"])
  np.testing.assert_array_equal(got["b"]["c"], [2, 0, 1])
  state = store.state()
  np.testing.assert_array_equal(state["ids"], [5, 9_999])
  fresh = store_lib.ClientStore(initial, num_clients=10_000)
  assert jax.tree_util.tree_structure(fresh.like(2)) == jax.tree_util.tree_structure(state)
  fresh.load(state)
  assert helpers.leaves_equal(fresh.gather([9_999, 0, 5]), got)


# ------------------------------------------------------------------------------------------------ the feeder


def test_step_buckets():
  assert feeder.step_buckets(10, 1) == (10,)
  assert feeder.step_buckets(10, 3) == (3, 5, 10)
  assert feeder.step_buckets(2, 4) == (1, 2)


@pytest.fixture(scope="module")
def population():
  """The synthetic Function benchmark (tiny scale) split into 5 x 6 Dirichlet clients, with a model for it."""
  tok = tokenizer.SyntheticTokenizer()
  datasets = synthetic.make_benchmark("function", scale=0.06, image_size=16)
  data = pipeline.FederatedData(datasets, tok, image_hw=(32, 32), text_len=12, batch_size=4, num_answers=32,
                                seed=0, population="dirichlet:6:0.3")
  cfg = vilt.ViltConfig.preset("tiny", vocab_size=tok.vocab_size, image_size=32, num_layers=1, hidden_size=32,
                               mlp_dim=64, max_position_embeddings=12)
  model = vlm.VisionLanguageModel(cfg, peft.PeftConfig("adapter", reduction_factor=4), 32)
  algo = registry.make("fedavg_adapter", model, helpers.OPTIM, total_rounds=4)
  return data, algo


def test_feeder_round_compiles_once_over_unequal_cohorts(population):
  """Four rounds of a cohort of 4 from 30 unequal clients (their real steps differ round to round): one trace;
  only the cohort's clients get a row in the store; the untouched clients keep the initial state."""
  data, algo = population
  assert data.num_clients == 30 and data.names[7] == "knowledge/1"
  placement = sharding.Placement()
  feed = feeder.Feeder(data, placement, seed=0, cohort_size=4, local_epochs=1)
  frozen, server, store = experiment.init_states(algo, 0, None, data.num_clients)
  frozen, server = placement.put_replicated((frozen, server))
  with helpers.fast_compile():
    round_fn = placement.jit(chex.assert_max_traces(engine.round_fn_for(algo), n=1))
    real_steps, trained = set(), set()
    for rnd in feed.rounds(0, 4):
      assert rnd.inputs.step_mask.shape == (4, feed.buckets[-1])
      real_steps.add(tuple(np.asarray(rnd.inputs.step_mask).sum(1)))
      rows = placement.put_rows(store.gather(rnd.cohort), len(rnd.cohort))
      server, rows, metrics = round_fn(frozen, server, rows, rnd.inputs)
      store.scatter(rnd.cohort, jax.device_get(rows))
      trained |= set(rnd.cohort.tolist())
      np.testing.assert_array_equal(metrics["steps"], data.local_steps(rnd.cohort))
  assert len(real_steps) == 4  # the cohorts differ in data size
  assert round_fn._cache_size() == 1
  assert len(store) == len(trained) < data.num_clients
  untouched = next(i for i in range(data.num_clients) if i not in trained)
  assert helpers.leaves_equal(store.gather([untouched]), store.gather([data.num_clients]))  # initial state


def test_feeder_eval_blocks_cover_every_client_once(population):
  data, _ = population
  feed = feeder.Feeder(data, sharding.Placement(), seed=0, cohort_size=8, eval_clients=5)
  ids = feed.eval_ids(5)
  assert len(ids) == 5 and np.array_equal(ids, feed.eval_ids(5)) and not np.array_equal(ids, feed.eval_ids(10))
  every = feed.eval_ids(10, final=True)
  seen = []
  for block, inputs in feed.eval_blocks(every):
    assert len(block) == 8 and inputs.step_mask.shape == (8, feed.eval_steps)
    real = block < data.num_clients
    seen += block[real].tolist()
    counts = np.asarray(inputs.batches["example_mask"]).sum((1, 2))
    np.testing.assert_array_equal(counts[real], data.num_test[block[real]])
    assert not np.asarray(inputs.step_mask)[~real].any()
  assert seen == list(range(data.num_clients))


def test_cohort_larger_than_population_is_an_error(tmp_path):
  config = config_utils.load_config(os.path.join(REPO, "configs/vqa.py:runlocal=true,backbone=random"))
  config.cohort_size = 6
  with pytest.raises(experiment.ConfigError, match="cohort_size=6 exceeds the 5 clients"):
    experiment.run(config, str(tmp_path))


# ------------------------------------------------------------------------------------------------ a run


def test_dirichlet_population_run_reports_by_dataset(tmp_path):
  config = config_utils.load_config(
      os.path.join(REPO, "configs/vqa.py:runlocal=true,backbone=random,population=dirichlet:3:0.5"))
  config.cohort_size = 4
  config.eval_clients = 6
  results = experiment.run(config, str(tmp_path))
  assert len(results["clients"]) == 15 and results["clients"][:2] == ["attribute/0", "attribute/1"]
  evals = results["history"]
  assert len(evals[0]["scores"]["dat"]) == 6 and len(evals[-1]["scores"]["dat"]) == 15  # sampled, then all
  assert list(results["final_by_dataset"]["dat"]) == list(synthetic.client_names("function"))
  with open(tmp_path / "summary.csv") as f:
    header = next(csv.reader(f))
  assert header == ["variant"] + list(synthetic.client_names("function")) + ["mean"]
  with open(tmp_path / "clients.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 15 and rows[4]["dataset"] == "knowledge"
  with open(tmp_path / "metrics.jsonl") as f:
    train = [r for r in map(json.loads, f) if r["kind"] == "train"]
  assert all(len(r["clients"]) == 4 for r in train)
