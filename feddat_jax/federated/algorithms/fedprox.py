"""FedProx (Li et al., 2020): FedAvg with a proximal term (mu / 2) ||w - w_global||^2 in each local loss."""
from __future__ import annotations

from feddat_jax.federated.algorithms import fedavg


def make(model, optim, *, total_rounds: int, mu: float = 0.01, name: str = "fedprox", **kwargs):
  """kwargs: fedavg.make's (e.g. aggregator)."""
  if mu <= 0:
    raise ValueError(f"FedProx needs mu > 0, got {mu}; use fedavg for mu = 0")
  return fedavg.make(model, optim, total_rounds=total_rounds, name=name, prox_mu=mu, **kwargs)
