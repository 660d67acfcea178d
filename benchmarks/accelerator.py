"""Accelerator figures for the federated round: a sweep over algorithm x compute dtype x lanes x clients.

  bash benchmarks/accelerator.sh                        # the usual entry point (writes the JSON file too)
  python benchmarks/accelerator.py --size=base --clients=5,16,64 --lanes=1,C --json_out=results.jsonl
  python benchmarks/accelerator.py --cpu-smoke          # tiny size on CPU: checks that the sweep works

Runs the round of `engine.build_round` (one jitted XLA program: every client's local steps and the
aggregation) on whatever device JAX sees, with random inputs and a random (not pretrained) backbone: speed
does not depend on the weights. Shapes are round_throughput.py's: C clients, S local steps, B examples per
step, A answers, L text tokens.

Lanes: how many of a round's C clients run at once inside the program. Today the engine has two settings,
`client_parallelism="scan"` (clients one after the other: 1 lane) and "vmap" (all C batched: C lanes); the
mapping from a lane count to the engine's argument lives in `_round_fn` alone, and other lane counts are
refused there. `--lanes` takes integers and the letter C (the configuration's client count).

One line per configuration: algorithm, dtype, lanes, C, round_s (median of the timed rounds after one
warm-up round), examples_per_s (C x S x B / round_s), flops_per_round, mfu, peak device memory, compile_s.
- flops_per_round: XLA's cost analysis of the compiled C-lane (vmap) round, plus S - 1 local steps from the
  cost of one client's step compiled on its own, times C (the cost analysis counts a loop body once; the
  1-lane round does the same arithmetic, so it is credited with the C-lane round's FLOPs). C x one client's
  step is within 0.3% of the vmapped step's count (FedDAT, tiny, C = 2). If the FLOPs cannot be counted (the
  C-lane round does not compile), flops_per_round and mfu are NaN and the timings still stand.
- mfu: flops_per_round / round_s over the device's peak for the compute dtype: --peak_tflops, else a table of
  dense peaks by device kind (PEAKS below), else (any other device, the CPU included) the best of 10 f32
  2048^3 matmuls measured in this process, used for both dtypes. The header line says which.
- peak device memory: `memory_stats()["peak_bytes_in_use"]` of the device when it has one (GPU, TPU). That
  counter is the process's peak so far and never goes back down, so configurations run from the smallest
  expected memory to the largest (C, then lanes, then dtype width ascending), and a configuration whose run did
  not raise it is marked `<=` (an upper bound). Without memory stats (the CPU): the compiled round's
  `memory_analysis()` argument + temp bytes, marked `xla`. The JSON record has both where available.
A configuration that fails (out of memory, a refused lane count) prints one FAILED line and the sweep goes on.

--json_out: one JSON object per configuration per line (JSON Lines), written as each configuration ends.
--cpu-smoke: CPU, tiny size cut to one transformer layer, C = 2, S = 2, B = 2, A = 10, L = 8, one timed
round, both dtypes, both lane settings, both algorithms (8 configurations), XLA optimisations mostly off
(`jax_disable_most_optimizations`). Tracing and compiling the 8 round programs is nearly all of its time.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import random_inputs  # noqa: E402
import xla_costs  # noqa: E402

FLAGS = flags.FLAGS

# Dense peak TFLOP/s by device kind: (lower-case substring of jax's device_kind, bfloat16, float32, note).
# The first match wins, so the more specific names come first.
_GPU_F32 = ("float32: the non-tensor-core FP32 peak; XLA may run float32 dots as TF32 on tensor cores, "
            "so float32 MFU can read high")
_TPU_F32 = "float32: the bfloat16 peak (at default precision the TPU runs float32 dots as bfloat16 passes)"
PEAKS = (
    ("h100 pcie", 756.0, 51.0, "H100 PCIe dense; " + _GPU_F32),
    ("h100", 989.0, 67.0, "H100 SXM dense; " + _GPU_F32),
    ("h200", 989.0, 67.0, "H200 SXM dense (as H100 SXM); " + _GPU_F32),
    ("a100", 312.0, 19.5, "A100 dense; " + _GPU_F32),
    ("v5 lite", 197.0, 197.0, "TPU v5e; " + _TPU_F32),
    ("v5e", 197.0, 197.0, "TPU v5e; " + _TPU_F32),
    ("v6 lite", 918.0, 918.0, "TPU v6e; " + _TPU_F32),
    ("v6e", 918.0, 918.0, "TPU v6e; " + _TPU_F32),
    ("v5p", 459.0, 459.0, "TPU v5p; " + _TPU_F32),
    ("tpu v5", 459.0, 459.0, "TPU v5p; " + _TPU_F32),
    ("tpu v4", 275.0, 275.0, "TPU v4; " + _TPU_F32),
)

# The smoke's model is the tiny preset cut to one transformer layer: tracing the 8 round programs is most of
# its time (their compiles too, where the persistent compilation cache does not hold them yet).
SMOKE = dict(size="tiny", layers=1, clients=["2"], steps=2, batch=2, answers=10, text_len=8, rounds=1)


def _round_fn(algo, lanes: int, clients: int):
  """The round program for `lanes` lanes of `clients` clients: the one place that maps lanes to the engine.

  Today: 1 lane is client_parallelism="scan", C lanes "vmap"; any other count is refused.
  """
  from feddat_jax.federated import engine
  if lanes == 1:
    parallelism = "scan"
  elif lanes == clients:
    parallelism = "vmap"
  else:
    raise ValueError(f"lanes={lanes} with C={clients}: the engine runs 1 lane (client_parallelism='scan') or "
                     f"C lanes ('vmap'), nothing in between yet")
  return engine.build_round(algo, donate=True, client_parallelism=parallelism)


def _algorithm(algorithm: str, size: str, dtype: str, answers: int, text_len: int, layers: int = 0):
  from feddat_jax.federated import algorithms as registry
  from feddat_jax.federated import optim
  from feddat_jax.models import peft, vilt, vlm
  layers = {"num_layers": layers} if layers else {}
  cfg = vilt.ViltConfig.preset(size, vocab_size=1000, max_position_embeddings=max(40, text_len), dtype=dtype,
                               **layers)
  model = vlm.VisionLanguageModel(cfg, peft.PeftConfig(registry.peft_method(algorithm)), answers)
  return registry.make(algorithm, model, optim.OptimConfig(), total_rounds=10), cfg


def _states(algo, algorithm: str, clients: int, cache: dict):
  """-> frozen, server, rows on the device. The random init (the same for every compute dtype: parameters are
  float32) runs once per algorithm, jitted (one program, which the persistent compilation cache can keep), for
  one client, and is kept on the host; every client starts from the same row, so the rows are that one
  broadcast to C. Fresh device copies each time: a round donates its states."""
  import jax
  import numpy as np
  if algorithm not in cache:
    cache[algorithm] = jax.device_get(jax.jit(lambda key: algo.init(key, 1))(jax.random.key(0)))
  frozen, server, row = cache[algorithm]
  rows = jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (clients,) + x.shape[1:]), row)
  return jax.device_put((frozen, server, rows))


def _inputs(cfg, clients: int, steps: int, batch: int, answers: int, text_len: int):
  """-> RoundInputs: random batches of the given shapes, on the device."""
  import jax
  import jax.numpy as jnp

  from feddat_jax.federated import engine
  batches = random_inputs.random_batches(clients, steps, batch, cfg.image_size, answers, text_len)
  return engine.RoundInputs.make(jnp.arange(clients, dtype=jnp.int32), jax.device_put(batches),
                                 jnp.ones((clients, steps), bool), jnp.ones((clients,), jnp.float32),
                                 jax.random.key(1))


def _one_step_flops(algo, frozen, server, rows, inputs) -> float:
  """FLOPs of one client's local step (compiled on its own from abstract shapes: nothing runs)."""
  import jax
  take = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)
  batch = {**jax.tree_util.tree_map(lambda x: x[0, 0], inputs.batches), **take(inputs.constants)}
  return xla_costs.step_flops(algo, frozen, server, take(rows), batch)


def peaks(device_kind: str, dtypes, override: str = "") -> tuple[dict, str]:
  """-> ({dtype: peak TFLOP/s}, a sentence saying where the figures come from)."""
  if override:
    if "=" in override:
      given = {k.strip(): float(v) for k, v in (p.split("=", 1) for p in override.split(","))}
      missing = [d for d in dtypes if d not in given]
      if missing:
        raise ValueError(f"--peak_tflops={override} names no peak for {missing}")
      return {d: given[d] for d in dtypes}, f"peak from --peak_tflops={override}"
    return {d: float(override) for d in dtypes}, f"peak from --peak_tflops={override} (every dtype)"
  kind = device_kind.lower()
  for key, bf16, f32, note in PEAKS:
    if key in kind:
      table = {"bfloat16": bf16, "float32": f32}
      return {d: table[d] for d in dtypes}, (f"peak assumed from the table for {device_kind!r}: bfloat16 {bf16:g}, "
                                             f"float32 {f32:g} TFLOP/s ({note})")
  peak = xla_costs.matmul_peak_gflops() / 1e3
  return {d: peak for d in dtypes}, (f"peak measured: {device_kind!r} is not in the table, so the best of 10 f32 "
                                     f"2048^3 matmuls here, {peak * 1e3:.1f} GFLOP/s, is the peak of every dtype")


def _peak_bytes_in_use():
  import jax
  stats = jax.devices()[0].memory_stats()
  return None if not stats or "peak_bytes_in_use" not in stats else int(stats["peak_bytes_in_use"])


def _lane_count(token: str, clients: int) -> int:
  return clients if token.strip().upper() == "C" else int(token)


def configurations(algorithms, dtypes, lanes, clients):
  """(algorithm, dtype, lanes, C) from the smallest expected memory to the largest (see the docstring)."""
  width = {"bfloat16": 2, "float32": 4}
  out = []
  for c in sorted({int(x) for x in clients}):
    for n in sorted({_lane_count(t, c) for t in lanes}):
      for d in sorted(dtypes, key=lambda d: width.get(d, 8)):
        out += [(a, d, n, c) for a in algorithms]
  return out


def _compile(round_fn, *args):
  t = time.perf_counter()
  compiled = round_fn.lower(*args).compile()
  return compiled, time.perf_counter() - t


def run_one(algorithm, dtype, lanes, clients, shape, peak_tflops, cache):
  """One configuration -> its record. cache: {"init": {algorithm: host states}, (algorithm, dtype): one step's
  FLOPs, (algorithm, dtype, C): FLOPs per round, ("compiled", algorithm, dtype, C): a C-lane round compiled
  early (for a 1-lane configuration's FLOPs), taken by its own configuration}."""
  import jax
  peak_before = _peak_bytes_in_use()
  algo, cfg = _algorithm(algorithm, shape["size"], dtype, shape["answers"], shape["text_len"], shape["layers"])
  round_fn = _round_fn(algo, lanes, clients)  # refuses an unsupported lane count before anything is built
  frozen, server, rows = _states(algo, algorithm, clients, cache["init"])
  inputs = _inputs(cfg, clients, shape["steps"], shape["batch"], shape["answers"], shape["text_len"])
  early = ("compiled", algorithm, dtype, clients)
  if lanes == clients and early in cache:
    compiled, compile_s = cache.pop(early)
  else:
    compiled, compile_s = _compile(round_fn, frozen, server, rows, inputs)
  mem = compiled.memory_analysis()
  xla_bytes = None if mem is None else int(mem.argument_size_in_bytes + mem.temp_size_in_bytes)

  if (algorithm, dtype, clients) not in cache:
    try:
      vmapped = compiled
      if lanes != clients:  # the C-lane round, compiled for its FLOPs and kept for its own configuration
        cache[early] = _compile(_round_fn(algo, clients, clients), frozen, server, rows, inputs)
        vmapped = cache[early][0]
      if (algorithm, dtype) not in cache:
        cache[(algorithm, dtype)] = _one_step_flops(algo, frozen, server, rows, inputs)
      cache[(algorithm, dtype, clients)] = (xla_costs.flops(vmapped) +
                                            (shape["steps"] - 1) * clients * cache[(algorithm, dtype)])
    except Exception as e:  # noqa: BLE001  (no FLOPs, so no MFU: the timing still counts)
      print(f"  FLOPs not counted for {algorithm} {dtype} C={clients}: {type(e).__name__}: "
            f"{(str(e).strip().splitlines() or [''])[0][:200]}", flush=True)
      cache[(algorithm, dtype, clients)] = float("nan")
  flops = cache[(algorithm, dtype, clients)]

  times = []
  for i in range(shape["rounds"] + 1):
    t = time.perf_counter()
    server, rows, metrics = compiled(frozen, server, rows, inputs)
    jax.block_until_ready((server, rows, metrics))
    if i:  # the first round is a warm-up
      times.append(time.perf_counter() - t)
  peak_after = _peak_bytes_in_use()
  finite = bool(jax.device_get(metrics["upload_finite"]).all())
  del frozen, server, rows, inputs, metrics, compiled

  round_s = statistics.median(times)
  examples = clients * shape["steps"] * shape["batch"]
  record = {"algorithm": algorithm, "dtype": dtype, "lanes": lanes, "clients": clients,
            "client_parallelism": "scan" if lanes == 1 else "vmap", **shape,
            "round_s": round_s, "round_times_s": times, "examples_per_s": examples / round_s,
            "flops_per_round": flops, "achieved_tflops": flops / round_s / 1e12,
            "peak_tflops": peak_tflops[dtype], "compile_s": compile_s, "xla_argument_temp_bytes": xla_bytes,
            "uploads_finite": finite}
  record["mfu"] = record["achieved_tflops"] / peak_tflops[dtype]
  if peak_after is not None:
    record.update(peak_memory_bytes=peak_after, peak_memory_source="memory_stats.peak_bytes_in_use",
                  peak_memory_upper_bound=peak_before is not None and peak_after <= peak_before)
  else:
    record.update(peak_memory_bytes=xla_bytes, peak_memory_source="memory_analysis.argument+temp",
                  peak_memory_upper_bound=False)
  return record


def _line(r) -> str:
  head = f"{r['algorithm']:15s} {r['dtype']:8s} lanes={r['lanes']:<3d} C={r['clients']:<3d}"
  if "error" in r:
    return f"{head} FAILED {r['error']}"
  tag = ("xla" if r["peak_memory_source"].startswith("memory_analysis") else
         "stats<=" if r["peak_memory_upper_bound"] else "stats")
  mem = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes']}"
  return (f"{head} round_s={r['round_s']:.4g} examples_per_s={r['examples_per_s']:.4g} "
          f"flops_per_round={r['flops_per_round']:.4g} mfu={r['mfu']:.4f} peak_mem_bytes={mem}({tag}) "
          f"compile_s={r['compile_s']:.1f}")


def _define_flags():
  """The flags, defined when run as a script only (tests import this module next to others' flags)."""
  flags.DEFINE_enum("size", "base", ["tiny", "small", "base"], "ViLT size preset.")
  flags.DEFINE_list("algorithms", ["feddat", "fedavg_adapter"], "Algorithm registry names.")
  flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes (parameters, optimiser state and "
                    "aggregation stay float32).")
  flags.DEFINE_list("lanes", ["1", "C"], "Lane counts: integers, or C for the configuration's client count.")
  flags.DEFINE_list("clients", ["5", "16", "64"], "Clients per round C.")
  flags.DEFINE_integer("steps", 4, "Local steps per round S.")
  flags.DEFINE_integer("batch", 8, "Examples per client per step B.")
  flags.DEFINE_integer("answers", 100, "Answer-head width A.")
  flags.DEFINE_integer("text_len", 40, "Text tokens L.")
  flags.DEFINE_integer("layers", 0, "Transformer layers (0: the size preset's).")
  flags.DEFINE_integer("rounds", 3, "Timed rounds (after one untimed warm-up round).")
  flags.DEFINE_string("peak_tflops", "", "The device's peak TFLOP/s for MFU: one number for every dtype, or "
                      "dtype=value pairs (bfloat16=989,float32=67); empty: the table by device kind, else "
                      "measured.")
  flags.DEFINE_bool("cpu_smoke", False, "CPU, tiny size with one layer, C = 2, S = 2, B = 2, one timed "
                    "round (also spelt --cpu-smoke).")
  flags.DEFINE_string("json_out", "", "File for one JSON object per configuration per line ('' to skip).")


def main(argv):
  del argv
  import jax
  if FLAGS.cpu_smoke:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_disable_most_optimizations", True)
    for k, v in SMOKE.items():
      setattr(FLAGS, k, v)
  shape = dict(size=FLAGS.size, layers=FLAGS.layers, steps=FLAGS.steps, batch=FLAGS.batch, answers=FLAGS.answers,
               text_len=FLAGS.text_len, rounds=FLAGS.rounds)
  device = jax.devices()[0]
  peak, peak_note = peaks(device.device_kind, FLAGS.dtypes, FLAGS.peak_tflops)
  memory = ("memory_stats peak_bytes_in_use (process peak so far; '<=': not raised by this configuration)"
            if _peak_bytes_in_use() is not None else "the compiled round's memory_analysis argument + temp bytes "
            "('xla'; this device has no memory_stats)")
  print(f"device: {device.platform} {device.device_kind!r} x{jax.device_count()}; jax {jax.__version__}; "
        f"size={FLAGS.size}{f' layers={FLAGS.layers}' if FLAGS.layers else ''} S={FLAGS.steps} B={FLAGS.batch} "
        f"A={FLAGS.answers} L={FLAGS.text_len} "
        f"rounds={FLAGS.rounds}{' (cpu smoke)' if FLAGS.cpu_smoke else ''}")
  print(f"mfu: {peak_note}")
  print(f"peak memory: {memory}", flush=True)

  sink = open(FLAGS.json_out, "w", encoding="utf-8") if FLAGS.json_out else None
  cache, failed = {"init": {}}, 0
  try:
    for algorithm, dtype, lanes, clients in configurations(FLAGS.algorithms, FLAGS.dtypes, FLAGS.lanes,
                                                           FLAGS.clients):
      try:
        record = run_one(algorithm, dtype, lanes, clients, shape, peak, cache)
      except Exception as e:  # noqa: BLE001  (out of memory, a refused lane count: report and go on)
        failed += 1
        message = (str(e).strip().splitlines() or [""])[0][:300]
        record = {"algorithm": algorithm, "dtype": dtype, "lanes": lanes, "clients": clients, **shape,
                  "error": f"{type(e).__name__}: {message}"}
      record.update(device_kind=device.device_kind, platform=device.platform, peak_note=peak_note,
                    cpu_smoke=FLAGS.cpu_smoke)
      print(_line(record), flush=True)
      if sink:
        sink.write(json.dumps(record) + "\n")
        sink.flush()
      if _peak_bytes_in_use() is not None:
        gc.collect()  # free this configuration's device buffers before the next (slow on CPU, not needed there)
  finally:
    if sink:
      sink.close()
  print(f"{failed} configuration(s) failed" if failed else "all configurations ran")


def _argv(argv):
  """--cpu-smoke is spelt with a hyphen in accelerator.sh; absl's flag is cpu_smoke."""
  return [{"--cpu-smoke": "--cpu_smoke", "--nocpu-smoke": "--nocpu_smoke"}.get(a, a) for a in argv]


if __name__ == "__main__":
  _define_flags()
  sys.argv = _argv(sys.argv)
  app.run(main)
