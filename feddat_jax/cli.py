"""How the command-line tools end when something stops them: one line and an exit status, never a traceback,
for whatever the user can act on.

  status 2    a user error (experiment.user_errors(): a bad config value, an unusable checkpoint, a diverged
              run, a workdir in use) or a file system that refuses to be written (read-only, full, no access);
  status 130  Ctrl-C: the run stops where it is and a rerun of the same command resumes from its last checkpoint.
"""
from __future__ import annotations

import errno
import os
import sys

INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
_STORAGE = {errno.EACCES: "no permission to write there", errno.EPERM: "not permitted",
            errno.EROFS: "the file system is read-only", errno.ENOSPC: "the disk is full",
            errno.EDQUOT: "the disk quota is exhausted"}


def run_or_exit(fn, *args, **kwargs):
  """fn(*args, **kwargs), its return value; a user error or Ctrl-C -> one line on stderr and sys.exit."""
  from feddat_jax import experiment
  try:
    return fn(*args, **kwargs)
  except KeyboardInterrupt:
    print("interrupted; rerun the same command to resume", file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED)
  except experiment.user_errors() as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except OSError as e:
    if e.errno not in _STORAGE:
      raise
    where = e.filename or "the workdir"
    print(f"error: cannot write {where}: {_STORAGE[e.errno]} ({e.strerror}); fix that or pick another --workdir, "
          "then rerun the same command (it resumes from the last checkpoint)", file=sys.stderr, flush=True)
    sys.exit(2)


def fail(message: str, status: int = 2):
  """One line on stderr and exit: for checks of command-line arguments before any work."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def check_output(flag: str, path: str) -> None:
  """An output file's folder must exist and be writable, checked before the work that produces the file."""
  parent = os.path.dirname(os.path.abspath(os.path.expanduser(path)))
  if not os.path.isdir(parent):
    fail(f"{flag}={path}: the folder {parent} does not exist; create it first")
  if not os.access(parent, os.W_OK):
    fail(f"{flag}={path}: the folder {parent} is not writable")
