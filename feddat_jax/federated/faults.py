"""Client faults on the host side: simulated dropout, the per-round fault report, divergence, and a test-only
pause hook.

Dropout: each real cohort client independently fails to report with probability p; the draw is a function
of (seed, round) only, so a resumed run drops the same clients. A dropped client's steps are masked, so the
jitted round keeps its state and gives it weight 0 (engine.end_round); non-finite uploads are excluded inside
the round itself and come back as metrics["upload_finite"].

Test hook: FEDDAT_DEBUG_PAUSE_AT=<phase>:<round> (phase: round | save | eval) makes the process print
"FEDDAT_DEBUG_PAUSED <phase>:<round>" and sleep at that point of that round, so that a test can SIGKILL it
there deterministically (tests/test_faults.py). Unset, it costs one environment lookup.

Divergence: a round in which no client that trained has a finite upload (or loss) stops the run with a
DivergenceError before it is logged or saved: continuing would skip every later round and report the untrained
model's scores as final.
"""
from __future__ import annotations

import os
import time

import numpy as np

PAUSE_ENV = "FEDDAT_DEBUG_PAUSE_AT"
PHASES = ("round", "save", "eval")
_DROPOUT_STREAM = 0xD0  # keeps the dropout draw apart from sample_cohort's stream [seed, round]


def dropped(seed: int, round_idx: int, cohort: np.ndarray, num_clients: int, p: float) -> np.ndarray:
  """bool [C]: which cohort positions drop out this round (dummies, index >= num_clients, never do)."""
  cohort = np.asarray(cohort)
  if p <= 0:
    return np.zeros(cohort.shape, bool)
  draw = np.random.default_rng([seed, round_idx, _DROPOUT_STREAM]).random(cohort.shape[0])
  return (draw < p) & (cohort < num_clients)


def round_report(names, cohort, num_clients: int, dropped_mask, finite, min_clients: int) -> dict:
  """What happened to the cohort's clients in a round, for metrics.jsonl.

  -> {"reported": [names aggregated], "dropped": [names], "nonfinite": [names], "skipped": bool}; a round is
  skipped (server unchanged) when fewer than min_clients clients reported a finite upload.
  """
  real = np.asarray(cohort) < num_clients
  finite = np.asarray(finite, bool)
  dropped_mask = np.asarray(dropped_mask, bool)
  name = lambda mask: [names[i] for i in np.asarray(cohort)[real & mask]]
  ok = ~dropped_mask & finite
  return {"reported": name(ok), "dropped": name(dropped_mask), "nonfinite": name(~dropped_mask & ~finite),
          "skipped": bool((real & ok).sum() < min_clients)}


class DivergenceError(RuntimeError):
  """Training diverged: no client of a round produced a finite result. The message names the round and the
  likely cause; the run stops before anything of that round is logged or saved."""


def check_divergence(round_idx: int, report: dict, losses, config) -> None:
  """Raise DivergenceError when every client that trained in round `round_idx` (1-based) uploaded NaN/Inf or
  has a non-finite loss. A round in which every client dropped out, or in which some clients stayed finite,
  is not divergence (the aggregate skips or excludes them, see round_report)."""
  losses = np.asarray(losses, np.float64)
  trained = len(report["reported"]) + len(report["nonfinite"])
  if trained == 0:
    return
  if report["reported"] and (losses.size == 0 or np.isfinite(losses).any()):
    return
  what = "upload" if not report["reported"] else "loss"
  causes = [f"the learning rate (optim.lr={config.optim.lr}) is too high"]
  if config.algorithm == "feddat":
    causes.append(f"the distillation temperature (options.temperature={config.options.temperature}) is too low")
  raise DivergenceError(f"round {round_idx}: training diverged, every client's {what} is NaN or Inf; likely cause: "
                        + " or ".join(causes) + "; nothing of this round was saved (the checkpoints hold the last "
                        "good round)")


def pause_point(phase: str, round_idx: int) -> None:
  """Sleep here (for a test to kill the process) when FEDDAT_DEBUG_PAUSE_AT names this phase and round."""
  spec = os.environ.get(PAUSE_ENV)
  if spec and spec == f"{phase}:{round_idx}":
    print(f"FEDDAT_DEBUG_PAUSED {spec}", flush=True)
    time.sleep(3600)
