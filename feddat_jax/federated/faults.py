"""Client faults on the host side: simulated dropout, the per-round fault report, and a test-only pause hook.

Dropout: each real cohort client independently fails to report with probability p; the draw is a function
of (seed, round) only, so a resumed run drops the same clients. A dropped client's steps are masked, so the
jitted round keeps its state and gives it weight 0 (engine.end_round); non-finite uploads are excluded inside
the round itself and come back as metrics["upload_finite"].

Test hook: FEDDAT_DEBUG_PAUSE_AT=<phase>:<round> (phase: round | save | eval) makes the process print
"FEDDAT_DEBUG_PAUSED <phase>:<round>" and sleep at that point of that round, so that a test can SIGKILL it
there deterministically (tests/test_faults.py). Unset, it costs one environment lookup.
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


def pause_point(phase: str, round_idx: int) -> None:
  """Sleep here (for a test to kill the process) when FEDDAT_DEBUG_PAUSE_AT names this phase and round."""
  spec = os.environ.get(PAUSE_ENV)
  if spec and spec == f"{phase}:{round_idx}":
    print(f"FEDDAT_DEBUG_PAUSED {spec}", flush=True)
    time.sleep(3600)
