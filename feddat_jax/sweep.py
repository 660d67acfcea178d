"""Several algorithms x seeds on one benchmark, and the paper's table: rows = methods, columns = clients + mean.

  python -m feddat_jax.sweep --config=configs/vqa.py:benchmark=domain \
      --algorithms=feddat,fedavg_adapter,fedavg_lora --seeds=3 --workdir=runs/sweep_domain

Each run is an ordinary `experiment.run` in <workdir>/<algorithm>_seed<k> (so a rerun resumes or reuses it);
the table reports each method's first evaluation variant (FedDAT: the DAT, its personalised model) as
mean +- std over seeds, in table.md, table.csv and table.png.
"""
from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from feddat_jax import cli, config_utils, experiment, reporting

config_flags.DEFINE_config_file("config", None, "Base config, e.g. configs/vqa.py:benchmark=domain", lock_config=True)
flags.DEFINE_list("algorithms", ["feddat", "fedavg_adapter"], "Registry names, comma-separated.")
flags.DEFINE_integer("seeds", 1, "Training seeds 0..N-1 per algorithm.")
flags.DEFINE_string("workdir", None, "Sweep directory (default: runs/sweep_<benchmark>).")
flags.DEFINE_string("variant", "", "Evaluation variant to tabulate (default: each method's first).")
flags.mark_flags_as_required(["config"])


def _configs(base_config, algorithms, seeds: int):
  for algorithm in algorithms:
    for seed in range(seeds):
      config = base_config.copy_and_resolve_references()
      config.algorithm, config.seed = algorithm, seed
      yield algorithm, seed, config


def check_sweep(base_config, algorithms, seeds: int) -> None:
  """Every run's config checked (experiment.validate) before any runs: a typo in the last algorithm is not
  found after the first has trained."""
  if seeds < 1:
    raise experiment.ConfigError(f"--seeds={seeds} must be >= 1 (training seeds 0..N-1 per algorithm)")
  if not algorithms:
    raise experiment.ConfigError("--algorithms is empty; name at least one, e.g. feddat,fedavg_adapter")
  for _, _, config in _configs(base_config, algorithms, 1):
    experiment.validate(config)


def run_sweep(base_config, algorithms, seeds: int, workdir: str, variant: str = "") -> dict:
  """-> {algorithm: {"variant": v, "scores": [seed][client] -> score}, "clients": [...]}."""
  check_sweep(base_config, algorithms, seeds)
  table, clients = {}, None
  for algorithm in algorithms:
    per_seed = []
    for seed in range(seeds):
      config = base_config.copy_and_resolve_references()
      config.algorithm, config.seed = algorithm, seed
      results = experiment.run(config, os.path.join(workdir, f"{algorithm}_seed{seed}"))
      v = variant or next(iter(results["final"]))
      if v not in results["final"]:
        raise experiment.ConfigError(f"variant {v!r} not evaluated by {algorithm}; it has {list(results['final'])}")
      clients = results["clients"]
      per_seed.append([results["final"][v][c] for c in clients])
    table[algorithm] = {"variant": v, "scores": per_seed}
  return {"clients": clients, "methods": table}


def _rows(result):
  clients = result["clients"]
  for algorithm, entry in result["methods"].items():
    s = np.asarray(entry["scores"])  # [seeds, clients]
    s = np.concatenate([s, s.mean(1, keepdims=True)], 1)
    yield algorithm, entry["variant"], s.mean(0), s.std(0), len(s), clients + ["mean"]


def markdown(result, title: str) -> str:
  lines = []
  for algorithm, variant, mean, std, n, cols in _rows(result):
    if not lines:
      lines = [f"{title} (VQA score on test, " + (f"mean +- std over {n} seeds)" if n > 1 else "1 seed)"), "",
               "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    cell = (lambda m, s: f"{m:.1f}") if n == 1 else (lambda m, s: f"{m:.1f} +- {s:.1f}")  # no spread from 1 seed
    lines.append(f"| {algorithm} ({variant}) | " + " | ".join(cell(m, s) for m, s in zip(mean, std)) + " |")
  return "\n".join(lines) + "\n"


def table_csv(result) -> str:
  out = io.StringIO()
  w = csv.writer(out)
  for i, (algorithm, variant, mean, std, n, cols) in enumerate(_rows(result)):
    if i == 0:
      w.writerow(["method", "variant", "seeds"] + [f"{c}_{k}" for c in cols for k in ("mean", "std")])
    w.writerow([algorithm, variant, n] + [f"{x:.3f}" for pair in zip(mean, std) for x in pair])
  return out.getvalue()


def plot(result, path: str, title: str) -> None:
  import matplotlib.pyplot as plt
  rows = list(_rows(result))
  cols = rows[0][5]
  fig, ax = plt.subplots(figsize=(1.1 * len(cols) * max(1, len(rows) / 3) + 2, 3.8))
  width = 0.8 / len(rows)
  for i, (algorithm, _, mean, std, _, _) in enumerate(rows):
    ax.bar(np.arange(len(cols)) + i * width, mean, width, yerr=std, label=algorithm, capsize=2)
  ax.set_xticks(np.arange(len(cols)) + 0.4 - width / 2, cols, rotation=20)
  ax.set_ylabel("VQA score")
  ax.set_title(title)
  ax.legend(fontsize=7, ncol=2)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_reports(result, workdir: str, title: str) -> str:
  md = markdown(result, title)
  reporting.write_atomic(os.path.join(workdir, "table.md"), md)
  reporting.write_atomic(os.path.join(workdir, "table.csv"), table_csv(result))
  reporting.write_atomic(os.path.join(workdir, "sweep.json"), json.dumps(result, indent=2))
  plot(result, os.path.join(workdir, "table.png"), title)
  return md


def main(argv):
  del argv
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or os.path.join("runs", f"sweep_{config.benchmark}")
  def sweep():
    check_sweep(config, flags.FLAGS.algorithms, flags.FLAGS.seeds)  # every run's config, before the first runs
    os.makedirs(workdir, exist_ok=True)
    result = run_sweep(config, flags.FLAGS.algorithms, flags.FLAGS.seeds, workdir, flags.FLAGS.variant)
    return write_reports(result, workdir, f"{config.benchmark} benchmark ({config.data})")
  print(cli.run_or_exit(sweep))  # user errors, a full disk, Ctrl-C: one line


if __name__ == "__main__":
  app.run(main, flags_parser=config_utils.parse_flags_or_exit)
