"""The registry: config names -> algorithms.

Names: "feddat"; and "<family>_<peft method>" for family in FAMILIES and method in peft.METHODS, e.g.
"fedavg_adapter", "fedavg_lora", "fedprox_adapter", "fedadam_bitfit", "local_adapter", "centralized_full".

>>> method = peft_method("fedavg_lora")                  # which PEFT sites the model needs: "lora"
>>> algo = make("fedavg_lora", model, optim_cfg, total_rounds=30, options={})
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from feddat_jax.federated import aggregators
from feddat_jax.federated.algorithms import base, centralized, feddat, fedavg, fedprox, local
from feddat_jax.models import peft as peft_lib

FAMILIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "local", "centralized")
_SERVER_OPT = {"fedavgm": "momentum", "fedadam": "adam", "fedyogi": "yogi"}
# Options each family reads from `options`; anything else given to it is an error.
OPTIONS = {
    "feddat": ("temperature", "freeze_personal_after_first_round", "eval_stale_frozen_copy", "zero_grad_adam_steps",
               "single_pass_dat"),
    "fedprox": ("prox_mu",),
    "fedavgm": ("server_lr",), "fedadam": ("server_lr",), "fedyogi": ("server_lr",),
}


def names() -> list[str]:
  return ["feddat"] + [f"{f}_{m}" for f in FAMILIES for m in peft_lib.METHODS]


def _parse(name: str) -> tuple[str, str]:
  if name == "feddat":
    return "feddat", "adapter"
  family, _, method = name.partition("_")
  if family not in FAMILIES or method not in peft_lib.METHODS:
    raise ValueError(f"unknown algorithm {name!r}; use 'feddat' or '<family>_<method>' with family in "
                     f"{FAMILIES} and method in {peft_lib.METHODS}")
  return family, method


def peft_method(name: str) -> str:
  """The PEFT method an algorithm trains (the model must be built with it)."""
  return _parse(name)[1]


def make(name: str, model, optim, *, total_rounds: int, options: Mapping[str, Any] | None = None,
         aggregator: aggregators.Aggregator | None = None, min_clients: int = 1) -> base.Algorithm:
  """Build the named algorithm for `model` (whose PEFT method must be `peft_method(name)`).

  aggregator: how the server combines the shared uploads (`aggregators.make`; None: the weighted mean);
  min_clients: a round with fewer counted clients leaves the server parameters unchanged
  (`aggregators.with_quorum`). Neither applies to local (nothing shared) or centralized (no uploads) training.
  """
  algo = _make(name, model, optim, total_rounds=total_rounds, options=options,
               agg={} if aggregator is None else {"aggregator": aggregator})
  if algo.centralized or min_clients <= 1:
    return algo
  return dataclasses.replace(algo, aggregate=aggregators.with_quorum(algo.aggregate, min_clients))


def _make(name, model, optim, *, total_rounds, options, agg) -> base.Algorithm:
  family, method = _parse(name)
  if model.peft.method != method:
    raise ValueError(f"{name} trains PEFT method {method!r} but the model was built for {model.peft.method!r}")
  options = dict(options or {})
  unknown = set(options) - set(OPTIONS.get(family, ()))
  if unknown:
    raise ValueError(f"{name}: unknown options {sorted(unknown)}; it accepts {list(OPTIONS.get(family, ()))}")
  if family == "feddat":
    return feddat.make(model, optim, total_rounds=total_rounds, **options, **agg)
  if family == "fedprox":
    return fedprox.make(model, optim, total_rounds=total_rounds, name=name,
                        **({"mu": options["prox_mu"]} if "prox_mu" in options else {}), **agg)
  if family in _SERVER_OPT:
    return fedavg.make(model, optim, total_rounds=total_rounds, name=name, server_optimizer=_SERVER_OPT[family],
                       **options, **agg)
  if family == "local":
    return local.make(model, optim, total_rounds=total_rounds, name=name)
  if family == "centralized":
    return centralized.make(model, optim, total_rounds=total_rounds, name=name)
  return fedavg.make(model, optim, total_rounds=total_rounds, name=name, **agg)


def options_for(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
  """The subset of a config's algorithm options that `name` reads."""
  family, _ = _parse(name)
  return {k: options[k] for k in OPTIONS.get(family, ()) if k in options}
