r"""Calibration of the synthetic twins (issue #19, item 1): can the default backbone beat the text prior at all?

  python benchmarks/calibrate_twins.py --benchmarks=domain,function,scene,task --rounds=10 --eval_every=2 \
      --workdir=runs/calibrate_twins --out=runs/calibrate_twins/before

For every client of every twin it puts side by side:
  - the text-only prior: the per-question-string majority answer of the client's train split, scored on its
    test split (`feddat_jax.data.report.text_baselines`, the `question_only_score` of docs/heterogeneity.json);
  - centralized_full: every backbone weight trained on all clients' data pooled, `--rounds` passes over it, with
    ViLT's finetuning recipe (`--full_lr` 1e-4, the answer heads at `--full_head_lr_mult` 10 times that): at the
    adapters' lr 1e-3 full finetuning overwrites what pretraining taught (itm stays at chance on the Task twin);
  - centralized_adapter: the backbone frozen, adapters (and heads) trained the same way with the same budget, with
    --config's optimiser (the default job's).
A twin tests something only if full finetuning beats every client's prior by `--margin` points, and a frozen
backbone with adapters gets part of the way.

Each run is an ordinary `experiment.run` workdir, <workdir>/<twin>_data<seed>_r<rounds>/<algorithm>_seed<k> (the
layout of a `feddat_jax.sweep`), so a rerun reuses finished runs and resumes stopped ones; the priors are cached
in the twin's folder as prior.json. Writes calibration.md, calibration.csv and calibration.json to --out (the
command at the top of each; rewritten after every twin) and prints the short table. Config overrides pass
through as --config.<field>=... (the benchmark, rounds, eval_every and synthetic seed are set by this tool's
flags).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shlex
import sys
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from feddat_jax import cli, config_utils, experiment, reporting, sweep
from feddat_jax.data import report as report_lib
from feddat_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGORITHMS = ("centralized_full", "centralized_adapter")

DEFAULT_CONFIG = os.path.join(REPO, "configs", "vqa.py")  # the default job's config
FLAGS = flags.FLAGS

COLUMNS = ("twin", "client", "prior", "centralized_full", "centralized_adapter", "full_minus_prior",
           "adapter_minus_prior", "meets_margin")


def check_args(benchmarks, rounds: int, seeds: int, margin: float, config=None, full_optim=None) -> None:
  """Raises ValueError (one line) for arguments that would fail later, before anything is trained."""
  if config is not None and (config.data != "synthetic" or config.population != "natural"):
    raise ValueError(f"config data={config.data!r}, population={config.population!r}: the calibration compares "
                     "each synthetic twin's own clients with their text priors (data=synthetic, population=natural)")
  if not benchmarks:
    raise ValueError("--benchmarks is empty; name at least one of " + ",".join(synthetic.BENCHMARKS))
  unknown = [b for b in benchmarks if b not in synthetic.BENCHMARKS]
  if unknown:
    raise ValueError(f"--benchmarks: unknown benchmark(s) {unknown}; use some of {','.join(synthetic.BENCHMARKS)}")
  if len(set(benchmarks)) != len(benchmarks):
    raise ValueError(f"--benchmarks={','.join(benchmarks)} names a twin twice")
  if rounds < 1 or seeds < 1:
    raise ValueError(f"--rounds={rounds} and --seeds={seeds} must both be >= 1")
  for name, value in (full_optim or {}).items():
    if not (np.isfinite(value) and value > 0):
      raise ValueError(f"--full_{name}={value} must be a finite number > 0")
  if not np.isfinite(margin) or margin < 0:
    raise ValueError(f"--margin={margin} must be a finite number >= 0")


def calibration_rows(twins: dict, margin: float) -> list[dict]:
  """The table: one row per (twin, client) and a "mean" row per twin (unweighted over its clients).

  twins: {twin: {"prior": {client: score}, "centralized_full": {client: score}, "centralized_adapter": {...}}},
  clients in the prior's order. A client row's meets_margin is whether full - prior >= margin; the mean row's
  says how many of the twin's clients do ("3/5")."""
  rows = []
  for twin, t in twins.items():
    clients = list(t["prior"])
    cells = {c: (t["prior"][c], t["centralized_full"][c], t["centralized_adapter"][c]) for c in clients}
    cells["mean"] = tuple(float(np.mean([cells[c][i] for c in clients])) for i in range(3))
    passed = 0
    for c in clients + ["mean"]:
      prior, full, adapter = cells[c]
      ok = full - prior >= margin
      passed += ok and c != "mean"
      rows.append(dict(twin=twin, client=c, prior=prior, centralized_full=full, centralized_adapter=adapter,
                       full_minus_prior=full - prior, adapter_minus_prior=adapter - prior,
                       meets_margin=f"{passed}/{len(clients)}" if c == "mean" else ("yes" if ok else "no")))
  return rows


def _signed(x: float) -> str:
  """+1.5 / -0.3 / +0.0 (never "-0.0" for a difference that rounds to zero)."""
  return f"{round(x, 1) + 0.0:+.1f}"


def markdown(rows: list[dict], margin: float, command: str, settings: str) -> str:
  lines = ["# Calibration of the synthetic twins", "", "```bash", command, "```", "", settings, "",
           "| twin | client | text prior | centralized full | centralized adapter | full - prior | adapter - prior "
           f"| full - prior >= {margin:g} |", "|---" * 8 + "|"]
  for r in rows:
    name = "**mean**" if r["client"] == "mean" else r["client"]
    lines.append(f"| {r['twin']} | {name} | {r['prior']:.1f} | {r['centralized_full']:.1f} | "
                 f"{r['centralized_adapter']:.1f} | {_signed(r['full_minus_prior'])} | "
                 f"{_signed(r['adapter_minus_prior'])} | {r['meets_margin']} |")
  return "\n".join(lines) + "\n"


def table_csv(rows: list[dict], command: str) -> str:
  out = io.StringIO()
  out.write(f"# {command}\n")
  w = csv.writer(out)
  w.writerow(COLUMNS)
  for r in rows:
    w.writerow([r[k] if isinstance(r[k], str) else f"{r[k]:.2f}" for k in COLUMNS])
  return out.getvalue()


def short_table(rows: list[dict], margin: float) -> str:
  lines = [f"{'twin':<9}{'client':<11}{'prior':>7}{'full':>7}{'adapter':>8}{'full-pr':>8}{'adap-pr':>8}"
           f"  >= {margin:g}"]
  for r in rows:
    lines.append(f"{r['twin']:<9}{r['client']:<11}{r['prior']:7.1f}{r['centralized_full']:7.1f}"
                 f"{r['centralized_adapter']:8.1f}{_signed(r['full_minus_prior']):>8}"
                 f"{_signed(r['adapter_minus_prior']):>8}  {r['meets_margin']}")
  return "\n".join(lines)


def _run_info(run_dir: str) -> dict:
  """A finished run's learning curve (mean test score per evaluated round), last train loss and training time."""
  with open(os.path.join(run_dir, "results.json")) as f:
    results = json.load(f)
  variant = next(iter(results["final"]))
  train = [row for row in reporting.read_metrics(run_dir) if row.get("kind") == "train"]
  loss = [float(np.mean(list(r["loss"].values()))) for r in train if r["loss"]]
  return dict(curve={int(e["round"]): round(float(e["mean"][variant]), 2) for e in results["history"]},
              last_loss=loss[-1] if loss else None,
              train_seconds=round(float(sum(r["seconds"] for r in train)), 1))


def run_config(twin, algorithm: str, seed: int, full_optim: dict):
  """One run's config: the twin's, with `full_optim` (optim fields) for centralized_full."""
  config = sweep.run_config(twin, algorithm, seed)
  if algorithm == "centralized_full":
    config.optim.update(full_optim)
  return config


def calibrate_twin(base_config, benchmark: str, workdir: str, rounds: int, eval_every: int, seeds: int,
                   synthetic_seed: int, full_optim: dict) -> dict:
  """Runs (or reuses) both centralized algorithms on one twin -> {"prior", algorithm: {client: mean score over
  seeds}, "runs": {algorithm_seed<k>: _run_info}, "wall_seconds"}."""
  start = time.time()
  config = twin_config(base_config, benchmark, rounds, eval_every, synthetic_seed)
  twin_dir = os.path.join(workdir, f"{benchmark}_data{synthetic_seed}_r{rounds}")
  os.makedirs(twin_dir, exist_ok=True)
  prior = report_lib.text_prior(benchmark, seed=synthetic_seed, scale=config.synthetic.scale,
                                cache=os.path.join(twin_dir, "prior.json"))
  out = {"prior": prior}
  runs = [(a, s) for a in ALGORITHMS for s in range(seeds)]
  with tqdm(runs, unit="run", dynamic_ncols=True, file=sys.stderr, leave=False) as bar:
    for algorithm, seed in bar:
      bar.set_description(f"{benchmark} {algorithm} seed {seed}")
      results = experiment.run(run_config(config, algorithm, seed, full_optim),
                               os.path.join(twin_dir, f"{algorithm}_seed{seed}"))
      final = next(iter(results["final"].values()))  # the algorithm's own model (centralized: "shared")
      if set(final) != set(prior):  # e.g. a population of more clients than datasets
        raise experiment.ConfigError(f"{benchmark}: the runs' clients {list(final)} are not the twin's "
                                     f"{list(prior)}; calibrate with population=natural")
      for c in prior:  # the mean over seeds, accumulated
        out.setdefault(algorithm, {}).setdefault(c, 0.0)
        out[algorithm][c] += final[c] / seeds
  out["runs"] = {f"{a}_seed{s}": _run_info(os.path.join(twin_dir, f"{a}_seed{s}")) for a, s in runs}
  out["wall_seconds"] = round(time.time() - start, 1)
  return out


def twin_config(base_config, benchmark: str, rounds: int, eval_every: int, synthetic_seed: int):
  config = base_config.copy_and_resolve_references()
  config.benchmark, config.rounds, config.eval_every = benchmark, rounds, eval_every
  config.synthetic.seed = synthetic_seed
  return config


def command_line(argv) -> str:
  return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(argv[0], REPO)] + list(argv[1:]))


def define_flags() -> None:
  """This tool's own flags, defined when it runs (not on import: a test that imports it beside another tool
  with a --rounds or --out flag must not get a duplicate-flag error)."""
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Base config (default: the default job's); "
                                  "--config.<field>=... overrides pass through.", lock_config=True)
  flags.DEFINE_string("workdir", "runs/calibrate_twins", "Where the runs go (a folder per twin and budget).")
  flags.DEFINE_integer("seeds", 1, "Training seeds 0..N-1 per algorithm; scores are the mean over them.")
  flags.DEFINE_list("benchmarks", list(synthetic.BENCHMARKS), "Twins to calibrate, comma-separated.")
  flags.DEFINE_string("out", "", "Folder for calibration.md/.csv/.json (default: --workdir).")
  flags.DEFINE_integer("rounds", 10, "Training budget: passes over the pooled data (10: the default job's, and "
                       "the before table's; check the learning curves in calibration.md for whether it converged).")
  flags.DEFINE_integer("eval_every", 4, "Test evaluation every N rounds: the learning curve that shows whether the "
                       "score has stopped rising (each evaluation costs a fraction of a round).")
  flags.DEFINE_integer("synthetic_seed", 0, "The twins' data draw (config synthetic.seed).")
  flags.DEFINE_float("full_lr", 1e-4, "centralized_full's learning rate (ViLT finetunes at 1e-4).")
  flags.DEFINE_float("full_head_lr_mult", 10.0, "centralized_full's answer-head learning rate over --full_lr "
                     "(ViLT: 10).")
  flags.DEFINE_float("margin", 15.0, "Points by which centralized full finetuning must beat each client's prior.")
  flags.DEFINE_bool("json", False, "Print the calibration as JSON on stdout instead of the short table.")


def full_optim() -> dict:
  return {"lr": FLAGS.full_lr, "head_lr_mult": FLAGS.full_head_lr_mult}


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:  # the runs print their own progress; orbax INFO logs are noise
    logging.set_verbosity(logging.WARNING)
  benchmarks = [b.strip() for b in FLAGS.benchmarks]
  try:
    check_args(benchmarks, FLAGS.rounds, FLAGS.seeds, FLAGS.margin, FLAGS.config, full_optim())
    for b in benchmarks:  # every run's config (experiment.validate) before the first trains
      for a in ALGORITHMS:
        experiment.validate(run_config(twin_config(FLAGS.config, b, FLAGS.rounds, FLAGS.eval_every,
                                                   FLAGS.synthetic_seed), a, 0, full_optim()))
  except (ValueError, *experiment.user_errors()) as e:
    cli.fail(str(e))
  out_dir = FLAGS.out or FLAGS.workdir
  os.makedirs(out_dir, exist_ok=True)
  cli.check_output("--out", os.path.join(out_dir, "calibration.md"))
  command = command_line(sys.argv)  # as typed

  def calibrate():
    twins = {}
    with tqdm(benchmarks, unit="twin", dynamic_ncols=True, file=sys.stderr) as bar:
      for benchmark in bar:
        bar.set_description(f"twin {benchmark}")
        twins[benchmark] = calibrate_twin(FLAGS.config, benchmark, FLAGS.workdir, FLAGS.rounds, FLAGS.eval_every,
                                          FLAGS.seeds, FLAGS.synthetic_seed, full_optim())
        tqdm.write(f"calibrate: {benchmark} done in {twins[benchmark]['wall_seconds']:.0f} s", file=sys.stderr)
        # After every twin, so a long calibration stopped part-way still leaves the twins it finished.
        rows = write_outputs(twins, len(benchmarks), out_dir, command)
    return rows

  with contextlib.redirect_stdout(sys.stderr):  # the runs' progress lines: stdout is for the table (or JSON)
    rows = cli.run_or_exit(calibrate)
  print(json.dumps(json.load(open(os.path.join(out_dir, "calibration.json"))), indent=1) if FLAGS.json
        else short_table(rows, FLAGS.margin))


def write_outputs(twins: dict, planned: int, out_dir: str, command: str) -> list[dict]:
  """calibration.md/.csv/.json of the twins done so far (of `planned`) -> the table's rows."""
  rows = calibration_rows(twins, FLAGS.margin)
  c = FLAGS.config
  settings = (f"Centralized training on each twin's pooled clients, {FLAGS.rounds} rounds (passes over the pooled "
              f"data), {FLAGS.seeds} seed(s) (scores: mean over seeds), backbone {c.backbone} ({c.size}), lr "
              f"{FLAGS.full_lr:g} with the heads' at {FLAGS.full_head_lr_mult:g}x for full finetuning, "
              f"{c.optim.lr:g} (heads {c.optim.head_lr_mult:g}x) for adapters ({c.optim.schedule}), batch "
              f"{c.batch_size} per client, synthetic seed "
              f"{FLAGS.synthetic_seed}. VQA score on each client's test split. Text prior: the per-question-string "
              f"majority answer of the client's train split. Margin: {FLAGS.margin:g} points.")
  if len(twins) < planned:
    settings += f" **Partial: {len(twins)} of the {planned} twins asked for are done.**"
  md = markdown(rows, FLAGS.margin, command, settings)
  curves = ["", "Learning curves (mean test score over the twin's clients at each evaluated round), last training "
            "loss and training time of each run:", ""]
  for twin, t in twins.items():
    for name, info in t["runs"].items():
      curve = ", ".join(f"r{k} {v:.1f}" for k, v in info["curve"].items())
      curves.append(f"- {twin} {name}: {curve}; last loss {info['last_loss']:.3f}; {info['train_seconds']:.0f} s "
                    "training")
    curves.append(f"- {twin}: {t['wall_seconds']:.0f} s wall in this invocation (prior and runs; a reused run costs "
                  "only its set-up)")
  md += "\n".join(curves) + "\n"
  payload = dict(command=command, margin=FLAGS.margin, rounds=FLAGS.rounds, seeds=FLAGS.seeds,
                 full_optim=full_optim(), synthetic_seed=FLAGS.synthetic_seed, backbone=c.backbone, rows=rows, twins=twins)
  reporting.write_atomic(os.path.join(out_dir, "calibration.md"), md)
  reporting.write_atomic(os.path.join(out_dir, "calibration.csv"), table_csv(rows, command))
  reporting.write_atomic(os.path.join(out_dir, "calibration.json"), json.dumps(payload, indent=1))
  return rows


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_utils.parse_flags_or_exit)
