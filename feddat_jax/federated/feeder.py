"""The host side of a round: one object makes every round's `engine.RoundInputs`, each thing done once here.

Per round, the feeder
1. samples the cohort from (seed, round) (`sample_cohort`) and pads it with dummies (id K) to the mesh multiple;
2. draws which cohort clients drop out (`faults.dropped`) and sets the aggregation weights (uniform or example
   counts; 0 for dummies and dropped clients, whose steps are masked);
3. cuts the training arrays of the cohort positions this process feeds (`Placement.hosted`), at the program's
   fixed step count, with the per-client constants kept apart from the per-step arrays;
4. turns them into global arrays on the mesh, in a background thread one round ahead, so that the host work
   and the host-to-device transfer of round r+1 overlap the compute of round r.

Lanes (`lanes` > 0, the engine's "lanes" parallelism): the cohort's clients are also packed into that many
lanes (`engine.lane_schedule`), each running its clients back to back, so that smaller clients cost no masked
steps; the lanes' length is fixed too (`_lane_lengths`): with the whole population in every round, its packing
exactly (one compile); else the smallest of a few lengths that holds the round's packing.

Fixed program shapes. Every round's arrays have the same shapes, so the round compiles once per configuration
whatever the cohort: S is `local_steps` when set; otherwise a client makes ceil(local_epochs * n / B) steps,
at most `max_local_steps`, and S is the smallest of a few step buckets (fixed at start-up from the largest
client of the population) that holds the cohort's largest client. One bucket (the default): one compile, and
smaller clients' steps are masked (padded work). More buckets: less padded work, one compile per bucket used.

>>> feeder = Feeder(data, placement, seed=0, cohort_size=16)
>>> for r in feeder.rounds(0, 10):      # r.cohort [C] ids (>= K: dummies), r.dropped, r.inputs (global arrays)
...   rows = placement.put_rows(store.gather(placement.hosted(r.cohort)), len(r.cohort))
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Iterator

import jax
import numpy as np

from feddat_jax.federated import engine, faults

_EVAL_STREAM = 0xE7  # keeps the evaluation sample apart from the cohort's stream [seed, round]


def sample_cohort(seed: int, round_idx: int, num_clients: int, cohort_size: int) -> np.ndarray:
  """This round's client ids (sorted, distinct), reproducible from (seed, round); all clients in order when
  cohort_size >= num_clients."""
  if cohort_size >= num_clients:
    return np.arange(num_clients, dtype=np.int32)
  rng = np.random.default_rng([seed, round_idx])
  return np.sort(rng.choice(num_clients, size=cohort_size, replace=False)).astype(np.int32)


def step_buckets(max_steps: int, count: int) -> tuple[int, ...]:
  """Up to `count` step counts: max_steps, max_steps / 2, max_steps / 4, ... (rounded up), ascending."""
  return tuple(sorted({-(-max_steps // 2 ** i) for i in range(count)}))


@dataclasses.dataclass
class Round:
  """One round's input: the padded cohort (ids >= K are dummies), who dropped out, and the global arrays."""
  index: int
  cohort: np.ndarray
  dropped: np.ndarray
  inputs: engine.RoundInputs


class Feeder:

  def __init__(self, data, placement, *, seed: int, cohort_size: int = 0, aggregation: str = "uniform",
               dropout: float = 0.0, local_epochs: int = 1, local_steps: int = 0, max_local_steps: int = 0,
               num_step_buckets: int = 1, eval_clients: int = 0, lanes: int = 0):
    self.data, self.placement, self.seed = data, placement, seed
    self.num_clients = data.num_clients
    self.cohort_size = min(cohort_size or self.num_clients, self.num_clients)
    self.size = placement.padded_size(self.cohort_size)  # cohort positions per round, dummies included
    self.aggregation, self.dropout = aggregation, dropout
    self.eval_clients = eval_clients
    self._local = dict(local_epochs=local_epochs, local_steps=local_steps or None,
                       max_steps=max_local_steps or None)
    self.buckets = step_buckets(int(data.local_steps(**self._local).max()), num_step_buckets)
    self.eval_steps = data.eval_steps("test")
    self.lanes = lanes
    if lanes:
      self.lane_lengths = self._lane_lengths(num_step_buckets)

  # ------------------------------------------------------------------------------ training rounds

  def cohort(self, round_idx: int) -> np.ndarray:
    ids = sample_cohort(self.seed, round_idx, self.num_clients, self.cohort_size)
    return np.concatenate([ids, np.full(self.size - len(ids), self.num_clients, np.int32)])

  def num_steps(self, cohort: np.ndarray) -> int:
    """The program's step count for this cohort: the smallest bucket that holds its largest client."""
    real = cohort[cohort < self.num_clients]
    need = int(self.data.local_steps(real, **self._local).max())
    return next(b for b in self.buckets if b >= need)

  def host_round(self, round_idx: int) -> Round:
    """The round's input as this process's numpy rows (what `round` puts on the mesh)."""
    k = self.num_clients
    cohort = self.cohort(round_idx)
    dropped = faults.dropped(self.seed, round_idx, cohort, k, self.dropout)
    weights = np.ones(len(cohort), np.float32) if self.aggregation == "uniform" else \
        self.data.num_examples[np.minimum(cohort, k - 1)].astype(np.float32)
    weights = np.where((cohort < k) & ~dropped, weights, 0.0).astype(np.float32)
    hosted = self.placement.hosted(cohort)
    s = self.num_steps(cohort)
    batches, step_mask = self._cut(hosted, lambda ids: self.data.round_batches(round_idx, ids, num_steps=s,
                                                                                **self._local))
    step_mask &= ~self.placement.hosted(dropped)[:, None]  # dropped clients do not train: state kept
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(self.seed), round_idx))
    schedule = None
    if self.lanes:
      schedule = engine.lane_schedule(step_mask, self.lanes, self.lane_lengths)
    inputs = engine.RoundInputs(hosted, batches, self.data.client_constants(hosted), step_mask,
                                self.placement.hosted(weights), np.asarray(rng), schedule)
    return Round(round_idx, cohort, dropped, inputs)

  def _lane_lengths(self, count: int) -> tuple[int, ...]:
    """The lanes' step counts this configuration compiles, ascending: where every cohort packs alike (the whole
    population in every round, or clients of equal steps), that packing exactly; and halvings of a length any
    cohort fits (`engine.lane_length_bound`), the largest always."""
    c, s, lanes = self.size, self.buckets[-1], self.lanes
    lengths = set(step_buckets(engine.lane_length_bound(c, s, lanes), count))
    exact = engine.exact_lane_length(self.data.local_steps(**self._local), self.cohort_size, lanes)
    if exact is not None:
      lengths.add(exact)
    return tuple(sorted(lengths))

  def round(self, round_idx: int) -> Round:
    """The round's input, on the mesh."""
    r = self.host_round(round_idx)
    return dataclasses.replace(r, inputs=self.placement.put_inputs(r.inputs, len(r.cohort)))

  def rounds(self, start: int, stop: int) -> Iterator[Round]:
    """Rounds start..stop-1, each prepared (cut and put on the mesh) in a background thread one ahead."""
    return prefetch(self.round, range(start, stop))

  def _cut(self, hosted: np.ndarray, cut):
    """cut(real ids) -> (batches, step_mask) for the real clients among `hosted`, as rows of `hosted`
    (dummy rows all zero with no steps: inert)."""
    real = np.flatnonzero(hosted < self.num_clients)
    batches, step_mask = cut([int(c) for c in hosted[real]] or [0])  # a process of dummies only: any shapes
    grow = lambda x: np.zeros((len(hosted),) + x.shape[1:], x.dtype)
    out, mask = {k: grow(v) for k, v in batches.items()}, grow(step_mask)
    for k, v in batches.items():
      out[k][real] = v[:len(real)]
    mask[real] = step_mask[:len(real)]
    return out, mask

  # ------------------------------------------------------------------------------ evaluation

  def eval_ids(self, round_idx: int, final: bool = False) -> np.ndarray:
    """The clients scored after `round_idx` rounds: all (final, or eval_clients 0) or a reproducible sample."""
    if final or not self.eval_clients or self.eval_clients >= self.num_clients:
      return np.arange(self.num_clients, dtype=np.int32)
    rng = np.random.default_rng([self.seed, round_idx, _EVAL_STREAM])
    return np.sort(rng.choice(self.num_clients, self.eval_clients, replace=False)).astype(np.int32)

  def eval_blocks(self, ids: np.ndarray) -> Iterator[tuple[np.ndarray, engine.RoundInputs]]:
    """(block ids [size], inputs on the mesh) for `ids` in blocks of the cohort's size (padded with dummies),
    every client's whole test split at the fixed evaluation step count."""
    def block(lo):
      part = ids[lo:lo + self.size]
      part = np.concatenate([part, np.full(self.size - len(part), self.num_clients, np.int32)])
      hosted = self.placement.hosted(part)
      batches, step_mask = self._cut(hosted, lambda c: self.data.eval_batches("test", c, num_steps=self.eval_steps))
      local = engine.RoundInputs(hosted, batches, self.data.client_constants(hosted), step_mask,
                                 np.zeros(len(hosted), np.float32), np.zeros(2, np.uint32))
      return part, self.placement.put_inputs(local, len(part))
    return prefetch(block, range(0, len(ids), self.size))


def prefetch(make, items) -> Iterator:
  """make(item) for each item, computed one ahead in a background thread (errors re-raised here)."""
  q: queue.Queue = queue.Queue(maxsize=1)
  done = object()

  def work():
    try:
      for item in items:
        q.put(make(item))
      q.put(done)
    except BaseException as e:  # surface worker errors in the consumer
      q.put(e)

  threading.Thread(target=work, daemon=True).start()
  while (item := q.get()) is not done:
    if isinstance(item, BaseException):
      raise item
    yield item
