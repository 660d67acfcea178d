"""docs/algorithms.md: its Python blocks run, in order, in one namespace (the page's example algorithm trains)."""
import pathlib
import re

import helpers

from feddat_jax.federated import algorithms as registry

PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "algorithms.md"


def python_blocks(text: str) -> list[str]:
  return re.findall(r"^```python\n(.*?)^```$", text, re.M | re.S)


def test_python_blocks_run():
  blocks = python_blocks(PAGE.read_text(encoding="utf-8"))
  assert len(blocks) >= 2
  namespace = {"__name__": "docs_algorithms"}
  try:
    with helpers.fast_compile():
      for i, block in enumerate(blocks):
        exec(compile(block, f"{PAGE.name}[python block {i}]", "exec"), namespace)  # noqa: S102
  finally:
    registry.FACTORIES.pop("sgd_fedavg", None)  # the page registers its algorithm; leave the table as it was
  assert namespace["algo"].name == "sgd_fedavg"
