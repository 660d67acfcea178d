"""Orbax checkpoints of a run: server and client states after a round, with the config's fingerprint.

Everything else a resumed run needs is derived from (seed, round): data order, cohorts and step RNGs, so
"the states + the round" is the whole checkpoint. Orbax writes each step to a temporary folder and renames
it when complete, so a run killed mid-save resumes from the last complete step.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint that cannot be used (another config's, or unreadable); the message says what to do."""


class Checkpointer:

  def __init__(self, directory: str, fingerprint: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.fingerprint = fingerprint
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_round(self) -> int | None:
    """The number of rounds completed by the latest complete checkpoint, or None."""
    return self._manager.latest_step()

  def check_config(self) -> None:
    """Refuse a directory whose checkpoints were written by a run of another config."""
    step = self.latest_round()
    if step is None:
      return
    meta = self._read_meta(step)
    if meta.get("fingerprint") != self.fingerprint:
      raise CheckpointError(f"{self.directory} holds checkpoints of another config (fingerprint "
                            f"{meta.get('fingerprint')}, this run {self.fingerprint}); use a new --workdir "
                            "or delete that one")

  def _read_meta(self, step):
    try:
      return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(f"checkpoint {self.directory}/{step} is unreadable ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}); delete it to restart from the previous one") from None

  def save(self, rounds_done: int, state) -> None:
    self._manager.save(rounds_done, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"fingerprint": self.fingerprint,
                                                                    "round": rounds_done})))
    self._manager.wait_until_finished()

  def restore(self, rounds_done: int, like):
    """The saved state, with the structure, shapes and dtypes of `like`."""
    self._read_meta(rounds_done)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    try:
      out = self._manager.restore(rounds_done, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except Exception as e:
      raise CheckpointError(f"checkpoint {self.directory}/{rounds_done} does not match this run's states "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); use a new --workdir") from None
    return out["state"]

  def close(self):
    self._manager.close()
