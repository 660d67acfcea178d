"""Orbax checkpoints of a run: server and client states after a round, with the config's fingerprint.

Everything else a resumed run needs is derived from (seed, round): data order, cohorts and step RNGs, so
"the states + the round" is the whole checkpoint. Orbax writes each step to a temporary folder and renames
it when complete, so a run killed mid-save resumes from the last complete step; the killed save's temporary
folder is deleted when the next run opens the directory.

Each step also holds a small JSON `meta`: format version, the config fingerprint, the round and every state
array's shape and dtype, checked before any array is read, so that a checkpoint of another config or of other
shapes gives a one-line CheckpointError. Nothing is ever unpickled: orbax stores arrays and JSON.
"""
from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from feddat_jax.federated import faults

FORMAT = 1  # meta's format version


class CheckpointError(ValueError):
  """A checkpoint that cannot be used (another config's, or unreadable); the message says what to do."""


class Checkpointer:

  def __init__(self, directory: str, fingerprint: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.fingerprint = fingerprint
    debug = {}
    if os.environ.get(faults.PAUSE_ENV, "").startswith("save:"):
      debug["temporary_path_class"] = _PausingTemporaryPath  # test hook: pause before the rename
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                             cleanup_tmp_directories=True, **debug))

  def latest_round(self) -> int | None:
    """The number of rounds completed by the latest complete checkpoint, or None."""
    return self._manager.latest_step()

  def check_config(self, differences: str = "") -> None:
    """Refuse a directory whose checkpoints were written by a run of another config; `differences` (e.g. "rounds:
    10 there, 20 here") goes into the message."""
    step = self.latest_round()
    if step is None:
      return
    meta = self._read_meta(step)
    if not isinstance(meta, dict) or "fingerprint" not in meta or meta.get("round") != step:
      raise CheckpointError(f"checkpoint {self.directory}/{step} is not a feddat_jax checkpoint (its meta is "
                            f"{str(meta)[:100]}); use a new --workdir or delete that one")
    if meta.get("fingerprint") != self.fingerprint:
      raise CheckpointError(f"{self.directory} holds checkpoints of another config (fingerprint "
                            f"{meta.get('fingerprint')}, this run {self.fingerprint}"
                            + (f"; {differences}" if differences else "") + "); use a new --workdir or delete that one")

  def _read_meta(self, step):
    try:
      return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(f"checkpoint {self.directory}/{step} is unreadable ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}); delete it to restart from the previous one") from None

  def save(self, rounds_done: int, state) -> None:
    meta = {"format": FORMAT, "fingerprint": self.fingerprint, "round": rounds_done, "shapes": _shapes(state)}
    self._manager.save(rounds_done, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def restore(self, rounds_done: int, like):
    """The saved state, with the structure, shapes and dtypes of `like`."""
    meta = self._read_meta(rounds_done)
    saved = meta.get("shapes") if isinstance(meta, dict) else None
    if saved is not None:  # checkpoints of format 1 and later
      expected = _shapes(like)
      for path in sorted(set(saved) | set(expected)):
        if saved.get(path) != expected.get(path):
          raise CheckpointError(f"checkpoint {self.directory}/{rounds_done} does not match this run's states: "
                                f"{path} is {_describe(saved.get(path))} there, {_describe(expected.get(path))} "
                                "here; use a new --workdir")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    try:
      out = self._manager.restore(rounds_done, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except Exception as e:
      raise CheckpointError(f"checkpoint {self.directory}/{rounds_done} does not match this run's states "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); use a new --workdir") from None
    return out["state"]

  def close(self):
    self._manager.close()


def _shapes(tree) -> dict[str, list]:
  """{path: [shape, dtype]} of every array in a state tree (JSON-able)."""
  return {jax.tree_util.keystr(path): [list(np.shape(x)), str(np.dtype(x.dtype))]
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _describe(entry) -> str:
  return "absent" if entry is None else f"{entry[1]}{tuple(entry[0])}"


class _PausingTemporaryPath(ocp.path.atomicity.AtomicRenameTemporaryPath):
  """Orbax's atomic-rename step folder, pausing (faults.pause_point "save") after the step's files are
  written and before the rename that completes it: the one point where a kill leaves a temporary folder."""

  async def finalize(self, *args, **kwargs):
    name = self.get_final().name
    if name.isdigit():
      faults.pause_point("save", int(name))
    return await super().finalize(*args, **kwargs)
