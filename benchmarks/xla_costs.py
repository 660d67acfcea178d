"""What the benchmarks measure the same way (no flags here, so any benchmark script may import it):
FLOPs from XLA's cost analysis of a compiled program, this machine's f32 matmul peak, and a process's own peak
memory."""
from __future__ import annotations

import time


def flops(compiled) -> float:
  """FLOPs of a compiled program by XLA's cost analysis (a loop body counts once); NaN when it has none."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def step_flops(algo, frozen, server, client, batch) -> float:
  """FLOPs of one client's local step (`algo.step` on one client's state and batch, no clients axis), compiled
  on its own from the arguments' shapes (arrays or jax.ShapeDtypeStruct: nothing runs)."""
  import jax
  carry = jax.eval_shape(algo.begin, frozen, server, client, jax.numpy.int32(1))
  return flops(jax.jit(algo.step).lower(frozen, server, carry, batch, jax.random.key(0)).compile())


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
  """The best of `repeats` f32 n x n matmuls on the default device, in GFLOP/s."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best / 1e9


def peak_rss_bytes() -> int:
  """This process's peak RSS: VmHWM, the high-water mark of its own address space. Not getrusage's ru_maxrss
  where /proc has it: Linux carries ru_maxrss across fork and exec, so a child process started by a benchmark
  would report at least its parent's peak."""
  try:
    with open("/proc/self/status") as f:
      fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM"].split()[0]) * 1024
  except (OSError, KeyError):
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
