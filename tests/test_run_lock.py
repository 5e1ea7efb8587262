"""run_control.RunLock in object storage (the GCS emulator on loopback): a lease of claim objects
that needs only strongly consistent writes and listings. Exactly one of several trainers
starting at the same instant gets it; a live one refuses the next; a stale one (its holder killed)
is taken over with a warning naming the holder; a holder that stalled past the expiry learns
that it lost the lock. The local flock is tested with the trainer (test_reliability.py)."""

import logging
import threading
import time

import pytest

from vdm_jax.storage import rundir
from vdm_jax.training import run_control, runs


def _lock(gs_dir, holder, expiry=2.0):
  lock = run_control.RunLock(gs_dir, expiry_secs=expiry)
  lock.holder = holder
  return lock


def test_trainers_starting_at_the_same_instant_get_exactly_one_lock(gs_dir, monkeypatch):
  """Each contender's first claim is written before any of them lists the folder (a barrier
  between the two), the worst interleaving: all see each other's pending claims and withdraw;
  after their random pauses exactly one holds the lock and the others are refused by it."""
  n, barrier, first = 3, threading.Barrier(3), set()
  real_mtime = rundir.mtime

  def mtime_after_every_first_claim(path):
    if threading.get_ident() not in first:
      first.add(threading.get_ident())
      barrier.wait(timeout=60)
    return real_mtime(path)

  monkeypatch.setattr(rundir, "mtime", mtime_after_every_first_claim)
  withdrawn, real_remove = [], rundir.remove
  monkeypatch.setattr(rundir, "remove", lambda path, **k: (withdrawn.append(path),
                                                           real_remove(path, **k)))
  results = {}

  def contend(i):
    lock = _lock(gs_dir, f"trainer {i}")
    try:
      lock.__enter__()
      results[i] = lock
    except runs.RunError as e:
      results[i] = e

  threads = [threading.Thread(target=contend, args=(i,)) for i in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  holders = [i for i, r in results.items() if isinstance(r, run_control.RunLock)]
  assert len(results) == n and len(holders) == 1, results
  assert len(withdrawn) >= n   # every first claim was withdrawn
  for i, r in results.items():
    if i != holders[0]:
      assert f"trainer {holders[0]}" in str(r) and "being trained by another process" in str(r)
  results[holders[0]].__exit__(None, None, None)
  assert rundir.list_names(rundir.join(gs_dir, run_control.LOCK_FILE)) == []


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(gs_dir, caplog):
  first = _lock(gs_dir, "pid 1 on host-a").__enter__()
  with pytest.raises(runs.RunError, match="pid 1 on host-a"):
    _lock(gs_dir, "pid 2 on host-b").__enter__()
  first._stop_heartbeat.set()   # host-a is killed: its claim stays, nobody refreshes it
  time.sleep(2.5)
  caplog.set_level(logging.WARNING)
  second = _lock(gs_dir, "pid 2 on host-b").__enter__()
  warned = [r.getMessage() for r in caplog.records if "taking over the lock" in r.getMessage()]
  assert len(warned) == 1 and "pid 1 on host-a" in warned[0]
  claims = rundir.list_names(rundir.join(gs_dir, run_control.LOCK_FILE))
  assert len(claims) == 1   # host-a's claim was removed
  # host-a was only stalled: at its next heartbeat it finds its claim gone, and knows.
  assert not first._beat() and first.lost
  assert second._beat() and not second.lost   # the new holder's heartbeat refreshes its claim
  second.__exit__(None, None, None)


def test_a_heartbeat_keeps_a_lock_alive_past_its_expiry(gs_dir):
  held = _lock(gs_dir, "pid 1 on host-a", expiry=1.5).__enter__()
  time.sleep(3.0)   # two expiries; refreshed every 0.15 s
  with pytest.raises(runs.RunError, match="pid 1 on host-a"):
    _lock(gs_dir, "pid 2 on host-b", expiry=1.5).__enter__()
  held.__exit__(None, None, None)
  _lock(gs_dir, "pid 2 on host-b").__enter__().__exit__(None, None, None)   # released: free
