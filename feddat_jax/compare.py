"""Is A better than B? Per-client score differences between two sweeps, over seeds, with Welch's t-test;
and is A steadier across seeds than B (Brown-Forsythe test of equal spread)?

  python -m feddat_jax.compare runs/seeds10_function_pretrained runs/seeds10_function_random \
      --labels=pretrained,random --out=docs/results/function_pretrained_vs_random

Two methods of one sweep: give its directory twice with --methods, e.g.
  python -m feddat_jax.compare runs/sweep_scene runs/sweep_scene --methods=feddat,fedavg_adapter
A range of seeds of both sweeps, e.g. a second look on seeds 10..19 after a first on 0..9: --seed_range=10:20.

Reads each sweep directory's sweep.json (written by `feddat_jax.sweep`), takes one method from each (default:
the only one, or --methods=a,b; labels default to the methods when both sides are one sweep, else the
directories' names) and, per client and for the client mean, reports both sides' mean and sample
std over seeds, the difference A - B with its 95% confidence interval and the two-sided p-value of Welch's
unequal-variance t-test (seeds are independent runs; the two sweeps' seeds are not paired), and the p-value of
the Brown-Forsythe test that both sides spread equally over seeds (Levene's test about the median: robust to
outlying seeds; small p: one side's runs are steadier). Writes <out>.md,
<out>.csv and <out>.png (every seed's score per client, both sides), and prints the markdown.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import sys

import numpy as np
from absl import app, flags
from scipy import stats

from feddat_jax import reporting

flags.DEFINE_list("labels", [], "Names of the two sides in the table (default: the methods when both sides are "
                  "one sweep, else the sweep directories' names).")
flags.DEFINE_list("methods", [], "The method to take from each sweep (default: each sweep's only method).")
flags.DEFINE_string("out", None, "Output path without extension (default: <first sweep dir>/compare).")
flags.DEFINE_string("seed_range", "", "Seeds to compare on both sides, START:STOP (seeds START..STOP-1; default: "
                    "all), e.g. 10:20 to test on seeds that an earlier look did not use.")


class CompareError(ValueError):
  """Bad input to the comparison: a one-line message naming the problem and the fix."""


def load_sweep(path: str) -> dict:
  """A sweep directory (or its sweep.json) -> the result `feddat_jax.sweep.run_sweep` returns."""
  file = path if path.endswith(".json") else os.path.join(path, "sweep.json")
  if not os.path.isfile(file):
    raise CompareError(f"{file} does not exist; pass a directory written by python -m feddat_jax.sweep")
  try:
    with open(file) as f:
      result = json.load(f)
  except json.JSONDecodeError as e:
    raise CompareError(f"{file} is not JSON ({e}); rerun python -m feddat_jax.sweep there") from e
  if not isinstance(result, dict) or not {"clients", "methods"} <= set(result):
    raise CompareError(f"{file} is not a sweep result (no clients/methods); rerun python -m feddat_jax.sweep there")
  return result


def seed_range(spec: str) -> tuple[int, int | None]:
  """"START:STOP" (either may be empty) -> (start, stop or None); "" -> every seed: (0, None)."""
  if not spec:
    return 0, None
  m = re.fullmatch(r"(\d*):(\d*)", spec.strip())
  if m is None or (m[2] and int(m[2]) <= int(m[1] or 0)):
    raise CompareError(f"--seed_range={spec!r} is not START:STOP with START < STOP (e.g. "
                       "--seed_range=10:20)")
  return int(m[1] or 0), int(m[2]) if m[2] else None


def scores(result: dict, method: str = "", name: str = "", span: tuple[int, int | None] = (0, None)) -> np.ndarray:
  """-> float [seeds, clients + 1] (the last column is the client mean) of `method` (default: the only one),
  seeds span = (start, stop) of the sweep (`seed_range`)."""
  methods = result["methods"]
  if not method:
    if len(methods) != 1:
      raise CompareError(f"{name} holds methods {sorted(methods)}; pick one with --methods")
    method = next(iter(methods))
  if method not in methods:
    raise CompareError(f"{name} has no method {method!r}; it has {sorted(methods)}")
  s = np.asarray(methods[method]["scores"], np.float64)
  start, stop = span
  if (stop or start + 1) > len(s):
    raise CompareError(f"{name} ({method}) has {len(s)} seeds; --seed_range={start}:{stop or ''} asks for "
                       "more (extend the sweep with a larger --seeds)")
  s = s[start:stop]
  if s.shape[0] < 2:
    raise CompareError(f"{name} ({method}) has {s.shape[0]} seed; a comparison needs >= 2 per side (--seeds)")
  return np.concatenate([s, s.mean(1, keepdims=True)], 1)


def welch(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> dict:
  """Welch's t-test of mean(a) - mean(b): diff, its `level` confidence interval (lo, hi), p (two-sided), df."""
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  diff, se = a.mean() - b.mean(), np.sqrt(va + vb)
  if se == 0:  # both sides constant: the difference is exact
    return dict(diff=diff, lo=diff, hi=diff, p=1.0 if diff == 0 else 0.0, df=float("inf"))
  df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
  half = stats.t.ppf(0.5 + level / 2, df) * se
  p = 2 * stats.t.sf(abs(diff) / se, df)
  return dict(diff=diff, lo=diff - half, hi=diff + half, p=p, df=df)


def spread_p(a: np.ndarray, b: np.ndarray) -> float:
  """Brown-Forsythe test that a and b spread equally: p (1.0 when neither side varies; nan when it cannot tell:
  fewer than 3 seeds on a side, or every seed's distance to its side's median alike within both sides)."""
  if np.ptp(a) == 0 and np.ptp(b) == 0:
    return 1.0
  if min(len(a), len(b)) < 3:
    return float("nan")
  with np.errstate(invalid="ignore", divide="ignore"):
    return float(stats.levene(a, b, center="median").pvalue)


def compare(a: np.ndarray, b: np.ndarray, clients: list[str]) -> list[dict]:
  """Per column of `scores` (clients, then "mean"): both sides' mean/std, `welch` and `spread_p`."""
  rows = []
  for j, client in enumerate(list(clients) + ["mean"]):
    rows.append(dict(client=client, a_mean=a[:, j].mean(), a_std=a[:, j].std(ddof=1), b_mean=b[:, j].mean(),
                     b_std=b[:, j].std(ddof=1), **welch(a[:, j], b[:, j]), spread_p=spread_p(a[:, j], b[:, j])))
  return rows


def markdown(rows: list[dict], labels: tuple[str, str], n: tuple[int, int], seeds: str = "") -> str:
  la, lb = labels
  head = (f"Seeds {seeds} (START:STOP) of each sweep. " if seeds else "") + f"{la} ({n[0]} seeds) vs {lb} "
  lines = [head + f"({n[1]} seeds): mean +- sample std; difference {la} - {lb} with its 95% confidence interval"
           " and Welch's two-sided p; spread p: Brown-Forsythe test of equal std over seeds (-: needs 3 seeds a side)",
           "",
           f"| client | {la} | {lb} | {la} - {lb} | 95% CI | p | spread p |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['client']} | {r['a_mean']:.1f} +- {r['a_std']:.1f} | {r['b_mean']:.1f} +- {r['b_std']:.1f} "
                 f"| {r['diff']:+.1f} | [{r['lo']:+.1f}, {r['hi']:+.1f}] | {r['p']:.3f} | "
                 + ("-" if np.isnan(r["spread_p"]) else f"{r['spread_p']:.3f}") + " |")
  return "\n".join(lines) + "\n"


def table_csv(rows: list[dict], labels: tuple[str, str]) -> str:
  out = io.StringIO()
  w = csv.writer(out)
  la, lb = labels
  w.writerow(["client", f"{la}_mean", f"{la}_std", f"{lb}_mean", f"{lb}_std", "diff", "ci95_lo", "ci95_hi", "p",
              "welch_df", "spread_p"])
  for r in rows:
    w.writerow([r["client"]] + [f"{r[k]:.4f}" for k in ("a_mean", "a_std", "b_mean", "b_std", "diff", "lo", "hi",
                                                          "p", "df", "spread_p")])
  return out.getvalue()


def plot(a: np.ndarray, b: np.ndarray, cols: list[str], labels: tuple[str, str], path: str) -> None:
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2, 3.8))
  x = np.arange(len(cols))
  for side, (s, label, dx) in enumerate(((a, labels[0], -0.15), (b, labels[1], 0.15))):
    ax.scatter(np.repeat(x + dx, len(s)), s.T.ravel(), s=12, alpha=0.6, color=f"C{side}", label=label)
    ax.errorbar(x + dx, s.mean(0), s.std(0, ddof=1), fmt="_", color=f"C{side}", capsize=4, markersize=14)
  ax.set_xticks(x, cols, rotation=20)
  ax.set_ylabel("VQA score (each dot one seed)")
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(dirs: list[str], labels=(), methods=(), out: str | None = None, seeds: str = "") -> str:
  """Compares sweep dirs[0] (A) with dirs[1] (B) on `seeds` ("START:STOP", default all); writes
  <out>.md/.csv/.png; returns the markdown."""
  if len(dirs) != 2:
    raise CompareError(f"give exactly two sweep directories (A then B), got {len(dirs)}")
  methods = tuple(methods) or ("", "")
  same_dir = os.path.normpath(dirs[0]) == os.path.normpath(dirs[1])
  labels = tuple(labels) or (methods if same_dir and all(methods) else
                             tuple(os.path.basename(os.path.normpath(d)) for d in dirs))
  if len(labels) != 2 or len(methods) != 2:
    raise CompareError("--labels and --methods take two comma-separated values (A,B)")
  ra, rb = (load_sweep(d) for d in dirs)
  if ra["clients"] != rb["clients"]:
    raise CompareError(f"the sweeps score different clients ({ra['clients']} vs {rb['clients']}); compare runs "
                       "of one benchmark")
  span = seed_range(seeds)
  a, b = scores(ra, methods[0], dirs[0], span), scores(rb, methods[1], dirs[1], span)
  rows = compare(a, b, ra["clients"])
  md = markdown(rows, labels, (len(a), len(b)), seeds)
  out = out or os.path.join(dirs[0], "compare")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  reporting.write_atomic(out + ".md", md)
  reporting.write_atomic(out + ".csv", table_csv(rows, labels))
  plot(a, b, list(ra["clients"]) + ["mean"], labels, out + ".png")
  return md


def main(argv):
  try:
    print(run(argv[1:], flags.FLAGS.labels, flags.FLAGS.methods, flags.FLAGS.out, flags.FLAGS.seed_range))
  except CompareError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
