"""Tests for vdm_jax.maths.latent: each term against float64 NumPy, the continuous-latent VDM bound
against its closed form for Gaussian data, the composed bound against an exactly known -log p(x)
(1-D latent, quadrature), training the latent prior, and bad input."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized

from vdm_jax.maths import diffusion, elbo, latent, schedules

SE = 4.0   # Monte-Carlo tolerance: this many standard errors


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _gaussian_eps_fn(mean, std):
  """The exact eps_hat = E[eps | z_t] for y ~ N(mean, std^2) per dimension (parameters may be
  traced): E[eps | z] = sigma (z - alpha m) / (alpha^2 s^2 + sigma^2)."""
  def eps_fn(z, gamma):
    alpha, sigma = schedules.alpha_sigma(diffusion.broadcast_to_data(gamma, z))
    return sigma * (z - alpha * mean) / (alpha**2 * std**2 + sigma**2)
  return eps_fn


def _np_expected_vdm_bound(y, m, s, g0, g1, num_steps=0):
  """E_{t, eps}[VDM bound (3)] for one y [D] under y ~ N(m, s^2) with the exact eps_hat, float64.

  E_eps ||eps - eps_hat||^2 = sum_d r^2 + alpha^2 sigma^2 (y_d - m)^2 / den^2 with
  den = alpha^2 s^2 + sigma^2 and r = alpha^2 s^2 / den; integrated over gamma (continuous time)
  or summed over the T steps.
  """
  y = np.asarray(y, np.float64)

  def mse(g):
    a2, s2 = _np_sigmoid(-g)[:, None], _np_sigmoid(g)[:, None]
    den = a2 * s * s + s2
    return np.sum((a2 * s * s / den)**2 + a2 * s2 * (y - m)**2 / den**2, axis=-1)

  if num_steps == 0:
    g = np.linspace(g0, g1, 100_001)
    f = mse(g)
    diff = 0.5 * np.sum(0.5 * (f[1:] + f[:-1]) * np.diff(g))
  else:
    g = np.linspace(g0, g1, num_steps + 1)
    diff = np.sum(0.5 * np.expm1(np.diff(g)) * mse(g[1:]))
  a2, s2 = _np_sigmoid(-g1), _np_sigmoid(g1)
  prior = 0.5 * np.sum(a2 * y * y + s2 - np.log(s2) - 1.0)
  recon = 0.5 * y.size * (math.log(2 * math.pi) + 1.0 + g0)
  return prior + recon + diff


def _mean_and_se(means):
  """Mean and standard error of independent batch means [R, ...] (R repeats with their own keys;
  within a batch the times are antithetic, so per-example spread would overstate the error)."""
  means = np.asarray(means, np.float64)
  return means.mean(0), means.std(0, ddof=1) / math.sqrt(means.shape[0])


def _np_gauss_nll(y, m, s):
  return np.sum(0.5 * np.log(2 * np.pi * s * s) + (np.asarray(y, np.float64) - m)**2 / (2 * s * s))


class PiecesTest(chex.TestCase):

  def test_categorical_nll_matches_numpy(self):
    rng = np.random.default_rng(0)
    k = rng.integers(0, 5, size=(3, 4, 2)).astype(np.int32)
    logits = rng.normal(size=(3, 4, 2, 5)).astype(np.float32) * 3
    lg = logits.astype(np.float64)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    ref = -np.take_along_axis(logp, k[..., None], -1)[..., 0].reshape(3, -1).sum(-1)
    chex.assert_trees_all_close(jax.jit(elbo.categorical_nll)(k, logits), ref, rtol=1e-5)

  def test_entropy_and_vae_kl_match_numpy(self):
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(4, 2, 2, 3)).astype(np.float32)
    log_var = rng.normal(size=(4, 2, 2, 3)).astype(np.float32)
    lv = log_var.astype(np.float64)
    ent = 0.5 * np.sum(np.log(2 * np.pi * np.e) + lv, axis=(1, 2, 3))
    chex.assert_trees_all_close(latent.gaussian_entropy(log_var), ent, rtol=1e-5)
    kl = 0.5 * np.sum(np.exp(lv) + mean.astype(np.float64)**2 - 1 - lv, axis=(1, 2, 3))
    k = rng.integers(0, 3, size=(4, 5)).astype(np.int32)
    logits_fn = lambda y: jnp.broadcast_to(jnp.sum(y, axis=(1, 2, 3))[:, None, None]
                                           * jnp.arange(3.0), (4, 5, 3))
    terms = latent.vae_terms(jax.random.key(0), k, mean=mean, log_var=log_var,
                             logits_fn=logits_fn, vocab_size=3)
    chex.assert_trees_all_close(terms.kl, kl, rtol=1e-5)
    y = latent.sample_gaussian(jax.random.key(0), mean, log_var)
    chex.assert_trees_all_close(terms.reconstruction, elbo.categorical_nll(k, logits_fn(y)))
    chex.assert_trees_all_close(terms.total, terms.reconstruction + terms.kl)

  def test_sample_gaussian_moments(self):
    mean, log_var = jnp.asarray([[-1.0, 2.0]]), jnp.asarray([[math.log(0.3), math.log(4.0)]])
    y = jax.jit(jax.vmap(lambda k: latent.sample_gaussian(k, mean, log_var)[0]))(
        jax.random.split(jax.random.key(0), 40_000))
    chex.assert_trees_all_close(jnp.mean(y, 0), mean[0], atol=0.03)
    chex.assert_trees_all_close(jnp.var(y, 0), jnp.asarray([0.3, 4.0]), rtol=0.03)

  def test_gaussian_decoder_nll_identity_and_expectation(self):
    """-log p(y | z_0) = D/2 (log 2 pi + gamma_0) + ||eps||^2 / 2 exactly; its mean is eq. (4)."""
    g0, shape = -5.0, (20_000, 3)
    y = jax.random.normal(jax.random.key(0), shape) * 2.0
    eps = jax.random.normal(jax.random.key(1), shape)
    nll = latent.gaussian_decoder_nll(y, diffusion.q_sample(y, g0, eps), gamma_0=g0)
    exact = 1.5 * (math.log(2 * math.pi) + g0) + 0.5 * np.sum(np.asarray(eps, np.float64)**2, -1)
    chex.assert_trees_all_close(nll, exact, atol=2e-3)
    expected = float(latent.expected_gaussian_decoder_nll(gamma_0=g0, num_dims=3))
    self.assertAlmostEqual(expected, 1.5 * (math.log(2 * math.pi) + 1 + g0), places=5)
    se = float(np.std(nll)) / math.sqrt(shape[0])
    self.assertLess(abs(float(np.mean(nll)) - expected), SE * se)


class LatentVDMBoundTest(chex.TestCase):
  """latent_vdm_terms on Gaussian y with the exact eps_hat: its mean equals the closed form, which
  approaches -log N(y; m, s^2) as gamma_0 -> -inf and gamma_1 -> +inf."""

  M, S = 0.3, 0.7
  Y = np.array([0.1, 0.5, -0.4])

  def test_closed_form_tightens_to_exact_nll(self):
    nll = _np_gauss_nll(self.Y, self.M, self.S)
    gaps = [_np_expected_vdm_bound(self.Y, self.M, self.S, -g, g) - nll for g in (4, 8, 12, 16)]
    self.assertTrue(all(a > b > 0 for a, b in zip(gaps, gaps[1:])), gaps)
    self.assertLess(gaps[-1], 1e-5)

  def _cv(self, cv):
    """Control-variate base models: None, the exact N(M, S^2), or N(0, 1) (not the model)."""
    return {None: {}, "exact": dict(cv_mean=self.M, cv_log_var=math.log(self.S**2)),
            "unit": dict(cv_log_var=0.0)}[cv]

  @parameterized.parameters((0, None, 12.0), (0, "exact", 12.0), (0, "unit", 12.0),
                            (1000, "unit", 12.0), (1000, None, 12.0), (10, "exact", 12.0),
                            (10, None, 12.0), (0, "unit", 1.0), (0, "exact", 1.0), (0, None, 1.0))
  def test_monte_carlo_matches_closed_form(self, num_steps, cv, g1):
    g0, batch, repeats = -12.0, 4096, 16
    gamma_fn = functools.partial(schedules.linear_gamma, gamma_min=g0, gamma_max=g1)
    y = jnp.broadcast_to(jnp.asarray(self.Y, jnp.float32), (batch, 3))
    run = jax.jit(lambda key: jnp.mean(latent.latent_vdm_terms(
        key, y, eps_fn=_gaussian_eps_fn(self.M, self.S), gamma_fn=gamma_fn, num_steps=num_steps,
        **self._cv(cv)).total))
    est, se = _mean_and_se(np.asarray([run(jax.random.key(i)) for i in range(repeats)]))
    expected = _np_expected_vdm_bound(self.Y, self.M, self.S, g0, g1, num_steps)
    self.assertLess(abs(est - expected), SE * se + 2e-3, (est, expected, se))
    if num_steps == 0 and g1 > 10:   # tight in continuous time (closed-form gap 3e-5)
      self.assertLess(abs(est - _np_gauss_nll(self.Y, self.M, self.S)), SE * se + 2e-3)

  @parameterized.parameters(0, 20)
  def test_control_variate_has_zero_mean(self, num_steps):
    """diffusion_control_variate averages to zero over t ~ U(0, 1) (or the grid) and eps."""
    gamma_fn = functools.partial(schedules.linear_gamma, gamma_min=-3.0, gamma_max=2.0)
    mean, log_var = jnp.asarray([[0.5, -1.0], [0.0, 2.0]]), jnp.asarray([[-3.0, 0.5], [-1.0, 2.0]])
    y = jnp.asarray([[0.3, 2.0], [-1.5, 0.7]])

    def run(key):
      key_t, key_eps = jax.random.split(key)
      t = elbo.sample_time(key_t, 4096, num_steps=num_steps)
      eps = jax.random.normal(key_eps, (4096, 2, 2))
      if num_steps:
        loss_fn = functools.partial(elbo.diffusion_loss_discrete, gamma_s=gamma_fn(
            t - 1.0 / num_steps), gamma_t=gamma_fn(t), num_steps=num_steps)
      else:
        loss_fn = functools.partial(elbo.diffusion_loss_continuous, gamma_prime=5.0)
      return jnp.mean(latent.diffusion_control_variate(
          jnp.broadcast_to(y, eps.shape), eps, mean=mean, log_var=log_var, gamma_t=gamma_fn(t),
          loss_fn=loss_fn, num_steps=num_steps, gamma_endpoints=(-3.0, 2.0)))

    est, se = _mean_and_se(np.asarray([jax.jit(run)(jax.random.key(i)) for i in range(16)]))
    self.assertLess(abs(est), SE * se + 1e-3, (est, se))

  def test_gaussian_eps_is_the_test_reference(self):
    z, g = jax.random.normal(jax.random.key(0), (4, 3)), jnp.linspace(-5.0, 5.0, 4)
    log_var = 2 * math.log(self.S)
    chex.assert_trees_all_close(latent.gaussian_eps(z, g, mean=self.M, log_var=log_var),
                                _gaussian_eps_fn(self.M, self.S)(z, g), rtol=1e-5)
    _, sigma = schedules.alpha_sigma(g)
    chex.assert_trees_all_close(latent.gaussian_eps(z, g), sigma[:, None] * z, rtol=1e-5)

  def test_control_variate_reduces_variance(self):
    gamma_fn = functools.partial(schedules.linear_gamma, gamma_min=-12.0, gamma_max=12.0)
    y = jnp.broadcast_to(jnp.asarray(self.Y, jnp.float32), (8192, 3))
    std = {}
    for cv in (None, "exact", "unit"):
      std[cv] = float(np.std(latent.latent_vdm_terms(
          jax.random.key(0), y, eps_fn=_gaussian_eps_fn(self.M, self.S), gamma_fn=gamma_fn,
          **self._cv(cv)).total))
    self.assertLess(std["exact"], 1e-3 * std[None], std)   # the base model is the model
    self.assertLess(std["unit"], 0.5 * std[None], std)


# ----------------------------------------------------------------------------------------------
# The composed bound on a model whose -log p(x) is known exactly.

W = np.array([[-2.0, 0.0, 2.0], [1.5, -1.0, 0.0]])    # decoder logits W[d, k] y + B[d, k]
B = np.array([[0.0, 0.5, 0.0], [0.0, 0.3, -0.2]])
DATA = np.array([[i, j] for i in range(3) for j in range(3)], np.int32)   # all 9 values of x
GRID = np.linspace(-12.0, 12.0, 48_001)


def _logits_fn(y):
  """y [B, 1] -> logits [B, 2, 3] of p(x | y) = prod_d softmax(W_d y + B_d)."""
  return jnp.asarray(W, jnp.float32) * y[:, :, None] + jnp.asarray(B, jnp.float32)


def _np_log_joint(m, s):
  """log p(x_n | y) + log N(y; m, s^2) on GRID, float64 [9, G]."""
  logits = W[None] * GRID[:, None, None] + B[None]                          # [G, 2, 3]
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  log_lik = logp[:, 0, DATA[:, 0]] + logp[:, 1, DATA[:, 1]]                 # [G, 9]
  return (log_lik - 0.5 * np.log(2 * np.pi * s * s) - (GRID[:, None] - m)**2 / (2 * s * s)).T


def _np_exact(m=0.0, s=1.0):
  """Exact -log p(x_n) [9] and the posterior p(y | x_n) on GRID [9, G] by quadrature."""
  lj = _np_log_joint(m, s)
  top = lj.max(-1, keepdims=True)
  log_px = top[:, 0] + np.log(np.trapezoid(np.exp(lj - top), GRID, axis=-1))
  return -log_px, np.exp(lj - log_px[:, None])


def _np_kl_to_posterior(q_mean, q_var, post):
  """KL(N(q_mean, q_var) || p(y | x_n)) [9] by quadrature."""
  var = q_var[:, None]
  log_q = -0.5 * np.log(2 * np.pi * var) - (GRID - q_mean[:, None])**2 / (2 * var)
  q = np.exp(log_q)
  return np.trapezoid(q * (log_q - np.log(np.maximum(post, 1e-300))), GRID, axis=-1)


def _composed(key, mean, log_var, *, m, s, reps, cv_log_var=0.0):
  """Composed-bound samples [reps, 9] with the exact Gaussian latent prior N(m, s^2)."""
  gamma_fn = functools.partial(schedules.linear_gamma, gamma_min=-13.0, gamma_max=13.0)
  tile = lambda a: jnp.tile(jnp.asarray(a), (reps,) + (1,) * (jnp.ndim(a) - 1))
  terms = latent.composed_terms(
      key, tile(DATA), mean=tile(mean), log_var=tile(log_var), logits_fn=_logits_fn,
      eps_fn=_gaussian_eps_fn(m, s), gamma_fn=gamma_fn, vocab_size=3, cv_log_var=cv_log_var)
  return terms.total.reshape(reps, 9)


class ComposedBoundTest(chex.TestCase):
  """E[composed bound] = -log p(x) + KL(q(y | x) || p(y | x)) + (VDM gap ~ 0) >= -log p(x)."""

  def _check(self, q_mean, q_var, reps=512, repeats=16, cv_log_var=0.0):
    nll, post = _np_exact()
    kl = _np_kl_to_posterior(q_mean, q_var, post)
    mean = jnp.asarray(q_mean, jnp.float32)[:, None]
    log_var = jnp.log(jnp.asarray(q_var, jnp.float32))[:, None]
    run = jax.jit(lambda key: jnp.mean(_composed(key, mean, log_var, m=0.0, s=1.0, reps=reps,
                                                 cv_log_var=cv_log_var), 0))
    est, se = _mean_and_se([run(jax.random.key(i)) for i in range(repeats)])
    np.testing.assert_array_less(nll - SE * se, est)                 # an upper bound on -log p(x)
    np.testing.assert_allclose(est, nll + kl, atol=SE * se.max() + 2e-3)   # with the known gap
    se_mean = math.sqrt(np.mean(se**2) / se.size)                           # and on average
    self.assertLess(abs(est.mean() - (nll + kl).mean()), SE * se_mean + 2e-3)
    return est - nll, kl, se

  def test_tight_with_the_posterior_moments(self):
    _, post = _np_exact()
    q_mean = np.trapezoid(post * GRID, GRID, axis=-1)
    q_var = np.trapezoid(post * GRID**2, GRID, axis=-1) - q_mean**2
    gap, kl, se = self._check(q_mean, q_var)
    self.assertLess(kl.max(), 0.02)           # the posterior is nearly Gaussian here
    self.assertLess(gap.max(), 0.02 + SE * se.max())

  @parameterized.parameters(0.0, None)
  def test_loose_with_a_poor_encoder(self, cv_log_var):
    gap, kl, _ = self._check(np.linspace(-1.0, 1.0, 9), np.full(9, 2.0), cv_log_var=cv_log_var)
    self.assertGreater(kl.min(), 0.1)
    self.assertGreater(gap.mean(), 0.5 * kl.mean())

  def test_training_the_latent_prior_lowers_the_bound(self):
    """A learnable Gaussian prior N(m, s^2) (exact eps_hat of its family) trained on the composed
    bound with a frozen encoder: the bound falls, and stays above the exact -log p(x) of the
    current model."""
    _, post = _np_exact()                       # a fixed encoder: posterior moments under N(0, 1)
    q_mean = np.trapezoid(post * GRID, GRID, axis=-1)
    q_var = np.trapezoid(post * GRID**2, GRID, axis=-1) - q_mean**2
    mean = jnp.asarray(q_mean, jnp.float32)[:, None]
    log_var = jnp.log(jnp.asarray(q_var, jnp.float32))[:, None]
    loss = lambda p, key: jnp.mean(_composed(key, mean, log_var, m=p["m"],
                                             s=jnp.exp(p["log_s"]), reps=256))
    tx = optax.adam(0.05)
    params = {"m": jnp.asarray(2.0), "log_s": jnp.asarray(math.log(3.0))}
    state = tx.init(params)

    @jax.jit
    def step(params, state, key):
      value, grads = jax.value_and_grad(loss)(params, key)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, value

    evaluate = jax.jit(lambda p: jnp.mean(jnp.stack(
        [loss(p, jax.random.key(10_000 + i)) for i in range(4)])))
    before, start = float(evaluate(params)), params
    for i in range(60):
      params, state, _ = step(params, state, jax.random.key(i))
    after = float(evaluate(params))
    self.assertLess(after, before - 0.5, (before, after, params))
    for p, bound in ((start, before), (params, after)):
      exact = float(np.mean(_np_exact(float(p["m"]), math.exp(float(p["log_s"])))[0]))
      self.assertGreater(bound, exact - 0.02, (p, bound, exact))


class ValidationTest(chex.TestCase):

  def test_bad_inputs_raise(self):
    y = jnp.zeros((2, 3))
    gamma_fn = functools.partial(schedules.linear_gamma, gamma_min=-5.0, gamma_max=5.0)
    eps_fn = lambda z, g: z
    key = jax.random.key(0)
    with self.assertRaisesRegex(ValueError, "same shape"):
      latent.sample_gaussian(key, jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with self.assertRaisesRegex(ValueError, "float latent"):
      latent.latent_vdm_terms(key, jnp.zeros((2, 3), jnp.int32), eps_fn=eps_fn, gamma_fn=gamma_fn)
    with self.assertRaisesRegex(ValueError, "num_steps"):
      latent.latent_vdm_terms(key, y, eps_fn=eps_fn, gamma_fn=gamma_fn, num_steps=-1)
    with self.assertRaisesRegex(ValueError, "eps_fn returned shape"):
      latent.latent_vdm_terms(key, y, eps_fn=lambda z, g: z[:, :2], gamma_fn=gamma_fn)
    with self.assertRaisesRegex(ValueError, "vocab_size=3"):
      latent.composed_terms(key, DATA[:2], mean=jnp.zeros((2, 1)), log_var=jnp.zeros((2, 1)),
                            logits_fn=lambda y: jnp.zeros((2, 2, 4)), eps_fn=eps_fn,
                            gamma_fn=gamma_fn, vocab_size=3)
    with self.assertRaisesRegex(ValueError, "batch sizes differ"):
      latent.composed_terms(key, DATA[:2], mean=jnp.zeros((3, 1)), log_var=jnp.zeros((3, 1)),
                            logits_fn=_logits_fn, eps_fn=eps_fn, gamma_fn=gamma_fn, vocab_size=3)
    with self.assertRaisesRegex(ValueError, "outside"):
      latent.vae_terms(key, DATA[:2] + 5, mean=jnp.zeros((2, 1)), log_var=jnp.zeros((2, 1)),
                       logits_fn=_logits_fn, vocab_size=3)
    with self.assertRaisesRegex(ValueError, "num_dims"):
      latent.expected_gaussian_decoder_nll(gamma_0=0.0, num_dims=0)

  def test_jit_matches_eager(self):
    gamma_fn = functools.partial(schedules.linear_gamma, gamma_min=-6.0, gamma_max=6.0)
    fn = functools.partial(latent.composed_terms, logits_fn=_logits_fn,
                           eps_fn=_gaussian_eps_fn(0.0, 1.0), gamma_fn=gamma_fn, vocab_size=3)
    args = (jax.random.key(3), DATA)
    kw = dict(mean=jnp.linspace(-1, 1, 9)[:, None], log_var=jnp.full((9, 1), -1.0))
    chex.assert_trees_all_close(jax.jit(fn)(*args, **kw), fn(*args, **kw), rtol=1e-5, atol=1e-5)
