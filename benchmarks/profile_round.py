"""Where the time of one compiled federated round goes on this machine: a profile by XLA op category.

  python benchmarks/profile_round.py --size=small --algorithm=feddat --clients=5 --steps=4 --batch=8 \
      --out=runs/profile

Profiles with `jax.profiler` (offline, no TensorBoard needed) the round of `engine.build_round` (one program
per --parallelisms) and one client's update as the sequential loop of `round_throughput.py` runs it (one
jitted call: begin, scan over local steps, end). XLA's CPU runtime annotates every thunk it executes with its
HLO instruction; the trace is read back with `jax.profiler.ProfileData`, and each instruction is put in a
category from the compiled HLO (`compiled.as_text()`; a fusion by the ops it contains, first match wins):

  matmul/dot/conv         dot, convolution, and YNNPACK fusions that hold one (XLA:CPU fuses some dots with
                          their neighbours, e.g. a backward dot with the LayerNorm backward's reductions)
  reduction/softmax/norm  reduce, reduce-window (softmax and LayerNorm statistics; YNNPACK reduce fusions)
  dus/gather/scatter      dynamic-slice, dynamic-update-slice, gather, scatter (per-step batch slicing,
                          cohort gather/scatter)
  elementwise             any other arithmetic: GELU's erfc polynomial, Adam, the masking selects, ...
  copy/transpose/bcast    pure data movement: copy, transpose, broadcast, concatenate, slice, pad, ...
  while-loop              the while instruction's own time (loop control, not its body)
  other                   the rest (custom calls, rng, sort, ...)
  idle                    the part of the round's wall time when no HLO op runs on any thread (dispatch,
                          waiting between thunks)

Seconds are wall-clock: where several ops run at once on different threads, each instant is split evenly
among them, so the categories and `idle` add up to the round's wall time (measured around the call, median
of --rounds traced calls). `thread_s` is the summed op durations over threads (CPU time of the ops on their
launching threads; a matmul split across cores by its library counts once). A second table splits the time by
where the op comes from in the model (from the HLO metadata's op_name of the op, for a fusion its root's:
GELU, softmax, LayerNorm, adapter, optimiser, masking selects, ...), and the top ops are listed with their HLO
names. GFLOP: 2 x the multiply-adds of the dots and convolutions (from their HLO shapes) times the calls seen
in the trace; a category's GFLOP/s is over its wall seconds, an op's over its own thread time. The process's
CPU seconds per call are printed too: on a loaded machine they are steadier than the wall time.

Output: tables on stdout, and under --out: profile.json (everything) and profile.csv (one row per program and
category). Noise: this is a shared 2-core machine; compare programs profiled in the same run.
"""
from __future__ import annotations

import collections
import csv
import functools
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import round_throughput  # noqa: E402  (setup() of the same benchmark shapes)

# The shape flags (--size, --clients, --steps, --batch, --answers, --text_len, --algorithm, --rounds,
# --sequential) are round_throughput's (not its --client_parallelism: see --parallelisms); here --rounds counts
# the traced calls, after one untraced warm-up.
flags.DEFINE_list("parallelisms", ["vmap", "scan"], "Round programs to profile, by engine.build_round's "
                  "client_parallelism (vmap, scan, lanes: --lanes lanes).")
flags.DEFINE_integer("top", 15, "Ops listed by time.")
flags.DEFINE_string("out", "runs/profile", "Directory for profile.json and profile.csv ('' to skip).")
FLAGS = flags.FLAGS

CATEGORIES = ("matmul/dot/conv", "reduction/softmax/norm", "dus/gather/scatter", "elementwise",
              "copy/transpose/bcast", "while-loop", "other", "idle")
_MATMUL = {"dot", "convolution"}
_REDUCE = {"reduce", "reduce-window", "reduce-precision"}
_INDEX = {"dynamic-slice", "dynamic-update-slice", "gather", "scatter"}
_MOVE = {"copy", "transpose", "broadcast", "bitcast", "reshape", "concatenate", "slice", "pad", "reverse",
         "iota", "constant", "parameter", "get-tuple-element", "tuple", "convert", "bitcast-convert",
         "copy-start", "copy-done"}
_OTHER = {"custom-call", "rng", "rng-bit-generator", "rng-get-and-update-state", "sort", "call", "conditional",
          "after-all", "infeed", "outfeed", "all-reduce", "partition-id", "replica-id"}
# (source, op_name keywords): the first whose keyword occurs in the op's metadata op_name.
SOURCES = (("GELU (erfc)", ("erfc", "gelu")), ("attention softmax", ("softmax", "reduce_max", "exp")),
           ("LayerNorm", ("LayerNorm", "layernorm", "rsqrt")), ("adapter", ("adapter",)),
           ("optimiser (AdamW)", ("adam", "scale_by", "decayed", "optax", "apply_updates", "sqrt")),
           ("losses/head", ("VQAHead", "losses", "log_softmax", "logsumexp", "sigmoid")),
           ("masking selects (where)", ("select_n",)), ("matmuls", ("dot_general", "conv_general")))

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")
_OPCODE = re.compile(r"(?<![\w.\-%])([a-z][a-z0-9\-]*)\(")
_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(")


def parse_hlo(text: str):
  """Compiled HLO text -> ({instruction: (opcode, called computations, op_name, flops)}, {computation: ops}).

  flops: 2 * multiply-adds of a dot or convolution, and of every dot/convolution inside a fusion; else 0.
  """
  lines, shapes, comps, current = [], {}, collections.defaultdict(set), None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m:
      current = m.group(1)
      continue
    m = _INSTR.match(line)
    if not m or current is None:
      continue
    name, rest = m.groups()
    head = rest.split(" metadata=")[0]
    op = _OPCODE.search(head)
    opcode = op.group(1) if op else "?"
    shape = re.match(r"\s*\(?\w+\[([\d,]*)\]", rest)
    shapes[name] = [int(d) for d in shape.group(1).split(",") if d] if shape else []
    operands = re.findall(r"%([\w.\-]+)", head[op.end():]) if op else []
    called = re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", rest)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    lines.append((current, name, opcode, operands, called, op_name.group(1) if op_name else "", head))
    comps[current].add((opcode, tuple(called)))
  own = {}  # flops of the dots/convolutions themselves, per computation
  for comp, name, opcode, operands, _, _, head in lines:
    own[comp] = own.get(comp, 0) + _matmul_flops(opcode, shapes.get(name, []), operands, head, shapes)
  instrs = {}
  for comp, name, opcode, operands, called, op_name, head in lines:
    flops = _matmul_flops(opcode, shapes.get(name, []), operands, head, shapes)
    if opcode == "fusion":
      flops = sum(own.get(c, 0) for c in called)
    instrs[name] = (opcode, called, op_name, flops)
  return instrs, comps


def _matmul_flops(opcode, out_shape, operands, head, shapes) -> int:
  prod = lambda xs: int(functools.reduce(lambda a, b: a * b, xs, 1))
  if opcode == "dot" and operands:
    dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", head)
    lhs = shapes.get(operands[0], [])
    k = prod(lhs[int(d)] for d in dims.group(1).split(",") if d) if dims and lhs else 0
    return 2 * prod(out_shape) * k
  if opcode == "convolution" and len(operands) > 1:
    labels = re.search(r"dim_labels=\w+_(\w+)->", head)
    kernel = shapes.get(operands[1], [])
    if labels and kernel and "o" in labels.group(1):
      return 2 * prod(out_shape) * prod(kernel) // kernel[labels.group(1).index("o")]
  return 0


def _opcodes(comps, comp, seen=None):
  """All opcodes inside a computation, through nested fusions and calls."""
  seen = set() if seen is None else seen
  if comp in seen:
    return set()
  seen.add(comp)
  out = set()
  for opcode, called in comps.get(comp, ()):
    out.add(opcode)
    for c in called:
      out |= _opcodes(comps, c, seen)
  return out


def categorize(name: str, instrs, comps) -> str:
  opcode, called = instrs.get(name, ("?", [], "", 0))[:2]
  if opcode == "while":
    return "while-loop"
  ops = {opcode}
  if opcode == "fusion":
    ops = set()
    for c in called:
      ops |= _opcodes(comps, c)
  if ops & _MATMUL:
    return "matmul/dot/conv"
  if ops & _REDUCE:
    return "reduction/softmax/norm"
  if ops & _INDEX:
    return "dus/gather/scatter"
  if ops & _OTHER:
    return "other"
  if ops - _MOVE:
    return "elementwise"
  return "copy/transpose/bcast"


def source(op_name: str) -> str:
  for label, keys in SOURCES:
    if any(k in op_name for k in keys):
      return label
  return "rest"


def _events(xspace_path: str, module: str):
  """HLO-op events of `module`: {thread: [(start_ns, end_ns, op)]}."""
  import jax
  data = jax.profiler.ProfileData.from_file(xspace_path)
  out = collections.defaultdict(list)
  for plane in data.planes:
    for line in plane.lines:
      for e in line.events:
        stats = dict(e.stats)
        if stats.get("hlo_module") == module and "hlo_op" in stats:
          out[(plane.name, line.name)].append((e.start_ns, e.start_ns + e.duration_ns, stats["hlo_op"]))
  return out


def _self_intervals(events):
  """Per thread, nested events (a while around its body, if on the same thread) keep only their own time."""
  out = []
  for evs in events.values():
    evs = sorted(evs, key=lambda e: (e[0], -e[1]))
    stack = []  # [start, end, op, cursor]
    def close_until(t):
      while stack and stack[-1][1] <= t:
        s, e, op, cur = stack.pop()
        if e > cur:
          out.append((cur, e, op))
        if stack:
          stack[-1][3] = max(stack[-1][3], e)
    for s, e, op in evs:
      close_until(s)
      if stack:
        top = stack[-1]
        if s > top[3]:
          out.append((top[3], s, top[2]))
        top[3] = max(top[3], e)
      stack.append([s, e, op, s])
    close_until(float("inf"))
  return out


def attribute(events):
  """-> ({op: wall ns, splitting concurrent ops evenly}, {op: thread ns}, busy wall ns, window ns)."""
  intervals = _self_intervals(events)
  thread = collections.Counter()
  points = []
  for s, e, op in intervals:
    thread[op] += e - s
    points += [(s, 1, op), (e, -1, op)]
  points.sort(key=lambda p: (p[0], p[1]))
  wall, active, last, busy = collections.Counter(), collections.Counter(), None, 0.0
  for t, kind, op in points:
    n = sum(active.values())
    if last is not None and n and t > last:
      for a, k in active.items():
        if k:
          wall[a] += (t - last) * k / n
      busy += t - last
    active[op] += kind
    last = t
  window = (max(p[0] for p in points) - min(p[0] for p in points)) if points else 0
  return wall, thread, busy, window


def profile(fn, args, module: str, rounds: int, instrs, comps, trace_dir: str):
  """Trace `rounds` calls of `fn(*args)`; -> per-category and per-op seconds per call (averages)."""
  import jax
  jax.block_until_ready(fn(*args))  # warm-up, untraced
  walls, cpus = [], []
  with jax.profiler.trace(trace_dir):
    for _ in range(rounds):
      t, c = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*args))
      walls.append(time.perf_counter() - t)
      cpus.append(time.process_time() - c)
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
  events = _events(path, module)
  calls = collections.Counter(op for evs in events.values() for _, _, op in evs)
  wall, thread, busy, window = attribute(events)
  round_s = statistics.median(walls)
  per = lambda ns: ns / 1e9 / rounds
  cats = {c: {"wall_s": 0.0, "thread_s": 0.0, "gflop": 0.0} for c in CATEGORIES}
  srcs = collections.defaultdict(float)
  ops = []
  for op in thread:
    c = categorize(op, instrs, comps)
    cats[c]["wall_s"] += per(wall[op])
    cats[c]["thread_s"] += per(thread[op])
    opcode, _, op_name, flops = instrs.get(op, ("?", [], "", 0))
    gflop = flops * calls[op] / rounds / 1e9
    cats[c]["gflop"] += gflop
    srcs[source(op_name)] += per(wall[op])
    ops.append({"op": op, "category": c, "opcode": opcode, "wall_s": per(wall[op]), "thread_s": per(thread[op]),
                "calls": calls[op] / rounds, "gflop": gflop,
                "gflops_per_s": gflop / per(thread[op]) if thread[op] else 0.0, "op_name": op_name})
  mean_wall = statistics.mean(walls)
  cats["idle"]["wall_s"] = max(mean_wall - per(busy), 0.0)
  for c in cats.values():
    c["share"] = c["wall_s"] / mean_wall
    c["gflops_per_s"] = c["gflop"] / c["wall_s"] if c["wall_s"] else 0.0
  ops.sort(key=lambda o: -o["wall_s"])
  return {"module": module, "round_s": round_s, "round_s_all": walls, "process_cpu_s": statistics.median(cpus),
          "busy_s": per(busy), "trace_window_s": per(window), "categories": cats, "sources": dict(srcs), "ops": ops}


def _short(op_name: str, parts: int = 4) -> str:
  op_name = re.sub(r"^jit\([^)]*\)/", "", op_name)
  return "/".join(op_name.split("/")[-parts:])


def _print(title, prof, top):
  print(f"\n{title}  [{prof['module']}]  wall {prof['round_s']:.3f} s (median of "
        f"{len(prof['round_s_all'])}: {', '.join(f'{w:.3f}' for w in prof['round_s_all'])}; process CPU "
        f"{prof['process_cpu_s']:.2f} s)")
  print(f"  {'category':24s} {'wall s':>8s} {'%':>6s} {'thread s':>9s} {'GFLOP':>8s} {'GFLOP/s':>8s}")
  for c in CATEGORIES:
    v = prof["categories"][c]
    rate = f"{v['gflop']:8.1f} {v['gflops_per_s']:8.1f}" if v["gflop"] else ""
    print(f"  {c:24s} {v['wall_s']:8.3f} {100 * v['share']:5.1f}% {v['thread_s']:9.3f} {rate}")
  total = sum(prof["sources"].values()) or 1.0
  print("  by source (op_name; % of op time): " + ", ".join(
      f"{k} {100 * v / total:.1f}%" for k, v in sorted(prof["sources"].items(), key=lambda kv: -kv[1])))
  print(f"  top {top} ops by wall time (calls per round; GFLOP/s over the op's own thread time):")
  for o in prof["ops"][:top]:
    rate = f"{o['gflops_per_s']:6.1f} GFLOP/s" if o["gflop"] else " " * 13
    print(f"    {o['wall_s']:7.3f} s  {o['calls']:3.0f}x  {rate}  {o['category']:22s} {o['op']:24s} "
          f"{_short(o['op_name'])}")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  from feddat_jax.federated import engine

  shape = dict(size=FLAGS.size, clients=FLAGS.clients, steps=FLAGS.steps, batch=FLAGS.batch,
               answers=FLAGS.answers, text_len=FLAGS.text_len, algorithm=FLAGS.algorithm)
  algo, frozen, server, clients, batches, step_mask, weights = round_throughput.setup(**shape)
  cohort = jnp.arange(FLAGS.clients, dtype=jnp.int32)
  key = jax.random.key(1)
  out = {**shape, "device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "programs": {}}
  tmp = tempfile.mkdtemp(prefix="profile_round_")

  for parallelism in FLAGS.parallelisms:
    args = (frozen, server, clients,
            round_throughput.round_inputs(parallelism, FLAGS.lanes or round_throughput.auto_lanes(algo.model, step_mask),
                                          cohort, batches, step_mask, weights, key))
    compiled = engine.build_round(algo, donate=False, client_parallelism=parallelism).lower(*args).compile()
    instrs, comps = parse_hlo(compiled.as_text())
    name = {"vmap": "vmapped_round"}.get(parallelism, f"{parallelism}_round")
    if name in out["programs"]:  # a program profiled again (noise check): keep both
      name += f"_{sum(n.startswith(name) for n in out['programs']) + 1}"
    out["programs"][name] = profile(compiled, args, "jit_round_fn", FLAGS.rounds, instrs, comps,
                                    os.path.join(tmp, name))
    _print(f"one round, clients by {parallelism}, C={FLAGS.clients} S={FLAGS.steps} B={FLAGS.batch}",
           out["programs"][name], FLAGS.top)

  if FLAGS.sequential:
    one_client, client_args = round_throughput.one_client_update(algo)
    cargs = client_args(0, frozen, server, clients, batches, step_mask, key)
    ccompiled = one_client.lower(*cargs).compile()
    instrs, comps = parse_hlo(ccompiled.as_text())
    prof = profile(ccompiled, cargs, "jit_one_client", FLAGS.rounds, instrs, comps, os.path.join(tmp, "client"))
    out["programs"]["sequential_one_client"] = prof
    _print(f"one client's sequential update (x{FLAGS.clients} = {FLAGS.clients * prof['round_s']:.3f} s "
           "plus aggregation)", prof, FLAGS.top)

  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "profile.json"), "w") as f:
      json.dump(out, f, indent=1)
    with open(os.path.join(FLAGS.out, "profile.csv"), "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["program", "category", "wall_s", "share", "thread_s", "gflop", "round_s", "process_cpu_s"])
      for name, prof in out["programs"].items():
        for c in CATEGORIES:
          v = prof["categories"][c]
          w.writerow([name, c, f"{v['wall_s']:.4f}", f"{v['share']:.4f}", f"{v['thread_s']:.4f}",
                      f"{v['gflop']:.2f}", f"{prof['round_s']:.4f}", f"{prof['process_cpu_s']:.3f}"])
    print(f"\nwrote {FLAGS.out}/profile.json and profile.csv")


if __name__ == "__main__":
  app.run(main)
