r"""FedDAT against its baselines on the synthetic twins, reported on a draw of the twins that no setting was
picked on, beside the draw they were picked on (issue #19, item 3):

  python benchmarks/method_tables.py --benchmarks=function,domain,scene,task --draws=1,0 --seeds=3 \
      --workdir=runs/tables --out=docs/method_tables

For each twin and draw (`synthetic.seed`) it runs, or reuses, a sweep of each of --algorithms x --seeds in
<workdir>/<twin>_draw<d> and FedDAT on a randomly initialised backbone in <workdir>/<twin>_draw<d>_random
(`python -m feddat_jax.sweep` in a subprocess, seeds as one program: a killed table resumes from the runs that
finished), and measures the draw's text-only prior (`feddat_jax.data.report`: the per-question-string majority
answer). Then it writes <out>.md, <out>.json, <out>.csv and one figure per twin and draw (<out>_<twin>_draw<d>.png):
per twin and draw, the scores (clients and their mean; mean +- sample std over seeds) of every method, of FedDAT
on a random backbone and of the prior; and FedDAT against each method on the client mean: the difference, its
95% confidence interval and p (Welch's t-test over seeds, as `feddat_jax.compare`), that p Holm-adjusted across
the table's comparisons, and the verdict (FedDAT wins or loses where the adjusted p < 0.05, else no clear
difference). The report opens with a summary: per method, the difference and verdict on every twin and draw, and
how often FedDAT wins, ties and loses. The first of --draws is the reported one; --tuned_draw names the draw the
settings were picked on.

Each method's sweep runs on its own and is kept, as it finishes, beside the report in <out>_sweeps/ (a few kB
each, with the draws' priors): a table whose workdir is gone resumes from them (a method kept there is not run
again; the whole set takes several sessions on this CPU), and --assemble_only writes the report from them (an
error names a missing one; with --partial, the twins and draws not all kept yet are left out and named). Where
a method's client mean is within 2 points of FedDAT's, both get --close_seeds (5) seeds: the kept sweeps gain
seeds 3 and 4 from a sweep of just those (`feddat_jax.sweep --first_seed=3`); until they are kept, the table is
not reported (--assemble_only fails; --partial leaves it out).
"""
from __future__ import annotations

import csv
import io
import json
import os
import shlex
import subprocess
import sys

import numpy as np
from absl import app, flags

from feddat_jax import cli, compare, config_utils, reporting, sweep
from feddat_jax.data import report as data_report
from feddat_jax.data import synthetic

FLAGS = flags.FLAGS
ALGORITHMS = ("feddat", "fedavg_adapter", "fedavg_lora", "fedavg_prompt", "local_adapter", "centralized_adapter",
              "fedavg_full")
RANDOM_ROW = "feddat, random backbone"
ALPHA = 0.05  # the verdict's level, on the Holm-adjusted p
CLOSE, CLOSE_SEEDS = 2.0, 5  # differences under CLOSE points deserve CLOSE_SEEDS seeds (issue #19)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags():
  """The command line's flags, defined only when run as a script (its tests import the module)."""
  flags.DEFINE_list("benchmarks", ["function", "domain", "scene", "task"], "Twins to tabulate.")
  flags.DEFINE_list("draws", ["1", "0"], "Draws of the twins (synthetic.seed); the first is the reported one.")
  flags.DEFINE_integer("tuned_draw", 0, "The draw the settings were picked on (labelled as such).")
  flags.DEFINE_list("algorithms", list(ALGORITHMS), "Methods; the first is the one compared with the others.")
  flags.DEFINE_integer("seeds", 3, "Training seeds 0..N-1 per method.")
  flags.DEFINE_integer("close_seeds", CLOSE_SEEDS, f"Seeds for FedDAT and every method within {CLOSE:g} points of "
                       "it on the client mean (added to the kept sweeps; <= --seeds: none added).")
  flags.DEFINE_string("config", "configs/vqa.py", "Base config file.")
  flags.DEFINE_list("set", [], "Config fields for every run, field=value (e.g. rounds=20), comma-separated.")
  flags.DEFINE_string("workdir", "runs/tables", "Where the sweeps live.")
  flags.DEFINE_string("out", "", "Write <out>.md, .json, .csv and the figures (default: <workdir>/tables).")
  flags.DEFINE_bool("assemble_only", False, "Run nothing; write the report from the sweeps already there.")
  flags.DEFINE_bool("partial", False, "With --assemble_only: leave out each twin and draw whose sweeps are not all "
                    "kept yet (the report names them) instead of failing.")


def sweep_dir(workdir: str, benchmark: str, draw: int, random: bool = False) -> str:
  return os.path.join(workdir, f"{benchmark}_draw{draw}" + ("_random" if random else ""))


def kept_sweep(out: str, benchmark: str, draw: int, algorithm: str, random: bool = False) -> str:
  """Where one method's finished sweep is kept beside the report: <out>_sweeps/<twin>_draw<d>[_random]/<method>.json.
  The report is assembled from them, and a table whose workdir is gone resumes from them, method by method."""
  return os.path.join(out + "_sweeps", os.path.basename(sweep_dir("", benchmark, draw, random)), algorithm + ".json")


def merge(results: list[dict]) -> dict:
  """Several methods' sweep results of one twin and draw -> one (their clients and generator must agree)."""
  first = results[0]
  for r in results[1:]:
    if r["clients"] != first["clients"] or r.get("synthetic_generator") != first.get("synthetic_generator"):
      raise compare.CompareError(f"the kept sweeps of {sorted(first['methods'])} and {sorted(r['methods'])} "
                                 "differ in clients or data; delete the older one and rerun")
  return dict(first, methods={m: e for r in results for m, e in r["methods"].items()})


def sweep_command(config: str, benchmark: str, draw: int, algorithms, seeds: int, workdir: str,
                  sets=(), random: bool = False, first_seed: int = 0) -> list[str]:
  """The `python -m feddat_jax.sweep` command of one twin and draw (random: FedDAT on a random backbone), for
  training seeds first_seed .. first_seed + seeds - 1."""
  arg = config + ("," if ":" in config else ":") + f"benchmark={benchmark}" + (",backbone=random" if random else "")
  return ([sys.executable, "-m", "feddat_jax.sweep", f"--config={arg}", f"--config.synthetic.seed={draw}",
           f"--algorithms={','.join(algorithms)}", f"--seeds={seeds}", "--vectorize_seeds", f"--workdir={workdir}"]
          + ([f"--first_seed={first_seed}"] if first_seed else []) + [f"--config.{s}" for s in sets])


def seed_ids(entry: dict) -> list[int]:
  """A sweep entry's training seeds (sweeps written before they were recorded ran seeds 0..N-1)."""
  return list(entry.get("seeds", range(len(entry["scores"]))))


def take_seeds(result: dict | None, algorithm: str, ids) -> dict | None:
  """`algorithm`'s entry of `result` cut to the training seeds `ids`, or None if it lacks any of them."""
  entry = (result or {}).get("methods", {}).get(algorithm)
  if entry is None or not set(ids) <= set(seed_ids(entry)):
    return None
  at = {s: i for i, s in enumerate(seed_ids(entry))}
  return dict(entry, seeds=list(ids), scores=[entry["scores"][at[s]] for s in ids])


def complete(path: str, algorithms, seeds: int) -> dict | None:
  """The sweep at `path` if it holds every algorithm with at least `seeds` seeds, on the data of this version
  of the twins' generator (a sweep on an earlier one's is run again, and its runs refuse to resume); else None."""
  try:
    result = compare.load_sweep(path)
  except compare.CompareError:
    return None
  if result.get("synthetic_generator") != synthetic.GENERATOR:
    return None
  return result if all(len(result["methods"].get(a, {}).get("scores", [])) >= seeds for a in algorithms) else None


def data_scale(config: str, sets) -> float:
  """The runs' `synthetic.scale` (the base config's, or --set's), so that the prior is of the data they saw."""
  given = dict(s.split("=", 1) for s in sets if "=" in s)
  return float(given.get("synthetic.scale", config_utils.load_config(config).synthetic.scale))


def table(result: dict, random_result: dict | None, prior: dict[str, float], algorithms) -> dict:
  """One twin and draw -> {"clients", "rows" (sweep.summarize's, the random backbone's last), "prior" (with
  its "mean"), "comparisons"}: the first algorithm against each other one on the client mean, Holm across them."""
  clients = result["clients"]
  missing = [a for a in algorithms if a not in result["methods"]]
  if missing:
    raise compare.CompareError(f"the sweep has no {missing}; rerun without --assemble_only")
  kept = dict(result, methods={a: result["methods"][a] for a in algorithms})
  rows = sweep.summarize(kept)
  if random_result is not None:
    rows += sweep.summarize(dict(random_result, methods={RANDOM_ROW: random_result["methods"][algorithms[0]]}))
  prior = dict({c: prior[c] for c in clients}, mean=float(np.mean([prior[c] for c in clients])))
  first = compare.scores(kept, algorithms[0])[:, -1]
  comparisons = []
  for a in algorithms[1:]:
    other = compare.scores(kept, a)[:, -1]
    comparisons.append(dict(method=a, **compare.welch(first, other), a_n=len(first), b_n=len(other)))
  for c, p in zip(comparisons, compare.holm([c["p"] for c in comparisons])):
    c["p_holm"] = float(p)
    c["verdict"] = {"wins": "wins", "losses": "loses", "ties": "no clear difference"}[outcome(c)]
    if p >= ALPHA and abs(c["diff"]) < CLOSE and min(c["a_n"], c["b_n"]) < CLOSE_SEEDS:
      c["verdict"] += f" (under {CLOSE:g} points: worth {CLOSE_SEEDS} seeds)"
  return dict(clients=clients, rows=rows, prior=prior, comparisons=comparisons)


def outcome(c: dict) -> str:
  """'wins', 'ties' or 'losses' for the first method in one comparison, by the Holm-adjusted p."""
  if c["p_holm"] >= ALPHA:
    return "ties"
  return "wins" if c["diff"] > 0 else "losses"


def table_markdown(t: dict, first: str) -> str:
  """The scores and the comparisons of one twin and draw."""
  cols = t["rows"][0]["cols"]
  lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for r in t["rows"]:
    cells = [f"{m:.1f}" if r["n"] == 1 else f"{m:.1f} +- {s:.1f}" for m, s in zip(r["mean"], r["std"])]
    lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
  lines.append("| text-only prior | " + " | ".join(f"{t['prior'][c]:.1f}" for c in cols) + " |")
  lines += ["", f"| {first} vs | difference (client mean) | 95% CI | p | Holm p | {first} |",
            "|---|---|---|---|---|---|"]
  for c in t["comparisons"]:
    lines.append(f"| {c['method']} | {c['diff']:+.1f} | [{c['lo']:+.1f}, {c['hi']:+.1f}] | {compare.format_p(c['p'])} "
                 f"| {compare.format_p(c['p_holm'])} | {c['verdict']} |")
  return "\n".join(lines) + "\n"


def tally(tables: dict) -> dict[str, dict[str, int]]:
  """Per compared method, over every twin and draw: how often the first method wins, shows no clear
  difference ("ties") and loses."""
  out = {}
  for per in tables.values():
    for t in per.values():
      for c in t["comparisons"]:
        out.setdefault(c["method"], dict(wins=0, ties=0, losses=0))[outcome(c)] += 1
  return out


def summary_markdown(tables: dict, draws, first: str) -> str:
  """One line per compared method: the difference and verdict on every twin and draw, and the tally."""
  cols = [(b, d) for b, per in tables.items() for d in draws if d in per]
  lines = [f"| {first} vs | " + " | ".join(f"{b.capitalize()} draw {d}" for b, d in cols)
           + " | wins / ties / losses |", "|---" * (len(cols) + 2) + "|"]
  short = {"wins": "wins", "ties": "tie", "losses": "loses"}
  for method, counts in tally(tables).items():
    cells = []
    for b, d in cols:
      c = next(c for c in tables[b][d]["comparisons"] if c["method"] == method)
      cells.append(f"{c['diff']:+.1f} {short[outcome(c)]}")
    lines.append(f"| {method} | " + " | ".join(cells)
                 + f" | {counts['wins']} / {counts['ties']} / {counts['losses']} |")
  return "\n".join(lines) + "\n"


def to_markdown(tables: dict, draws, tuned: int, first: str, command: str, left_out=()) -> str:
  seeds = sorted({r["n"] for per in tables.values() for t in per.values() for r in t["rows"]})
  n_comparisons = len(next(iter(next(iter(tables.values())).values()))["comparisons"])
  lines = [f"```bash\n{command}\n```", "",
           f"VQA score on each client's test split; mean +- sample std over {'/'.join(map(str, seeds))} training "
           f"seeds (ddof=1). {first} is its first evaluation variant (FedDAT: the DAT); '{RANDOM_ROW}': {first} "
           "with a randomly initialised backbone; text-only prior: the train split's most frequent answer for "
           f"the exact question string. Comparisons: {first} minus each method on the client mean, Welch's "
           f"95% interval and two-sided p over seeds, Holm-adjusted across the table's {n_comparisons} "
           f"comparisons; wins / loses: Holm p < {ALPHA}. Draw = `synthetic.seed`; draw {tuned} is the one the "
           "settings were picked on.", ""]
  if left_out:
    lines += ["Not in this report yet, their sweeps not all kept: " + "; ".join(left_out) + ".", ""]
  lines += ["## Summary\n",
           f"{first} minus each method on the client mean, with the verdict (tie: no clear difference).\n",
           summary_markdown(tables, draws, first)]
  for benchmark, per in tables.items():
    lines.append(f"## {benchmark.capitalize()}\n")
    for d in (d for d in draws if d in per):
      label = "tuned on" if d == tuned else "not tuned on"
      lines += [f"### Draw {d} ({label})\n", table_markdown(per[d], first)]
  return "\n".join(lines)


def scores_csv(tables: dict) -> str:
  """Long format: twin, draw, method, column (client or mean), mean, sample std, seeds."""
  out = io.StringIO()
  w = csv.writer(out)
  w.writerow(["benchmark", "draw", "method", "column", "mean", "std", "seeds"])
  for benchmark, per in tables.items():
    for d, t in per.items():
      for r in t["rows"]:
        for c, m, s in zip(r["cols"], r["mean"], r["std"]):
          w.writerow([benchmark, d, r["method"], c, f"{m:.3f}", f"{s:.3f}", r["n"]])
      for c in t["rows"][0]["cols"]:
        w.writerow([benchmark, d, "text-only prior", c, f"{t['prior'][c]:.3f}", "", ""])
  return out.getvalue()


def to_json(tables: dict, command: str, left_out=()) -> str:
  def rows(t):
    return [dict(method=r["method"], variant=r["variant"], seeds=r["n"], columns=r["cols"],
                 mean=[float(x) for x in r["mean"]], std=[float(x) for x in r["std"]]) for r in t["rows"]]
  return json.dumps(dict(command=command, summary=tally(tables), left_out=list(left_out), tables={
      b: {str(d): dict(clients=t["clients"], rows=rows(t), prior=t["prior"], comparisons=t["comparisons"])
          for d, t in per.items()} for b, per in tables.items()}), indent=1)


def keep_seeds(out: str, benchmark: str, d: int, algorithm: str, random: bool, seeds: int,
               required: bool) -> bool:
  """Makes the kept sweep of `algorithm` hold training seeds 0 .. seeds - 1: the seeds it lacks come from the
  workdir's finished sweep, or from a sweep of just those seeds (`--first_seed`), and are added to it. Returns
  whether it holds them; without them: an error if `required`, else False (nothing is run with --assemble_only)."""
  saved = kept_sweep(out, benchmark, d, algorithm, random)
  kept = complete(saved, [algorithm], 1)
  have = seed_ids(kept["methods"][algorithm]) if kept else []
  if have != list(range(len(have))):
    cli.fail(f"{saved}: seeds {have} are not 0..{len(have) - 1}; delete it and rerun")
  missing = list(range(len(have), seeds))
  if not missing:
    return True
  path = sweep_dir(FLAGS.workdir, benchmark, d, random)
  done = complete(path, [algorithm], 1)
  new = take_seeds(done, algorithm, missing)
  if new is None:
    if FLAGS.assemble_only:
      if required:
        cli.fail(f"{saved}: no finished sweep of {algorithm} x {seeds} seeds; run without --assemble_only")
      return False
    cmd = sweep_command(FLAGS.config, benchmark, d, [algorithm], len(missing), path, FLAGS.set, random, missing[0])
    print("method_tables: " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode:
      cli.fail(f"the sweep in {path} failed (its output is above); fix it and rerun: finished runs are kept")
    done = compare.load_sweep(path)
    new = take_seeds(done, algorithm, missing)
    if new is None:
      cli.fail(f"{path}: the sweep finished without {algorithm}'s seeds {missing}")
  if kept:
    try:
      merge([kept, done])
    except compare.CompareError as e:
      cli.fail(f"{saved}: {e}")
    old = kept["methods"][algorithm]
    new = dict(new, seeds=have + missing, scores=old["scores"] + new["scores"])
  os.makedirs(os.path.dirname(saved), exist_ok=True)
  reporting.write_atomic(saved, json.dumps(dict(kept or done, methods={algorithm: new}), indent=1))
  return True


def extend_close(out: str, benchmark: str, d: int) -> list[str]:
  """FedDAT and every method whose client mean is within CLOSE points of FedDAT's get --close_seeds seeds (their
  kept sweeps extended); repeated until no more qualify, since FedDAT's mean moves with its added seeds. Returns
  the methods that qualify but lack them (only with --assemble_only, which trains nothing)."""
  first, extended, lacking = FLAGS.algorithms[0], set(), []
  while True:
    result = merge([compare.load_sweep(kept_sweep(out, benchmark, d, a)) for a in FLAGS.algorithms])
    mean = {a: compare.scores(result, a)[:, -1].mean() for a in FLAGS.algorithms}
    close = [a for a in FLAGS.algorithms[1:] if abs(mean[first] - mean[a]) < CLOSE]
    todo = [a for a in ([first] + close if close else []) if a not in extended]
    if not todo:
      return lacking
    for a in todo:
      if not keep_seeds(out, benchmark, d, a, False, FLAGS.close_seeds, required=False):
        lacking.append(a)
      extended.add(a)


def main(argv):
  del argv
  if not all(d.isdigit() for d in FLAGS.draws) or not FLAGS.draws:
    cli.fail(f"--draws={','.join(FLAGS.draws)}: give draws of the twins as non-negative integers, e.g. 1,0")
  draws = [int(d) for d in FLAGS.draws]
  if FLAGS.seeds < 2:
    cli.fail(f"--seeds={FLAGS.seeds}: a comparison needs at least 2 seeds per method")
  if FLAGS.partial and not FLAGS.assemble_only:
    cli.fail("--partial: add --assemble_only (a run that trains makes every sweep it needs)")
  if len(FLAGS.algorithms) < 2:
    cli.fail("--algorithms: name FedDAT (first) and at least one method to compare it with")
  out = FLAGS.out or os.path.join(FLAGS.workdir, "tables")
  cli.check_output("--out", out + ".md")
  command = "python benchmarks/method_tables.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  scale = data_scale(FLAGS.config, FLAGS.set)  # the same for every twin and draw
  tables, left_out = {}, []
  for benchmark in FLAGS.benchmarks:
    tables[benchmark] = {}
    for d in draws:
      lacking = [a + (" on a random backbone" if random else "")  # one sweep per method, kept as it finishes
                 for random, algorithms in ((False, FLAGS.algorithms), (True, FLAGS.algorithms[:1]))
                 for a in algorithms
                 if not keep_seeds(out, benchmark, d, a, random, FLAGS.seeds, required=not FLAGS.partial)]
      if lacking:
        left_out.append(f"{benchmark} draw {d} (no {FLAGS.seeds} kept seeds of {', '.join(lacking)})")
        continue
      if FLAGS.close_seeds > FLAGS.seeds:  # with --assemble_only: from finished sweeps only
        short = extend_close(out, benchmark, d)
        if short:  # a table with fewer seeds than its close differences deserve is not reported
          why = f"no {FLAGS.close_seeds} kept seeds of {', '.join(short)}, under {CLOSE:g} points apart"
          if not FLAGS.partial:
            cli.fail(f"{benchmark} draw {d}: {why}; run without --assemble_only to train them, or pass "
                     f"--close_seeds={FLAGS.seeds} to report without them")
          left_out.append(f"{benchmark} draw {d} ({why})")
          continue
      try:
        result = merge([compare.load_sweep(kept_sweep(out, benchmark, d, a)) for a in FLAGS.algorithms])
      except compare.CompareError as e:
        cli.fail(f"{os.path.dirname(kept_sweep(out, benchmark, d, ''))}: {e}")
      random_result = compare.load_sweep(kept_sweep(out, benchmark, d, FLAGS.algorithms[0], True))
      prior = data_report.text_prior(benchmark, seed=d, scale=scale,
                                     cache=os.path.join(out + "_sweeps", f"{benchmark}_draw{d}_prior.json"))
      try:
        t = table(result, random_result, prior, FLAGS.algorithms)
      except compare.CompareError as e:
        cli.fail(f"{sweep_dir(FLAGS.workdir, benchmark, d)}: {e}")
      tables[benchmark][d] = t
  tables = {b: per for b, per in tables.items() if per}
  if not tables:
    cli.fail(f"--partial: no twin and draw has all its sweeps kept under {out}_sweeps; run without --assemble_only")
  for benchmark, per in tables.items():  # written once every table is there: an error above leaves no output
    for d, t in per.items():
      sweep.plot(t["rows"], f"{out}_{benchmark}_draw{d}.png", f"{benchmark}, draw {d}", t["prior"])
  md = to_markdown(tables, draws, FLAGS.tuned_draw, FLAGS.algorithms[0], command, left_out)
  reporting.write_atomic(out + ".md", "# FedDAT and its baselines on the synthetic twins\n\n" + md)
  reporting.write_atomic(out + ".json", to_json(tables, command, left_out))
  reporting.write_atomic(out + ".csv", scores_csv(tables))
  print(md)


if __name__ == "__main__":
  define_flags()
  app.run(main)
