"""Algorithms written outside the package against its public API (docs/algorithms.md).

Run one from the repository root by its module:function name, e.g.
  python -m feddat_jax.main --config=configs/vqa.py:algorithm=examples.ditto:make
"""
