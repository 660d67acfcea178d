"""Client-level (epsilon, delta) of DP-FedAvg (`aggregators.dp_mean`) over a whole run, from dp-accounting.

Each round releases the sum of the cohort's clipped updates plus Gaussian noise of std noise_multiplier * clip,
a Gaussian mechanism on a client sample of rate q = cohort / clients, composed over the run's rounds. The
accountant (Google's `dp_accounting`, RDP) treats the sample as Poisson with rate q, the usual accounting for
DP-FedAvg's fixed-size cohorts (McMahan et al. 2018); rounds in which clients drop out or are skipped only
release less, so counting every round is conservative.
"""
from __future__ import annotations

import math


def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
  """epsilon of `rounds` rounds of the sampled Gaussian mechanism at `delta`; inf without noise."""
  if not 0 < sampling_rate <= 1:
    raise ValueError(f"sampling rate must be in (0, 1], got {sampling_rate}")
  if not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta}")
  if noise_multiplier <= 0:
    return math.inf
  import dp_accounting  # only runs with DP need it
  event = dp_accounting.GaussianDpEvent(noise_multiplier)
  if sampling_rate < 1:
    event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
  return float(accountant.get_epsilon(delta))


def report(noise_multiplier: float, clip_norm: float, cohort: int, num_clients: int, rounds: int,
           delta: float) -> dict:
  """The run's privacy statement for results.json."""
  q = min(cohort, num_clients) / num_clients
  return {"mechanism": "DP-FedAvg (client-level, Gaussian)", "accountant": "dp_accounting RDP",
          "noise_multiplier": noise_multiplier, "clip_norm": clip_norm, "sampling_rate": q, "rounds": rounds,
          "delta": delta, "epsilon": epsilon(noise_multiplier, q, rounds, delta)}
