"""Tests for vdm_jax.maths.objectives: the weightings against NumPy, each objective as a reweighting
of the bound's terms at the same draw, L_simple's time grid, and bad arguments."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from vdm_jax.maths import elbo, objectives, schedules


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _random_data(seed, shape, vocab):
  return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


def _linear_eps_fn(w):
  """A stand-in network: eps_hat = w sigmoid(gamma) z."""
  return lambda z, g: w * z * jax.nn.sigmoid(g)[:, None, None, None]


OBJ_SCHED = schedules.FixedLinear(gamma_min=-13.3, gamma_max=5.0)


class ObjectivesTest(parameterized.TestCase):

  def test_loss_weight_against_numpy(self):
    gamma = np.array([-13.3, -2.0, 0.0, 2.0, 5.0], np.float32)
    chex.assert_trees_all_equal(objectives.loss_weight(gamma, weighting="uniform"),
                                np.ones(5, np.float32))
    for bias in (0.0, -2.0, 3.0):
      lam = -gamma.astype(np.float64)                        # lambda = log SNR = -gamma
      ref = _np_sigmoid(bias - lam)
      weight = objectives.loss_weight(gamma, weighting="sigmoid", bias=bias)
      chex.assert_trees_all_close(weight, ref, rtol=1e-6)
    # w = 1/2 where lambda equals the bias; w decreases with lambda (increases with gamma).
    self.assertAlmostEqual(float(objectives.loss_weight(2.0, weighting="sigmoid", bias=-2.0)), 0.5)
    sigmoid = np.asarray(objectives.loss_weight(gamma, weighting="sigmoid"))
    self.assertTrue(np.all(np.diff(sigmoid) > 0))

  def test_weighted_loss_is_weight_times_continuous_loss(self):
    rng = np.random.default_rng(20)
    eps, eps_hat = (rng.normal(size=(4, 3, 3, 2)).astype(np.float32) for _ in range(2))
    gamma_prime = np.array([0.5, 1.0, 18.3, 2.0], np.float32)
    cont = elbo.diffusion_loss_continuous(eps, eps_hat, gamma_prime=gamma_prime)
    chex.assert_trees_all_equal(
        objectives.weighted_diffusion_loss(eps, eps_hat, gamma_prime=gamma_prime, weight=1.0), cont)
    weight = np.array([0.1, 0.5, 1.0, 2.0], np.float32)
    ref = 0.5 * weight * gamma_prime * ((eps - eps_hat).astype(np.float64)**2).sum((1, 2, 3))
    out = objectives.weighted_diffusion_loss(eps, eps_hat, gamma_prime=gamma_prime, weight=weight)
    chex.assert_trees_all_close(out, ref, rtol=1e-5)

  def test_simple_loss_known_values(self):
    ones = np.ones((2, 4, 4, 3), np.float32)
    chex.assert_trees_all_equal(objectives.simple_loss(ones, np.zeros_like(ones)),
                                np.ones(2, np.float32))
    chex.assert_trees_all_equal(objectives.simple_loss(ones, ones), np.zeros(2, np.float32))
    # eps_hat = 0: E[mean_d eps_d^2] = 1; 64 x 48 draws, SE = sqrt(2 / 3072) = 0.026.
    eps = jax.random.normal(jax.random.key(0), (64, 4, 4, 3))
    simple = objectives.simple_loss(eps, jnp.zeros_like(eps))
    self.assertLess(abs(float(jnp.mean(simple)) - 1.0), 0.1)

  @parameterized.parameters(0, 10)
  def test_elbo_objective_and_uniform_weighting_are_the_elbo(self, num_steps):
    k = _random_data(21, (4, 3, 3, 2), 17)
    kw = dict(eps_fn=_linear_eps_fn(0.4), gamma_fn=OBJ_SCHED, vocab_size=17, num_steps=num_steps)
    key = jax.random.key(3)
    total = elbo.elbo_terms(key, k, **kw).total
    chex.assert_trees_all_equal(objectives.training_loss(key, k, objective="elbo", **kw), total)
    weighted = objectives.training_loss(key, k, objective="weighted", weighting="uniform", **kw)
    chex.assert_trees_all_close(weighted, total, rtol=1e-6)

  @parameterized.parameters(0, 10)
  def test_sigmoid_weighting_reweights_only_the_diffusion_term(self, num_steps):
    k = _random_data(22, (4, 3, 3, 2), 17)
    kw = dict(eps_fn=_linear_eps_fn(0.4), gamma_fn=OBJ_SCHED, vocab_size=17, num_steps=num_steps)
    key, t = jax.random.key(4), jnp.asarray([0.1, 0.4, 0.7, 1.0])
    terms = elbo.elbo_terms(key, k, t=t, **kw)
    weight = _np_sigmoid(-1.0 + np.asarray(OBJ_SCHED(t), np.float64))
    out = objectives.training_loss(key, k, objective="weighted", weighting="sigmoid",
                                   weighting_bias=-1.0, t=t, **kw)
    chex.assert_trees_all_close(out, terms.prior + terms.reconstruction + weight * terms.diffusion,
                                rtol=1e-5)
    self.assertTrue(np.all(np.asarray(out) < np.asarray(terms.total)))

  def test_simple_is_the_T_step_term_without_its_weight(self):
    k = _random_data(23, (4, 3, 3, 2), 17)
    T, t = 10, jnp.asarray([0.1, 0.4, 0.7, 1.0])
    kw = dict(eps_fn=_linear_eps_fn(0.4), gamma_fn=OBJ_SCHED, vocab_size=17, num_steps=T, t=t)
    key = jax.random.key(5)
    simple = objectives.training_loss(key, k, objective="simple", **kw)
    weight = 0.5 * T * np.expm1(np.asarray(OBJ_SCHED(t)) - np.asarray(OBJ_SCHED(t - 1 / T))) * 18
    chex.assert_trees_all_close(weight * simple, elbo.elbo_terms(key, k, **kw).diffusion, rtol=1e-4)

  def test_simple_with_the_exact_eps_is_zero(self):
    # One data point: the oracle's E[x | z_t] is the point, so eps_hat = eps and L_simple = 0.
    data = _random_data(24, (1, 6), 17)
    out = objectives.training_loss(jax.random.key(6), np.repeat(data, 8, 0), objective="simple",
                                   eps_fn=elbo.oracle_eps_fn(data, vocab_size=17),
                                   gamma_fn=OBJ_SCHED, vocab_size=17, num_steps=10)
    chex.assert_trees_all_close(out, np.zeros(8), atol=1e-6)

  def test_simple_draws_t_uniformly_from_the_grid(self):
    T, n = 10, 2000
    seen = []

    def eps_fn(z, gamma):
      seen.append(np.asarray(gamma))
      return jnp.zeros_like(z)

    out = objectives.training_loss(jax.random.key(7), np.zeros((n, 3), np.int32),
                                   objective="simple", eps_fn=eps_fn, gamma_fn=OBJ_SCHED,
                                   vocab_size=4, num_steps=T, antithetic=False)
    levels = np.asarray(OBJ_SCHED(np.arange(1, T + 1) / T))
    dist = np.abs(seen[0][:, None] - levels[None, :])
    self.assertLess(dist.min(1).max(), 1e-4)                 # every gamma is a grid level 1..T
    counts = np.bincount(dist.argmin(1), minlength=T)        # n / T = 200 each; SE 13.4
    np.testing.assert_allclose(counts, n / T, atol=4 * math.sqrt(n * 0.09))
    self.assertLess(abs(float(jnp.mean(out)) - 1.0), 0.1)     # eps_hat = 0: E = 1

  @parameterized.parameters(("elbo", 0), ("elbo", 10), ("simple", 10), ("weighted", 0),
                            ("weighted", 10))
  def test_jit_shapes_and_finite_gradients(self, objective, num_steps):
    k = _random_data(25, (4, 3, 3, 1), 17)

    def loss(w):
      return jnp.mean(objectives.training_loss(
          jax.random.key(8), k, eps_fn=_linear_eps_fn(w), gamma_fn=OBJ_SCHED, vocab_size=17,
          objective=objective, num_steps=num_steps, weighting="sigmoid", weighting_bias=2.0))

    per = jax.jit(lambda: objectives.training_loss(
        jax.random.key(8), k, eps_fn=_linear_eps_fn(0.3), gamma_fn=OBJ_SCHED, vocab_size=17,
        objective=objective, num_steps=num_steps))()
    chex.assert_shape(per, (4,))
    chex.assert_tree_all_finite(per)
    grad = jax.jit(jax.grad(loss))(0.3)
    chex.assert_tree_all_finite(grad)
    self.assertNotEqual(float(grad), 0.0)

  def test_bad_objective_arguments(self):
    kw = dict(eps_fn=lambda z, g: z, gamma_fn=OBJ_SCHED, vocab_size=4)
    x = np.zeros((2, 3), np.int32)
    with self.assertRaisesRegex(ValueError, "objective 'ddpm'.*elbo"):
      objectives.training_loss(jax.random.key(0), x, objective="ddpm", **kw)
    for objective in ("weighted", "elbo"):           # a typo is caught whatever the objective
      with self.assertRaisesRegex(ValueError, "weighting 'snr'.*sigmoid"):
        objectives.training_loss(jax.random.key(0), x, objective=objective, weighting="snr", **kw)
    with self.assertRaisesRegex(ValueError, "weighting 'snr'"):
      objectives.loss_weight(0.0, weighting="snr")
    with self.assertRaisesRegex(ValueError, "'simple'.*num_steps=0"):
      objectives.training_loss(jax.random.key(0), x, objective="simple", **kw)
    with self.assertRaisesRegex(ValueError, "num_steps to be an integer >= 0"):
      objectives.training_loss(jax.random.key(0), x, objective="weighted", num_steps=-1, **kw)
