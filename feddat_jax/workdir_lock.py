"""One run per workdir: a lock file `<workdir>/run.lock` holding the owner's pid, host, process start and
start time.

Two runs on one workdir would interleave checkpoints and logs (and orbax's clean-up of one would delete the
other's half-written checkpoint), so the second refuses in one line naming the holder. A lock left by a run that
died (its pid no longer runs on this host, or runs another program) is taken over with a warning; a lock of
another host cannot be checked from here, so the message says how to remove it if that run is gone. Taking over
a dead run's lock also removes the half-written `*.tmp` files it left in the workdir.

Under jax.distributed only process 0 takes the lock (every process of the job shares the workdir).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time

from absl import logging

from feddat_jax.config_checks import ConfigError

NAME = "run.lock"
_held: dict[str, dict] = {}  # workdir -> the lock this process wrote


class WorkdirLocked(ConfigError):
  """Another live run holds the workdir."""


def _process_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux /proc), to tell a reused pid apart."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rpartition(")")[2].split()[19]
  except (OSError, IndexError):
    return None


def _alive(owner: dict) -> bool:
  """Whether the lock's owner (on this host) still runs."""
  pid = owner.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # it exists, under another user
    pass
  start = owner.get("process_start")
  return start is None or _process_start(pid) in (None, start)


def _describe(owner: dict) -> str:
  started = owner.get("started")
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
  return f"pid {owner.get('pid')} on host {owner.get('host')}, started {when}"


def acquire(workdir: str) -> None:
  """Take `workdir`'s lock or raise WorkdirLocked; a stale lock is taken over with a warning."""
  workdir = os.path.abspath(workdir)
  path = os.path.join(workdir, NAME)
  if workdir in _held:  # e.g. two threads of one process
    raise WorkdirLocked(f"workdir {workdir} is in use by another run of this process (pid {os.getpid()})")
  me = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
        "started": time.time()}
  with _guard(workdir):  # one acquirer at a time, so that two take-overs of a stale lock cannot both win
    owner = _read(path)
    if owner == {}:
      _warn(f"workdir {workdir}: its {NAME} is unreadable (cut short by a crash?); taking it over")
      _remove_leftovers(workdir)
    elif owner is not None:
      mine = owner.get("pid") == me["pid"] and owner.get("host") == me["host"]
      if owner.get("host") != me["host"] and not mine:
        raise WorkdirLocked(f"workdir {workdir} is in use by {_describe(owner)} (its {NAME}); if that run is gone, "
                            f"delete {path} and rerun")
      if not mine and _alive(owner):
        raise WorkdirLocked(f"workdir {workdir} is in use by another run: {_describe(owner)}; wait for it or use "
                            "another --workdir")
      if not mine:
        _warn(f"workdir {workdir}: taking over the lock of a run that is gone ({_describe(owner)})")
        _remove_leftovers(workdir)
    tmp = f"{path}.{me['pid']}.tmp"
    with open(tmp, "w") as f:
      json.dump(me, f)
    os.replace(tmp, path)
  _held[workdir] = me


def release(workdir: str) -> None:
  """Remove `workdir`'s lock if this process holds it (no error otherwise)."""
  workdir = os.path.abspath(workdir)
  me = _held.pop(workdir, None)
  if me is None:
    return
  path = os.path.join(workdir, NAME)
  owner = _read(path)
  if owner is not None and owner.get("pid") == me["pid"] and owner.get("started") == me["started"]:
    with contextlib.suppress(OSError):
      os.remove(path)


def _remove_leftovers(workdir: str) -> None:
  """Half-written files (`<name>.tmp`, reporting.write_atomic's and this module's) of the run that died: nobody
  else writes here while the lock is ours. Checkpoints' temporary folders are orbax's to clean."""
  for name in os.listdir(workdir):
    path = os.path.join(workdir, name)
    if name.endswith(".tmp") and os.path.isfile(path):
      with contextlib.suppress(OSError):
        os.remove(path)


def _warn(msg: str) -> None:
  logging.warning(msg)
  print(f"warning: {msg}", flush=True)


def _read(path: str) -> dict | None:
  try:
    with open(path) as f:
      owner = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):  # a lock cut short by a crash while it was written
    return {}
  return owner if isinstance(owner, dict) else {}


@contextlib.contextmanager
def _guard(workdir: str):
  """An exclusive flock on the workdir itself (no extra file: a refused run leaves the workdir as it was)."""
  fd = os.open(workdir, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)
