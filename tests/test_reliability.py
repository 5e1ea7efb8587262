"""Reliability: exact resumption, signals (before and after the first step) and exit statuses,
non-finite guards, determinism, a run directory that a refused command cannot brick, one trainer
per run directory, a failing metrics writer, and the checkpoint in flight on an error."""

import errno
import json
import logging
import os
import pathlib
import runpy
import signal
import subprocess
import sys
import threading
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import patience

from vdm_jax.storage import checkpointing, metrics
from vdm_jax.training import config_checks, run_control
from vdm_jax.datasets import data, pipeline
from vdm_jax.maths import elbo
from vdm_jax.core import parallel
from vdm_jax.storage import rundir
from vdm_jax.training import runs
from vdm_jax.training import state as state_lib, steps as steps_lib, tasks, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def smoke_config(**training):
  config = runpy.run_path(str(ROOT / "configs" / "smoke.py"))["get_config"]()
  for k, v in training.items():
    setattr(config.training, k, v)
  return config


def _final_state(config, workdir):
  info = data.get_info(config.data.name)
  task, tx = tasks.build_task(config, info), state_lib.build_optimizer(config).tx
  mesh = parallel.make_mesh()
  abstract = state_lib.abstract_state(
      lambda: state_lib.init_state(task, tx, seed=config.seed), mesh)
  with checkpointing.CheckpointManager(os.path.join(workdir, "checkpoints")) as ckpt:
    step, state, meta = ckpt.restore(abstract)
  return step, jax.device_get(state), meta


def test_exact_resumption(tmp_path):
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(smoke_config(num_steps=6), straight)
  split = str(tmp_path / "split")
  train.train_and_evaluate(smoke_config(num_steps=3, checkpoint_every=3), split)
  train.train_and_evaluate(smoke_config(num_steps=6, checkpoint_every=3), split)
  s1, a, meta_a = _final_state(smoke_config(), straight)
  s2, b, meta_b = _final_state(smoke_config(), split)
  assert s1 == s2 == 6
  assert meta_a["data_position"] == meta_b["data_position"] == 6
  chex.assert_trees_all_equal(a, b)   # params, EMA, optimizer state, step, rng: bit-identical


def test_determinism_same_seed_same_bound(tmp_path):
  r1 = train.train_and_evaluate(smoke_config(num_steps=2), str(tmp_path / "a"))
  r2 = train.train_and_evaluate(smoke_config(num_steps=2), str(tmp_path / "b"))
  assert r1["bpd"] == r2["bpd"]


def _nan_loss(monkeypatch):
  orig = elbo.diffusion_loss_continuous
  monkeypatch.setattr(elbo, "diffusion_loss_continuous",
                      lambda *a, **k: orig(*a, **k) * jnp.nan)


def test_nan_stops_with_the_step_and_saves_nothing(tmp_path, monkeypatch):
  _nan_loss(monkeypatch)
  workdir = tmp_path / "nan"
  with pytest.raises(FloatingPointError, match="at step 1 "):
    train.train_and_evaluate(smoke_config(num_steps=4), str(workdir))
  ckpts = workdir / "checkpoints"
  assert not ckpts.exists() or not [p for p in ckpts.iterdir() if p.name.isdigit()]


def test_nan_skips_then_stops_after_k_in_a_row(tmp_path, monkeypatch):
  _nan_loss(monkeypatch)
  with pytest.raises(FloatingPointError, match=r"at step 3 .*3 such steps in a row, allowed 2"):
    train.train_and_evaluate(smoke_config(num_steps=6, max_nonfinite_steps=2),
                             str(tmp_path / "skip"))


def test_skipped_update_leaves_state_unchanged(monkeypatch):
  config = smoke_config()
  info = data.get_info("digits")
  task, tx = tasks.build_task(config, info), state_lib.build_optimizer(config).tx
  state = state_lib.init_state(task, tx, seed=0)
  batch = next(pipeline.train_iterator("digits", global_batch_size=8, seed=0))
  _nan_loss(monkeypatch)
  new, out = jax.jit(steps_lib.make_train_step(task, tx, ema_decay=0.9))(state, batch)
  assert float(out["finite"]) == 0.0 and int(new.nonfinite_count) == 1 and int(new.step) == 1
  chex.assert_trees_all_equal(new.params, state.params)
  chex.assert_tree_all_finite(new.params)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_saves_and_resumes(tmp_path, sig):
  workdir = tmp_path / "pre"
  cmd = [sys.executable, "-m", "vdm_jax.cli", "train", "--config", str(ROOT / "configs/smoke.py"),
         "--workdir", str(workdir), "--config.training.num_steps=100000",
         "--config.training.checkpoint_every=100000", "--config.training.log_every=1"]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
  try:
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + patience(1800)
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
      time.sleep(0.5)
    assert metrics.exists(), "training did not start in time"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=patience(900))      # bounded: finishes the step, saves, exits
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  # A distinct status, not the 0 of a finished run: 3 (SIGTERM, preempted), 130 (SIGINT).
  expected = {signal.SIGTERM: run_control.EXIT_PREEMPTED,
              signal.SIGINT: run_control.EXIT_INTERRUPTED}[sig]
  assert proc.returncode == expected, out.decode()[-2000:]
  assert f"{sig.name} received: saved step" in out.decode()
  steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and 3 <= steps[0] < 100000
  saved = steps[0]
  before = len(metrics.read_text().splitlines())
  train.train_and_evaluate(smoke_config(num_steps=saved + 2), str(workdir))
  logged = [json.loads(l)["step"] for l in metrics.read_text().splitlines()[before:]
            if '"train/bpd"' in l]
  assert logged and min(logged) > saved and logged[-1] == saved + 2, (saved, logged)


# --- Signals before the first step ----------------------------------------------------------

def _env_without_compile_cache():
  """The test environment minus the shared compilation cache, so that the subprocess really
  compiles (a cached train step would compile faster than a signal can be sent)."""
  env = dict(os.environ)
  for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):
    env.pop(name, None)
  return env


def _lines(proc):
  """A queue that receives the subprocess's output lines (None at the end), read in a thread
  so that waiting for a line can time out."""
  import queue
  q = queue.Queue()

  def read():
    for line in proc.stdout:
      q.put(line)
    q.put(None)

  threading.Thread(target=read, daemon=True).start()
  return q


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, run_control.EXIT_INTERRUPTED),
                                         (signal.SIGTERM, run_control.EXIT_PREEMPTED)])
def test_signal_while_compiling_stops_at_once(tmp_path, sig, status):
  """SIGINT / SIGTERM while the first train step compiles: a prompt, clean exit with the signal's
  status and a line saying so (not a segfault, not a wait for the compilation), nothing saved."""
  workdir = tmp_path / "early"
  cmd = [sys.executable, "-m", "vdm_jax.cli", "train", "--config", str(ROOT / "configs/smoke.py"),
         "--workdir", str(workdir), "--config.training.log_every=1"]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=tmp_path, env=_env_without_compile_cache())
  out = []
  try:
    lines, deadline = _lines(proc), time.time() + patience(1800)
    while time.time() < deadline:
      line = lines.get(timeout=max(deadline - time.time(), 0.1))
      assert line is not None, "the trainer ended before compiling:\n" + "".join(out)[-3000:]
      out.append(line)
      if "compiling the train step" in line:
        break
    sent = time.time()
    proc.send_signal(sig)
    proc.wait(timeout=patience(600))
    elapsed = time.time() - sent
    while (line := lines.get(timeout=patience(300))) is not None:
      out.append(line)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  text = "".join(out)
  assert proc.returncode == status, text[-3000:]
  # Acted on while compiling (the phase is named only when the compilation was abandoned).
  assert (f"{sig.name} received before the first step (compiling the train step): nothing new "
          f"to save" in text), text[-3000:]
  assert "Traceback" not in text and "Fatal Python error" not in text, text[-3000:]
  assert elapsed < 60, elapsed
  assert not (workdir / "metrics.jsonl").exists()
  assert not (workdir / "config.json").exists()
  ckpts = workdir / "checkpoints"
  assert not ckpts.exists() or not list(ckpts.iterdir())


# --- A refused command cannot brick a run directory (items 3 and 4) ----------------------------

def _snapshot(workdir):
  """{relative path: (size, mtime_ns)} of every file in the run directory but the lock file."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      if name != run_control.LOCK_FILE:
        st = os.stat(path)
        out[os.path.relpath(path, workdir)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture
def trained(tmp_path):
  """A smoke run trained for 2 steps (checkpoints 1 and 2)."""
  workdir = tmp_path / "run"
  train.train_and_evaluate(smoke_config(num_steps=2, checkpoint_every=1), str(workdir))
  return workdir


@pytest.mark.parametrize("change, field", [
    ({"optim.grad_clip_norm": 1.0}, "optim.grad_clip_norm: 0.0 -> 1.0"),   # optimiser state
    ({"model.channels": 16, "training.allow_config_change": True}, "model.channels: 8 -> 16"),
])
def test_a_structure_change_is_refused_before_anything_changes(trained, change, field):
  before = _snapshot(trained)
  config = smoke_config(num_steps=4, checkpoint_every=1)
  for name, value in change.items():
    section, key = name.split(".")
    config[section][key] = value
  with pytest.raises(config_checks.ConfigError, match="does not fit the run's checkpoint") as err:
    train.train_and_evaluate(config, str(trained))
  assert field in str(err.value)
  assert _snapshot(trained) == before   # config.json, checkpoints, metrics: untouched
  assert runs.load_run(str(trained)).step == 2   # eval still reads the run
  result = train.train_and_evaluate(smoke_config(num_steps=3, checkpoint_every=1), str(trained))
  assert np.isfinite(result["bpd"])   # and the original command resumes it


@pytest.fixture(params=["local", "gs"])
def trained_anywhere(request, tmp_path):
  """`trained`, in a local directory or in a bucket (the GCS emulator)."""
  base = str(tmp_path) if request.param == "local" else request.getfixturevalue("gs_dir")
  workdir = rundir.join(base, "run")
  train.train_and_evaluate(smoke_config(num_steps=2, checkpoint_every=1), workdir)
  return workdir


def test_config_json_is_replaced_only_after_a_checkpoint(trained_anywhere, monkeypatch):
  """A pinned but structure-preserving change (dropout), allowed explicitly: a first attempt that
  fails before its first checkpoint leaves config.json as it was; a successful one replaces it."""
  run, config_path = trained_anywhere, rundir.join(trained_anywhere, "config.json")
  config = smoke_config(num_steps=4, checkpoint_every=2)   # the NaN of step 3 is seen at step 4
  config.model.dropout, config.training.allow_config_change = 0.25, True
  _nan_loss(monkeypatch)
  with pytest.raises(FloatingPointError, match="at step 3"):
    train.train_and_evaluate(config, run)
  assert checkpointing.complete_steps(rundir.join(run, "checkpoints")) == [2, 1]
  assert rundir.read_json(config_path)["config"]["model"]["dropout"] == 0.0
  monkeypatch.undo()
  train.train_and_evaluate(config, run)
  assert rundir.read_json(config_path)["config"]["model"]["dropout"] == 0.25


@pytest.mark.parametrize("section, field, value", [
    ("eval", "max_examples", -1), ("", "seed", -1), ("optim", "grad_clip_norm", -1.0)])
def test_invalid_fields_fail_before_the_run_directory_exists(tmp_path, section, field, value):
  config = smoke_config()
  (config[section] if section else config)[field] = value
  name = f"{section}.{field}" if section else field
  with pytest.raises(config_checks.ConfigError, match=f"{name}={value!r}: expected"):
    train.train_and_evaluate(config, str(tmp_path / "new"))
  assert not (tmp_path / "new").exists()


def test_all_bad_fields_in_one_config_error():
  config = smoke_config()
  config.eval.max_examples, config.seed, config.optim.grad_clip_norm = -1, -1, -1.0
  with pytest.raises(config_checks.ConfigError) as err:
    config_checks.check_config(config)
  for name in ("eval.max_examples=-1", "seed=-1", "optim.grad_clip_norm=-1.0"):
    assert name in str(err.value)


def test_damaged_config_json_is_named(trained):
  path = trained / "config.json"
  path.write_text(path.read_text()[:100])   # truncated
  with pytest.raises(config_checks.ConfigError, match=rf"{path} is damaged"):
    train.train_and_evaluate(smoke_config(num_steps=4), str(trained))


# --- One trainer per run directory (item 7) ----------------------------------------------------

_HOLD_LOCK = """
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.seek(0); f.truncate(); f.write(f"pid {os.getpid()} on test\\n"); f.flush()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_trainer_is_refused_while_eval_may_read(trained):
  before = _snapshot(trained)
  holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK,
                             str(trained / run_control.LOCK_FILE)],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(runs.RunError, match=rf"being trained by another process \(pid "
                                            rf"{holder.pid} on test"):
      train.train_and_evaluate(smoke_config(num_steps=4, checkpoint_every=1), str(trained))
    assert _snapshot(trained) == before
    assert runs.load_run(str(trained)).step == 2   # readers take no lock
  finally:
    holder.kill()   # a crash: the kernel drops its lock, the file stays
    holder.wait()
  assert (trained / run_control.LOCK_FILE).exists()
  result = train.train_and_evaluate(smoke_config(num_steps=3, checkpoint_every=1), str(trained))
  assert np.isfinite(result["bpd"])
  assert f"pid {os.getpid()} " in (trained / run_control.LOCK_FILE).read_text()


# --- A failing metrics writer (item 9) and the checkpoint in flight (item 10) -----------------

def test_full_disk_under_tensorboard_neither_hangs_nor_stops_training(tmp_path, monkeypatch,
                                                                       caplog):
  """The TensorBoard file's writes fail with ENOSPC after a few records (the disk fills during
  training): training finishes, with one warning, and metrics.jsonl is complete."""
  write, calls = metrics._EventFile.write_event, []

  def filling_disk(self, event):
    calls.append(1)
    if len(calls) > 3:
      raise OSError(errno.ENOSPC, "No space left on device")
    write(self, event)

  monkeypatch.setattr(metrics._EventFile, "write_event", filling_disk)
  caplog.set_level(logging.WARNING, logger="vdm_jax.storage.metrics")
  workdir, box = tmp_path / "full", {}

  def run():
    try:
      box["result"] = train.train_and_evaluate(smoke_config(num_steps=4, log_every=1),
                                               str(workdir))
    except BaseException as e:  # pylint: disable=broad-except
      box["error"] = e

  worker = threading.Thread(target=run, daemon=True)
  worker.start()
  worker.join(timeout=patience(1800))
  assert not worker.is_alive(), "training hangs on a failing TensorBoard writer"
  if "error" in box:
    raise box["error"]
  assert np.isfinite(box["result"]["bpd"])
  assert len(calls) > 3   # the failure did happen (then the events were turned off)
  warned = [r for r in caplog.records if "TensorBoard events" in r.getMessage()]
  assert len(warned) == 1 and "No space left on device" in warned[0].getMessage()
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train/bpd" in r] == [1, 2, 3, 4]


def test_an_error_in_the_loop_waits_for_the_save_in_flight(tmp_path, monkeypatch):
  """learning_rate=1e6 stops on a non-finite loss at step 3 with checkpoint_every=1: the
  checkpointer is closed (its save finished) before the error leaves the trainer, so no
  half-written step directory is left."""
  closed, close = [], checkpointing.CheckpointManager.close

  def spy(self):
    close(self)
    closed.append(sorted(os.listdir(self.directory)))

  monkeypatch.setattr(checkpointing.CheckpointManager, "close", spy)
  config = smoke_config(num_steps=6, checkpoint_every=1)
  config.optim.learning_rate = 1e6
  workdir = tmp_path / "diverged"
  with pytest.raises(FloatingPointError, match="at step 3"):
    train.train_and_evaluate(config, str(workdir))
  names = sorted(os.listdir(workdir / "checkpoints"))
  assert closed and closed[-1] == names, (closed, names)
  assert names and all(n.isdigit() for n in names), names   # no *.orbax-checkpoint-tmp*
  assert "2" in names
