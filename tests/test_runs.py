"""Tests for vdm_jax.training.runs: a run's EMA parameters, restored without its optimiser state."""

import chex
import jax
import jax.numpy as jnp

from conftest import fresh_run
from vdm_jax.storage import checkpointing
from vdm_jax.training import runs, state as state_lib


def test_load_run_restores_the_ema_parameters_and_nothing_else(tmp_path, monkeypatch,
                                                                smoke_config):
  config = smoke_config
  workdir = tmp_path / "run"
  task, rep, fresh = fresh_run(config, workdir)
  ema = jax.tree.map(lambda p: p + 1.0, fresh.params)   # unlike the trained parameters
  saved = fresh.replace(ema_params=ema, step=jax.device_put(jnp.asarray(7, jnp.int32), rep))
  with checkpointing.CheckpointManager(workdir / "checkpoints", async_save=False) as manager:
    manager.save(7, saved, force=True)

  requested = []
  restore = checkpointing.CheckpointManager.restore

  def spy(self, abstract_state, **kwargs):
    requested.append((abstract_state, kwargs))
    return restore(self, abstract_state, **kwargs)

  monkeypatch.setattr(checkpointing.CheckpointManager, "restore", spy)
  run = runs.load_run(str(workdir))
  assert run.step == 7
  chex.assert_trees_all_equal(run.params, ema)   # the EMA, not the parameters being trained
  (abstract, kwargs), = requested
  assert kwargs.get("partial") and set(abstract) == set(state_lib.EVAL_FIELDS)
  assert "opt_state" not in abstract and "params" not in abstract   # never read
