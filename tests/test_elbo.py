"""Tests for vdm_jax.maths.elbo: each term against float64 NumPy, the T-step / KL identity, the
oracle
bound, the consistency estimator, and bad input."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from vdm_jax.maths import diffusion, elbo, schedules


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _np_gauss_kl(m1, v1, m2, v2):
  return 0.5 * np.sum(v1 / v2 - 1 - np.log(v1 / v2) + (m1 - m2)**2 / v2,
                      axis=tuple(range(1, m1.ndim)))


def _random_data(seed, shape, vocab):
  return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


class TermsTest(chex.TestCase):

  def test_encode_bin_centres(self):
    chex.assert_trees_all_close(elbo.encode(jnp.arange(4), vocab_size=4),
                                jnp.asarray([-0.75, -0.25, 0.25, 0.75]))

  @parameterized.parameters(5.0, -2.0)
  def test_prior_kl_matches_gaussian_kl(self, gamma_1):
    x = elbo.encode(_random_data(0, (3, 4, 4, 5), 7), vocab_size=7)
    a2, s2 = _np_sigmoid(-gamma_1), _np_sigmoid(gamma_1)
    ref = _np_gauss_kl(np.sqrt(a2) * np.asarray(x, np.float64), s2, 0.0, 1.0)
    chex.assert_trees_all_close(elbo.prior_kl(x, gamma_1=gamma_1), ref, rtol=1e-5)

  @parameterized.parameters((3, (2, 5)), (17, (2, 8, 8, 1)), (256, (2, 4, 4, 3)), (7, (2, 3, 3, 5)))
  def test_reconstruction_matches_numpy(self, vocab, shape):
    k = _random_data(1, shape, vocab)
    z0 = np.random.default_rng(2).normal(size=shape).astype(np.float32) * 0.3
    g0 = -4.0
    a0, s0 = math.sqrt(_np_sigmoid(-g0)), math.sqrt(_np_sigmoid(g0))
    centres = 2 * (np.arange(vocab) + 0.5) / vocab - 1
    logits = -0.5 * (z0[..., None].astype(np.float64) - a0 * centres)**2 / s0**2   # log q(z0|x_k)
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                  keepdims=True)) - logits.max(-1, keepdims=True)
    ref = -np.take_along_axis(logp, k[..., None], -1)[..., 0].reshape(shape[0], -1).sum(-1)
    out = elbo.reconstruction_nll(k, z0, gamma_0=g0, vocab_size=vocab)
    chex.assert_shape(out, (shape[0],))
    chex.assert_trees_all_close(out, ref, rtol=1e-4, atol=1e-3)

  def test_reconstruction_limits(self):
    k = _random_data(3, (4, 64), 17)
    x = elbo.encode(k, vocab_size=17)
    eps = jax.random.normal(jax.random.key(0), x.shape)
    sharp = elbo.reconstruction_nll(k, diffusion.q_sample(x, -13.3, eps), gamma_0=-13.3, vocab_size=17)
    self.assertLess(float(sharp.max()), 1e-3)                  # decoder is certain at gamma_0 = -13.3
    blurred = elbo.reconstruction_nll(k, diffusion.q_sample(x, 20.0, eps), gamma_0=20.0, vocab_size=17)
    chex.assert_trees_all_close(blurred, np.full(4, 64 * math.log(17)), rtol=1e-3)

  def test_discrete_loss_is_T_times_posterior_kl(self):
    shape, T = (4, 3, 3, 2), 10
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, size=shape).astype(np.float32)
    eps = rng.normal(size=shape).astype(np.float32)
    eps_hat = eps + 0.3 * rng.normal(size=shape).astype(np.float32)
    sched = schedules.FixedLinear(gamma_min=-6.0, gamma_max=4.0)
    t = np.array([0.1, 0.5, 0.8, 1.0], np.float32)
    g_t, g_s = sched(t), sched(t - 1.0 / T)
    z_t = diffusion.q_sample(x, g_t, eps)
    x_hat = diffusion.x_from_eps(z_t, eps_hat, gamma=g_t)
    # Explicit Gaussian KL between q(z_s|z_t,x) and p(z_s|z_t) = q(z_s|z_t, x_hat), in float64.
    m_q, v_q = (np.asarray(a, np.float64) for a in diffusion.posterior(z_t, x, gamma_s=g_s, gamma_t=g_t))
    m_p, v_p = (np.asarray(a, np.float64) for a in diffusion.posterior(z_t, x_hat, gamma_s=g_s,
                                                                       gamma_t=g_t))
    ref = T * _np_gauss_kl(m_q, np.broadcast_to(v_q, shape), m_p, np.broadcast_to(v_p, shape))
    out = elbo.diffusion_loss_discrete(eps, eps_hat, gamma_s=g_s, gamma_t=g_t, num_steps=T)
    chex.assert_trees_all_close(out, ref, rtol=2e-3)

  def test_discrete_loss_tends_to_continuous(self):
    eps, eps_hat = jnp.ones((1, 4)), jnp.zeros((1, 4))
    sched = schedules.Cosine()
    _, prime = schedules.gamma_and_derivative(sched, jnp.asarray([0.6]))
    cont = elbo.diffusion_loss_continuous(eps, eps_hat, gamma_prime=prime)
    T = 10_000
    disc = elbo.diffusion_loss_discrete(eps, eps_hat, gamma_s=sched(0.6 - 1 / T), gamma_t=sched(0.6),
                                        num_steps=T)
    chex.assert_trees_all_close(disc, cont, rtol=1e-2)

  def test_sample_time(self):
    t = elbo.sample_time(jax.random.key(0), 8)
    chex.assert_shape(t, (8,))
    gaps = np.diff(np.sort(np.asarray(t)))
    chex.assert_trees_all_close(gaps, np.full(7, 1 / 8), atol=1e-6)    # low-discrepancy
    td = np.asarray(elbo.sample_time(jax.random.key(1), 1000, num_steps=10, antithetic=False))
    self.assertTrue(set(np.round(td * 10).astype(int)) <= set(range(1, 11)))
    chex.assert_trees_all_close(td * 10, np.round(td * 10), atol=1e-5)

  def test_bits_per_dim(self):
    self.assertAlmostEqual(float(elbo.bits_per_dim(64 * math.log(2), num_dims=64)), 1.0, places=6)
    with self.assertRaisesRegex(ValueError, "num_dims"):
      elbo.bits_per_dim(1.0, num_dims=0)


def _linear_eps_fn(w):
  return lambda z, g: w * z * jax.nn.sigmoid(g)[:, None, None, None]


class ElboTermsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  @parameterized.parameters(0, 100)
  def test_shapes_and_finite(self, num_steps):
    k = _random_data(5, (4, 4, 4, 5), 7)
    fn = self.variant(lambda key, x: elbo.elbo_terms(
        key, x, eps_fn=_linear_eps_fn(0.5), gamma_fn=schedules.FixedLinear(), vocab_size=7,
        num_steps=num_steps))
    terms = fn(jax.random.key(0), k)
    for term in terms:
      chex.assert_shape(term, (4,))
    chex.assert_tree_all_finite(terms)
    self.assertTrue(np.all(np.asarray(terms.total) > 0))

  @parameterized.parameters(-20.0, 20.0)
  def test_gradients_finite_at_extreme_gammas(self, g_end):
    params = schedules.init_learned_linear(gamma_min=-20.0, gamma_max=20.0)
    k = _random_data(6, (4, 3, 3, 1), 17)

    def loss(p, w):
      gamma_fn = lambda t: schedules.learned_linear_gamma(t, p)
      t = jnp.full((4,), 0.0 if g_end < 0 else 1.0)
      return jnp.mean(elbo.elbo_terms(jax.random.key(0), k, eps_fn=_linear_eps_fn(w),
                                      gamma_fn=gamma_fn, vocab_size=17, t=t).total)

    grads = jax.grad(loss, argnums=(0, 1))(params, 0.3)
    chex.assert_tree_all_finite(grads)

  def test_bfloat16_network_output(self):
    k = _random_data(7, (4, 3, 3, 1), 17)
    eps_fn = lambda z, g: (0.1 * z).astype(jnp.bfloat16)
    terms = elbo.elbo_terms(jax.random.key(0), k, eps_fn=eps_fn, gamma_fn=schedules.FixedLinear(),
                            vocab_size=17)
    self.assertEqual(terms.diffusion.dtype, jnp.float32)
    chex.assert_tree_all_finite(terms)

  def test_pure_loss_is_pmap_compatible(self):
    """Under pmap, the pmean of each device's batch mean is, on every device, the float64 mean
    of the per-device means computed one device at a time (jit, no collective)."""
    n = jax.device_count()
    self.assertGreater(n, 1)
    k = _random_data(8, (n, 2, 3, 3, 1), 17)
    keys = jax.random.split(jax.random.key(0), n)
    batch_mean = lambda key, x: jnp.mean(elbo.elbo_terms(
        key, x, eps_fn=_linear_eps_fn(0.2), gamma_fn=schedules.FixedLinear(),
        vocab_size=17).total)
    out = jax.pmap(lambda key, x: jax.lax.pmean(batch_mean(key, x), "d"), axis_name="d")(keys, k)
    per_device = np.asarray([jax.jit(batch_mean)(keys[i], k[i]) for i in range(n)], np.float64)
    # The devices' own means differ, so a pmean that kept the local value (or summed) would fail.
    self.assertGreater(per_device.std(), 1.0)
    chex.assert_shape(out, (n,))
    np.testing.assert_allclose(np.asarray(out, np.float64), np.full(n, per_device.mean()),
                               rtol=1e-6)


class BadInputTest(parameterized.TestCase):

  def _call(self, x, eps_fn=None, **kw):
    return elbo.elbo_terms(jax.random.key(0), x, eps_fn=eps_fn or (lambda z, g: z),
                           gamma_fn=schedules.FixedLinear(), **kw)

  def test_float_data(self):
    with self.assertRaisesRegex(ValueError, "integer data.*float32"):
      self._call(jnp.zeros((2, 3)), vocab_size=17)

  @parameterized.parameters(17, -1)
  def test_out_of_range(self, bad):
    x = np.zeros((2, 3), np.int32)
    x[1, 2] = bad
    with self.assertRaisesRegex(ValueError, f"value {bad} is outside \\[0, 17\\)"):
      self._call(x, vocab_size=17)

  def test_eps_fn_shape_mismatch_under_jit(self):
    bad_fn = lambda z, g: z[..., :1]
    with self.assertRaisesRegex(ValueError, r"returned shape \(2, 3, 1\).*\(2, 3, 2\)"):
      jax.jit(lambda x: self._call(x, eps_fn=bad_fn, vocab_size=4))(np.zeros((2, 3, 2), np.int32))

  def test_bad_steps_and_vocab(self):
    with self.assertRaisesRegex(ValueError, "num_steps to be an integer >= 0"):
      self._call(np.zeros((2, 3), np.int32), vocab_size=4, num_steps=-3)
    with self.assertRaisesRegex(ValueError, "vocab_size >= 2"):
      self._call(np.zeros((2, 3), np.int32), vocab_size=1)
    with self.assertRaisesRegex(ValueError, "num_steps to be an integer >= 1"):
      elbo.consistency_terms(jax.random.key(0), np.zeros((2, 3), np.int32), eps_fn=lambda z, g: z,
                             gamma_fn=schedules.FixedLinear(), vocab_size=4, num_steps=0)


def _oracle_bpd(data, vocab, num_steps, num_samples, seed=0, estimator=elbo.elbo_terms):
  """[num_samples, N] per-example bound samples in bpd with the oracle denoiser."""
  eps_fn = elbo.oracle_eps_fn(data, vocab_size=vocab)
  sched = schedules.FixedLinear(gamma_min=-13.3, gamma_max=5.0)
  fn = jax.jit(lambda key: estimator(key, data, eps_fn=eps_fn, gamma_fn=sched, vocab_size=vocab,
                                     num_steps=num_steps).total)
  nats = jax.lax.map(fn, jax.random.split(jax.random.key(seed), num_samples))
  return np.asarray(elbo.bits_per_dim(nats, num_dims=int(np.prod(data.shape[1:]))), np.float64)


class OracleTest(parameterized.TestCase):

  def test_oracle_is_posterior_mean(self):
    data = _random_data(9, (5, 6), 17)
    eps_fn = elbo.oracle_eps_fn(data, vocab_size=17)
    x = elbo.encode(data, vocab_size=17)
    # Nearly noiseless: E[x|z] is the point itself, so eps_hat is the true noise.
    eps = jax.random.normal(jax.random.key(0), x.shape)
    z = diffusion.q_sample(x, -13.0, eps)
    chex.assert_trees_all_close(eps_fn(z, jnp.full((5,), -13.0)), eps, atol=1e-2)
    # Pure noise: E[x|z] is the data mean, eps_hat = (z - alpha mean) / sigma.
    g = 25.0
    a, s = diffusion.alpha_sigma(g)
    z = jnp.zeros((1, 6))
    chex.assert_trees_all_close(eps_fn(z, jnp.full((1,), g)), -(a / s) * x.mean(0, keepdims=True),
                                rtol=1e-3, atol=1e-6)

  def test_oracle_matches_float64_bayes(self):
    data = _random_data(14, (7, 2, 3), 5)
    x = np.asarray(elbo.encode(data, vocab_size=5), np.float64).reshape(7, -1)
    z = np.random.default_rng(0).normal(size=(3, 2, 3))
    gamma = np.array([-1.0, 0.0, 2.0])
    a, s = np.sqrt(_np_sigmoid(-gamma))[:, None], np.sqrt(_np_sigmoid(gamma))[:, None]
    zf = z.reshape(3, -1)
    logw = -((zf[:, None, :] - a[:, :, None] * x[None]) ** 2).sum(-1) / (2 * s**2)   # [B, N]
    w = np.exp(logw - logw.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    ref = (zf - a * (w @ x)) / s
    out = elbo.oracle_eps_fn(data, vocab_size=5)(z.astype(np.float32), gamma.astype(np.float32))
    chex.assert_trees_all_close(out, ref.reshape(z.shape), rtol=1e-4, atol=1e-4)

  @parameterized.parameters((32, (16,)), (64, (4, 4, 2)))
  def test_bound_approaches_log_n(self, n, shape):
    data = np.unique(_random_data(10, (n,) + shape, 17).reshape(n, -1), axis=0).reshape((n,) + shape)
    self.assertEqual(len(data), n)
    bpd = _oracle_bpd(data, 17, 0, num_samples=1500)
    target = math.log2(n) / np.prod(shape)
    se = bpd.mean(1).std() / math.sqrt(bpd.shape[0])
    self.assertLess(se, 0.005)
    self.assertLess(abs(bpd.mean() - target), 0.02, msg=f"{bpd.mean()} vs {target} (se {se})")

  def test_discrete_bound_falls_with_T_towards_continuous(self):
    data = _random_data(11, (32, 16), 17)
    means = {T: _oracle_bpd(data, 17, T, 600).mean() for T in (10, 100, 1000, 0)}
    self.assertGreater(means[10], means[100] + 0.05)
    self.assertGreater(means[100], means[1000])
    self.assertLess(abs(means[1000] - means[0]), 0.02)


class ConsistencyEstimatorTest(parameterized.TestCase):

  def test_same_expectation_larger_variance(self):
    data = _random_data(12, (32, 16), 17)
    for T in (10, 100):
      den = _oracle_bpd(data, 17, T, 1500, seed=1)
      con = _oracle_bpd(data, 17, T, 1500, seed=2, estimator=elbo.consistency_terms)
      se = math.hypot(den.mean(1).std(), con.mean(1).std()) / math.sqrt(1500)
      self.assertLess(abs(den.mean() - con.mean()), 4 * se, msg=f"T={T}")
      # Per-example variance of the estimate, averaged over the data points.
      self.assertGreater(con.var(0).mean(), 1.05 * den.var(0).mean(), msg=f"T={T}")

  def test_consistency_terms_shapes(self):
    k = _random_data(13, (4, 3, 3, 2), 5)
    terms = elbo.consistency_terms(jax.random.key(0), k, eps_fn=_linear_eps_fn(0.1),
                                   gamma_fn=schedules.FixedLinear(), vocab_size=5, num_steps=4)
    for term in terms:
      chex.assert_shape(term, (4,))
    chex.assert_tree_all_finite(terms)
