r"""Client drift of finished runs side by side: per round, the mean over clients of the update norm and of its
cosine to the aggregated update (metrics.jsonl's "drift"), as a markdown table and a two-panel plot.

  python benchmarks/drift.py runs/tables/domain_draw0/{feddat,fedavg_adapter}_seed{0,1,2} \
      --table=docs/results/drift_domain.md --plot=docs/drift_domain.png --title="Domain draw 0"

Each argument is a run's workdir (`python -m feddat_jax.main ... --workdir=DIR`, or the per-seed workdirs that
`benchmarks/method_tables.py` keeps). Runs whose configs differ only in `seed` are seeds of one setting: the
table gives, per round, the mean over seeds of the client mean and its sample standard deviation over seeds;
the plot draws the seed mean bold, a band of one standard deviation, and each seed thin. Settings are labelled
by their algorithm (and the first workdir's name when two settings share one). The table is printed and, with
--table, written; --plot writes the figure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from feddat_jax import reporting  # noqa: E402

METRICS = ("norm", "cosine")


def load(workdir: str) -> tuple[dict, dict]:
  """-> (the run's config.json, `reporting.drift_curves` of its metrics.jsonl)."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  curves = reporting.drift_curves(reporting.read_metrics(workdir))
  if not curves["rounds"]:
    raise SystemExit(f"error: {workdir}/metrics.jsonl holds no client drift (an algorithm without `sent`?)")
  return config, curves


def group_seeds(workdirs: list[str]) -> dict[str, list[dict]]:
  """Workdirs -> {label: [drift curves of each seed]}: runs whose configs differ only in `seed` form one setting."""
  settings: list[tuple[dict, str, dict[int, dict]]] = []  # (config without seed, first workdir, {seed: curves})
  for w in workdirs:
    config, curves = load(w)
    seed = config.pop("seed", 0)
    for rest, _, seeds in settings:
      if rest == config:
        if seed in seeds:
          raise SystemExit(f"error: {w} repeats seed {seed} of a run already given; pass each run once")
        seeds[seed] = curves
        break
    else:
      settings.append((config, w, {seed: curves}))
  out: dict[str, list[dict]] = {}
  for config, first, seeds in settings:
    label = config["algorithm"]
    label = label if label not in out else f"{label} ({os.path.basename(os.path.normpath(first))})"
    out[label] = [seeds[s] for s in sorted(seeds)]
  return out


def seed_stats(seeds: list[dict]) -> dict:
  """Per round, over seeds, of each seed's client mean: {"rounds", "seeds" (the label's "N seed(s)"), m: {"mean",
  "std"}} (std: sample standard deviation, NaN with one seed; rounds only some seeds reached count those seeds)."""
  rounds = sorted({r for c in seeds for r in c["rounds"]})
  out: dict = {"rounds": rounds, "seeds": f"{len(seeds)} seed{'s' * (len(seeds) > 1)}"}
  values = {m: [] for m in METRICS}
  for rnd in rounds:
    have = [c for c in seeds if rnd in c["rounds"]]
    for m in METRICS:
      xs = [c[m]["mean"][c["rounds"].index(rnd)] for c in have]
      values[m].append([x for x in xs if not math.isnan(x)])
  for m in METRICS:
    out[m] = {"mean": [statistics.fmean(xs) if xs else math.nan for xs in values[m]],
              "std": [statistics.stdev(xs) if len(xs) > 1 else math.nan for xs in values[m]]}
  return out


def table(stats: dict[str, dict]) -> str:
  """Markdown from each setting's `seed_stats`: a row per round, for each setting the mean update norm and the
  mean cosine over its clients (mean ± sample std over seeds where it has several), then what the cells are."""
  def cell(s, m, i, spec):
    if i is None or math.isnan(s[m]["mean"][i]):
      return ""
    sd = s[m]["std"][i]
    return format(s[m]["mean"][i], spec) + ("" if math.isnan(sd) else f" ± {sd:{spec}}")

  head = "| round | " + " | ".join(f"{label} norm | {label} cosine" for label in stats) + " |"
  lines = [head, "|" + "---|" * (1 + 2 * len(stats))]
  for rnd in sorted({r for s in stats.values() for r in s["rounds"]}):
    cells = []
    for s in stats.values():
      i = s["rounds"].index(rnd) if rnd in s["rounds"] else None
      cells += [cell(s, "norm", i, ".4f"), cell(s, "cosine", i, ".3f")]
    lines.append(f"| {rnd} | " + " | ".join(cells) + " |")
  seeds = ", ".join(f"{label} {s['seeds']}" for label, s in stats.items())
  lines += ["", f"Means over each run's clients; ± is the sample standard deviation over seeds ({seeds})."]
  return "\n".join(lines) + "\n"


def plot(settings: dict[str, list[dict]], stats: dict[str, dict], path: str, title: str) -> None:
  """A colour per setting: its seed mean bold, a band of ± one sample std over seeds, each seed's mean thin."""
  def draw(axes):
    for k, (label, seeds) in enumerate(settings.items()):
      s = stats[label]
      for ax, m in zip(axes, METRICS):
        mean, sd = s[m]["mean"], s[m]["std"]
        ax.plot(s["rounds"], mean, color=f"C{k}", lw=2, label=f"{label} ({s['seeds']})")
        if len(seeds) > 1:
          ax.fill_between(s["rounds"], [a - b for a, b in zip(mean, sd)], [a + b for a, b in zip(mean, sd)],
                          color=f"C{k}", alpha=0.2, lw=0)
          for c in seeds:
            ax.plot(c["rounds"], c[m]["mean"], color=f"C{k}", lw=0.7, alpha=0.4)
  reporting.drift_figure(draw, path, title)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+", help="finished runs' workdirs")
  parser.add_argument("--table", help="write the markdown table here")
  parser.add_argument("--plot", help="write the figure here (PNG)")
  parser.add_argument("--title", default="client drift", help="the plot's title")
  args = parser.parse_args(argv)
  settings = group_seeds(args.workdirs)
  stats = {label: seed_stats(seeds) for label, seeds in settings.items()}
  text = table(stats)
  print(text, end="")
  if args.table:
    reporting.write_atomic(args.table, text)
  if args.plot:
    plot(settings, stats, args.plot, args.title)


if __name__ == "__main__":
  main()
