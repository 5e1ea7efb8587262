"""`s3://` paths against a local S3 server (moto's server mode on loopback,
`vdm_jax.testing.s3_emulator`), configured by environment variables alone: what works and what
does not (docs/pods_and_clusters.md says the same).

Works, through s3fs (the `s3` extra): every file vdm_jax.storage.rundir writes and reads (the
rundir tests of test_rundir.py run here on S3), and the run lock's lease of claim objects (S3's
modification times are whole seconds; the lease needs no better).

Does not: checkpoints. Orbax builds TensorStore specs for gs:// and local paths only; for
`s3://B/R/checkpoints/2/state` it takes `s3:/B/R/...` for a relative local path (it would stop
at the first checkpoint, having written a stray `./s3:/B/R/...` folder). So
`checkpointing.check_location` refuses an s3:// checkpoint directory, and `vdm-jax train
--workdir s3://...` stops with one `error:` line before writing anything. Beyond that,
TensorStore's `s3` driver ignores AWS_ENDPOINT_URL: a custom endpoint would need the `endpoint`
member of a spec, which only Orbax builds. The last two tests pin this; once Orbax writes to S3,
widen `checkpointing.CHECKPOINT_SCHEMES`, test the train / resume / eval commands here as
test_bucket_runs.py does for gs://, and correct the docs.
"""

import logging
import os
import pathlib
import subprocess
import sys
import time
import uuid

import pytest

# pylint: disable=unused-import  # the tests of test_rundir imported run here, on S3
from conftest import patience
import test_rundir
from test_rundir import (test_append_file_keeps_every_append_across_reopening,
                         test_arrays_and_images_round_trip, test_write_folder_is_all_or_nothing)
from vdm_jax.storage import checkpointing, rundir
from vdm_jax.testing import s3_emulator
from vdm_jax.training import run_control, runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.py")


@pytest.fixture(scope="module")
def s3():
  """moto's S3 on loopback, with this process's clients pointed at it for this module."""
  emulator = s3_emulator.Emulator().start()
  with emulator.environment():
    yield emulator
  emulator.stop()


@pytest.fixture
def s3_dir(s3):
  """A fresh s3:// folder in the server's bucket."""
  del s3
  return f"s3://{s3_emulator.BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def where(s3_dir):
  """test_rundir's folder, here in S3 (its tests imported above run with it)."""
  return s3_dir


def test_whole_file_writes_read_back_and_list_on_s3(where):
  test_rundir.test_whole_file_writes_read_back_and_list(where)


def test_removing_objects_on_s3(s3_dir):
  """S3 deletes a missing object without an error; rundir.remove still raises for one unless
  missing_ok, as on a disk and on GCS; remove_tree removes everything."""
  rundir.write_bytes(s3_dir + "/a/b", b"1")
  rundir.write_bytes(s3_dir + "/c", b"2")
  with pytest.raises(FileNotFoundError):
    rundir.remove(s3_dir + "/missing", missing_ok=False)
  rundir.remove(s3_dir + "/missing")
  rundir.remove(s3_dir + "/c", missing_ok=False)
  rundir.remove_tree(s3_dir)
  assert rundir.list_names(s3_dir) == [] and not rundir.exists(s3_dir + "/a/b")


def _lock(path, holder, expiry):
  lock = run_control.RunLock(path, expiry_secs=expiry)
  lock.holder = holder
  return lock


def test_the_run_lock_lease_on_s3(s3_dir, caplog):
  """A live lease refuses the next trainer; one whose heartbeat stopped is taken over after its
  expiry, measured on S3's whole-second clock (hence the margin); released, nothing is left."""
  claims = rundir.join(s3_dir, run_control.LOCK_FILE)
  first = _lock(s3_dir, "pid 1 on host-a", expiry=1.0).__enter__()
  with pytest.raises(runs.RunError, match="pid 1 on host-a"):
    _lock(s3_dir, "pid 2 on host-b", expiry=1.0).__enter__()
  first._stop_heartbeat.set()   # pylint: disable=protected-access  # host-a is killed
  first._heartbeat_thread.join()   # pylint: disable=protected-access
  time.sleep(2.5)
  caplog.set_level(logging.WARNING)
  second = _lock(s3_dir, "pid 2 on host-b", expiry=1.0).__enter__()
  warned = [r.getMessage() for r in caplog.records if "taking over the lock" in r.getMessage()]
  assert len(warned) == 1 and "pid 1 on host-a" in warned[0]
  assert len(rundir.list_names(claims)) == 1
  assert not first._beat() and first.lost   # pylint: disable=protected-access
  second.__exit__(None, None, None)
  assert rundir.list_names(claims) == []


def test_checkpoints_on_s3_are_refused_by_name(s3_dir, tmp_path):
  """Orbax cannot write checkpoints to s3:// (see the module docstring): the manager refuses
  the directory before Orbax sees it; local folders and gs:// pass the check."""
  with pytest.raises(ValueError, match=r"'s3://\S+/ckpt': checkpoints can be written to a local "
                     r"folder or gs:// only"):
    checkpointing.CheckpointManager(s3_dir + "/ckpt")
  checkpointing.check_location(str(tmp_path / "ckpt"))
  checkpointing.check_location("gs://bucket/run/checkpoints")
  assert not rundir.exists(s3_dir + "/ckpt")


@pytest.mark.slow
def test_training_on_s3_is_refused_before_anything_is_written(s3, s3_dir, tmp_path):
  """`vdm-jax train --workdir s3://...`: one `error:` line naming the path and what works,
  exit 2, before the lock, metrics or any checkpoint file is written (Orbax would otherwise
  stop at the first checkpoint, having written a stray `./s3:/...` folder locally)."""
  run, cwd = s3_dir + "/run", tmp_path / "cwd"
  cwd.mkdir()
  proc = subprocess.run(
      [sys.executable, "-m", "vdm_jax.cli", "train", "--config", SMOKE, "--workdir", run],
      env={**os.environ, **s3.env}, capture_output=True, text=True, timeout=patience(600),
      cwd=cwd)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert proc.returncode == 2 and len(errors) == 1, (proc.returncode, proc.stderr[-3000:])
  assert errors[0] == (f"error: {run + '/checkpoints'!r}: checkpoints can be written to a local "
                       "folder or gs:// only (Orbax, the checkpoint writer, gives TensorStore no "
                       "other URL); use a local or gs:// --workdir"), errors
  assert "Traceback" not in proc.stderr
  assert not rundir.exists(run)
  assert not list(cwd.rglob("*"))
