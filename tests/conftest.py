"""Test configuration: four fake CPU devices, so that pmap and sharding paths run everywhere.

XLA reads the flag when jax initialises its backends, so it is set here, before any test module
imports jax.
"""

import os
import pathlib
import runpy
import tempfile

import pytest

_FLAG = "--xla_force_host_platform_device_count=4"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache shared by the test processes (and the subprocesses they start):
# the end-to-end tests build the same tiny model many times, and reuse its compiled steps.
_CACHE = os.path.join(tempfile.gettempdir(), "vdm_jax_test_compile_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


# Wall-clock limits of the tests that wait on other processes or threads, sized about 10x what
# they take on this project's 2-core machine (the README-command test ~1 min, the two-process
# test ~1.5 min), so that a machine several times slower, or one under load, still passes;
# VDM_TEST_TIMEOUT_SCALE multiplies them all (e.g. 4 on an emulated or throttled machine).
TIMEOUT_SCALE = float(os.environ.get("VDM_TEST_TIMEOUT_SCALE", "1"))


def patience(seconds: float) -> float:
  """A wall-clock limit of `seconds`, times VDM_TEST_TIMEOUT_SCALE."""
  return seconds * TIMEOUT_SCALE


def pytest_report_header(config):
  del config
  return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def smoke_config():
  """A fresh copy of configs/smoke.py's config (tiny model, digits)."""
  return runpy.run_path(str(_ROOT / "configs" / "smoke.py"))["get_config"]()


def fresh_run(config, workdir):
  """(task, replicated sharding, initial TrainState) of `config` on digits, and `workdir` made a
  run directory of it (config.json written), for tests that write checkpoints into a run."""
  from vdm_jax.datasets import data
  from vdm_jax.core import parallel
  from vdm_jax.training import state as state_lib, stored_config, tasks
  task = tasks.build_task(config, data.get_info("digits"))
  optimizer = state_lib.build_optimizer(config)
  rep = parallel.replicated(parallel.make_mesh())
  fresh = jax.jit(lambda: state_lib.init_state(task, optimizer.tx, seed=config.seed),
                  out_shardings=rep)()
  os.makedirs(workdir)
  stored_config.check_workdir_config(config, str(workdir))
  return task, rep, fresh


@pytest.fixture
def registered():
  """registered(registry, register_fn, name, *args, **kwargs) calls register_fn(name, *args,
  **kwargs) for this test only: the name is removed from `registry` afterwards."""
  names = []

  def register(registry, register_fn, name, *args, **kwargs):
    names.append((registry, name))
    return register_fn(name, *args, **kwargs)

  yield register
  for registry, name in reversed(names):
    registry.unregister(name)


@pytest.fixture(scope="session")
def gcs():
  """A GCS emulator on loopback for this test process (`vdm_jax.testing.gcs_emulator`), with this
  process's clients pointed at it for the rest of the session."""
  from vdm_jax.testing import gcs_emulator
  emulator = gcs_emulator.Emulator().start()
  with emulator.environment():
    yield emulator
  emulator.stop()


@pytest.fixture
def gs_dir(gcs):
  """A fresh gs:// folder in the emulator's bucket."""
  import uuid
  from vdm_jax.testing import gcs_emulator
  return f"gs://{gcs_emulator.BUCKET}/{uuid.uuid4().hex[:12]}"
