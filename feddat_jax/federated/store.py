"""The client-state store: every client's state on the host, never on a device.

A population of K clients all start from one initial state (the algorithm's `init` gives every client the same
tree), so the store holds that tree once and a row only for each client that has trained. Each round the
cohort's rows are gathered into [C, ...] host arrays for the jitted round and scattered back from its output;
nothing anywhere is shaped [K, ...], so K = 10,000 costs host memory for the clients that ever trained and
device memory for the cohort only.

Checkpoints save `state()` ({"ids": int32 [n], "rows": tree of [n, ...]}) and `load` restores it; the rows
carry no device layout, so a run resumes on any device or process count.

>>> store = ClientStore(initial, num_clients=10_000)   # initial: one client's tree (numpy or jax arrays)
>>> rows = store.gather(cohort)                        # [C, ...] host arrays; ids >= K (dummies) get `initial`
>>> store.scatter(cohort, new_rows)                    # dummies dropped
"""
from __future__ import annotations

import jax
import numpy as np


class ClientStore:

  def __init__(self, initial, num_clients: int):
    self.initial = jax.tree_util.tree_map(np.asarray, initial)
    self.num_clients = num_clients
    self._rows: dict[int, list[np.ndarray]] = {}  # client id -> leaves (in the tree's flattening order)
    self._leaves, self._treedef = jax.tree_util.tree_flatten(self.initial)

  def __len__(self) -> int:
    """Clients with a row of their own (those that have trained)."""
    return len(self._rows)

  def gather(self, ids) -> object:
    """The clients' states stacked: a tree of [len(ids), ...] numpy arrays."""
    rows = [self._rows.get(int(i), self._leaves) for i in ids]
    return jax.tree_util.tree_unflatten(self._treedef, [np.stack(xs) for xs in zip(*rows)])

  def scatter(self, ids, rows) -> None:
    """Store row j of `rows` (a tree of [len(ids), ...]) as client ids[j]'s state; ids >= K are dropped."""
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(rows)]
    for j, i in enumerate(ids):
      if 0 <= int(i) < self.num_clients:
        self._rows[int(i)] = [x[j].copy() for x in leaves]

  def nbytes(self) -> int:
    """Host bytes held: the initial tree and every stored row."""
    per_row = sum(x.nbytes for x in self._leaves)
    return per_row * (1 + len(self._rows))

  def row_bytes(self) -> int:
    """Bytes of one client's state."""
    return sum(x.nbytes for x in self._leaves)

  def state(self) -> dict:
    """{"ids": int32 [n], "rows": tree of [n, ...]}: what a checkpoint saves (n >= 1: client 0 stands in when no
    client has trained yet, with its initial state)."""
    ids = np.array(sorted(self._rows) or [0], np.int32)
    return {"ids": ids, "rows": self.gather(ids)}

  def like(self, n: int) -> dict:
    """A `state()`-shaped tree of n rows (zeros), for restoring a checkpoint of n stored rows."""
    rows = jax.tree_util.tree_map(lambda x: np.zeros((n,) + x.shape, x.dtype), self.initial)
    return {"ids": np.zeros(n, np.int32), "rows": rows}

  def load(self, state: dict) -> None:
    """Replace every stored row by those of a `state()` (restored from a checkpoint)."""
    self._rows = {}
    self.scatter(np.asarray(state["ids"]), state["rows"])
