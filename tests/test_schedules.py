"""Tests for vdm_jax.schedules: values against float64 NumPy, monotonicity, endpoints, stability."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from vdm_jax import schedules

T_GRID = np.linspace(0.0, 1.0, 101)


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


class FixedLinearTest(parameterized.TestCase):

  def test_values_and_endpoints(self):
    g = schedules.FixedLinear(gamma_min=-13.3, gamma_max=5.0)
    chex.assert_trees_all_close(g(T_GRID), -13.3 + 18.3 * T_GRID, rtol=1e-6, atol=1e-5)
    self.assertAlmostEqual(float(g(0.0)), -13.3, places=5)
    self.assertAlmostEqual(float(g(1.0)), 5.0, places=5)

  def test_derivative_is_slope(self):
    g = schedules.FixedLinear(gamma_min=-2.0, gamma_max=3.0)
    gamma, prime = schedules.gamma_and_derivative(g, jnp.asarray(T_GRID, jnp.float32))
    chex.assert_shape(prime, (101,))
    chex.assert_trees_all_close(prime, np.full(101, 5.0, np.float32), rtol=1e-6)
    chex.assert_trees_all_close(gamma, -2.0 + 5.0 * T_GRID, atol=1e-5)

  @parameterized.parameters((5.0, 5.0), (5.0, -13.3), (float("nan"), 1.0))
  def test_bad_endpoints(self, lo, hi):
    with self.assertRaisesRegex(ValueError, "gamma_min < gamma_max"):
      schedules.FixedLinear(gamma_min=lo, gamma_max=hi)

  @parameterized.parameters(-0.1, 1.5)
  def test_time_outside_unit_interval(self, t):
    with self.assertRaisesRegex(ValueError, r"t in \[0, 1\]"):
      schedules.FixedLinear()(jnp.asarray([0.5, t]))

  def test_jit_skips_the_value_check_but_computes(self):
    out = jax.jit(schedules.FixedLinear(gamma_min=0.0, gamma_max=1.0))(jnp.asarray(0.25))
    self.assertAlmostEqual(float(out), 0.25, places=6)


class DDPMScheduleTest(parameterized.TestCase):

  def test_beta_linear_reference(self):
    sched = schedules.BetaLinear()
    b0, b1, n = 1e-4, 0.02, 1000
    m = 1.0 + (n - 1.0) * T_GRID          # tau = m / n from 1/T to 1
    c = m * b0 + (b1 - b0) * m * (m - 1) / (2 * (n - 1))
    chex.assert_trees_all_close(sched(T_GRID), np.log(np.expm1(c)), rtol=1e-4, atol=1e-4)

  def test_beta_linear_close_to_discrete_ddpm(self):
    # DDPM's discrete alpha_bar_n = prod(1 - beta_i) at n = 1 and n = T vs the continuous form.
    betas = np.linspace(1e-4, 0.02, 1000)
    log_abar = np.cumsum(np.log1p(-betas))
    discrete = np.log(-np.expm1(log_abar)) - log_abar
    lo, hi = schedules.BetaLinear().endpoints
    self.assertAlmostEqual(lo, discrete[0], delta=1e-3)
    self.assertAlmostEqual(hi, discrete[-1], delta=0.2)   # sum of beta^2/2 terms: ~0.13

  def test_cosine_reference(self):
    sched = schedules.Cosine()
    s = 0.008
    lo, hi = sched.endpoints
    self.assertAlmostEqual(lo, 2 * math.log(math.tan(math.pi / 2 * s / (1 + s))), places=6)
    taup = np.linspace(2 / np.pi * np.arctan(np.exp(lo / 2)), 2 / np.pi * np.arctan(np.exp(hi / 2)),
                       101)
    alpha2 = np.cos(np.pi / 2 * taup)**2
    chex.assert_trees_all_close(sched(T_GRID), np.log((1 - alpha2) / alpha2), rtol=1e-4, atol=2e-4)

  @parameterized.parameters(schedules.BetaLinear, schedules.Cosine)
  def test_equal_endpoints_option(self, cls):
    sched = cls(gamma_min=-13.3, gamma_max=5.0)
    self.assertAlmostEqual(float(sched(0.0)), -13.3, places=3)
    self.assertAlmostEqual(float(sched(1.0)), 5.0, places=3)

  @parameterized.parameters(schedules.BetaLinear, schedules.Cosine, schedules.FixedLinear)
  def test_strictly_increasing_with_positive_derivative(self, cls):
    gamma, prime = schedules.gamma_and_derivative(cls(), jnp.asarray(T_GRID, jnp.float32))
    self.assertTrue(np.all(np.diff(np.asarray(gamma)) > 0))
    self.assertTrue(np.all(np.asarray(prime) > 0))

  def test_cosine_derivative_matches_finite_difference(self):
    sched = schedules.Cosine()
    t = jnp.asarray([0.1, 0.5, 0.9])
    _, prime = schedules.gamma_and_derivative(sched, t)
    h = 1e-3
    fd = (np.asarray(sched(t + h), np.float64) - np.asarray(sched(t - h), np.float64)) / (2 * h)
    chex.assert_trees_all_close(prime, fd, rtol=2e-3)

  def test_bad_ddpm_args(self):
    with self.assertRaisesRegex(ValueError, "beta_start"):
      schedules.BetaLinear(beta_start=0.1, beta_end=0.01)
    with self.assertRaisesRegex(ValueError, "offset s"):
      schedules.Cosine(s=0.0)


class LearnedScheduleTest(parameterized.TestCase):

  def test_learned_linear_endpoints_and_monotone_for_negative_delta(self):
    params = schedules.init_learned_linear(gamma_min=-7.0, gamma_max=5.0)
    chex.assert_trees_all_close(schedules.learned_linear_gamma(jnp.asarray([0.0, 1.0]), params),
                                jnp.asarray([-7.0, 5.0]))
    params["delta"] = -params["delta"]
    g = schedules.learned_linear_gamma(jnp.asarray(T_GRID), params)
    self.assertTrue(np.all(np.diff(np.asarray(g)) > 0))
    chex.assert_trees_all_close(schedules.learned_endpoints(params), (-7.0, 5.0))

  @parameterized.parameters(0, 1, 2)
  def test_monotone_net_keeps_endpoints_exactly(self, seed):
    params = schedules.init_monotone(jax.random.key(seed), gamma_min=-13.3, gamma_max=5.0, hidden=64)
    # Perturb the network and the endpoints as an optimiser would.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 10), len(leaves))
    params = jax.tree.unflatten(
        tree, [l + 0.5 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
    gmin, gmax = schedules.learned_endpoints(params)
    g = schedules.monotone_gamma(jnp.asarray(T_GRID), params)
    self.assertAlmostEqual(float(g[0]), float(gmin), places=4)
    self.assertAlmostEqual(float(g[-1]), float(gmax), places=4)
    self.assertTrue(np.all(np.diff(np.asarray(g)) > 0))

  def test_monotone_gradients_finite(self):
    params = schedules.init_monotone(jax.random.key(0), hidden=16)
    grads = jax.grad(lambda p: jnp.sum(schedules.gamma_and_derivative(
        lambda t: schedules.monotone_gamma(t, p), jnp.asarray(T_GRID))[1]))(params)
    chex.assert_tree_all_finite(grads)


class AlphaSigmaTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_stable_on_wide_range_float32(self):
    gamma = np.linspace(-30.0, 30.0, 241).astype(np.float32)
    alpha, sigma = self.variant(schedules.alpha_sigma)(gamma)
    g64 = gamma.astype(np.float64)
    chex.assert_tree_all_finite((alpha, sigma))
    chex.assert_trees_all_close(alpha, np.sqrt(_np_sigmoid(-g64)), rtol=1e-5)
    chex.assert_trees_all_close(sigma, np.sqrt(_np_sigmoid(g64)), rtol=1e-5)
    chex.assert_trees_all_close(alpha**2 + sigma**2, np.ones_like(g64), rtol=1e-6)
    chex.assert_trees_all_close(jnp.log(alpha**2) - jnp.log(sigma**2), -g64, atol=1e-4)
    chex.assert_trees_all_close(self.variant(schedules.snr)(gamma), np.exp(-g64), rtol=1e-5)

  @parameterized.parameters(-30.0, -20.0, 20.0, 30.0)
  def test_gradients_finite_at_extremes(self, g):
    grad = jax.grad(lambda x: jnp.sum(jnp.stack(schedules.alpha_sigma(x))))(jnp.float32(g))
    chex.assert_tree_all_finite(grad)

  def test_bfloat16_input(self):
    gamma = jnp.linspace(-10.0, 10.0, 21, dtype=jnp.bfloat16)
    alpha, sigma = schedules.alpha_sigma(gamma)
    self.assertEqual(alpha.dtype, jnp.bfloat16)
    ref = np.sqrt(_np_sigmoid(-np.asarray(gamma, np.float64)))
    chex.assert_trees_all_close(alpha.astype(jnp.float32), ref, rtol=2e-2)
    chex.assert_tree_all_finite(sigma)


if __name__ == "__main__":
  pytest.main([__file__])
