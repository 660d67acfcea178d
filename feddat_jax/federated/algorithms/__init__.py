"""The registry: config names -> algorithm factories.

Names:
- "feddat"; and "<family>_<peft method>" for family in FAMILIES and method in peft.METHODS, e.g.
  "fedavg_adapter", "fedavg_lora", "fedprox_adapter", "fedadam_bitfit", "local_adapter", "centralized_full";
- "module:function", an algorithm from outside the package (docs/algorithms.md; e.g. "examples.ditto:make"):
  the module is imported by importlib on first use and the function registered under that name.

Every name maps to a `Factory`: the function that builds the algorithm, the PEFT method the model must be built
with, and the config options the function reads. A factory function is called as

    factory(model, optim, *, total_rounds, options, aggregator) -> base.Algorithm

(options: the config options it declares that the config sets; aggregator: `aggregators.make`'s function for the
shared uploads, `aggregators.mean` by default). An outside module declares the PEFT method with a module attribute
`PEFT_METHOD = "adapter"` (or a `peft_method` attribute on the function) and its options with `OPTIONS = (...)`
(or `function.options`).

>>> method = peft_method("fedavg_lora")                  # which PEFT sites the model needs: "lora"
>>> algo = make("fedavg_lora", model, optim_cfg, total_rounds=30, options={})
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

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


@dataclasses.dataclass(frozen=True)
class Factory:
  """How a name becomes an algorithm.

  make: (model, optim, *, total_rounds, options, aggregator) -> base.Algorithm;
  peft_method: the PEFT method the model must be built with (one of peft.METHODS);
  options: the names of the config options (`config.options.<name>`) that `make` reads.
  """
  make: Callable[..., base.Algorithm]
  peft_method: str
  options: tuple[str, ...] = ()


# name -> Factory: every built-in name, and each "module:function" name once it has been resolved.
FACTORIES: dict[str, Factory] = {}


def register(name: str, make_fn: Callable[..., base.Algorithm], peft_method: str,
             options: tuple[str, ...] = ()) -> Factory:
  """Add (or replace) the algorithm `name`; what `make(name, ...)` builds from then on."""
  if peft_method not in peft_lib.METHODS:
    raise ValueError(f"algorithm {name!r} trains PEFT method {peft_method!r}, which is not one of "
                     f"{peft_lib.METHODS}")
  FACTORIES[name] = Factory(make_fn, peft_method, tuple(options))
  return FACTORIES[name]


def _builtin(family: str, method: str):
  name = "feddat" if family == "feddat" else f"{family}_{method}"

  def make_fn(model, optim, *, total_rounds, options, aggregator):
    if family == "feddat":
      return feddat.make(model, optim, total_rounds=total_rounds, **options, aggregator=aggregator)
    if family == "fedprox":
      return fedprox.make(model, optim, total_rounds=total_rounds, name=name,
                          **({"mu": options["prox_mu"]} if "prox_mu" in options else {}), aggregator=aggregator)
    if family in _SERVER_OPT:
      return fedavg.make(model, optim, total_rounds=total_rounds, name=name, server_optimizer=_SERVER_OPT[family],
                         **options, aggregator=aggregator)
    if family == "local":  # nothing shared: no aggregator
      return local.make(model, optim, total_rounds=total_rounds, name=name)
    if family == "centralized":  # no uploads: no aggregator
      return centralized.make(model, optim, total_rounds=total_rounds, name=name)
    return fedavg.make(model, optim, total_rounds=total_rounds, name=name, aggregator=aggregator)

  register(name, make_fn, method, OPTIONS.get(family, ()))


_builtin("feddat", "adapter")
for _family in FAMILIES:
  for _method in peft_lib.METHODS:
    _builtin(_family, _method)


def names() -> list[str]:
  """The built-in names (outside "module:function" names are not listed)."""
  return [n for n in FACTORIES if ":" not in n]


def _one_line(e: BaseException) -> str:
  return " ".join(f"{type(e).__name__}: {e}".split())


def _import(name: str) -> Factory:
  """"module:function" -> its Factory (ValueError with one readable line when it cannot be had)."""
  module_name, _, attr = name.partition(":")
  if not module_name or not attr:
    raise ValueError(f"algorithm={name!r}: an outside algorithm is named 'module:function', e.g. "
                     "'examples.ditto:make'")
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # noqa: BLE001 -- whatever the module raises on import, reported in one line
    raise ValueError(f"algorithm={name!r}: cannot import module {module_name!r} ({_one_line(e)}); run from the "
                     "directory that holds it or put it on PYTHONPATH") from None
  make_fn = getattr(module, attr, None)
  if not callable(make_fn):
    raise ValueError(f"algorithm={name!r}: module {module_name!r} has no function {attr!r}")
  method = getattr(make_fn, "peft_method", getattr(module, "PEFT_METHOD", None))
  if method is None:
    raise ValueError(f"algorithm={name!r}: say which PEFT method it trains: PEFT_METHOD = 'adapter' in module "
                     f"{module_name!r} or {attr}.peft_method = 'adapter'")
  options = getattr(make_fn, "options", getattr(module, "OPTIONS", ()))
  if isinstance(options, str) or not all(isinstance(o, str) for o in options):
    raise ValueError(f"algorithm={name!r}: OPTIONS must be a tuple of config option names, got {options!r}")
  try:
    return register(name, make_fn, method, tuple(options))
  except ValueError as e:
    raise ValueError(f"algorithm={name!r}: {e}") from None


def resolve(name: str) -> Factory:
  """The Factory of a built-in or "module:function" name; ValueError (one line) for anything else."""
  if name in FACTORIES:
    return FACTORIES[name]
  if ":" in name:
    return _import(name)
  raise ValueError(f"unknown algorithm {name!r}; use 'feddat', '<family>_<method>' with family in "
                   f"{FAMILIES} and method in {peft_lib.METHODS}, or 'module:function'")


def peft_method(name: str) -> str:
  """The PEFT method an algorithm trains (the model must be built with it)."""
  return resolve(name).peft_method


def make(name: str, model, optim, *, total_rounds: int, options: Mapping[str, Any] | None = None,
         aggregator: aggregators.Aggregator | None = None, min_clients: int = 1) -> base.Algorithm:
  """Build the named algorithm for `model` (whose PEFT method must be `peft_method(name)`).

  aggregator: how the server combines the shared uploads (`aggregators.make`; None: the weighted mean);
  min_clients: a round with fewer counted clients leaves the server parameters unchanged
  (`aggregators.with_quorum`). Neither applies to local (nothing shared) or centralized (no uploads) training.
  """
  factory = resolve(name)
  if model.peft.method != factory.peft_method:
    raise ValueError(f"{name} trains PEFT method {factory.peft_method!r} but the model was built for "
                     f"{model.peft.method!r}")
  options = dict(options or {})
  unknown = set(options) - set(factory.options)
  if unknown:
    raise ValueError(f"{name}: unknown options {sorted(unknown)}; it accepts {list(factory.options)}")
  algo = factory.make(model, optim, total_rounds=total_rounds, options=options,
                      aggregator=aggregators.mean if aggregator is None else aggregator)
  if not isinstance(algo, base.Algorithm):
    raise TypeError(f"{name} returned {type(algo).__name__}, not a feddat_jax.federated.algorithms.base.Algorithm")
  if algo.centralized or min_clients <= 1:
    return algo
  return dataclasses.replace(algo, aggregate=aggregators.with_quorum(algo.aggregate, min_clients))


def options_for(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
  """The subset of a config's algorithm options that `name` reads."""
  return {k: options[k] for k in resolve(name).options if k in options}
