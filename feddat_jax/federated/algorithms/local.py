"""Local-only training: each client trains its own PEFT parameters and head; nothing is communicated."""
from __future__ import annotations

from feddat_jax.federated.algorithms import fedavg


def make(model, optim, *, total_rounds: int, name: str = "local"):
  return fedavg.make(model, optim, total_rounds=total_rounds, name=name, share=False)
