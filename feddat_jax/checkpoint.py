"""Orbax checkpoints of a run: server and client states after a round, with the config's fingerprint.

Everything else a resumed run needs is derived from (seed, round): data order, cohorts and step RNGs, so
"the states + the round" is the whole checkpoint. Orbax writes each step to a temporary folder and renames
it when complete, so a run killed mid-save resumes from the last complete step; the killed save's temporary
folder is deleted when the next run opens the directory.

Each step also holds a small JSON `meta`: format version, the config fingerprint, the round, every state
array's shape and dtype, checked before any array is read, so that a checkpoint of another config or of other
shapes gives a one-line CheckpointError, and (format 2) the SHA-256 of every array's bytes, checked after it is
read, so that a damaged file (a flipped bit, a cut write) is never resumed from silently. `restore_latest`
tries the steps newest first and falls back, with a one-line warning, past damaged ones to the newest good
one. Nothing is ever unpickled: orbax stores arrays and JSON.
"""
from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from feddat_jax.federated import faults

FORMAT = 2  # meta's format version (1: no checksums; still restored, unverified)


class CheckpointError(ValueError):
  """A checkpoint that cannot be used (another config's, or unreadable); the message says what to do."""


class CheckpointDamaged(CheckpointError):
  """One step's files are damaged or incomplete (unreadable, or an array that fails its checksum); an older
  step may still be good."""


class Checkpointer:

  def __init__(self, directory: str, fingerprint: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.fingerprint = fingerprint
    debug = {}
    if os.environ.get(faults.PAUSE_ENV, "").startswith("save:"):
      debug["temporary_path_class"] = _PausingTemporaryPath  # test hook: pause before the rename
    self._reported = set()  # damaged steps already warned about
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                             cleanup_tmp_directories=True, **debug))

  def latest_round(self) -> int | None:
    """The number of rounds completed by the latest complete checkpoint, or None."""
    return self._manager.latest_step()

  def check_config(self, differences: str = "") -> None:
    """Refuse a directory whose checkpoints were written by a run of another config; `differences` (e.g. "rounds:
    10 there, 20 here") goes into the message."""
    meta, step = None, None
    for step in sorted(self._manager.all_steps(), reverse=True):  # the newest step whose meta can be read
      try:
        meta = self._read_meta(step)
        break
      except CheckpointDamaged as e:
        self._warn(step, e)
    if meta is None:
      return
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
      raise CheckpointDamaged(f"checkpoint {self.directory}/{step} is unreadable ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:200]})") from None

  def save(self, rounds_done: int, state) -> None:
    meta = {"format": FORMAT, "fingerprint": self.fingerprint, "round": rounds_done, "shapes": _shapes(state),
            "checksums": _checksums(state)}
    if rounds_done in self._manager.all_steps():  # a damaged step that restore_latest went past: replaced now
      self._manager.delete(rounds_done)
    self._manager.save(rounds_done, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def restore(self, rounds_done: int, like):
    """The saved state, with the structure, shapes and dtypes of `like`, each array checked against its checksum.

    Raises CheckpointError if the step does not fit `like`, CheckpointDamaged if its files are damaged.
    """
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
      first = (str(e).splitlines() or [""])[0][:200]
      if saved is not None:  # the shapes matched: the files are damaged or incomplete
        raise CheckpointDamaged(f"checkpoint {self.directory}/{rounds_done} is unreadable ({type(e).__name__}: "
                                f"{first})") from None
      raise CheckpointError(f"checkpoint {self.directory}/{rounds_done} does not match this run's states "
                            f"({type(e).__name__}: {first}); use a new --workdir") from None
    expected = meta.get("checksums") or {}
    for path, digest in _checksums(out["state"]).items():
      if expected.get(path) is not None and digest is not None and digest != expected[path]:
        raise CheckpointDamaged(f"checkpoint {self.directory}/{rounds_done} is damaged: {path} does not match its "
                                "checksum")
    return out["state"]

  def restore_latest(self, like_fn):
    """-> (rounds done, state) from the newest step that is intact, or (0, None) if there is no step.

    `like_fn(meta)` gives the tree to restore into (meta["shapes"]: {path: [shape, dtype]} of the saved arrays).
    A damaged step is reported in one line and the next older one is tried; a step that does not fit (another
    config's, other shapes) raises CheckpointError, as does a directory whose every step is damaged.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    for step in steps:
      try:
        meta = self._read_meta(step)
        return step, self.restore(step, like_fn(meta))
      except CheckpointDamaged as e:
        self._warn(step, e)
    if steps:
      raise CheckpointError(f"every checkpoint in {self.directory} is damaged (steps {sorted(steps)}); delete that "
                            "directory to start over, or use a new --workdir")
    return 0, None

  def _warn(self, step, error) -> None:
    if step not in self._reported:
      self._reported.add(step)
      msg = f"{error}; trying the previous checkpoint"
      logging.warning(msg)
      if jax.process_index() == 0:
        print(f"warning: {msg}", flush=True)

  def close(self):
    self._manager.close()


def _shapes(tree) -> dict[str, list]:
  """{path: [shape, dtype]} of every array in a state tree (JSON-able)."""
  return {jax.tree_util.keystr(path): [list(np.shape(x)), str(np.dtype(x.dtype))]
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _checksums(tree) -> dict[str, str | None]:
  """{path: SHA-256 of the array's bytes} (None for an array this process does not hold whole)."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if not getattr(x, "is_fully_addressable", True):
      out[jax.tree_util.keystr(path)] = None
      continue
    data = np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)
    out[jax.tree_util.keystr(path)] = hashlib.sha256(data).hexdigest()
  return out


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
