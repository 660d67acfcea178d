"""Populations: a benchmark's datasets split into clients.

`config.population` names the partitioner:
- `natural`: one client per dataset (the paper's setting; client name = dataset name);
- `iid:N`: each dataset's examples shuffled and split into N clients of (nearly) equal size;
- `dirichlet:N:ALPHA`: label skew. Each dataset's examples are spread over N clients: every client first gets
  `min_size` examples drawn uniformly, then for each answer label the remaining examples of that label are
  divided in proportions drawn from Dirichlet(ALPHA, ..., ALPHA) over the N clients. Small ALPHA: each client
  sees few labels, in very unequal amounts; large ALPHA: close to iid.

A client's test examples follow its training distribution: each label's test examples are divided in
proportion to the clients' training counts of that label (every client gets at least one test example).
Clients keep their dataset's answer space and score rule; names are `dataset/j`. Everything is a function of
the seed, so a resumed run rebuilds the same population.

>>> parts = partition("dirichlet:20:0.5", train_labels, test_labels, seed=0)  # one label array per dataset
>>> parts[0]                                     # Part(dataset=0, index=0, train=array([...]), test=array([...]))
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

MIN_SIZE = 2  # training examples every dirichlet client gets before the label-skewed share
_STREAM = 0x9A  # keeps the partition's random stream apart from the run's other streams of the same seed


class PartitionError(ValueError):
  """A population spec that cannot be used; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Part:
  """One client: which dataset, its number within it, and its example indices into the dataset's splits."""
  dataset: int
  index: int
  train: np.ndarray
  test: np.ndarray


def parse(spec: str) -> tuple[str, int, float]:
  """'natural' | 'iid:N' | 'dirichlet:N:ALPHA' -> (kind, N, ALPHA); a PartitionError names what is wrong."""
  if spec == "natural":
    return "natural", 1, 0.0
  m = re.fullmatch(r"iid:(\d+)", spec) or re.fullmatch(r"dirichlet:(\d+):([0-9.eE+-]+)", spec)
  if not m:
    raise PartitionError(f"population={spec!r}: use natural, iid:N or dirichlet:N:ALPHA (e.g. dirichlet:20:0.5)")
  n = int(m.group(1))
  alpha = float(m.group(2)) if spec.startswith("dirichlet") else 0.0
  if n < 1:
    raise PartitionError(f"population={spec!r}: N must be >= 1 clients per dataset")
  if spec.startswith("dirichlet") and not (np.isfinite(alpha) and alpha > 0):
    raise PartitionError(f"population={spec!r}: ALPHA must be a finite number > 0 (small: strong label skew)")
  return spec.split(":")[0], n, alpha


def client_name(dataset_name: str, part: Part, spec: str) -> str:
  return dataset_name if parse(spec)[0] == "natural" else f"{dataset_name}/{part.index}"


def partition(spec: str, train_labels: Sequence[np.ndarray], test_labels: Sequence[np.ndarray], seed: int,
              min_size: int = MIN_SIZE) -> list[Part]:
  """Split every dataset (its train and test label arrays, int [n]) into clients as `spec` says."""
  kind, n, alpha = parse(spec)
  parts = []
  for d, (train, test) in enumerate(zip(train_labels, test_labels)):
    train, test = np.asarray(train), np.asarray(test)
    if kind == "natural":
      parts.append(Part(d, 0, np.arange(len(train)), np.arange(len(test))))
      continue
    if len(train) < n * (min_size if kind == "dirichlet" else 1) or len(test) < n:
      raise PartitionError(f"population={spec!r}: dataset {d} has {len(train)} train / {len(test)} test examples, "
                           f"too few for {n} clients; use fewer clients per dataset")
    rng = np.random.default_rng([seed, d, _STREAM])
    if kind == "iid":
      trains = np.array_split(rng.permutation(len(train)), n)
      tests = np.array_split(rng.permutation(len(test)), n)
    else:
      trains = _dirichlet(train, n, alpha, min_size, rng)
      tests = _follow(test, train, trains, rng)
    parts += [Part(d, j, np.sort(a), np.sort(b)) for j, (a, b) in enumerate(zip(trains, tests))]
  return parts


def _dirichlet(labels: np.ndarray, n: int, alpha: float, min_size: int, rng) -> list[np.ndarray]:
  order = rng.permutation(len(labels))
  base, rest = order[:n * min_size], order[n * min_size:]
  owner = {i: [base[i * min_size:(i + 1) * min_size]] for i in range(n)}
  for label in np.unique(labels[rest]):
    idx = rest[labels[rest] == label]
    counts = rng.multinomial(len(idx), rng.dirichlet(np.full(n, alpha)))
    for i, chunk in enumerate(np.split(idx, np.cumsum(counts)[:-1])):
      owner[i].append(chunk)
  return [np.concatenate(owner[i]) for i in range(n)]


def _follow(test: np.ndarray, train: np.ndarray, trains: list[np.ndarray], rng) -> list[np.ndarray]:
  """Test indices per client, following each client's training label mix; at least one each."""
  n = len(trains)
  order = rng.permutation(len(test))
  owner = {i: [order[i:i + 1]] for i in range(n)}
  rest = order[n:]
  for label in np.unique(test[rest]):
    idx = rest[test[rest] == label]
    share = np.array([np.sum(train[t] == label) for t in trains], float) + 1e-9  # unseen label: even spread
    counts = rng.multinomial(len(idx), share / share.sum())
    for i, chunk in enumerate(np.split(idx, np.cumsum(counts)[:-1])):
      owner[i].append(chunk)
  return [np.concatenate(owner[i]) for i in range(n)]


def label_skew(parts: Sequence[Part], train_labels: Sequence[np.ndarray]) -> float:
  """Mean total-variation distance between a client's training label mix and its dataset's (0: iid, -> 1)."""
  out = []
  for p in parts:
    labels = np.asarray(train_labels[p.dataset])
    k = labels.max() + 1
    whole = np.bincount(labels, minlength=k) / len(labels)
    mine = np.bincount(labels[p.train], minlength=k) / max(len(p.train), 1)
    out.append(0.5 * np.abs(whole - mine).sum())
  return float(np.mean(out))
