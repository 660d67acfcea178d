r"""Is A better than B? Per-client score differences between two sweeps, over seeds, with Welch's t-test;
and is A steadier across seeds than B (Brown-Forsythe test of equal spread)?

  python -m feddat_jax.compare runs/seeds10_function_pretrained runs/seeds10_function_random \
      --labels=pretrained,random --out=docs/results/function_pretrained_vs_random

Two methods of one sweep: give its directory twice with --methods, e.g.
  python -m feddat_jax.compare runs/sweep_scene runs/sweep_scene --methods=feddat,fedavg_adapter
A range of seeds of both sweeps, e.g. a second look on seeds 10..19 after a first on 0..9: --seed_range=10:20.

Reads each sweep directory's sweep.json (written by `feddat_jax.sweep`), takes one method from each (default:
the only one, or --methods=a,b; labels default to the methods when both sides are one sweep, else the
directories' names) and, per client and for the client mean, reports both sides' mean and sample
std over seeds (ddof=1, the "+-" of every table here), the difference A - B with its 95% confidence interval
and the two-sided p-value of Welch's unequal-variance t-test (scipy.stats.ttest_ind(equal_var=False); seeds
are independent runs; the two sweeps' seeds are not paired), that p Holm-adjusted across the table's clients
(several clients, several tests: the adjusted p controls the chance of any false "differs"), and the p-value
of the Brown-Forsythe test that both sides spread equally over seeds (Levene's test about the median: robust
to outlying seeds; small p: one side's runs are steadier). Writes <out>.md, <out>.csv and <out>.png (every
seed's score per client, both sides, and the differences with their intervals), and prints the markdown.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
import warnings

import numpy as np
from absl import app, flags
from scipy import stats

from feddat_jax import config_utils, reporting


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
  """Welch's t-test of mean(a) - mean(b) (scipy): diff, its `level` confidence interval (lo, hi), p (two-sided),
  df."""
  diff = a.mean() - b.mean()
  if a.var() == 0 and b.var() == 0:  # both sides constant: the difference is exact (scipy gives NaN)
    return dict(diff=diff, lo=diff, hi=diff, p=1.0 if diff == 0 else 0.0, df=float("inf"))
  with warnings.catch_warnings():  # one constant side: scipy warns of precision loss, the result is exact
    warnings.simplefilter("ignore", RuntimeWarning)
    t = stats.ttest_ind(a, b, equal_var=False)
    ci = t.confidence_interval(level)
  return dict(diff=diff, lo=float(ci.low), hi=float(ci.high), p=float(t.pvalue), df=float(t.df))


def holm(p) -> np.ndarray:
  """Holm's step-down adjustment of the p-values of several tests (family-wise error rate)."""
  p = np.asarray(p, np.float64)
  order = np.argsort(p)
  adjusted = np.minimum(1.0, np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order]))
  out = np.empty_like(p)
  out[order] = adjusted
  return out


def format_p(p: float) -> str:
  """A p-value for a table: 3 decimals, "< 0.001" below that (never a bare 0.000)."""
  if np.isnan(p):
    return "-"
  return "< 0.001" if p < 0.001 else f"{p:.3f}"


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
  """Per column of `scores` (clients, then "mean"): both sides' mean/std (sample std, ddof=1) and seeds,
  `welch`, p_holm (Holm across the clients; the mean row, a summary of them, is not adjusted: NaN) and
  `spread_p`."""
  rows = []
  for j, client in enumerate(list(clients) + ["mean"]):
    rows.append(dict(client=client, a_mean=a[:, j].mean(), a_std=a[:, j].std(ddof=1), a_n=len(a),
                     b_mean=b[:, j].mean(), b_std=b[:, j].std(ddof=1), b_n=len(b), **welch(a[:, j], b[:, j]),
                     spread_p=spread_p(a[:, j], b[:, j])))
  add_holm(rows)
  return rows


def add_holm(rows: list[dict]) -> None:
  """rows[:-1] (the clients) get p_holm, their Holm-adjusted p; the last (the client mean) NaN."""
  for r, p in zip(rows[:-1], holm([r["p"] for r in rows[:-1]])):
    r["p_holm"] = float(p)
  rows[-1]["p_holm"] = float("nan")


def markdown(rows: list[dict], labels: tuple[str, str], n: tuple[int, int], seeds: str = "") -> str:
  la, lb = labels
  head = (f"Seeds {seeds} (START:STOP) of each sweep. " if seeds else "") + f"{la} ({n[0]} seeds) vs {lb} "
  lines = [head + f"({n[1]} seeds): mean +- sample std; +- is the sample std over {n[0]} / {n[1]} seeds "
           f"(ddof=1). Difference {la} - {lb} with its 95% confidence interval and Welch's two-sided p; "
           f"Holm p: that p adjusted across the {len(rows) - 1} clients (the mean row is not adjusted); "
           "spread p: Brown-Forsythe test of equal std over seeds (-: needs 3 seeds a side)",
           "",
           f"| client | {la} | {lb} | {la} - {lb} | 95% CI | p | Holm p | spread p |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['client']} | {r['a_mean']:.1f} +- {r['a_std']:.1f} | {r['b_mean']:.1f} +- {r['b_std']:.1f} "
                 f"| {r['diff']:+.1f} | [{r['lo']:+.1f}, {r['hi']:+.1f}] | {format_p(r['p'])} | "
                 f"{format_p(r['p_holm'])} | {format_p(r['spread_p'])} |")
  return "\n".join(lines) + "\n"


CSV_FIELDS = ("a_mean", "a_std", "b_mean", "b_std", "diff", "lo", "hi", "p", "p_holm", "df", "spread_p")


def table_csv(rows: list[dict], labels: tuple[str, str]) -> str:
  out = io.StringIO()
  w = csv.writer(out)
  la, lb = labels
  w.writerow(["client", f"{la}_mean", f"{la}_std", f"{lb}_mean", f"{lb}_std", "diff", "ci95_lo", "ci95_hi", "p",
              "p_holm", "welch_df", "spread_p", f"{la}_seeds", f"{lb}_seeds"])
  for r in rows:
    w.writerow([r["client"]] + [f"{r[k]:.4f}" for k in CSV_FIELDS] + [r["a_n"], r["b_n"]])
  return out.getvalue()


def read_table_csv(path: str, seeds: tuple[int, int] | None = None) -> tuple[list[dict], tuple[str, str]]:
  """A <out>.csv back into `compare`'s rows and the labels (for redrawing a figure without the sweeps). A file
  written before the seeds and Holm columns existed needs `seeds` (A's, B's); its Holm p is recomputed."""
  with open(path) as f:
    reader = csv.reader(f)
    header = next(reader)
    records = list(reader)
  la, lb = header[1][:-len("_mean")], header[3][:-len("_mean")]
  names = {f"{la}_mean": "a_mean", f"{la}_std": "a_std", f"{lb}_mean": "b_mean", f"{lb}_std": "b_std",
           "ci95_lo": "lo", "ci95_hi": "hi", "welch_df": "df", f"{la}_seeds": "a_n", f"{lb}_seeds": "b_n"}
  rows = []
  for rec in records:
    r = {"client": rec[0]}
    for key, value in zip(header[1:], rec[1:]):
      r[names.get(key, key)] = int(value) if key.endswith("_seeds") else float(value)
    if "a_n" not in r:
      if seeds is None:
        raise CompareError(f"{path} does not say how many seeds each side had; pass them (A, B)")
      r["a_n"], r["b_n"] = seeds
    rows.append(r)
  if "p_holm" not in rows[0]:
    add_holm(rows)
  return rows, (la, lb)


def plot(rows: list[dict], labels: tuple[str, str], path: str, title: str = "", a: np.ndarray | None = None,
         b: np.ndarray | None = None) -> None:
  """Top: both sides' mean +- sample std per client (and every seed's score when the scores `a`, `b` are given);
  bottom: the difference A - B per client with its 95% interval, a line at 0 and the p-values below 0.05."""
  plt = reporting.pyplot()
  la, lb = labels
  cols = [r["client"] for r in rows]
  x = np.arange(len(cols))
  fig, (ax, dax) = plt.subplots(2, 1, sharex=True, figsize=(max(6.5, 1.2 * len(cols) + 2.5), 7.0),
                                gridspec_kw=dict(height_ratios=[3, 2]))
  for side, (key, label, s, dx) in enumerate((("a", la, a, -0.12), ("b", lb, b, 0.12))):
    mean, std = np.array([r[f"{key}_mean"] for r in rows]), np.array([r[f"{key}_std"] for r in rows])
    if s is not None:
      ax.scatter(np.repeat(x + dx, len(s)), s.T.ravel(), s=10, alpha=0.45, color=f"C{side}", linewidths=0)
    ax.errorbar(x + dx, mean, std, fmt="o", color=f"C{side}", capsize=4, markersize=5,
                label=f"{label}: mean +- sample std over {rows[0][f'{key}_n']} seeds")
  ax.set_ylabel("VQA score (zoomed)" + ("; dots: seeds" if a is not None else ""))
  ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
  ax.grid(axis="y", alpha=0.3)
  diff = np.array([r["diff"] for r in rows])
  lo, hi = np.array([r["lo"] for r in rows]), np.array([r["hi"] for r in rows])
  dax.errorbar(x, diff, [diff - lo, hi - diff], fmt="o", color="C2", capsize=4, markersize=5,
               label=f"{la} - {lb} and its 95% interval (Welch); p < 0.05 marked (Holm p in brackets)")
  dax.axhline(0.0, color="black", lw=0.8)
  span = max(float(hi.max() - lo.min()), 1e-6)
  dax.set_ylim(min(float(lo.min()), 0.0) - 0.08 * span, max(float(hi.max()), 0.0) + 0.25 * span)
  for xi, r in zip(x, rows):
    if r["p"] < 0.05:
      text = "p " + format_p(r["p"]).replace("< ", "<") + ("" if np.isnan(r["p_holm"]) else
                                                          f"\n({format_p(r['p_holm']).replace('< ', '<')})")
      dax.annotate(text, (xi, r["hi"]), fontsize=7, ha="center", va="bottom", xytext=(0, 3),
                   textcoords="offset points")
  dax.set_xticks(x, cols, rotation=20)
  dax.set_ylabel(f"{la} - {lb} (VQA points)")
  dax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
  dax.grid(axis="y", alpha=0.3)
  fig.suptitle(title or f"{la} vs {lb}")
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
  plot(rows, labels, out + ".png", figure_title(labels, (len(a), len(b)), seeds), a, b)
  return md


def figure_title(labels: tuple[str, str], n: tuple[int, int], seeds: str = "") -> str:
  return (f"{labels[0]} ({n[0]} seeds) vs {labels[1]} ({n[1]} seeds)"
          + (f", seeds {seeds} of each sweep" if seeds else ""))


def main(argv):
  try:
    print(run(argv[1:], flags.FLAGS.labels, flags.FLAGS.methods, flags.FLAGS.out, flags.FLAGS.seed_range))
  except CompareError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def define_flags():
  """The command line's flags, defined only when run as a module (so importing it, as the tests and the
  benchmarks do, adds no global absl flags that could clash with theirs)."""
  flags.DEFINE_list("labels", [], "Names of the two sides in the table (default: the methods when both sides are "
                    "one sweep, else the sweep directories' names).")
  flags.DEFINE_list("methods", [], "The method to take from each sweep (default: each sweep's only method).")
  flags.DEFINE_string("out", None, "Output path without extension (default: <first sweep dir>/compare).")
  flags.DEFINE_string("seed_range", "", "Seeds to compare on both sides, START:STOP (seeds START..STOP-1; default: "
                      "all), e.g. 10:20 to test on seeds that an earlier look did not use.")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_utils.parse_flags_or_exit)
