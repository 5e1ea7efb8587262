"""Tests for vdm_jax.maths.schedules: values against float64 NumPy, monotonicity, endpoints,
stability."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from vdm_jax.maths import schedules

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

  @parameterized.parameters((1e-4, 0.02, 1000), (2e-3, 0.02, 10), (5e-3, 0.2, 50),
                            (2.5e-5, 0.005, 4000))
  def test_beta_linear_exact_on_the_ddpm_grid(self, b0, b1, n):
    # Ho et al. 2020: alpha_bar_n = prod_{i<=n} (1 - beta_i), float64 NumPy reference.
    sched = schedules.BetaLinear(beta_start=b0, beta_end=b1, num_steps=n)
    alpha_bar = np.cumprod(1.0 - np.linspace(b0, b1, n))
    c = sched.neg_log_alpha_bar(np.arange(n + 1) / n)        # float64 in, float64 out
    self.assertEqual(c.dtype, np.float64)
    np.testing.assert_allclose(np.exp(-c[1:]), alpha_bar, rtol=1e-9)
    self.assertEqual(c[0], 0.0)
    np.testing.assert_allclose(np.log(np.expm1(c[1:])), np.log((1 - alpha_bar) / alpha_bar),
                               rtol=1e-9, atol=1e-9)

  def test_beta_linear_call_gives_ddpm_levels_in_float32(self):
    # Default endpoints: level n at t = (n - 1) / (T - 1); float32 rounding only (measured 3e-6).
    alpha_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    levels = np.log((1 - alpha_bar) / alpha_bar)
    sched = schedules.BetaLinear()
    np.testing.assert_allclose(sched.endpoints, levels[[0, -1]], rtol=1e-10)
    gamma = jax.jit(sched)(jnp.arange(1000, dtype=jnp.float32) / 999)
    chex.assert_trees_all_close(np.asarray(gamma, np.float64), levels, atol=1e-5)

  @parameterized.parameters(-13.3, -9.2, 0.0, 5.0, 10.1, 20.0)
  def test_beta_linear_inverse_round_trip(self, gamma):
    sched = schedules.BetaLinear()
    tau = sched._tau(gamma)
    self.assertAlmostEqual(math.log(math.expm1(sched.neg_log_alpha_bar(tau))), gamma, delta=1e-9)
    custom = schedules.BetaLinear(gamma_min=min(gamma, 0.0) - 1.0, gamma_max=gamma + 1.0)
    np.testing.assert_allclose(custom(jnp.asarray([0.0, 1.0])), custom.endpoints, rtol=1e-6,
                               atol=1e-5)

  def test_beta_linear_increasing_between_grid_points(self):
    sched = schedules.BetaLinear(gamma_min=-13.3, gamma_max=20.0)   # tau from ~2e-5 to ~1.4
    c = sched.neg_log_alpha_bar(np.linspace(0.0, 1.5, 100_001))
    self.assertTrue(np.all(np.diff(c) > 0))
    gamma, prime = schedules.gamma_and_derivative(sched, jnp.linspace(0.0, 1.0, 4001))
    self.assertTrue(np.all(np.asarray(prime) > 0))
    self.assertTrue(np.all(np.diff(np.asarray(gamma)) >= 0))

  def test_beta_linear_gradients_finite_and_match_finite_differences(self):
    sched = schedules.BetaLinear(gamma_min=-13.3, gamma_max=schedules.BetaLinear().endpoints[1])
    t = jnp.asarray([0.0, 1e-3, 0.1, 0.5, 0.9, 1.0])
    grads = jax.grad(lambda x: jnp.sum(jnp.stack(schedules.gamma_and_derivative(sched, x))))(t)
    chex.assert_tree_all_finite(grads)
    _, prime = schedules.gamma_and_derivative(sched, t[2:5])
    h = 1e-3
    fd = (np.asarray(sched(t[2:5] + h), np.float64) - np.asarray(sched(t[2:5] - h))) / (2 * h)
    chex.assert_trees_all_close(prime, fd, rtol=2e-3)

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
    with self.assertRaisesRegex(ValueError, r"beta_start > .*num_steps=10"):
      schedules.BetaLinear(beta_start=1e-3, beta_end=0.1, num_steps=10)    # c'(0) < 0
    with self.assertRaisesRegex(ValueError, "converge.*beta_end=0.999"):
      schedules.BetaLinear(beta_start=0.5, beta_end=0.999, num_steps=2)
    with self.assertRaisesRegex(ValueError, "increasing"):     # passes the c'(0) check at order 1
      schedules.BetaLinear(beta_start=1 / 6 + 1e-9, beta_end=0.5, num_steps=2)
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
