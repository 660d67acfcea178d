"""What a run leaves in its workdir: metrics.jsonl, results.json, summary.csv, PNG plots, TensorBoard scalars.

Files are written whole to a temporary name and renamed, so a killed run never leaves a half-written one.
"""
from __future__ import annotations

import csv
import io
import json
import os

from absl import logging


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend, imported on first use (it costs half a second at every
  CLI start otherwise, and only the plots need it)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


class MetricsLogError(ValueError):
  """metrics.jsonl is damaged beyond a cut last line."""


class MetricsLog:
  """metrics.jsonl: one JSON object per line ({"round": r, "kind": "train" | "eval", ...}).

  On resume from round r, rows of later rounds (written after that checkpoint) are dropped, so the log
  reads as if the run had never been interrupted; a last line cut short by a crash mid-write is dropped with a
  warning (a bad line elsewhere is damage that nothing here can explain: a one-line MetricsLogError).
  """

  def __init__(self, workdir: str, resume_round: int):
    self.path = os.path.join(workdir, "metrics.jsonl")
    rows = []
    if resume_round > 0 and os.path.exists(self.path):
      rows = [r for r in read_metrics(workdir) if r["round"] <= resume_round]
    self.rows = rows
    write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))

  def add(self, row: dict) -> None:
    self.rows.append(row)
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")

  def evals(self) -> list[dict]:
    return [r for r in self.rows if r["kind"] == "eval"]


def read_metrics(workdir: str) -> list[dict]:
  """The rows of a workdir's metrics.jsonl (`MetricsLog`), read only: a last line cut short by a crash is dropped
  with a warning; a bad line elsewhere raises MetricsLogError."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
  rows = []
  for i, (n, line) in enumerate(lines):
    try:
      row = json.loads(line)
      if not isinstance(row, dict) or not isinstance(row.get("round"), int):
        raise ValueError("not a row of this log")
    except ValueError as e:
      if i == len(lines) - 1:
        msg = f"{path}: line {n} is cut short (a crash while it was written); dropped it"
        logging.warning(msg)
        print(f"warning: {msg}", flush=True)
        break
      raise MetricsLogError(f"{path}: line {n} is not a JSON row ({e}); move the file away to start a new "
                            "log") from None
    rows.append(row)
  return rows


def summary_csv(scores: dict[str, dict[str, float]], clients: list[str]) -> str:
  """Rows = evaluation variants, columns = clients and their unweighted mean."""
  out = io.StringIO()
  w = csv.writer(out)
  w.writerow(["variant"] + clients + ["mean"])
  for variant, per_client in scores.items():
    vals = [per_client[c] for c in clients]
    w.writerow([variant] + [f"{v:.2f}" for v in vals] + [f"{sum(vals) / len(vals):.2f}"])
  return out.getvalue()


def group_scores(scores: dict[str, dict[str, float]], group_of: dict[str, str]) -> dict[str, dict[str, float]]:
  """{variant: {client: score}} -> {variant: {group: mean over the group's clients present}}."""
  out = {}
  for v, per_client in scores.items():
    groups: dict[str, list[float]] = {}
    for c, x in per_client.items():
      groups.setdefault(group_of[c], []).append(x)
    out[v] = {g: sum(xs) / len(xs) for g, xs in groups.items()}
  return out


def clients_csv(scores: dict[str, dict[str, float]], clients: list[str], group_of: dict[str, str],
                train_examples) -> str:
  """One row per client: its dataset, training examples and every variant's score."""
  out = io.StringIO()
  w = csv.writer(out)
  variants = list(scores)
  w.writerow(["client", "dataset", "train_examples"] + variants)
  for c, n in zip(clients, train_examples):
    if c in scores[variants[0]]:
      w.writerow([c, group_of[c], int(n)] + [f"{scores[v][c]:.2f}" for v in variants])
  return out.getvalue()


def plot_history(evals: list[dict], clients: list[str], path: str, title: str) -> None:
  """Per-client score vs round, one panel per evaluation variant."""
  variants = list(evals[-1]["scores"])
  plt = pyplot()
  fig, axes = plt.subplots(1, len(variants), figsize=(4.5 * len(variants), 3.6), squeeze=False)
  rounds = [e["round"] for e in evals]
  for ax, v in zip(axes[0], variants):
    for c in clients:
      ax.plot(rounds, [e["scores"][v].get(c, float("nan")) for e in evals], marker="o", label=c)
    ax.plot(rounds, [e["mean"][v] for e in evals], "k--", lw=2, label="mean")
    ax.set_title(f"{title}: {v}")
    ax.set_xlabel("round")
    ax.set_ylabel("VQA score")
    ax.grid(alpha=0.3)
  handles, labels = axes[0][-1].get_legend_handles_labels()
  fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))  # beside the data
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def plot_final(scores: dict[str, dict[str, float]], clients: list[str], path: str, title: str) -> None:
  """Final score per client, bars grouped by client, one colour per variant."""
  variants = list(scores)
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(1.3 * (len(clients) + 1) * max(1, len(variants) / 2) + 2, 3.6))
  width = 0.8 / len(variants)
  names = clients + ["mean"]
  for i, v in enumerate(variants):
    vals = [scores[v][c] for c in clients]
    vals.append(sum(vals) / len(vals))
    ax.bar([j + i * width for j in range(len(names))], vals, width, label=v)
  ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=20)
  ax.set_ylabel("VQA score")
  ax.set_title(title)
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def drift_curves(rows: list[dict], group_of: dict[str, str] | None = None) -> dict:
  """Client drift per round from metrics.jsonl's train rows (their "drift": {client: {"norm", "cosine"}}) ->
  {"rounds": [r], "norm" / "cosine": {series: [value per round]}}: a series per client, or per group (the mean
  over its clients of the round) with `group_of`, and "mean" over all the round's clients; NaN where none."""
  rows = [r for r in rows if r.get("kind") == "train" and r.get("drift")]
  nan = float("nan")
  mean = lambda xs: sum(xs) / len(xs) if xs else nan
  out = {"rounds": [r["round"] for r in rows], "norm": {}, "cosine": {}}
  for m in ("norm", "cosine"):
    per_round = []
    for r in rows:
      groups: dict[str, list[float]] = {}
      for c, d in r["drift"].items():
        if d[m] is not None:
          groups.setdefault(group_of[c] if group_of else c, []).append(d[m])
      per_round.append(({g: mean(xs) for g, xs in groups.items()},
                        mean([d[m] for d in r["drift"].values() if d[m] is not None])))
    series = sorted({g for groups, _ in per_round for g in groups})
    out[m] = {g: [groups.get(g, nan) for groups, _ in per_round] for g in series}
    out[m]["mean"] = [x for _, x in per_round]
  return out


def plot_drift(curves: dict, path: str, title: str) -> None:
  """Update norm and cosine to the aggregated update vs round of one run (`drift_curves`): a line per client
  (or group) and their mean dashed."""
  def draw(axes):
    for ax, m in zip(axes, ("norm", "cosine")):
      for g, ys in curves[m].items():
        style = {"color": "k", "ls": "--", "lw": 2} if g == "mean" else {"marker": "o", "ms": 3}
        ax.plot(curves["rounds"], ys, label=g, **style)
  drift_figure(draw, path, title)


def drift_figure(draw, path: str, title: str) -> None:
  """The two-panel drift figure (update norm, cosine to the aggregated update; by round): `draw(axes)` draws
  the lines, this labels the axes, adds the legend of axes[0] and writes the PNG."""
  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  draw(axes)
  for ax, ylabel in zip(axes, ("||client update||", "cosine to aggregated update")):
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  axes[0].set_title(f"{title}: update norm")
  axes[1].set_title(f"{title}: update cosine")
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


class TensorBoard:
  """Scalars for TensorBoard under <workdir>/tensorboard (tensorboardX: no TensorFlow needed)."""

  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter
    self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    for k, v in values.items():
      self._writer.add_scalar(k, v, step)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()
