"""Run control for a trainer: the exit statuses of a stopped run, signals caught from the start,
work kept responsive to them, and the one-trainer lock on a run directory.

- `StopRequests`: SIGTERM / SIGINT set a flag the trainer checks between steps.
- `responsive(fn, stop)`: fn in a worker thread while the caller waits in short slices, so a
  signal during a long C++ call (an XLA compilation) is honoured at once.
- `RunLock`: one trainer per run directory: a `flock` on a local disk, an expiring lease of
  claim objects in object storage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import socket
import threading
import time
from typing import Any, Callable, NamedTuple

from vdm_jax.storage import rundir
from vdm_jax.training import runs

__all__ = ["EXIT_INTERRUPTED", "EXIT_PREEMPTED", "EXIT_STATUS", "LOCK_FILE", "Abandoned",
           "RunLock", "StopRequests", "responsive"]

# Exit statuses of a run stopped by a signal (a finished run exits 0, bad input 2).
EXIT_PREEMPTED = 3       # SIGTERM: state saved (or nothing new to save); rerun to resume
EXIT_INTERRUPTED = 130   # SIGINT (Ctrl-C), the shell's 128 + 2; state saved as for SIGTERM
EXIT_STATUS = {"SIGTERM": EXIT_PREEMPTED, "SIGINT": EXIT_INTERRUPTED}
LOCK_FILE = rundir.LOCK
_ATTEMPTS = 20          # lease attempts while other trainers start at the same instant
_PENDING_SECS = 60.0    # a claim not yet held after this long belongs to a trainer that died


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

  def reclaim(self) -> None:
    """Installs the handlers again (after `jax.distributed.initialize`, whose preemption
    notifier takes SIGTERM for itself), keeping the handlers to restore on exit."""
    for sig in self._old:
      signal.signal(sig, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    if self.requested is None:
      self.requested = signal.Signals(signum).name

  def __exit__(self, *exc) -> None:
    old, self._old = self._old, {}
    for sig, handler in old.items():
      signal.signal(sig, handler)


class RunLock:
  """One trainer per run directory: process 0 holds this while it trains.

  On a local disk: an exclusive `flock` on `workdir/train.lock`, released by the kernel however
  the process ends (no stale lock after a crash); the file keeps the last holder's pid and host.

  In object storage (gs://, s3://), where there is no flock: a lease among claim objects in the
  folder `workdir/train.lock/`, which needs only what GCS and S3 guarantee (a listing shows every
  object written before it started), no preconditions. A trainer writes a claim (pending), lists
  the folder, and:

  - another held claim, alive: refused (`runs.RunError` naming its holder);
  - another pending claim, alive: both may be starting at the same instant, so it withdraws its
    claim and tries again after a random pause (0.2-1 s), up to `_ATTEMPTS` times;
  - none: it marks its claim held and trains.

  Two trainers can never both hold it: the later of two claims is listed after the earlier was
  written, sees it, and withdraws. A held claim is refreshed every `expiry_secs / 10` (the
  heartbeat, a thread); one whose last refresh is more than `expiry_secs` old (a trainer killed
  by kill -9 or a lost VM), or a pending one older than `_PENDING_SECS`, is stale: the next
  trainer deletes it with a warning naming the old holder, and takes the lock. Ages are measured
  on the storage's own clock (the claims' modification times), so hosts' clocks do not matter. A
  holder whose claim disappears (taken over after a stall longer than the expiry) sees it at
  its next heartbeat: `lost` becomes True and the trainer stops.

  Readers (`vdm-jax eval`, `sample`) do not take it.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, expiry_secs: float = 300.0):
    if not expiry_secs > 0:
      raise ValueError(f"expiry_secs must be > 0, got {expiry_secs}")
    self.workdir, self.enabled, self.expiry_secs = workdir, enabled, float(expiry_secs)
    self.path = rundir.join(workdir, LOCK_FILE)
    self.holder = f"pid {os.getpid()} on {socket.gethostname()}"
    self.lost = False
    self._stack = contextlib.ExitStack()
    self._claim: str | None = None
    self._stop_heartbeat = threading.Event()
    self._heartbeat_thread: threading.Thread | None = None

  def __enter__(self) -> "RunLock":
    if not self.enabled:
      return self
    if rundir.is_remote(self.path):   # a failing bucket is a StorageError (the trainer's)
      self._take_lease()
      return self
    try:
      self._take_flock()
    except OSError as e:
      self._stack.close()
      raise runs.RunError(f"cannot use {self.workdir!r} as a run directory: "
                          f"{e.strerror or e} ({self.path})") from e
    return self

  def _refuse(self, holder: str) -> None:
    raise runs.RunError(
        f"{self.workdir!r} is being trained by another process ({holder}; lock {self.path}); two "
        f"trainers would write the same checkpoints. Wait for it or stop it, or use another "
        f"--workdir (vdm-jax eval and sample may run beside it)")

  def _holder_line(self, info: dict, age: float) -> str:
    return (f"{info.get('holder', 'holder unknown')}, last heartbeat {age:.0f} s ago; a lock "
            f"without one for {float(info.get('expiry_secs', self.expiry_secs)):.0f} s expires")

  def _take_flock(self) -> None:
    rundir.make_dirs(self.workdir)
    holder = self._stack.enter_context(rundir.local_flock(self.path, holder=self.holder))
    if holder is not None:
      self._stack.close()
      self._refuse(holder)

  def _claim_text(self, held: bool) -> str:
    return json.dumps({"holder": self.holder, "held": held, "expiry_secs": self.expiry_secs})

  def _take_lease(self) -> None:
    for _ in range(_ATTEMPTS):
      mine = rundir.join(self.path, rundir.unique_name("claim-", ".json"))
      rundir.write_text(mine, self._claim_text(held=False))
      now = rundir.mtime(mine)   # the storage's clock
      held, pending = self._others(mine, now)
      if held or pending:
        rundir.remove(mine)
        if held:
          self._refuse(held[0])
        time.sleep(random.uniform(0.2, 1.0))
        continue
      rundir.write_text(mine, self._claim_text(held=True))
      self._claim = mine
      self._heartbeat_thread = threading.Thread(target=self._heartbeat, daemon=True,
                                                name="vdm-jax-lock-heartbeat")
      self._heartbeat_thread.start()
      return
    raise runs.RunError(f"could not take the lock {self.path}: other trainers were starting on "
                        f"{self.workdir!r} at the same time in {_ATTEMPTS} attempts; try again")

  def _others(self, mine: str, now: float) -> tuple[list[str], list[str]]:
    """(holders of the live held claims, of the live pending ones) other than `mine`; stale
    claims are deleted with a warning."""
    held, pending = [], []
    for claim_name in rundir.list_names(self.path):
      claim = rundir.join(self.path, claim_name)
      if claim == mine:
        continue
      try:
        info, age = json.loads(rundir.read_text(claim)), now - rundir.mtime(claim)
      except FileNotFoundError:   # withdrawn or released meanwhile
        continue
      except ValueError:   # half-written by a store without atomic uploads: treat as pending
        info, age = {"holder": "unknown", "held": False}, 0.0
      is_held = bool(info.get("held"))
      limit = float(info.get("expiry_secs", self.expiry_secs)) if is_held else _PENDING_SECS
      if age > limit:
        logging.warning("taking over the lock %s: %s's claim was last refreshed %.0f s ago "
                        "(expiry %.0f s): that trainer is gone (killed, or its VM lost)",
                        self.path, info.get("holder", "unknown"), age, limit)
        rundir.remove(claim)
        continue
      (held if is_held else pending).append(self._holder_line(info, age))
    return held, pending

  def _heartbeat(self) -> None:
    while not self._stop_heartbeat.wait(self.expiry_secs / 10) and self._beat():
      pass

  def _beat(self) -> bool:
    """Refreshes the claim; False (and `lost`) once it is gone: taken over after a stall."""
    claim = self._claim
    if claim is None:
      return False
    try:
      if not rundir.exists(claim):
        self.lost = True
        logging.error("the lock %s was taken over by another trainer (this trainer stalled for "
                      "longer than the expiry, %.0f s); stopping", self.path, self.expiry_secs)
        return False
      rundir.write_text(claim, self._claim_text(held=True))
    except OSError as e:   # a passing storage failure: the next beat tries again
      logging.warning("refreshing the lock %s failed: %s", self.path, e)
    return True

  def __exit__(self, *exc) -> None:
    self._stop_heartbeat.set()
    if self._heartbeat_thread is not None:   # a beat in progress would write the claim again
      self._heartbeat_thread.join(timeout=self.expiry_secs)
    claim, self._claim = self._claim, None
    if claim is not None:
      try:
        rundir.remove(claim)
      except OSError as e:
        logging.warning("could not release the lock %s (%s); it expires after %.0f s",
                        self.path, e, self.expiry_secs)
    self._stack.close()


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
