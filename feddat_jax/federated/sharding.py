"""The round on a device mesh, over one host or several: clients sharded, the frozen backbone replicated.

Mesh. Two axes, `clients` x `data`. The cohort axis of a round ([C, ...]: batches, step mask, cohort indices,
weights, the gathered client states and carries) is sharded along `clients`, so the vmapped per-client work
(`begin` / scanned `step` / `end`) is split over devices, each running C / n of the clients. The frozen
backbone and the server state are replicated: every device holds one copy, never one per client. The
weighted mean over clients (`algorithm.aggregate`) becomes a cross-device all-reduce inside the same jitted
program: XLA's partitioner inserts it because the reduction runs over a sharded axis (see the test that reads
the HLO). `data` has size 1 today; it is the room left for splitting one client's batch over devices.

Client states. The stacked states [K, ...] (personal adapters, heads, optimiser moments) stay replicated,
with their shape [K, ...] unchanged; only the cohort computation is sharded. Why: the engine gathers the
cohort's states out of [K, ...] with arbitrary indices and scatters them back. With replicated states the
gather is local to each device (it reads its own rows' indices), the scatter costs one all-gather of the
cohort's new states (the same bytes the clients upload), checkpoints keep the [K, ...] shape whatever the
device count (resume on another mesh works), and K need not be padded. The price is K client states per
device: fine for FedDAT's few, small personal adapters; a cross-device setting with many thousands of
clients would shard the states too (K padded to the device count, a gather that becomes an all-to-all).

Cohort padding. A cohort whose size is not a multiple of the `clients` axis is padded with dummy clients
(index K: no state, weight 0, step mask False), which the engine already treats as inert.

Hosts. Under `jax.distributed`, process p feeds the contiguous block of cohort positions that lives on its
devices (devices are ordered by process). It cuts the round's arrays for those clients only (`hosted`), and
the global arrays are assembled with `jax.make_array_from_process_local_data`; arrays every process can compute
alone (cohort, weights, states at init) are built with `jax.make_array_from_callback`. Outputs that the host
reads (metrics, eval sums, server state) are replicated, so every process can read them without a collective.

Example (one host, every device):
  >>> placement = Placement(make_mesh())
  >>> frozen, server, clients = placement.put_states((frozen, server, clients))
  >>> round_fn = placement.build_round(algo)
  >>> cohort = placement.pad_cohort(engine.sample_cohort(seed, r, K, None), K)
  >>> rows = placement.hosted(cohort)          # this process's cohort positions; cut batches for them
  >>> server, clients, metrics = round_fn(frozen, server, clients, cohort, batches, step_mask, weights, rng)
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from feddat_jax.federated import engine

CLIENTS = "clients"  # mesh axis of the cohort: one shard of clients per device row
DATA = "data"  # mesh axis inside a client (reserved: size 1; a client's batch split over devices later)


def initialize(coordinator_address: str = "", num_processes: int = 1, process_id: int = 0,
               auto_detect: bool = False, cpu_collectives: str = "gloo") -> bool:
  """Joins a multi-process job with `jax.distributed.initialize`; True if this process is in one.

  Must run before anything touches a JAX backend. Without `coordinator_address` and `auto_detect` it does
  nothing (a single-process run). `auto_detect`: let JAX read the cluster (TPU pod slices, SLURM, ...).
  `cpu_collectives`: the CPU backend's cross-process collectives ("gloo"), needed for multi-process CPU
  runs such as launch/local_multiprocess.sh; ignored by accelerator backends.
  """
  if jax.distributed.is_initialized():
    return True
  if not (coordinator_address or auto_detect):
    return False
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  if auto_detect and not coordinator_address:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
  return True


def make_mesh(data_parallel: int = 1, devices=None) -> Mesh:
  """A (clients, data) mesh over `devices` (default: every device of every process), ordered by process.

  Ordering by process makes each process's devices a contiguous block of the clients axis, so a process
  feeds a contiguous block of cohort positions; within a row, the `data` axis stays on one host.
  """
  devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
  if len(devices) % data_parallel:
    raise ValueError(f"data_parallel={data_parallel} does not divide the {len(devices)} devices")
  grid = np.array(devices, dtype=object).reshape(len(devices) // data_parallel, data_parallel)
  # Auto axes, on purpose (jax.make_mesh would default to Explicit): the engine is written without sharding
  # annotations (vmap, cohort gather/scatter, the weighted mean), and with Auto the partitioner propagates
  # the argument shardings through it and inserts the collectives itself. Explicit axes would make sharding
  # part of every array's type and require each of those ops to state its output sharding.
  return Mesh(grid, (CLIENTS, DATA), axis_types=(AxisType.Auto, AxisType.Auto))


def _pad_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
  """x zero-padded along `axis` to `size` (padding steps are masked, padding clients are dummies)."""
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return np.pad(x, widths)


class Placement:
  """Where a round's arrays live; `Placement(None)` is today's single-device path, unchanged.

  With a mesh, `build_round` / `build_eval` / `build_chunked` return functions with the engine's signatures
  that take, for the per-client arrays (batches, step mask), only the rows this process hosts
  (`hosted(...)`; all rows on one host), and host or device arrays for everything else.
  """

  def __init__(self, mesh: Optional[Mesh]):
    self.mesh = mesh

  # ------------------------------------------------------------------------------ layout

  @property
  def num_shards(self) -> int:
    """Devices along the clients axis (1 without a mesh)."""
    return 1 if self.mesh is None else self.mesh.shape[CLIENTS]

  @property
  def is_main(self) -> bool:
    """Process 0: the one that logs and writes reports."""
    return jax.process_index() == 0

  @functools.cached_property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @functools.cached_property
  def by_client(self) -> NamedSharding:
    """Leading (cohort) axis split over `clients`; replicated over `data`."""
    return NamedSharding(self.mesh, P(CLIENTS))

  def pad_cohort(self, cohort: np.ndarray, num_clients: int) -> np.ndarray:
    """Cohort indices [C] padded with dummies (index num_clients) to a multiple of the clients axis."""
    cohort = np.asarray(cohort, np.int32)
    size = -(-len(cohort) // self.num_shards) * self.num_shards
    return np.concatenate([cohort, np.full(size - len(cohort), num_clients, np.int32)])

  def hosted_slice(self, size: int) -> slice:
    """The cohort positions [lo, hi) that this process's devices hold, for a cohort of `size`."""
    if self.mesh is None or jax.process_count() == 1:
      return slice(0, size)
    rows = set()
    for idx in self.by_client.addressable_devices_indices_map((size,)).values():
      rows.update(range(*idx[0].indices(size)[:2]))
    lo, hi = min(rows), max(rows) + 1
    if len(rows) != hi - lo:  # make_mesh orders devices by process, so this holds
      raise ValueError("this process's devices do not hold a contiguous block of clients")
    return slice(lo, hi)

  def hosted(self, x):
    """The rows of a cohort-shaped array [C, ...] (or list) that this process feeds."""
    return x[self.hosted_slice(len(x))]

  def hosted_clients(self, cohort: np.ndarray, num_clients: int) -> list[int]:
    """The real clients among this process's cohort positions, whose data it cuts (they come first).

    A process whose positions are all dummies (a cohort smaller than the device count) cuts client 0's data
    as a stand-in for its first dummy: a dummy is inert whatever it trains on (weight 0, its state dropped),
    and the data pipeline needs at least one client.
    """
    return [int(c) for c in self.hosted(np.asarray(cohort)) if c < num_clients] or [0]

  # ------------------------------------------------------------------------------ global arrays

  def _global(self, x, sharding):
    """A host value every process holds in full -> a global array with `sharding`."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  def put_states(self, tree):
    """States (frozen, server, clients, ...), identical on every process -> replicated global arrays."""
    if self.mesh is None:
      return tree
    return jax.tree_util.tree_map(lambda x: self._global(x, self.replicated), tree)

  def _global_steps(self, steps: int) -> int:
    """The round's step count: the largest over processes (each cut its arrays for its own clients)."""
    if jax.process_count() == 1:
      return steps
    return int(np.max(multihost_utils.process_allgather(np.int32(steps))))

  def _rows(self, batches, step_mask, size: int):
    """Process-local rows (batches [c, S, ...], step_mask [c, S]) -> global arrays [size, S_max, ...]."""
    step_mask = np.asarray(step_mask)
    steps = self._global_steps(step_mask.shape[1])
    hosted = self.hosted_slice(size)
    local = hosted.stop - hosted.start

    def put(x, per_step=True):
      x = np.asarray(x)
      x = _pad_axis(_pad_axis(x, 0, local), 1, steps) if per_step else _pad_axis(x, 0, local)
      return jax.make_array_from_process_local_data(self.by_client, x, (size,) + x.shape[1:])

    out = {k: put(v, per_step=(k not in engine.PER_CLIENT)) for k, v in batches.items()}
    return out, put(step_mask)

  def _rng(self, rng):
    return self._global(jax.random.key_data(rng), self.replicated)

  # ------------------------------------------------------------------------------ programs

  def build_round(self, algo, donate: bool = True, client_parallelism: str = "vmap"):
    """engine.build_round on the mesh: round_fn(frozen, server, clients, cohort, batches, step_mask, weights, rng).

    batches / step_mask: this process's rows of the cohort (`hosted`), the cohort padded by `pad_cohort`.
    Returns (server, clients, metrics), all replicated.
    """
    if self.mesh is None:
      return engine.build_round(algo, donate=donate, client_parallelism=client_parallelism)
    self._check_vmap(client_parallelism)
    inner = engine.build_round(algo, donate=False)  # inlined into the program below

    def sharded(frozen, server, clients, cohort, batches, step_mask, weights, raw_rng):
      return inner(frozen, server, clients, cohort, batches, step_mask, weights, jax.random.wrap_key_data(raw_rng))

    rep, cl = self.replicated, self.by_client
    jitted = jax.jit(sharded, in_shardings=(rep, rep, rep, cl, cl, cl, cl, rep), out_shardings=rep,
                     donate_argnums=(1, 2) if donate else ())

    def round_fn(frozen, server, clients, cohort, batches, step_mask, weights, rng):
      size = len(cohort)
      batches, step_mask = self._rows(batches, step_mask, size)
      return jitted(frozen, server, clients, self._global(cohort, cl), batches, step_mask,
                    self._global(np.asarray(weights, np.float32), cl), self._rng(rng))

    round_fn.jitted = jitted  # for lowering / HLO inspection
    round_fn.global_args = lambda *args: self._round_args(*args)
    return round_fn

  @staticmethod
  def _check_vmap(client_parallelism):
    if client_parallelism != "vmap":
      raise ValueError(f"client_parallelism={client_parallelism!r} runs the clients one after the other on one "
                       "device; with clients sharded over a mesh use 'vmap'")

  def _round_args(self, frozen, server, clients, cohort, batches, step_mask, weights, rng):
    """The global arguments round_fn passes to its jitted program (for `jitted.lower(*args)`)."""
    batches, step_mask = self._rows(batches, step_mask, len(cohort))
    cl = self.by_client
    return (frozen, server, clients, self._global(cohort, cl), batches, step_mask,
            self._global(np.asarray(weights, np.float32), cl), self._rng(rng))

  def build_eval(self, algo):
    """engine.build_eval on the mesh: eval_fn(frozen, server, clients, cohort, batches, step_mask).

    Per-client outputs ({variant: (sums [C], counts [C])}) are replicated; rows past the real clients are
    the padding dummies (zero counts).
    """
    if self.mesh is None:
      return engine.build_eval(algo)
    rep, cl = self.replicated, self.by_client
    jitted = jax.jit(engine.build_eval(algo), in_shardings=(rep, rep, rep, cl, cl, cl), out_shardings=rep)

    def eval_fn(frozen, server, clients, cohort, batches, step_mask):
      batches, step_mask = self._rows(batches, step_mask, len(cohort))
      return jitted(frozen, server, clients, self._global(cohort, cl), batches, step_mask)

    return eval_fn

  def build_chunked(self, algo, client_parallelism: str = "vmap"):
    """engine.ChunkedRound on the mesh (one host): carries sharded over clients, the rest as build_round."""
    chunked = engine.ChunkedRound(algo, client_parallelism)
    if self.mesh is None:
      return chunked
    self._check_vmap(client_parallelism)
    if jax.process_count() > 1:
      raise NotImplementedError("chunked rounds (chunk_steps > 0) run on one process; use chunk_steps=0")
    rep, cl = self.replicated, self.by_client
    out = engine.ChunkedRound.__new__(engine.ChunkedRound)
    begin = jax.jit(chunked.begin, in_shardings=(rep, rep, rep, cl, cl), out_shardings=cl)
    chunk = jax.jit(lambda f, s, c, b, m, raw, co: chunked.chunk(f, s, c, b, m, jax.random.wrap_key_data(raw), co),
                    in_shardings=(rep, rep, cl, cl, cl, rep, cl), out_shardings=(cl, rep), donate_argnums=(2,))
    end = jax.jit(chunked.end, in_shardings=(rep, rep, rep, cl, cl, cl, cl), out_shardings=rep,
                  donate_argnums=(1, 2, 4))
    put = lambda x: self._global(x, cl)
    out.begin = lambda f, s, c, cohort, m: begin(f, s, c, put(cohort), put(m))
    out.chunk = lambda f, s, carries, b, m, rng, cohort: chunk(
        f, s, carries, jax.tree_util.tree_map(put, b), put(m), self._rng(rng), put(cohort))
    out.end = lambda f, s, c, cohort, carries, active, w: end(f, s, c, put(cohort), carries, put(active),
                                                             put(np.asarray(w, np.float32)))
    return out


def from_config(config) -> Placement:
  """The placement a run's `config.distributed` group asks for (joins the multi-process job first).

  One process with one device, or shard_clients off: Placement(None), the single-device path unchanged.
  """
  initialize(config.coordinator_address, config.num_processes, config.process_id, config.auto_detect,
             config.cpu_collectives)
  if config.data_parallel != 1:
    raise ValueError(f"distributed.data_parallel={config.data_parallel}: the data axis is reserved, use 1")
  if not config.shard_clients or jax.device_count() == 1:
    if jax.process_count() > 1:
      raise ValueError("distributed.shard_clients=False cannot run several processes")
    return Placement(None)
  return Placement(make_mesh(config.data_parallel))
