r"""Client drift of finished runs side by side: per round, the mean over clients of the update norm and of its
cosine to the aggregated update (metrics.jsonl's "drift"), as a markdown table and a two-panel plot.

  python benchmarks/drift.py /tmp/drift_feddat /tmp/drift_fedavg --table=docs/results/drift_function.md \
      --plot=docs/drift_function.png

Each argument is a run's workdir (`python -m feddat_jax.main ... --workdir=DIR`); runs are labelled by their
config's algorithm (and the workdir's name when two share one). The table is printed and, with --table,
written; --plot writes the figure (a colour per run: its mean bold, its clients thin).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from feddat_jax import reporting  # noqa: E402


def load(workdir: str) -> tuple[str, dict]:
  """-> (the run's algorithm, `reporting.drift_curves` of its metrics.jsonl)."""
  with open(os.path.join(workdir, "config.json")) as f:
    label = json.load(f)["algorithm"]
  curves = reporting.drift_curves(reporting.read_metrics(workdir))
  if not curves["rounds"]:
    raise SystemExit(f"error: {workdir}/metrics.jsonl holds no client drift (an algorithm without `sent`?)")
  return label, curves


def table(runs: dict[str, dict]) -> str:
  """Markdown: a row per round, for each run the mean update norm and the mean cosine over its clients."""
  fmt = lambda x, spec: "" if x is None or math.isnan(x) else format(x, spec)
  head = "| round | " + " | ".join(f"{label} norm | {label} cosine" for label in runs) + " |"
  lines = [head, "|" + "---|" * (1 + 2 * len(runs))]
  rounds = sorted({r for c in runs.values() for r in c["rounds"]})
  for rnd in rounds:
    cells = []
    for c in runs.values():
      i = c["rounds"].index(rnd) if rnd in c["rounds"] else None
      cells += [fmt(None if i is None else c["norm"]["mean"][i], ".4f"),
                fmt(None if i is None else c["cosine"]["mean"][i], ".3f")]
    lines.append(f"| {rnd} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+", help="finished runs' workdirs")
  parser.add_argument("--table", help="write the markdown table here")
  parser.add_argument("--plot", help="write the figure here (PNG)")
  parser.add_argument("--title", default="client drift", help="the plot's title")
  args = parser.parse_args(argv)
  runs = {}
  for w in args.workdirs:
    label, curves = load(w)
    runs[label if label not in runs else f"{label} ({os.path.basename(os.path.normpath(w))})"] = curves
  text = table(runs)
  print(text, end="")
  if args.table:
    reporting.write_atomic(args.table, text)
  if args.plot:
    reporting.plot_drift(runs, args.plot, args.title)


if __name__ == "__main__":
  main()
