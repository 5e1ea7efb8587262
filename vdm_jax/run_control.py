"""Run control for a trainer: the exit statuses of a stopped run, signals caught from the start,
work kept responsive to them, and the one-trainer lock on a run directory.

- `StopRequests`: SIGTERM / SIGINT set a flag the trainer checks between steps.
- `responsive(fn, stop)`: fn in a worker thread while the caller waits in short slices, so a
  signal during a long C++ call (an XLA compilation) is honoured at once.
- `RunLock`: an exclusive `flock` on `workdir/train.lock`, released by the kernel however the
  process ends.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import threading
from typing import Any, Callable, NamedTuple

from vdm_jax import runs

__all__ = ["EXIT_INTERRUPTED", "EXIT_PREEMPTED", "EXIT_STATUS", "LOCK_FILE", "Abandoned",
           "RunLock", "StopRequests", "responsive"]

# Exit statuses of a run stopped by a signal (a finished run exits 0, bad input 2).
EXIT_PREEMPTED = 3       # SIGTERM: state saved (or nothing new to save); rerun to resume
EXIT_INTERRUPTED = 130   # SIGINT (Ctrl-C), the shell's 128 + 2; state saved as for SIGTERM
EXIT_STATUS = {"SIGTERM": EXIT_PREEMPTED, "SIGINT": EXIT_INTERRUPTED}
LOCK_FILE = "train.lock"


class StopRequests:
  """SIGTERM / SIGINT -> `requested` (the first signal's name), which the trainer checks; the
  handlers are installed in the main thread only (elsewhere signals keep their handlers)."""

  def __init__(self):
    self.requested: str | None = None
    self._old = {}

  def __enter__(self) -> "StopRequests":
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:   # not the main thread
        pass
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    if self.requested is None:
      self.requested = signal.Signals(signum).name

  def __exit__(self, *exc) -> None:
    old, self._old = self._old, {}
    for sig, handler in old.items():
      signal.signal(sig, handler)


class RunLock:
  """An exclusive `fcntl.flock` on `workdir/train.lock`, held while a trainer runs.

  The kernel releases it when the process ends, however it ends (no stale lock after a crash);
  the file itself stays, holding the last holder's pid and host. Readers (`vdm-jax eval`,
  `sample`) do not take it.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.path, self.enabled, self._file = os.path.join(workdir, LOCK_FILE), enabled, None

  def __enter__(self) -> "RunLock":
    if not self.enabled:
      return self
    try:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      f = open(self.path, "a+", encoding="utf-8")
    except OSError as e:
      raise runs.RunError(f"cannot use {os.path.dirname(self.path)!r} as a run directory: "
                          f"{e.strerror or e} ({self.path})") from e
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      f.seek(0)
      holder = f.read().strip()
      f.close()
      if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
        logging.warning("cannot lock %s (%s): a second trainer on this run would not be "
                        "detected", self.path, e)
        return self
      raise runs.RunError(
          f"{os.path.dirname(self.path)!r} is being trained by another process "
          f"({holder or 'holder unknown'}; lock {self.path}); two trainers would write the same "
          f"checkpoints. Wait for it or stop it, or use another --workdir (vdm-jax eval and "
          f"sample may run beside it)") from e
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    self._file = f
    return self

  def __exit__(self, *exc) -> None:
    f, self._file = self._file, None
    if f is not None:
      fcntl.flock(f, fcntl.LOCK_UN)
      f.close()


class Abandoned(NamedTuple):
  """A preparation left running in its thread after a signal (see `responsive`)."""
  phase: str


def responsive(fn: Callable[[Callable[[str], None]], Any], stop: StopRequests) -> Any:
  """fn(set_phase) in a worker thread, the calling thread waiting in short slices so that its
  signal handlers run at once (XLA compilation is one long C++ call that would defer them).

  Returns fn's value, or `Abandoned(phase)` when a signal came first (the worker is a daemon
  thread; an uninterruptible compilation finishes there, unused). fn's exception is re-raised.
  """
  box: dict[str, Any] = {"phase": "starting"}
  done = threading.Event()

  def run():
    try:
      box["value"] = fn(lambda phase: box.__setitem__("phase", phase))
    except BaseException as e:  # pylint: disable=broad-except  # re-raised in the caller
      box["error"] = e
    finally:
      done.set()

  threading.Thread(target=run, name="vdm-jax-prepare", daemon=True).start()
  while not done.wait(0.05):
    if stop.requested is not None:
      return Abandoned(box["phase"])
  if "error" in box:
    raise box["error"]
  return box["value"]
