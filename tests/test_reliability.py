"""Reliability: exact resumption, pre-emption by signal, non-finite guards, determinism."""

import json
import os
import pathlib
import runpy
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import checkpointing, data, elbo, parallel, pipeline, state as state_lib
from vdm_jax import steps as steps_lib, tasks, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def smoke_config(**training):
  config = runpy.run_path(str(ROOT / "configs" / "smoke.py"))["get_config"]()
  for k, v in training.items():
    setattr(config.training, k, v)
  return config


def _final_state(config, workdir):
  info = data.get_info(config.data.name)
  model, tx = tasks.build_vdm(config, info), state_lib.build_optimizer(config).tx
  mesh = parallel.make_mesh()
  abstract = state_lib.abstract_state(
      lambda: state_lib.init_state(model, tx, seed=config.seed, info=info), mesh)
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
  model, tx = tasks.build_vdm(config, info), state_lib.build_optimizer(config).tx
  state = state_lib.init_state(model, tx, seed=0, info=info)
  batch = next(pipeline.train_iterator("digits", global_batch_size=8, seed=0))
  _nan_loss(monkeypatch)
  new, out = jax.jit(steps_lib.make_train_step(model, tx, info=info, ema_decay=0.9))(state, batch)
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
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
      time.sleep(0.5)
    assert metrics.exists(), "training did not start in time"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)      # bounded: finishes the step, saves, exits
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 0, out.decode()[-2000:]
  steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and 3 <= steps[0] < 100000
  saved = steps[0]
  before = len(metrics.read_text().splitlines())
  train.train_and_evaluate(smoke_config(num_steps=saved + 2), str(workdir))
  logged = [json.loads(l)["step"] for l in metrics.read_text().splitlines()[before:]
            if '"train/bpd"' in l]
  assert logged and min(logged) > saved and logged[-1] == saved + 2, (saved, logged)
