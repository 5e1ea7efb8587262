"""Tests for vdm_jax.training.state: the optimiser applies the learning-rate schedule it reports,
the
train state's shapes, and the part of it that evaluation restores."""

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax.datasets import data
from vdm_jax.core import parallel
from vdm_jax.training import state as state_lib, steps, tasks

import tiny_net


@pytest.fixture
def config(smoke_config) -> ml_collections.ConfigDict:
  smoke_config.optim.warmup_steps = 10
  smoke_config.optim.learning_rate = 1e-3
  return smoke_config


def test_the_optimiser_applies_its_learning_rate_schedule(config):
  """Adam with constant unit gradients has m_hat = v_hat = 1, so the update of an undecayed leaf
  at step k is -lr(k) / (1 + eps): the rate applied is `Optimizer.learning_rate`, step by step
  through the warm-up."""
  optimizer = state_lib.build_optimizer(config)
  params = {"score_net": {"bias": jnp.zeros((3,))}}
  grads = jax.tree.map(jnp.ones_like, params)
  opt_state = optimizer.tx.init(params)
  rates = []
  for _ in range(14):
    updates, opt_state = optimizer.tx.update(grads, opt_state, params)
    rates.append(float(-updates["score_net"]["bias"][0] * (1.0 + config.optim.eps)))
  expected = [optimizer.learning_rate(k) for k in range(14)]
  np.testing.assert_allclose(rates, expected, rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(expected, [1e-3 * min(k / 10, 1.0) for k in range(14)], rtol=1e-6)


def test_a_cosine_decay_ends_at_the_configured_training_step(config):
  """optim.lr_decay = "cosine" decays from the peak after the warm-up to 0 at
  training.num_steps (the run's length, not another number)."""
  config.optim.lr_decay = "cosine"
  config.training.num_steps = 50
  optimizer = state_lib.build_optimizer(config)
  np.testing.assert_allclose(optimizer.learning_rate(10), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(optimizer.learning_rate(30), 0.5e-3, rtol=1e-5)
  np.testing.assert_allclose(optimizer.learning_rate(50), 0.0, atol=1e-12)
  assert float(optimizer.learning_rate(49)) > 0.0


def test_the_train_step_logs_the_rate_it_applies(config):
  """The trainer's step logs `optimizer.learning_rate(step)`; at step 0 of the warm-up that rate
  is 0 and the parameters do not move (the weight decay is scaled by it too). The network is a
  tiny one: neither depends on it."""
  info = data.static_info("digits")
  with tiny_net.registered() as network:
    config.model.network = network
    task, optimizer = tasks.build_task(config, info), state_lib.build_optimizer(config)
    mesh = parallel.make_mesh(1)
    state = jax.jit(lambda: state_lib.init_state(task, optimizer.tx, seed=0),
                    out_shardings=parallel.replicated(mesh))()
    first = jax.device_get(state.params)
    step = steps.jit_train_step(config, task, optimizer, mesh)
    batch = {"image": np.full((8, 8, 8, 1), 5, np.int32), "label": np.zeros((8,), np.int32)}
    for k in range(3):
      state, out = step(state, parallel.shard_batch(batch, mesh))
      np.testing.assert_allclose(out["learning_rate"], optimizer.learning_rate(k), rtol=1e-6)
      if k == 0:
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), first)


def test_eval_params_are_the_eval_fields_of_the_train_state(config):
  task = tasks.build_task(config, data.static_info("digits"))
  mesh = parallel.make_mesh(1)
  optimizer = state_lib.build_optimizer(config)
  full = state_lib.abstract_state(
      lambda: state_lib.init_state(task, optimizer.tx, seed=config.seed), mesh)
  part = state_lib.abstract_eval_state(task, seed=config.seed, mesh=mesh)
  assert set(part) == set(state_lib.EVAL_FIELDS) == {"step", "ema_params", "frozen"}
  for field in state_lib.EVAL_FIELDS:
    assert jax.tree.structure(part[field]) == jax.tree.structure(getattr(full, field))
    for a, b in zip(jax.tree.leaves(part[field]), jax.tree.leaves(getattr(full, field))):
      assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding)
