"""Tests for vdm_jax.nets.model: the schedule registry (a new schedule is usable by name through the
config) and the schedule's parameter key, the one the optimiser is given."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vdm_jax.training import config_checks, optim, tasks
from vdm_jax.datasets import data
from vdm_jax.nets import model as model_lib
from vdm_jax.maths import schedules


@pytest.fixture
def model_config(smoke_config):
  """The smoke config with model fields replaced: model_config(schedule="cosine")."""
  def make(**model):
    config = ml_collections.ConfigDict(smoke_config.to_dict())
    config.model.update(model)
    return config
  return make


def _quadratic(*, gamma_min: float, gamma_max: float):
  return lambda t: gamma_min + (gamma_max - gamma_min) * jnp.asarray(t)**2


def _init_offset(key, *, gamma_min, gamma_max, hidden):
  del key, hidden
  return {"start": jnp.asarray(gamma_min, jnp.float32),
          "width": jnp.asarray(gamma_max - gamma_min, jnp.float32)}


def _offset_gamma(t, params):
  return params["start"] + params["width"] * jnp.asarray(t)


@pytest.fixture
def schedules_registered(registered):
  """A fixed and a learned schedule, registered for one test."""
  registered(model_lib.SCHEDULES, model_lib.register_schedule, "test_quadratic",
             model_lib.fixed_schedule(_quadratic), learned=False)
  registered(model_lib.SCHEDULES, model_lib.register_schedule, "test_learned",
             model_lib.learned_schedule(_init_offset, _offset_gamma, ("start", "width")),
             learned=True)


def test_a_registered_fixed_schedule_is_usable_through_the_config(schedules_registered,
                                                                   model_config):
  config = model_config(schedule="test_quadratic", objective="simple", num_steps=10)
  config_checks.check_config(config)   # a fixed schedule: allowed with objective "simple"
  task = tasks.build_task(config, data.static_info("digits"))
  params, _ = task.init(jax.random.PRNGKey(0))
  assert model_lib.SCHEDULE_KEY not in params   # no parameters
  t = jnp.linspace(0.0, 1.0, 5)
  gamma = task.model.apply({"params": params}, t, method=model_lib.VDM.gamma)
  np.testing.assert_allclose(gamma, -7.0 + 12.0 * t**2, rtol=1e-6)   # smoke: gamma in [-7, 5]


def test_a_registered_learned_schedule_has_parameters_under_the_key(schedules_registered,
                                                                     model_config):
  config = model_config(schedule="test_learned")
  config_checks.check_config(config)
  task = tasks.build_task(config, data.static_info("digits"))
  params, _ = task.init(jax.random.PRNGKey(0))
  np.testing.assert_allclose(params[model_lib.SCHEDULE_KEY]["start"], -7.0)
  np.testing.assert_allclose(params[model_lib.SCHEDULE_KEY]["width"], 12.0)
  endpoints = task.param_metrics(params)
  np.testing.assert_allclose([endpoints["gamma_0"], endpoints["gamma_1"]], [-7.0, 5.0])
  fixed = r"\('fixed_linear', 'beta_linear', 'cosine', 'test_quadratic'\)"
  with pytest.raises(config_checks.ConfigError,
                     match=r"model.schedule='test_learned': expected a fixed schedule " + fixed):
    config_checks.check_config(
        model_config(schedule="test_learned", objective="simple", num_steps=10))


def test_an_unknown_schedule_names_the_registered_ones(model_config):
  with pytest.raises(ValueError, match=r"unknown schedule 'sqrt'; expected one of \("
                     r"'fixed_linear', 'learned_linear', 'learned_monotone', 'learned_nnet', "
                     r"'beta_linear', 'cosine'\)"):
    tasks.build_vdm(model_config(schedule="sqrt"), data.static_info("digits"))
  with pytest.raises(config_checks.ConfigError, match="model.schedule='sqrt': expected one of"):
    config_checks.check_config(model_config(schedule="sqrt"))


@pytest.mark.parametrize("name", ["learned_linear", "learned_monotone", "learned_nnet"])
def test_the_schedule_key_holds_exactly_the_schedule_parameters(name, model_config):
  """SCHEDULE_KEY is where the model keeps its schedule: the optimiser's schedule mask, given
  it, selects the schedule's leaves and nothing of the network."""
  task = tasks.build_task(model_config(schedule=name), data.static_info("digits"))
  params, _ = task.init(jax.random.PRNGKey(0))
  assert set(params) == {model_lib.SCHEDULE_KEY, "score_net"}
  mask = optim.schedule_mask(params, schedule_key=model_lib.SCHEDULE_KEY)
  assert all(jax.tree.leaves(mask[model_lib.SCHEDULE_KEY]))
  assert not any(jax.tree.leaves(mask["score_net"]))


def test_registered_schedules_match_their_maths():
  """Each built-in name builds the function of `vdm_jax.maths.schedules` it stands for."""
  t = jnp.linspace(0.0, 1.0, 7)
  expected = {"fixed_linear": schedules.FixedLinear(gamma_min=-9.0, gamma_max=9.0)(t),
              "beta_linear": schedules.BetaLinear(gamma_min=-9.0, gamma_max=9.0)(t),
              "cosine": schedules.Cosine(gamma_min=-9.0, gamma_max=9.0)(t),
              "learned_linear": -9.0 + 18.0 * t}
  for name, want in expected.items():
    sched = model_lib.NoiseSchedule(kind=name, gamma_min=-9.0, gamma_max=9.0)
    variables = sched.init(jax.random.PRNGKey(0))
    np.testing.assert_allclose(sched.apply(variables)(t), want, rtol=1e-5, atol=1e-5)
