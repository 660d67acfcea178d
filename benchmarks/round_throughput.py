"""Throughput of one federated round, against this machine's matmul peak and a sequential loop over clients.

  python benchmarks/round_throughput.py --size=small --algorithm=feddat --clients=5 --steps=4 --batch=8 --json
  python benchmarks/round_throughput.py --size=small --client_parallelism=scan --json   # clients one by one

Random inputs of the given shapes; a random (not pretrained) backbone: speed does not depend on weights.
Prints compile time, steady-state seconds per round (median over the rounds after the first), examples/s,
the round's FLOPs from XLA's cost analysis (which counts a loop body once, so S - 1 more local steps are added
from the cost of one vmapped step), achieved GFLOP/s and its share of the best of 10 f32 2048x2048
matmuls measured in the same run, the same round as a Python loop over clients (one jitted client update per
client, then the jitted aggregation) and the vmapped/sequential speed ratio, and the peak memory of a
process running one round for C = 1, 2, 4, 8 clients (each in its own subprocess, RSS on CPU).
With --json the last line printed is one JSON object.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import random_inputs  # noqa: E402
import xla_costs  # noqa: E402

flags.DEFINE_enum("size", "small", ["tiny", "mini", "small", "base"], "ViLT size preset (vilt.PRESETS).")
flags.DEFINE_integer("clients", 5, "Clients per round C.")
flags.DEFINE_integer("steps", 4, "Local steps per round S.")
flags.DEFINE_integer("batch", 8, "Batch per client B.")
flags.DEFINE_integer("answers", 100, "Answer-head width A.")
flags.DEFINE_integer("text_len", 40, "Text tokens L.")
flags.DEFINE_string("algorithm", "feddat", "Registry name.")
flags.DEFINE_enum("client_parallelism", "auto", ["auto", "vmap", "scan", "lanes"], "engine.build_round's: the "
                  "round's clients batched (vmap), one after the other in the program (scan), or packed into "
                  "--lanes lanes; auto: what a run picks on this backend (engine.resolve_parallelism).")
flags.DEFINE_integer("lanes", 0, "Lanes of the lanes round; 0: engine.auto_lanes, as the config's default.")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "Matmul/activation dtype (parameters, "
                  "optimiser state and aggregation stay float32); bfloat16 is for GPU/TPU, slow on CPU.")
flags.DEFINE_integer("rounds", 3, "Timed rounds; the first is warm-up.")
flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
flags.DEFINE_bool("sequential", True, "Also time the sequential loop over clients.")
flags.DEFINE_string("memory_clients", "1,2,4,8", "Client counts for the peak-memory probe ('' to skip).")
flags.DEFINE_bool("memory_probe", False, "Internal: run one round and print the peak RSS in bytes.")
flags.DEFINE_bool("serve", False, "Internal (benchmarks/reference_loop.py): compile and warm up, print one JSON line, "
                  "then run one round per line read from stdin and print its seconds.")
FLAGS = flags.FLAGS


def setup(size, clients, steps, batch, answers, text_len, algorithm, compute_dtype="float32"):
  import jax
  import jax.numpy as jnp

  from feddat_jax.federated import algorithms as registry
  from feddat_jax.federated import optim
  from feddat_jax.models import peft, vilt, vlm
  cfg = vilt.ViltConfig.preset(size, vocab_size=1000, max_position_embeddings=max(40, text_len), dtype=compute_dtype)
  model = vlm.VisionLanguageModel(cfg, peft.PeftConfig(registry.peft_method(algorithm)), answers)
  algo = registry.make(algorithm, model, optim.OptimConfig(), total_rounds=10)
  frozen, server, client_states = algo.init(jax.random.key(0), clients)
  batches = jax.device_put(random_inputs.random_batches(clients, steps, batch, cfg.image_size, answers, text_len))
  return (algo, frozen, server, client_states, batches, jnp.ones((clients, steps), bool),
          jnp.ones((clients,), jnp.float32))


def auto_lanes(model, step_mask) -> int:
  """The lanes a run of this model picks by default (`lanes=0`: engine.auto_lanes)."""
  import jax

  from feddat_jax.federated import engine
  steps = jax.device_get(step_mask).sum(1)
  return engine.auto_lanes(steps, len(steps), engine.model_step_work(model, FLAGS.batch, FLAGS.text_len))


def round_inputs(parallelism, lanes, cohort, batches, step_mask, weights, key):
  """The RoundInputs of the benchmark round; for the lanes round with its schedule of `lanes` lanes."""
  import jax

  from feddat_jax.federated import engine
  schedule = None
  if parallelism == "lanes":
    mask = jax.device_get(step_mask)
    schedule = engine.lane_schedule(mask, lanes)
  return engine.RoundInputs.make(cohort, batches, step_mask, weights, key, schedule)


def time_rounds(run_round, rounds):
  times = []
  for _ in range(rounds):
    t = time.perf_counter()
    run_round()
    times.append(time.perf_counter() - t)
  return times


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  from feddat_jax.federated import engine
  from feddat_jax.models import peft

  shape = dict(size=FLAGS.size, clients=FLAGS.clients, steps=FLAGS.steps, batch=FLAGS.batch,
               answers=FLAGS.answers, text_len=FLAGS.text_len, algorithm=FLAGS.algorithm,
               compute_dtype=FLAGS.compute_dtype)
  algo, frozen, server, clients, batches, step_mask, weights = setup(**shape)
  cohort = jnp.arange(FLAGS.clients, dtype=jnp.int32)
  key = jax.random.key(1)
  parallelism = engine.resolve_parallelism(FLAGS.client_parallelism)
  lanes = FLAGS.lanes or auto_lanes(algo.model, step_mask)
  inputs = round_inputs(parallelism, lanes, cohort, batches, step_mask, weights, key)
  round_fn = engine.build_round(algo, donate=False, client_parallelism=parallelism)

  if FLAGS.memory_probe:
    jax.block_until_ready(round_fn(frozen, server, clients, inputs))
    print(xla_costs.peak_rss_bytes())
    return

  t = time.perf_counter()
  compiled = round_fn.lower(frozen, server, clients, inputs).compile()
  compile_s = time.perf_counter() - t
  if FLAGS.serve:
    _serve(compiled, frozen, server, clients, inputs, parallelism, lanes, compile_s)
    return
  # XLA's cost analysis counts a loop body once: the round's figure covers one local step of every client, so
  # the other S - 1 steps are added from the cost of one vmapped step compiled on its own. (The scan round
  # counts one client's step: its FLOPs, the same arithmetic, come from the vmapped round.)
  vmapped = compiled if parallelism == "vmap" else engine.build_round(algo, donate=False).lower(
      frozen, server, clients, inputs).compile()
  flops = xla_costs.flops(vmapped) + (FLAGS.steps - 1) * _step_flops(algo, frozen, server, clients, batches, step_mask)
  state = {"server": server, "clients": clients}

  def vmapped_round():
    state["server"], state["clients"], m = compiled(frozen, state["server"], state["clients"], inputs)
    jax.block_until_ready(m)

  times = time_rounds(vmapped_round, FLAGS.rounds)
  round_s = statistics.median(times[1:]) if len(times) > 1 else times[0]
  examples = FLAGS.clients * FLAGS.steps * FLAGS.batch
  peak = xla_costs.matmul_peak_gflops()
  out = {**shape, "client_parallelism": parallelism if parallelism != "lanes" else f"lanes:{lanes}",
         "device": jax.devices()[0].device_kind,
         "compile_s": compile_s, "round_s": round_s,
         "examples_per_s": examples / round_s, "flops_per_round": flops,
         "achieved_gflops": flops / round_s / 1e9, "matmul_peak_gflops": peak}
  out["peak_fraction"] = out["achieved_gflops"] / peak

  if FLAGS.sequential:
    seq = _sequential(algo, frozen, server, clients, batches, step_mask, weights, key)
    out["sequential_round_s"] = statistics.median(seq[1:]) if len(seq) > 1 else seq[0]
    out["vmapped_over_sequential"] = out["sequential_round_s"] / round_s

  out["frozen_backbone_bytes"] = 4 * peft.count(frozen)
  one_client = jax.tree_util.tree_map(lambda x: x[0], clients)
  out["client_state_bytes"] = 4 * peft.count(one_client)
  if FLAGS.memory_clients:
    mem = {}
    for c in [int(x) for x in FLAGS.memory_clients.split(",")]:
      args = [sys.executable, os.path.abspath(__file__), "--memory_probe", f"--clients={c}",
              f"--client_parallelism={FLAGS.client_parallelism}", f"--lanes={FLAGS.lanes}"] + [
          f"--{k}={v}" for k, v in shape.items() if k != "clients"]
      res = subprocess.run(args, capture_output=True, text=True, check=True)
      mem[c] = int(res.stdout.strip().splitlines()[-1])
    out["peak_rss_bytes"] = mem
    cs = sorted(mem)
    out["rss_per_extra_client_bytes"] = (mem[cs[-1]] - mem[cs[0]]) / (cs[-1] - cs[0]) if len(cs) > 1 else None

  _print(out)
  if FLAGS.json:
    print(json.dumps(out))


def _serve(compiled, frozen, server, clients, inputs, parallelism, lanes, compile_s):
  """Rounds on demand, so that another process can interleave its own rounds with ours (one per stdin line)."""
  import jax
  state = {"server": server, "clients": clients}

  def one_round():
    state["server"], state["clients"], m = compiled(frozen, state["server"], state["clients"], inputs)
    jax.block_until_ready(m)

  one_round()  # warm-up
  print(json.dumps({"client_parallelism": parallelism if parallelism != "lanes" else f"lanes:{lanes}",
                    "compile_s": compile_s}), flush=True)
  for _ in sys.stdin:
    print(time_rounds(one_round, 1)[0], flush=True)


def _step_flops(algo, frozen, server, clients, batches, step_mask) -> float:
  """FLOPs of one local step of every client (vmapped), as inside the round."""
  import jax

  steps = step_mask.sum(1).astype(jax.numpy.int32)
  carries = jax.jit(jax.vmap(algo.begin, in_axes=(None, None, 0, 0)))(frozen, server, clients, steps)
  batch = {k: (v if k == "answer_mask" else v[:, 0]) for k, v in batches.items()}
  keys = jax.random.split(jax.random.key(0), step_mask.shape[0])
  step = jax.jit(jax.vmap(algo.step, in_axes=(None, None, 0, 0, 0)))
  return xla_costs.flops(step.lower(frozen, server, carries, batch, keys).compile())


def one_client_update(algo):
  """-> (jitted update of one client: begin, its scanned local steps, end; its arguments for client i of
  `setup`'s stacked clients and batches)."""
  import jax
  import jax.numpy as jnp

  from feddat_jax.federated import engine

  @jax.jit
  def one_client(frozen, server, client, client_batches, mask, answer_mask, rng):
    carry = algo.begin(frozen, server, client, mask.sum().astype(jnp.int32))
    carry, sums = engine.run_steps(algo, frozen, server, carry, client_batches, mask, {"answer_mask": answer_mask},
                                   rng)
    upload, client = algo.end(frozen, server, carry)
    return upload, client, sums

  def args(i, frozen, server, clients, batches, step_mask, key):
    take = lambda tree: jax.tree_util.tree_map(lambda x: x[i], tree)
    per_step = {k: v for k, v in batches.items() if k != "answer_mask"}
    return (frozen, server, take(clients), take(per_step), step_mask[i], batches["answer_mask"][i],
            jax.random.fold_in(key, i))

  return one_client, args


def _sequential(algo, frozen, server, clients, batches, step_mask, weights, key):
  """The same round as a Python loop: one jitted client update per client, then the jitted aggregation."""
  import jax
  import jax.numpy as jnp

  one_client, client_args = one_client_update(algo)
  aggregate = jax.jit(algo.aggregate)
  num = step_mask.shape[0]

  def sequential_round():
    outs = [one_client(*client_args(i, frozen, server, clients, batches, step_mask, key)) for i in range(num)]
    uploads = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[o[0] for o in outs])
    jax.block_until_ready(aggregate(server, uploads, weights))

  return time_rounds(sequential_round, FLAGS.rounds)


def _print(out):
  mb = lambda b: f"{b / 2**20:.1f} MiB"
  print(f"{out['algorithm']} size={out['size']} C={out['clients']} S={out['steps']} B={out['batch']} "
        f"A={out['answers']} L={out['text_len']} clients by {out['client_parallelism']} on {out['device']}")
  print(f"  compile            {out['compile_s']:.2f} s")
  label = f"round ({out['client_parallelism']})"
  print(f"  {label:18s} {out['round_s']:.3f} s   {out['examples_per_s']:.1f} examples/s")
  print(f"  FLOPs per round    {out['flops_per_round'] / 1e9:.2f} GFLOP   achieved {out['achieved_gflops']:.1f} GFLOP/s"
        f" = {100 * out['peak_fraction']:.0f}% of the measured matmul peak {out['matmul_peak_gflops']:.1f} GFLOP/s")
  if "sequential_round_s" in out:
    print(f"  round (sequential) {out['sequential_round_s']:.3f} s   the one-program round is "
          f"{out['vmapped_over_sequential']:.2f}x faster")
  print(f"  frozen backbone    {mb(out['frozen_backbone_bytes'])}   one client's state {mb(out['client_state_bytes'])}")
  if "peak_rss_bytes" in out:
    print("  peak RSS           " + ", ".join(f"C={c}: {mb(b)}" for c, b in out["peak_rss_bytes"].items()) +
          f"   per extra client {mb(out['rss_per_extra_client_bytes'])}")


if __name__ == "__main__":
  app.run(main)
