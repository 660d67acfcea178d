r"""Several algorithms x seeds on one benchmark, and the paper's table: rows = methods, columns = clients + mean.

  python -m feddat_jax.sweep --config=configs/vqa.py:benchmark=domain \
      --algorithms=feddat,fedavg_adapter,fedavg_lora --seeds=3 --workdir=runs/sweep_domain

Each run is an ordinary `experiment.run` in <workdir>/<algorithm>_seed<k> (so a rerun resumes or reuses it);
the table reports each method's first evaluation variant (FedDAT: the DAT, its personalised model) as
mean +- sample std over seeds (ddof=1, as feddat_jax.compare), in table.md, table.csv and table.png.
--prior=docs/heterogeneity.json (written by python -m feddat_jax.data.report --json) adds the text-only prior
(the per-question-string majority answer) to the table and as a reference line in the figure.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from feddat_jax import cli, config_utils, experiment, reporting, workdir_lock


def run_config(base_config, algorithm: str, seed: int):
  """One run's config: the base with its algorithm and training seed (what fingerprints the run's workdir)."""
  config = base_config.copy_and_resolve_references()
  config.algorithm, config.seed = algorithm, seed
  return config


def _configs(base_config, algorithms, seeds: int, first_seed: int = 0):
  for algorithm in algorithms:
    for seed in range(first_seed, first_seed + seeds):
      yield algorithm, seed, run_config(base_config, algorithm, seed)


def check_sweep(base_config, algorithms, seeds: int, first_seed: int = 0) -> None:
  """Every run's config checked (experiment.validate) before any runs: a typo in the last algorithm is not
  found after the first has trained."""
  if seeds < 1:
    raise experiment.ConfigError(f"--seeds={seeds} must be >= 1 (training seeds 0..N-1 per algorithm)")
  if first_seed < 0:
    raise experiment.ConfigError(f"--first_seed={first_seed} must be >= 0")
  if not algorithms:
    raise experiment.ConfigError("--algorithms is empty; name at least one, e.g. feddat,fedavg_adapter")
  for _, _, config in _configs(base_config, algorithms, 1):
    experiment.validate(config)


def run_sweep(base_config, algorithms, seeds: int, workdir: str, variant: str = "",
              vectorize_seeds: bool = False, first_seed: int = 0) -> dict:
  """-> {"clients": [...], "methods": {algorithm: {"variant": v, "seeds": [seed ids], "scores": [seed][client]
  -> score}}, and on synthetic data "synthetic_generator": the generator's version the runs' data came from
  (`synthetic.GENERATOR`)}. The training seeds are first_seed .. first_seed + seeds - 1 (a later call with
  first_seed = N adds seeds to a sweep of N: benchmarks/method_tables.py).

  vectorize_seeds: each algorithm's seeds train as one compiled program, their states stacked on a seeds axis
  (`experiment.run_seeds`); the same workdirs, reports and results as separate runs, to float rounding."""
  check_sweep(base_config, algorithms, seeds, first_seed)
  seed_ids = list(range(first_seed, first_seed + seeds))
  if vectorize_seeds:  # every algorithm's seeds, before the first runs
    for algorithm in algorithms:
      experiment.check_seeds([c for _, _, c in _configs(base_config, [algorithm], seeds, first_seed)])
  table, clients = {}, None
  total = len(algorithms) * seeds
  with tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stderr) as bar:
    for algorithm in algorithms:
      names = [f"{algorithm}_seed{seed}" for seed in seed_ids]
      configs = [run_config(base_config, algorithm, seed) for seed in seed_ids]
      if vectorize_seeds:
        bar.set_description(f"runs {bar.n + 1}-{bar.n + seeds}/{total} {algorithm} x {seeds} seeds")
        tqdm.write(f"sweep: runs {bar.n + 1}-{bar.n + seeds}/{total}: {', '.join(names)} as one program",
                   file=sys.stderr)
        all_results = experiment.run_seeds(configs, [os.path.join(workdir, name) for name in names])
        bar.update(seeds)
      else:
        all_results = []
        for name, config in zip(names, configs):
          bar.set_description(f"run {bar.n + 1}/{total} {name}")
          tqdm.write(f"sweep: run {bar.n + 1}/{total}: {name}", file=sys.stderr)
          all_results.append(experiment.run(config, os.path.join(workdir, name)))
          bar.update(1)
      per_seed = []
      for results in all_results:
        v = variant or next(iter(results["final"]))
        if v not in results["final"]:
          raise experiment.ConfigError(f"variant {v!r} not evaluated by {algorithm}; it has {list(results['final'])}")
        clients = results["clients"]
        per_seed.append([results["final"][v][c] for c in clients])
      table[algorithm] = {"variant": v, "seeds": seed_ids, "scores": per_seed}
  out = {"clients": clients, "methods": table}
  if base_config.data == "synthetic":  # a reader can tell a sweep on data of an earlier generator
    from feddat_jax.data import synthetic
    out["synthetic_generator"] = synthetic.GENERATOR
  return out


def summarize(result) -> list[dict]:
  """-> per method: {method, variant, n (seeds), cols (clients + "mean"), mean, std}; std is the SAMPLE std over
  seeds (ddof=1; NaN from one seed), the "+-" of every table of this project."""
  rows = []
  for algorithm, entry in result["methods"].items():
    s = np.asarray(entry["scores"], np.float64)  # [seeds, clients]
    s = np.concatenate([s, s.mean(1, keepdims=True)], 1)
    std = s.std(0, ddof=1) if len(s) > 1 else np.full(s.shape[1], np.nan)
    rows.append(dict(method=algorithm, variant=entry["variant"], n=len(s), cols=list(result["clients"]) + ["mean"],
                     mean=s.mean(0), std=std))
  return rows


def read_prior(spec: str, benchmark: str, clients: list[str] | None) -> dict[str, float] | None:
  """--prior -> {client: score, ..., "mean": unweighted mean over clients}, or None for "".

  spec: comma-separated scores in the clients' order, or a JSON file of `feddat_jax.data.report --json`
  (a list of benchmark reports; the entry of `benchmark`, its question_only_score per client). clients None
  (not known yet, before the runs): only the file and the numbers are checked; -> None."""
  if not spec:
    return None
  if os.path.isfile(spec):
    with open(spec) as f:
      reports = json.load(f)
    reports = reports if isinstance(reports, list) else [reports]
    report = next((r for r in reports if r.get("benchmark") == benchmark), None)
    if report is None:
      raise ValueError(f"--prior={spec}: no report of benchmark {benchmark!r} there (it has "
                       f"{[r.get('benchmark') for r in reports]})")
    by_name = {c["name"]: float(c["question_only_score"]) for c in report["clients"]}
    if clients is None:
      return None
    if set(by_name) != set(clients):
      raise ValueError(f"--prior={spec}: its {benchmark} clients {sorted(by_name)} are not the sweep's "
                       f"{sorted(clients)}")
  else:
    try:
      values = [float(x) for x in spec.split(",")]
    except ValueError:
      raise ValueError(f"--prior={spec!r} is neither a file nor comma-separated numbers") from None
    if clients is None:
      return None
    if len(values) != len(clients):
      raise ValueError(f"--prior={spec!r} gives {len(values)} scores for {len(clients)} clients ({clients})")
    by_name = dict(zip(clients, values))
  prior = {c: by_name[c] for c in clients}
  prior["mean"] = float(np.mean([prior[c] for c in clients]))
  return prior


def spread_caption(ns) -> str:
  """The "+-" sentence of a table's caption: the seeds behind it and what the spread is."""
  ns = sorted(set(ns))
  if ns == [1]:
    return "1 seed, no spread"
  seeds = f"{ns[0]} seeds" if len(ns) == 1 else f"{'/'.join(map(str, ns))} seeds per method"
  return f"mean +- std; +- is the sample std over {seeds} (ddof=1)"


def markdown(rows: list[dict], title: str, prior: dict | None = None) -> str:
  cols = rows[0]["cols"]
  lines = [f"{title} (VQA score on test; {spread_caption(r['n'] for r in rows)})"
           + ("; last row: the text-only prior (per-question-string majority answer)" if prior else ""), "",
           "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for r in rows:
    cells = [f"{m:.1f}" if r["n"] == 1 else f"{m:.1f} +- {s:.1f}" for m, s in zip(r["mean"], r["std"])]
    lines.append(f"| {r['method']} ({r['variant']}) | " + " | ".join(cells) + " |")
  if prior:
    lines.append("| text-only prior | " + " | ".join(f"{prior[c]:.1f}" for c in cols) + " |")
  return "\n".join(lines) + "\n"


def table_csv(rows: list[dict]) -> str:
  """One row per method: method, variant, seeds, then <col>_mean and <col>_std (sample std, ddof=1)."""
  out = io.StringIO()
  w = csv.writer(out)
  for i, r in enumerate(rows):
    if i == 0:
      w.writerow(["method", "variant", "seeds"] + [f"{c}_{k}" for c in r["cols"] for k in ("mean", "std")])
    w.writerow([r["method"], r["variant"], r["n"]] + [f"{x:.3f}" for pair in zip(r["mean"], r["std"]) for x in pair])
  return out.getvalue()


def read_table_csv(path: str, ddof: int = 1) -> list[dict]:
  """A table.csv back into `summarize`'s rows; ddof=0 for a file written before the std became the sample std
  (its population std is rescaled by sqrt(n / (n - 1)))."""
  with open(path) as f:
    records = list(csv.DictReader(f))
  cols = [k[:-len("_mean")] for k in records[0] if k.endswith("_mean")]
  rows = []
  for rec in records:
    n = int(rec["seeds"])
    std = np.array([float(rec[f"{c}_std"]) for c in cols])
    if ddof == 0:
      std = std * np.sqrt(n / (n - 1)) if n > 1 else np.full(len(cols), np.nan)
    rows.append(dict(method=rec["method"], variant=rec["variant"], n=n, cols=cols,
                     mean=np.array([float(rec[f"{c}_mean"]) for c in cols]), std=std))
  return rows


def plot(rows: list[dict], path: str, title: str, prior: dict | None = None) -> None:
  """One panel per client and the mean (two rows from 4 on), each with its own y axis zoomed to its scores
  (clients differ by tens of points, methods by one or two), a bar per method with the sample std over seeds as
  error bar, the text-only prior as a dashed line, one legend beside the panels."""
  plt = reporting.pyplot()
  cols = rows[0]["cols"]
  x = np.arange(len(rows))
  grid_rows = 1 if len(cols) <= 3 else 2
  grid_cols = -(-len(cols) // grid_rows)
  spare = grid_rows * grid_cols > len(cols)  # the legend's place; else beside the panels
  fig, axes = plt.subplots(grid_rows, grid_cols, figsize=(2.5 * grid_cols + (0.4 if spare else 3.2),
                                                          3.2 * grid_rows + 0.6), squeeze=False)
  axes = axes.ravel()
  for ax in axes[len(cols):]:
    ax.set_visible(False)
  for j, (ax, col) in enumerate(zip(axes, cols)):
    mean = np.array([r["mean"][j] for r in rows])
    std = np.array([r["std"][j] if r["n"] > 1 else 0.0 for r in rows])
    handles = ax.bar(x, mean, 0.8, yerr=std, capsize=2, color=[f"C{i % 10}" for i in range(len(rows))],
                     error_kw=dict(lw=0.8))
    lo, hi = float(np.min(mean - std)), float(np.max(mean + std))
    if prior:
      line = ax.axhline(prior[col], color="black", ls="--", lw=1.2)
      lo, hi = min(lo, prior[col]), max(hi, prior[col])
    pad = 0.12 * (hi - lo) + 0.3
    ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
    ax.set_xticks([])
    ax.set_title(col, fontsize=10, fontweight="bold" if col == "mean" else None)
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(axis="y", labelsize=8)
  for ax in axes[::grid_cols]:
    ax.set_ylabel("VQA score (zoomed)")
  labels = [f"{r['method']} ({r['variant']})" for r in rows]
  handles = list(handles) + ([line] if prior else [])
  labels += ["text-only prior"] if prior else []
  n = sorted({r["n"] for r in rows})
  caption = ("error bars: sample std over " + "/".join(map(str, n)) + " seeds") if n != [1] else "1 seed, no spread"
  fig.suptitle(title)
  if len(axes) > len(cols):  # an empty panel: the legend goes there
    spare = axes[-1]
    spare.set_visible(True)
    spare.axis("off")
    spare.legend(handles, labels, fontsize=8, title=caption, title_fontsize=8, loc="center", frameon=False)
    fig.tight_layout()
  else:  # beside the panels
    fig.legend(handles, labels, fontsize=8, title=caption, title_fontsize=8, loc="center right", frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.9 / fig.get_figwidth(), 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_reports(result, workdir: str, title: str, prior: dict | None = None) -> str:
  rows = summarize(result)
  md = markdown(rows, title, prior)
  reporting.write_atomic(os.path.join(workdir, "table.md"), md)
  reporting.write_atomic(os.path.join(workdir, "table.csv"), table_csv(rows))
  reporting.write_atomic(os.path.join(workdir, "sweep.json"), json.dumps(result, indent=2))
  plot(rows, os.path.join(workdir, "table.png"), title, prior)
  return md


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # as main: the runs print their own progress; orbax INFO logs are noise
    logging.set_verbosity(logging.WARNING)
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or os.path.join("runs", f"sweep_{config.benchmark}")
  try:  # a bad --prior fails now, not after the runs
    read_prior(flags.FLAGS.prior, config.benchmark, None)
  except (ValueError, OSError) as e:
    cli.fail(str(e))

  def sweep():
    check_sweep(config, flags.FLAGS.algorithms, flags.FLAGS.seeds, flags.FLAGS.first_seed)  # before the first runs
    os.makedirs(workdir, exist_ok=True)
    # One sweep per workdir: two (say of different methods) would each write sweep.json, the later over the
    # earlier's results. Each run takes its own run directory's lock as well.
    workdir_lock.acquire(workdir)
    try:
      result = run_sweep(config, flags.FLAGS.algorithms, flags.FLAGS.seeds, workdir, flags.FLAGS.variant,
                         flags.FLAGS.vectorize_seeds, flags.FLAGS.first_seed)
      try:  # its clients against the runs'
        prior = read_prior(flags.FLAGS.prior, config.benchmark, result["clients"])
      except (ValueError, OSError) as e:
        cli.fail(str(e))
      return write_reports(result, workdir, f"{config.benchmark} benchmark ({config.data})", prior)
    finally:
      workdir_lock.release(workdir)
  print(cli.run_or_exit(sweep))  # user errors, a full disk, Ctrl-C: one line


def define_flags():
  """The command line's flags, defined only when run as a module (so importing it, as the tests and
  benchmarks/method_tables.py do, adds no global absl flags that could clash with theirs)."""
  config_flags.DEFINE_config_file("config", None, "Base config, e.g. configs/vqa.py:benchmark=domain", lock_config=True)
  flags.DEFINE_list("algorithms", ["feddat", "fedavg_adapter"], "Registry names, comma-separated.")
  flags.DEFINE_integer("seeds", 1, "Training seeds per algorithm: first_seed .. first_seed + N - 1.")
  flags.DEFINE_integer("first_seed", 0, "The first training seed (e.g. 3 with --seeds=2 adds seeds 3 and 4 to a "
                       "sweep of 3 seeds).")
  flags.DEFINE_string("workdir", None, "Sweep directory (default: runs/sweep_<benchmark>).")
  flags.DEFINE_string("variant", "", "Evaluation variant to tabulate (default: each method's first).")
  flags.DEFINE_string("prior", "", "Text-only prior per client, for the table and a reference line in the figure: "
                      "a JSON written by python -m feddat_jax.data.report --json (e.g. docs/heterogeneity.json), or "
                      "one score per client, comma-separated (default: none).")
  flags.DEFINE_bool("vectorize_seeds", False, "Train each algorithm's seeds as one compiled program, their states "
                    "stacked on a seeds axis (docs/populations.md); same workdirs and reports as separate runs.")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_utils.parse_flags_or_exit)
