r"""Measures the heterogeneity of the synthetic benchmarks.

  python -m feddat_jax.data.report --benchmark=all --json=/tmp/heterogeneity.json

Per benchmark it prints, per client, the sizes and two text-only baselines (VQA score on the test split of
always answering the most frequent train answer, and of answering the most frequent train answer of the exact
same question string), then two pairwise client-by-client matrices:
  - the Jensen-Shannon divergence (base 2, in [0, 1]) of the clients' train answer distributions, over the
    union of their normalised annotator answers;
  - the total-variation distance (in [0, 1]) between the clients' mean per-channel colour histograms
    (16 bins per channel, train images).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time

import numpy as np

from feddat_jax import cli, reporting
from feddat_jax.data import answers as answers_lib
from feddat_jax.data import synthetic


def answer_distribution(examples) -> collections.Counter:
  return collections.Counter(answers_lib.normalize_answer(a) for ex in examples for a in ex["answers"])


def js_divergence(p: collections.Counter, q: collections.Counter) -> float:
  """Jensen-Shannon divergence (bits) between two answer count tables."""
  keys = sorted(set(p) | set(q))
  pv = np.array([p[k] for k in keys], np.float64)
  qv = np.array([q[k] for k in keys], np.float64)
  pv, qv = pv / pv.sum(), qv / qv.sum()
  m = 0.5 * (pv + qv)

  def kl(a):
    nz = a > 0
    return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

  return 0.5 * kl(pv) + 0.5 * kl(qv)


def color_histogram(examples, bins: int = 16) -> np.ndarray:
  """Mean normalised per-channel histogram float64[3 * bins] over all images of `examples`."""
  hist = np.zeros((3, bins))
  for ex in examples:
    for img in ex["images"]:
      px = np.asarray(img).reshape(-1, 3) // (256 // bins)
      for c in range(3):
        hist[c] += np.bincount(px[:, c], minlength=bins) / len(px)
  return (hist / hist.sum(axis=1, keepdims=True)).ravel()


def text_baselines(client) -> tuple[float, float]:
  """VQA scores (test) of the global-majority answer and of the per-question-string majority answer."""
  vocab_index = {a: i for i, a in enumerate(client.answers)}
  k = max(1, len(client.answers))
  overall = answer_distribution(client.train).most_common(1)[0][0]
  per_q = collections.defaultdict(collections.Counter)
  for ex in client.train:
    per_q[ex["question"]].update(answers_lib.normalize_answer(a) for a in ex["answers"])
  prior, blind = [], []
  for ex in client.test:
    scores = answers_lib.soft_scores(ex["answers"], vocab_index, client.score_rule, k)
    guess = per_q[ex["question"]].most_common(1)[0][0] if ex["question"] in per_q else overall
    prior.append(scores[vocab_index[overall]] if overall in vocab_index else 0.0)
    blind.append(scores[vocab_index[guess]] if guess in vocab_index else 0.0)
  return 100 * float(np.mean(prior)), 100 * float(np.mean(blind))


def benchmark_report(name: str, *, seed: int = 0, scale: float = 1.0) -> dict:
  start = time.time()
  clients = synthetic.make_benchmark(name, seed=seed, scale=scale)
  build_s = time.time() - start
  dists = [answer_distribution(c.train) for c in clients]
  hists = [color_histogram(c.train) for c in clients]
  n = len(clients)
  jsd = [[js_divergence(dists[i], dists[j]) for j in range(n)] for i in range(n)]
  # Total variation per channel histogram, averaged over the 3 channels.
  tv = [[float(0.5 * np.abs(hists[i] - hists[j]).sum() / 3) for j in range(n)] for i in range(n)]
  rows = []
  for c in clients:
    prior, blind = text_baselines(c)
    rows.append(dict(name=c.name, task=c.task, score_rule=c.score_rule, train=len(c.train), test=len(c.test),
                     answers=len(c.answers), majority_score=round(prior, 1), question_only_score=round(blind, 1)))
  return dict(benchmark=name, seed=seed, scale=scale, build_seconds=round(build_s, 2), clients=rows,
              answer_jsd=jsd, color_hist_tv=tv,
              mean_answer_jsd=float(np.mean([jsd[i][j] for i in range(n) for j in range(n) if i < j])),
              mean_color_hist_tv=float(np.mean([tv[i][j] for i in range(n) for j in range(n) if i < j])))


def _print_matrix(title, names, m):
  print(f"  {title}")
  print("    " + " " * 10 + "".join(f"{x[:9]:>10}" for x in names))
  for name, row in zip(names, m):
    print(f"    {name[:10]:<10}" + "".join(f"{v:10.3f}" for v in row))


def text_prior(benchmark: str, *, seed: int = 0, scale: float = 1.0, cache: str = "") -> dict[str, float]:
  """{client: the per-question-string majority answer's test VQA score} of one draw of a twin; cached in the
  JSON file `cache` when given (building a twin takes about half a minute), keyed by what it was measured on."""
  key = dict(benchmark=benchmark, seed=seed, scale=scale, generator=synthetic.GENERATOR)
  if cache and os.path.isfile(cache):
    with open(cache) as f:
      cached = json.load(f)
    if cached.get("key") == key:
      return cached["prior"]
  clients = synthetic.make_benchmark(benchmark, seed=seed, scale=scale)
  prior = {c.name: text_baselines(c)[1] for c in clients}  # [1]: the per-question one
  if cache:
    reporting.write_atomic(cache, json.dumps({"key": key, "prior": prior}, indent=1))
  return prior


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--benchmark", default="all", choices=synthetic.BENCHMARKS + ("all",),
                      help="benchmark to measure, or all")
  parser.add_argument("--seed", type=int, default=0, help="data seed")
  parser.add_argument("--scale", type=float, default=1.0, help="size scale passed to make_benchmark")
  parser.add_argument("--json", default=None, help="also write the report as JSON to this path")
  args = parser.parse_args(argv)
  if args.json:
    cli.check_output("--json", args.json)  # before the benchmarks are built
  if not args.scale > 0:
    cli.fail(f"--scale={args.scale} must be > 0")
  names = synthetic.BENCHMARKS if args.benchmark == "all" else (args.benchmark,)
  reports = []
  for name in names:
    rep = benchmark_report(name, seed=args.seed, scale=args.scale)
    reports.append(rep)
    print(f"== {name}: built in {rep['build_seconds']} s; mean pairwise answer JSD "
          f"{rep['mean_answer_jsd']:.3f}, mean colour-histogram TV {rep['mean_color_hist_tv']:.3f}")
    print(f"    {'client':<10}{'task':>6}{'rule':>14}{'train':>7}{'test':>6}{'answers':>8}"
          f"{'majority':>10}{'q-only':>8}")
    for r in rep["clients"]:
      print(f"    {r['name']:<10}{r['task']:>6}{r['score_rule']:>14}{r['train']:>7}{r['test']:>6}{r['answers']:>8}"
            f"{r['majority_score']:>10.1f}{r['question_only_score']:>8.1f}")
    client_names = [r["name"] for r in rep["clients"]]
    _print_matrix("answer-distribution JSD (bits)", client_names, rep["answer_jsd"])
    _print_matrix("colour-histogram total variation", client_names, rep["color_hist_tv"])
  if args.json:
    with open(args.json, "w") as f:
      json.dump(reports, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
