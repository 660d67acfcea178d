"""Client-level (epsilon, delta) of DP-FedAvg (`aggregators.dp_mean`) over a whole run, from dp-accounting.

Each round releases the sum of the cohort's clipped updates (norm <= clip) plus Gaussian noise of std
noise_multiplier * clip, over a cohort of fixed size drawn uniformly WITHOUT replacement from the clients
(`engine.sample_cohort`), composed over the run's rounds. The accountant (Google's `dp_accounting`, RDP) is told
exactly that sampling: `SampledWithoutReplacementDpEvent(clients, cohort, Gaussian)`. Its analysis (Wang,
Balle, Kasiviswanathan 2019) is for the replace-one neighbouring relation (the number of clients is public; a
neighbouring federation has one client's data replaced), under which the clipped sum's L2 sensitivity is
2 * clip, so the Gaussian's noise multiplier relative to that sensitivity is noise_multiplier / 2. With every
client in every round (cohort = clients) there is no sampling: the plain Gaussian mechanism, same relation.
Rounds in which clients drop out or are skipped only release less, so counting every round is conservative.
(Before, the accountant was told Poisson sampling at rate cohort / clients under add/remove-one with
sensitivity clip, the usual shortcut for DP-FedAvg but not the sampling done here; it gives a smaller epsilon.)
"""
from __future__ import annotations

import math

ACCOUNTANT = "dp_accounting RDP, fixed-size cohort sampled without replacement, replace-one (sensitivity 2 * clip)"


def events(noise_multiplier: float, cohort: int, num_clients: int, rounds: int):
  """The run as one dp_accounting event (noise_multiplier > 0): `rounds` x the sampled Gaussian; and the
  neighbouring relation the accountant needs for it."""
  import dp_accounting  # only runs with DP need it
  gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2)  # std / replace-one sensitivity (2 * clip)
  event = (gaussian if cohort >= num_clients else
           dp_accounting.SampledWithoutReplacementDpEvent(num_clients, cohort, gaussian))
  return dp_accounting.SelfComposedDpEvent(event, rounds), dp_accounting.NeighboringRelation.REPLACE_ONE


def epsilon(noise_multiplier: float, cohort: int, num_clients: int, rounds: int, delta: float) -> float:
  """epsilon at `delta` of `rounds` rounds of the Gaussian mechanism on a cohort of `cohort` of `num_clients`
  clients sampled without replacement; inf without noise."""
  if num_clients < 1 or not 0 < cohort:
    raise ValueError(f"need >= 1 client and a cohort of >= 1, got cohort {cohort} of {num_clients} clients")
  if not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta}")
  if rounds < 0:
    raise ValueError(f"rounds must be >= 0, got {rounds}")
  if noise_multiplier <= 0:
    return math.inf
  import dp_accounting
  event, relation = events(noise_multiplier, min(cohort, num_clients), num_clients, rounds)
  accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
  accountant.compose(event)
  return float(accountant.get_epsilon(delta))


def report(noise_multiplier: float, clip_norm: float, cohort: int, num_clients: int, rounds: int,
           delta: float) -> dict:
  """The run's privacy statement for results.json."""
  cohort = min(cohort, num_clients)
  return {"mechanism": "DP-FedAvg (client-level, Gaussian)", "accountant": ACCOUNTANT,
          "sampling": "fixed-size cohort, uniformly without replacement", "neighbouring": "replace one client",
          "noise_multiplier": noise_multiplier, "clip_norm": clip_norm, "cohort": cohort,
          "num_clients": num_clients, "sampling_rate": cohort / num_clients, "rounds": rounds, "delta": delta,
          "epsilon": epsilon(noise_multiplier, cohort, num_clients, rounds, delta)}
