"""Tests for vdm_jax.maths.diffusion: forward process, posterior, Tweedie conversions."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from vdm_jax.maths import diffusion


def _np_alpha2(g):
  return 1.0 / (1.0 + np.exp(g))


def _np_sigma2(g):
  return 1.0 / (1.0 + np.exp(-g))


class TransitionTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_matches_float64_reference(self):
    gs = np.array([-13.3, -5.0, 0.0, 2.0, 4.9], np.float32)
    gt = np.array([-13.0, -1.0, 0.5, 5.0, 5.0], np.float32)
    alpha_ts, sigma2_ts = self.variant(
        lambda a, b: diffusion.transition(gamma_s=a, gamma_t=b))(gs, gt)
    a_s, a_t = _np_alpha2(gs.astype(np.float64)), _np_alpha2(gt.astype(np.float64))
    ref_alpha = np.sqrt(a_t / a_s)
    ref_sigma2 = _np_sigma2(gt.astype(np.float64)) - a_t / a_s * _np_sigma2(gs.astype(np.float64))
    chex.assert_trees_all_close(alpha_ts, ref_alpha, rtol=1e-5)
    chex.assert_trees_all_close(sigma2_ts, ref_sigma2, rtol=1e-4)

  def test_exact_where_naive_difference_cancels(self):
    # gamma_t - gamma_s = 1e-5 at gamma = 2: the naive float32 difference loses most digits.
    gs, gt = np.float32(2.0), np.float32(2.0) + np.float32(1e-5)
    _, sigma2_ts = diffusion.transition(gamma_s=gs, gamma_t=gt)
    g_s, g_t = np.float64(gs), np.float64(gt)
    ref = -np.expm1(np.logaddexp(0, g_s) - np.logaddexp(0, g_t))
    chex.assert_trees_all_close(sigma2_ts, ref, rtol=1e-3)
    naive = np.float32(_np_sigma2(gt)) - np.float32(_np_alpha2(gt) / _np_alpha2(gs)) * np.float32(
        _np_sigma2(gs))
    self.assertGreater(abs(naive - ref) / ref, 1e-2)   # the naive formula really fails here

  def test_two_step_marginal_monte_carlo(self):
    # z_s ~ q(z_s|x), z_t ~ q(z_t|z_s) must have the moments of q(z_t|x). n = 200k, 5 std errors.
    n, gs, gt = 200_000, -2.0, 1.5
    x = jnp.full((n,), 0.7)
    k1, k2 = jax.random.split(jax.random.key(0))
    z_s = diffusion.q_sample(x, gs, jax.random.normal(k1, (n,)))
    alpha_ts, sigma2_ts = diffusion.transition(gamma_s=gs, gamma_t=gt)
    z_t = alpha_ts * z_s + jnp.sqrt(sigma2_ts) * jax.random.normal(k2, (n,))
    alpha_t, sigma_t = diffusion.alpha_sigma(gt)
    se_mean = float(sigma_t) / np.sqrt(n)
    self.assertLess(abs(float(z_t.mean()) - 0.7 * float(alpha_t)), 5 * se_mean)
    se_var = float(sigma_t**2) * np.sqrt(2.0 / n)
    self.assertLess(abs(float(z_t.var()) - float(sigma_t**2)), 5 * se_var)


class PosteriorTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_equals_bayes_rule(self):
    rng = np.random.default_rng(0)
    z_t = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)
    x = rng.uniform(-1, 1, size=(4, 3, 3, 2)).astype(np.float32)
    gs = np.array([-10.0, -3.0, 0.0, 3.0], np.float32)
    gt = gs + np.array([0.5, 2.0, 1.0, 0.01], np.float32)
    mean, var = self.variant(
        lambda a, b, c, d: diffusion.posterior(a, b, gamma_s=c, gamma_t=d))(z_t, x, gs, gt)
    # Bayes: q(z_s|x) = N(alpha_s x, sigma_s^2), q(z_t|z_s) = N(alpha_ts z_s, sigma_ts^2).
    g_s, g_t = gs.astype(np.float64)[:, None, None, None], gt.astype(np.float64)[:, None, None, None]
    a_s2, s_s2 = _np_alpha2(g_s), _np_sigma2(g_s)
    a_ts2 = _np_alpha2(g_t) / a_s2
    s_ts2 = _np_sigma2(g_t) - a_ts2 * s_s2
    precision = 1.0 / s_s2 + a_ts2 / s_ts2
    ref_var = 1.0 / precision
    ref_mean = ref_var * (np.sqrt(a_s2) * x / s_s2 + np.sqrt(a_ts2) * z_t / s_ts2)
    chex.assert_trees_all_close(mean, ref_mean, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(jnp.broadcast_to(var, mean.shape),
                                np.broadcast_to(ref_var, mean.shape), rtol=1e-4)

  def test_monte_carlo_conditional(self):
    # Sample the joint (z_s, z_t), keep z_t in a thin slice, compare z_s moments to the posterior.
    n, gs, gt, x0 = 2_000_000, -1.0, 0.5, 0.3
    k1, k2 = jax.random.split(jax.random.key(1))
    z_s = diffusion.q_sample(jnp.full((n,), x0), gs, jax.random.normal(k1, (n,)))
    alpha_ts, sigma2_ts = diffusion.transition(gamma_s=gs, gamma_t=gt)
    z_t = alpha_ts * z_s + jnp.sqrt(sigma2_ts) * jax.random.normal(k2, (n,))
    sel = np.abs(np.asarray(z_t) - 0.2) < 0.01
    zs_sel = np.asarray(z_s)[sel]
    mean, var = diffusion.posterior(jnp.full((1,), 0.2), jnp.full((1,), x0), gamma_s=gs, gamma_t=gt)
    var = jnp.broadcast_to(var, mean.shape)
    se = np.sqrt(float(var[0]) / sel.sum())
    self.assertLess(abs(zs_sel.mean() - float(mean[0])), 5 * se + 0.01)
    self.assertAlmostEqual(zs_sel.var(), float(var[0]), delta=0.05 * float(var[0]))

  def test_shape_mismatch(self):
    with self.assertRaisesRegex(ValueError, r"\(2, 3\) and \(2, 4\)"):
      diffusion.posterior(jnp.zeros((2, 3)), jnp.zeros((2, 4)), gamma_s=0.0, gamma_t=1.0)
    with self.assertRaisesRegex(ValueError, "same shape"):
      diffusion.q_sample(jnp.zeros((2, 3)), 0.0, jnp.zeros((3, 2)))
    with self.assertRaisesRegex(ValueError, r"got shape \(5,\)"):
      diffusion.q_sample(jnp.zeros((2, 3)), jnp.zeros((5,)), jnp.zeros((2, 3)))


class ConversionTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.x = rng.uniform(-1, 1, size=(3, 4, 4, 3)).astype(np.float32)
    self.eps = rng.normal(size=(3, 4, 4, 3)).astype(np.float32)
    self.gamma = np.array([-5.0, 0.0, 4.0], np.float32)
    self.z = diffusion.q_sample(self.x, self.gamma, self.eps)

  @parameterized.parameters("eps", "x", "score", "v")
  def test_round_trip(self, param):
    pred = diffusion.from_eps(self.eps, parameterization=param, z=self.z, gamma=self.gamma)
    back = diffusion.to_eps(pred, parameterization=param, z=self.z, gamma=self.gamma)
    chex.assert_trees_all_close(back, self.eps, rtol=1e-4, atol=1e-4)

  def test_true_eps_gives_true_x_and_v(self):
    chex.assert_trees_all_close(diffusion.x_from_eps(self.z, self.eps, gamma=self.gamma), self.x,
                                atol=1e-4)
    alpha, sigma = diffusion.alpha_sigma(self.gamma[:, None, None, None])
    chex.assert_trees_all_close(diffusion.v_from_eps(self.z, self.eps, gamma=self.gamma),
                                alpha * self.eps - sigma * self.x, atol=1e-4)

  def test_tweedie_on_gaussian_data(self):
    # x ~ N(m, s^2): the marginal q(z) = N(alpha m, alpha^2 s^2 + sigma^2) has an exact score, and
    # Tweedie gives E[x|z] = (z + sigma^2 score) / alpha, which must equal the Gaussian posterior
    # mean.
    m, s2, g = 0.4, 0.25, 0.3
    alpha, sigma = (float(a) for a in diffusion.alpha_sigma(g))
    z = jnp.linspace(-2, 2, 9)
    score = -(z - alpha * m) / (alpha**2 * s2 + sigma**2)
    eps_hat = diffusion.eps_from_score(score, gamma=g)
    x_hat = diffusion.x_from_eps(z, eps_hat, gamma=g)
    post_mean = m + alpha * s2 / (alpha**2 * s2 + sigma**2) * (z - alpha * m)
    chex.assert_trees_all_close(x_hat, post_mean, rtol=1e-5, atol=1e-6)
    # And the score of q(z|x) for one x is -eps/sigma by autodiff of the Gaussian log density.
    logq = lambda zz: jnp.sum(-0.5 * (zz - alpha * m)**2 / sigma**2)
    chex.assert_trees_all_close(jax.grad(logq)(z),
                                diffusion.score_from_eps((z - alpha * m) / sigma, gamma=g), rtol=1e-5)

  def test_unknown_parameterization(self):
    with self.assertRaisesRegex(ValueError, "'noise'"):
      diffusion.to_eps(self.eps, parameterization="noise", z=self.z, gamma=self.gamma)

  def test_bfloat16_inputs(self):
    z = diffusion.q_sample(self.x.astype(jnp.bfloat16), self.gamma.astype(jnp.bfloat16),
                           self.eps.astype(jnp.bfloat16))
    self.assertEqual(z.dtype, jnp.bfloat16)
    chex.assert_trees_all_close(z.astype(jnp.float32), self.z, atol=5e-2)
    mean, var = diffusion.posterior(z, self.x.astype(jnp.bfloat16), gamma_s=self.gamma - 1,
                                    gamma_t=self.gamma)
    chex.assert_tree_all_finite((mean, var))


def test_flow_drift_moves_the_marginal_of_gaussian_data_exactly():
  """For x ~ N(0, 1) the marginal q(z_t) = N(0, 1) for every gamma, so the probability flow
  with the exact eps_hat = sigma z (Tweedie) must be zero; with eps_hat = 0 it is the pure
  contraction -1/2 gamma' sigma^2 z of d log alpha_t / dt."""
  z = jnp.linspace(-2.0, 2.0, 5)[:, None]
  gamma, gamma_prime = jnp.asarray(0.7), jnp.asarray(3.0)
  sigma = np.sqrt(1.0 / (1.0 + np.exp(-0.7)))
  np.testing.assert_allclose(diffusion.flow_drift(z, sigma * z, gamma=gamma,
                                                  gamma_prime=gamma_prime), 0.0, atol=1e-6)
  np.testing.assert_allclose(diffusion.flow_drift(z, jnp.zeros_like(z), gamma=gamma,
                                                  gamma_prime=gamma_prime),
                             -0.5 * 3.0 * sigma**2 * np.asarray(z), rtol=1e-5)


def test_predict_eps_checks_the_shape():
  z = jnp.zeros((2, 3))
  np.testing.assert_array_equal(diffusion.predict_eps(lambda z, g: z + g[:, None], z,
                                                      jnp.ones(2)), np.ones((2, 3)))
  with pytest.raises(ValueError, match=r"eps_fn returned shape \(2, 1\); expected the shape of "
                                       r"z_t, \(2, 3\)"):
    diffusion.predict_eps(lambda z, g: z[:, :1], z, jnp.ones(2))
