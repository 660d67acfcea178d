"""The round on a device mesh, over one host or several: clients sharded, the frozen backbone replicated.

There is always a mesh (one device is a 1-device mesh), so a laptop, 8 devices and a pod run one code path.

Mesh. Two axes, `clients` x `data`. Every [C, ...] array of a round (the cohort's client rows and every leaf
of `engine.RoundInputs` but the RNG) is sharded along `clients`, so the per-client work is split over devices,
each running C / n of the clients. The frozen backbone and the server state are replicated: every device
holds one copy, never one per client. The weighted mean over clients (`algorithm.aggregate`) becomes a
cross-device all-reduce inside the same jitted program (XLA's partitioner inserts it because the reduction
runs over a sharded axis; a test reads the HLO). `data` has size 1 today: the room left for splitting one
client's batch over devices.

Client states never live on the devices between rounds: the host store (feddat_jax/federated/store.py)
gathers the cohort's rows, which enter the round sharded and come back replicated (one all-gather of the
cohort's new states, the same bytes the clients upload), so device memory depends on C, not on K.

Hosts. Under `jax.distributed`, process p feeds the contiguous block of cohort positions that lives on its
devices (devices are ordered by process): it cuts the round's arrays for those clients only (`hosted`), and
the global arrays are assembled with `jax.make_array_from_process_local_data`. Outputs the host reads
(metrics, eval sums, server state, new rows) are replicated, so every process can read them.

Example (one host, every device):
  >>> placement = Placement(make_mesh())
  >>> frozen, server = placement.put_replicated((frozen, server))
  >>> round_fn = placement.build_round(algo)
  >>> rows, inputs = placement.put_rows(store.gather(placement.hosted(cohort)), len(cohort)), placement.put_inputs(local, len(cohort))
  >>> server, rows, metrics = round_fn(frozen, server, rows, inputs)
"""
from __future__ import annotations

import functools

import jax
import numpy as np
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
  # annotations, and with Auto the partitioner propagates the argument shardings through it and inserts the
  # collectives itself. Explicit axes would make sharding part of every array's type.
  return Mesh(grid, (CLIENTS, DATA), axis_types=(AxisType.Auto, AxisType.Auto))


class Placement:
  """Where a round's arrays live, on a mesh (`Placement()`: a 1-device mesh on the default device)."""

  def __init__(self, mesh: Mesh | None = None):
    self.mesh = mesh if mesh is not None else make_mesh(devices=jax.devices()[:1])

  # ------------------------------------------------------------------------------ layout

  @property
  def num_shards(self) -> int:
    """Devices along the clients axis."""
    return self.mesh.shape[CLIENTS]

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

  @functools.cached_property
  def seeds_by_client(self) -> NamedSharding:
    """[N seeds, C, ...]: the seeds axis whole on every device, the cohort axis split over `clients` as in one
    run (seeds run as one program, `build_seeds_round`)."""
    return NamedSharding(self.mesh, P(None, CLIENTS))

  def padded_size(self, size: int) -> int:
    """`size` rounded up to a multiple of the clients axis (the cohort is padded with dummies to it)."""
    return -(-size // self.num_shards) * self.num_shards

  def hosted_slice(self, size: int) -> slice:
    """The cohort positions [lo, hi) that this process's devices hold, for a cohort of `size`."""
    if jax.process_count() == 1:
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

  # ------------------------------------------------------------------------------ global arrays

  def put_replicated(self, tree):
    """Host values every process holds in full (frozen backbone, server state) -> replicated global arrays."""
    def put(x):
      if isinstance(x, jax.Array) and x.sharding == self.replicated:
        return x
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, self.replicated, lambda idx: x[idx])
    return jax.tree_util.tree_map(put, tree)

  def put_rows(self, tree, size: int):
    """This process's rows [c, ...] of a cohort-shaped tree -> global arrays [size, ...] sharded by client."""
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(self.by_client, np.asarray(x), (size,) + np.shape(x)[1:]),
        tree)

  def put_inputs(self, inputs: engine.RoundInputs, size: int) -> engine.RoundInputs:
    """A RoundInputs of this process's rows (numpy) -> global arrays, the RNG and lane schedule replicated."""
    shared = self.put_replicated((np.asarray(inputs.rng), inputs.schedule))
    return self.put_rows(inputs.replace(rng=None, schedule=None), size).replace(rng=shared[0], schedule=shared[1])

  def put_seed_rows(self, tree, size: int):
    """This process's rows [N, c, ...] of N seeds' cohort-shaped trees -> global arrays [N, size, ...]."""
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(self.seeds_by_client, np.asarray(x),
                                                         np.shape(x)[:1] + (size,) + np.shape(x)[2:]), tree)

  def put_seed_inputs(self, inputs: engine.RoundInputs, size: int) -> engine.RoundInputs:
    """N seeds' RoundInputs stacked on a leading axis (numpy) -> global arrays; RNGs and lane schedules
    replicated."""
    shared = self.put_replicated((np.asarray(inputs.rng), inputs.schedule))
    return self.put_seed_rows(inputs.replace(rng=None, schedule=None), size).replace(rng=shared[0],
                                                                                     schedule=shared[1])

  # ------------------------------------------------------------------------------ programs

  def jit(self, fn, donate=()):
    """fn(frozen, server, rows, inputs) jitted on the mesh: states replicated, rows and inputs by client."""
    rep, cl = self.replicated, self.by_client
    return jax.jit(fn, in_shardings=(rep, rep, cl, engine.RoundInputs.shardings(cl, rep)), out_shardings=rep,
                   donate_argnums=donate)

  def build_round(self, algo, donate: bool = True, client_parallelism: str = "vmap"):
    """round_fn(frozen, server, rows, inputs) -> (server, rows, metrics) on the mesh, all outputs replicated.

    rows / inputs: global arrays from `put_rows` / `put_inputs`. `client_parallelism="scan"` (clients one
    after the other) needs a 1-device clients axis.
    """
    if client_parallelism != "vmap" and self.num_shards > 1:
      raise ValueError(f"client_parallelism={client_parallelism!r} runs the clients one after the other on one "
                       "device; with clients sharded over several devices use 'vmap'")
    return self.jit(engine.round_fn_for(algo, client_parallelism), donate=(1,) if donate else ())

  def build_seeds_round(self, algo, client_parallelism: str = "vmap", stacked_frozen: bool = False,
                        donate: bool = True):
    """N seeds' rounds as one program: `build_round`'s round vmapped over a leading seeds axis of the server,
    the rows and the inputs (from `put_seed_rows` / `put_seed_inputs`); the frozen backbone is shared by every
    seed (in_axes None), or stacked too with `stacked_frozen`. -> round_fn(frozen, servers, rows, inputs) ->
    (servers, rows, metrics), each output with the seeds axis first, replicated."""
    if client_parallelism != "vmap" and self.num_shards > 1:
      raise ValueError(f"client_parallelism={client_parallelism!r} runs the clients one after the other on one "
                       "device; with clients sharded over several devices use 'vmap'")
    fn = jax.vmap(engine.round_fn_for(algo, client_parallelism), in_axes=(0 if stacked_frozen else None, 0, 0, 0))
    rep, cl = self.replicated, self.seeds_by_client
    return jax.jit(fn, in_shardings=(rep, rep, cl, engine.RoundInputs.shardings(cl, rep)), out_shardings=rep,
                   donate_argnums=(1,) if donate else ())

  def build_eval(self, algo):
    """eval_fn(frozen, server, rows, inputs) -> {variant: (sums [C], counts [C])}, replicated."""
    return self.jit(engine.eval_fn_for(algo))


def from_config(config) -> Placement:
  """The placement a run's `config.distributed` group asks for (joins the multi-process job first).

  shard_clients off: a 1-device mesh on the first device (one process only).
  """
  initialize(config.coordinator_address, config.num_processes, config.process_id, config.auto_detect,
             config.cpu_collectives)
  if config.data_parallel != 1:
    raise ValueError(f"distributed.data_parallel={config.data_parallel}: the data axis is reserved, use 1")
  if not config.shard_clients:
    if jax.process_count() > 1:
      raise ValueError("distributed.shard_clients=False cannot run several processes")
    return Placement(make_mesh(devices=jax.devices()[:1]))
  return Placement(make_mesh(config.data_parallel))
