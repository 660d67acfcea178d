r"""Redraws docs/results' tables and figures from the files stored there, without the runs.

  python scripts/regenerate_results.py [docs/results] [--prior=docs/heterogeneity.json]

The sweeps' per-seed scores (sweep.json) are not stored in docs/results, only each table's CSV: per method and
column the mean and the spread over seeds, and per comparison both sides' mean and sample std, the difference,
its Welch 95% interval and p. That is all a table and its figure show, so:
  - a method table (<name>.csv with method,variant,seeds,...): written before the spread became the sample std
    (its .md says "mean +- std over"), its population std is rescaled to the sample std, sqrt(n / (n - 1));
    .md and .csv are rewritten; where a figure (.png) exists (the four benchmark tables) it is redrawn and
    the text-only prior of the benchmark (from --prior, the JSON of python -m feddat_jax.data.report --json)
    becomes a reference line there and the table's last row;
  - a comparison (<name>.csv with client,...): the seeds per side come from its .md, the Holm-adjusted p is
    computed from the stored p-values (4 decimals); .md, .csv and .png are rewritten (the figure then has no
    per-seed dots: those scores are not stored).
Running it again changes nothing (a file already holding the sample std is read as such).
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import sys

from feddat_jax import compare, reporting, sweep

TABLE_TITLE = re.compile(r"^(.*) \(VQA score on test[,;]")
COMPARE_HEAD = re.compile(r"^(?:Seeds (\S+) \(START:STOP\) of each sweep\. )?.* \((\d+) seeds\) vs .* \((\d+) seeds\)")


def _rest(md: str) -> str:
  """What a stored .md holds after its table (kept as it is)."""
  lines = md.splitlines()
  last = max(i for i, line in enumerate(lines) if line.startswith("|"))
  rest = "\n".join(lines[last + 1:]).strip("\n")
  return ("\n" + rest + "\n") if rest else ""


def method_table(base: str, prior_file: str) -> str:
  md = open(base + ".md").read()
  title = TABLE_TITLE.match(md.splitlines()[0])
  if title is None:
    raise ValueError(f"{base}.md: no 'title (VQA score on test...' first line")
  ddof = 1 if "+- is the sample std" in md.splitlines()[0] else 0
  rows = sweep.read_table_csv(base + ".csv", ddof=ddof)
  benchmark = title[1].split()[0]
  prior = None
  if prior_file and benchmark in ("domain", "function", "scene", "task") and "synthetic" in title[1]:
    prior = sweep.read_prior(prior_file, benchmark, rows[0]["cols"][:-1])
  figure = os.path.exists(base + ".png")  # the method tables of README (one per benchmark)
  prior = prior if figure else None  # the single-method tables stay as they are, one row
  reporting.write_atomic(base + ".md", sweep.markdown(rows, title[1], prior) + _rest(md))
  reporting.write_atomic(base + ".csv", sweep.table_csv(rows))
  if figure:
    sweep.plot(rows, base + ".png", title[1], prior)
  return (f"{base}: method table, {'sample' if ddof else 'population -> sample'} std"
          + (", text-only prior, figure" if figure else ""))


def comparison(base: str) -> str:
  md = open(base + ".md").read()
  head = COMPARE_HEAD.match(md.splitlines()[0])
  if head is None:
    raise ValueError(f"{base}.md: no 'A (n seeds) vs B (m seeds)' first line")
  seeds, n = head[1] or "", (int(head[2]), int(head[3]))
  rows, labels = compare.read_table_csv(base + ".csv", n)
  reporting.write_atomic(base + ".md", compare.markdown(rows, labels, n, seeds) + _rest(md))
  reporting.write_atomic(base + ".csv", compare.table_csv(rows, labels))
  compare.plot(rows, labels, base + ".png", compare.figure_title(labels, n, seeds))
  return f"{base}: comparison, figure"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("results", nargs="?", default="docs/results", help="folder of stored tables")
  parser.add_argument("--prior", default="docs/heterogeneity.json",
                      help="python -m feddat_jax.data.report --json output ('' for none)")
  args = parser.parse_args(argv)
  prior = args.prior if args.prior and os.path.isfile(args.prior) else ""
  for name in sorted(os.listdir(args.results)):
    base = os.path.join(args.results, name[:-len(".csv")])
    if not name.endswith(".csv") or not os.path.exists(base + ".md"):
      continue
    with open(base + ".csv") as f:
      header = next(csv.reader(f))
    if header[:3] == ["method", "variant", "seeds"]:
      print(method_table(base, prior))
    elif header[0] == "client":
      print(comparison(base))
  return 0


if __name__ == "__main__":
  sys.exit(main())
