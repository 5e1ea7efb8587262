"""Tests of vdm_jax.maths.sampling on cases with a known answer.

Test distributions:
- a 1-D mixture of two Gaussians, x ~ 0.3 N(-1, 0.25^2) + 0.7 N(1, 0.25^2). Its noisy marginal
  q(z_t) = sum_k pi_k N(alpha_t mu_k, alpha_t^2 s^2 + sigma_t^2) has a closed-form score, so
  eps = -sigma_t score is exact, and each sampler should return z_0 ~ q(z_0);
- a finite data set of 5 integer points with `elbo.oracle_eps_fn` (the exact eps of the uniform
  distribution over the set): decoded samples must be members of the set, each ~1/5 of the time.

Monte-Carlo tolerances: a fixed seed, n samples, and |estimate - truth| <= 4 standard errors plus a
discretisation allowance per sampler, measured once with 400,000 samples (the bias of that sampler
at that number of steps, see `MIXTURE_CASES`).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax.training import config_checks, steps
from vdm_jax.datasets import data
from vdm_jax.maths import diffusion, elbo, guidance, sampling, schedules

GAMMA_FN = schedules.FixedLinear(gamma_min=-10.0, gamma_max=10.0)   # q(z_1) = N(0, 1) to 5e-5
VOCAB = 8
DATA = np.array([[0, 7], [3, 3], [5, 1], [6, 6], [1, 4]], np.int32)   # N = 5 points, D = 2

MU, STD, WEIGHTS = np.array([-1.0, 1.0]), 0.25, np.array([0.3, 0.7])


def _component_params(gamma):
  alpha, sigma = schedules.alpha_sigma(jnp.asarray(gamma)[:, None])    # [B, 1]
  return alpha, sigma, alpha**2 * STD**2 + sigma**2


def mixture_log_joint(z, gamma):
  """log pi_k + log N(z; alpha mu_k, v) up to a shared constant: [B, 1], [B] -> [B, 2]."""
  alpha, _, var = _component_params(gamma)
  return jnp.log(WEIGHTS) - 0.5 * (z - alpha * MU)**2 / var


def component_eps(y):
  """Exact eps of class y alone (q(z_t | y) Gaussian): sigma (z - alpha mu_y) / v."""
  def eps_fn(z, gamma):
    alpha, sigma, var = _component_params(gamma)
    return sigma * (z - alpha * MU[y]) / var
  return eps_fn


def mixture_eps(z, gamma):
  """Exact eps = -sigma grad log q(z_t) = sum_k r_k(z) eps_k(z) of the mixture: [B, 1] -> [B, 1]."""
  resp = jax.nn.softmax(mixture_log_joint(z, gamma), axis=-1)
  eps_k = jnp.concatenate([component_eps(0)(z, gamma), component_eps(1)(z, gamma)], axis=-1)
  return jnp.sum(resp * eps_k, axis=-1, keepdims=True)


def class_log_prob(y):
  """Exact log p(y | z_t) from the mixture posterior: [B, 1], [B] -> [B]."""
  return lambda z, gamma: jax.nn.log_softmax(mixture_log_joint(z, gamma), axis=-1)[:, y]


def _members(samples, data):
  """Boolean [B]: is each sample one of the data points?"""
  return (samples[:, None, :] == data[None, :, :]).all(-1).any(-1)


# ----------------------------------------------------------------------------------------------
# decode


def test_decode_recovers_bin_centres():
  k = np.arange(VOCAB, dtype=np.int32)[None].repeat(3, 0)
  gamma_0 = GAMMA_FN(0.0)
  alpha_0, _ = schedules.alpha_sigma(gamma_0)
  z_0 = alpha_0 * elbo.encode(k, vocab_size=VOCAB)
  out = sampling.decode(None, z_0, gamma_0=gamma_0, vocab_size=VOCAB)
  assert out.dtype == jnp.int32
  np.testing.assert_array_equal(out, k)
  drawn = sampling.decode(jax.random.key(0), z_0, gamma_0=gamma_0, vocab_size=VOCAB, mode="sample")
  np.testing.assert_array_equal(drawn, k)   # sigma_0 / bin width ~ 0.03: p(k | z_0) ~ one-hot


def test_decode_sample_follows_decoder_probabilities():
  gamma_0 = jnp.asarray(0.0)                 # sigma_0 = alpha_0: p(k | z_0) is far from one-hot
  z_0 = jnp.zeros((20000, 1))
  probs = jax.nn.softmax(elbo.decoder_logits(z_0[:1], gamma_0=gamma_0, vocab_size=4))[0, 0]
  out = sampling.decode(jax.random.key(1), z_0, gamma_0=gamma_0, vocab_size=4, mode="sample")
  freq = np.bincount(np.asarray(out).ravel(), minlength=4) / out.size
  np.testing.assert_allclose(freq, probs, atol=4 * np.sqrt(0.25 / out.size))


# ----------------------------------------------------------------------------------------------
# Every sampler on the Gaussian mixture.

# (name, kwargs, allowance for weight, mean, relative variance): the biases measured with 400k
# samples were (w, mean towards 0, var/true - 1): ancestral (-0.005, 0.007, -0.03),
# ddim eta=0 (0.000, 0.008, +0.025), ddim eta=0.5 (-0.002, 0.009, -0.006), ode heun
# (0.000, 0.001, +0.017), ode euler (0.002, 0.001, +0.01), pc (-0.005, 0.001, +0.023),
# langevin (+0.019, 0.001, +0.026): annealed Langevin slowly fixes the weights of separated modes.
MIXTURE_CASES = [
    ("ancestral", dict(num_steps=200), 0.01, 0.01, 0.04),
    ("ddim", dict(num_steps=200), 0.01, 0.01, 0.04),
    ("ddim", dict(num_steps=200, eta=0.5), 0.01, 0.01, 0.04),
    ("ode", dict(num_steps=50, method="heun"), 0.01, 0.01, 0.03),
    ("ode", dict(num_steps=200, method="euler"), 0.01, 0.01, 0.03),
    ("pc", dict(num_steps=100, corrector_steps=1), 0.01, 0.01, 0.04),
    ("langevin", dict(num_levels=200, steps_per_level=5), 0.025, 0.01, 0.04),
]


@pytest.mark.parametrize("name,kwargs,w_allow,mean_allow,var_allow", MIXTURE_CASES)
def test_sampler_matches_gaussian_mixture(name, kwargs, w_allow, mean_allow, var_allow):
  n = 8000
  run = jax.jit(lambda key: sampling.get_sampler(name)(
      key, eps_fn=mixture_eps, gamma_fn=GAMMA_FN, shape=(n, 1), **kwargs))
  _assert_matches_mixture(np.asarray(run(jax.random.key(42)))[:, 0], GAMMA_FN, w_allow, mean_allow,
                          var_allow)


def _assert_matches_mixture(z, gamma_fn, w_allow, mean_allow, var_allow):
  """Samples z [n] against q(z_0) of the mixture: weight, and per component mean and variance."""
  n = len(z)
  chex.assert_tree_all_finite(z)
  alpha_0, sigma_0 = (float(a) for a in schedules.alpha_sigma(gamma_fn(0.0)))
  # q(z_0) components: means alpha_0 mu_k, variance alpha_0^2 s^2 + sigma_0^2 (overlap 3e-5).
  var = alpha_0**2 * STD**2 + sigma_0**2
  w = np.mean(z < 0)
  assert abs(w - WEIGHTS[0]) <= 4 * np.sqrt(0.21 / n) + w_allow, w
  for k, part in enumerate((z[z < 0], z[z > 0])):
    m = len(part)
    assert abs(part.mean() - alpha_0 * MU[k]) <= 4 * np.sqrt(var / m) + mean_allow, (k, part.mean())
    assert abs(part.var() / var - 1) <= 4 * np.sqrt(2 / (m - 1)) + var_allow, (k, part.var() / var)


# ----------------------------------------------------------------------------------------------
# Every sampler on a finite data set, with the oracle denoiser and integer decoding.

DATA_CASES = [
    ("ancestral", dict(num_steps=100)),
    ("ddpm", dict(num_steps=100)),
    ("ddim", dict(num_steps=100)),
    ("ode", dict(num_steps=50)),
    ("langevin", dict(num_levels=200, steps_per_level=5)),
    ("pc", dict(num_steps=100)),
]


@pytest.mark.parametrize("name,kwargs", DATA_CASES)
def test_sampler_with_oracle_lands_on_data(name, kwargs):
  eps_fn = elbo.oracle_eps_fn(DATA, vocab_size=VOCAB)
  n = 2000
  run = jax.jit(lambda key: sampling.get_sampler(name)(
      key, eps_fn=eps_fn, gamma_fn=GAMMA_FN, shape=(n, 2), vocab_size=VOCAB, **kwargs))
  out = np.asarray(run(jax.random.key(1)))
  chex.assert_shape(out, (n, 2))
  assert out.dtype == np.int32
  assert _members(out, DATA).all()
  freq = (out[:, None, :] == DATA[None]).all(-1).mean(0)
  # uniform 1/5 each; binomial SE = sqrt(0.2 * 0.8 / 2000) = 0.009: 4 SE plus 0.01.
  np.testing.assert_allclose(freq, 0.2, atol=0.046)


# ----------------------------------------------------------------------------------------------
# Identities between samplers.


def test_ddim_eta_one_is_ancestral_and_pc_without_corrector_is_ancestral():
  kw = dict(eps_fn=mixture_eps, gamma_fn=GAMMA_FN, shape=(64, 1), num_steps=30)
  key = jax.random.key(7)
  ancestral = sampling.ancestral_sample(key, **kw)
  chex.assert_trees_all_close(sampling.ddim_sample(key, eta=1.0, **kw), ancestral,
                              atol=1e-4, rtol=1e-4)
  chex.assert_trees_all_close(sampling.pc_sample(key, corrector_steps=0, **kw), ancestral)
  assert not np.allclose(sampling.ddim_sample(key, eta=0.0, **kw), ancestral, atol=1e-2)


def _gaussian_eps(z, gamma, std=0.5):
  """Exact eps of x ~ N(0, std^2): q(z_t) = N(0, v_t), v_t = alpha_t^2 std^2 + sigma_t^2."""
  alpha, sigma = schedules.alpha_sigma(gamma[:, None])
  return sigma * z / (alpha**2 * std**2 + sigma**2)


@pytest.mark.parametrize("name,kwargs,order", [
    ("ode", dict(method="euler"), 1), ("ode", dict(method="heun"), 2), ("ddim", dict(eta=0.0), 1)])
def test_deterministic_solvers_converge_at_their_order_on_a_gaussian(name, kwargs, order):
  """For Gaussian data the probability-flow ODE maps z_1 to z_0 = sqrt(v_0 / v_1) z_1 exactly
  (both sides stay Gaussian and dz/dt is linear in z), so the error at T and 2T steps shows the
  solver's order: the ratio is ~2^order (measured: euler 2.2, heun 16 (pre-asymptotic), ddim 1.8;
  a first-order "Heun" gives ~2)."""
  key, std = jax.random.key(0), 0.5
  var = lambda t: std**2 * schedules.alpha_sigma(GAMMA_FN(t))[0]**2 + \
      schedules.alpha_sigma(GAMMA_FN(t))[1]**2
  exact = jnp.sqrt(var(0.0) / var(1.0)) * jax.random.normal(jax.random.split(key)[0], (256, 1))
  errors = [float(jnp.max(jnp.abs(sampling.get_sampler(name)(
      key, eps_fn=_gaussian_eps, gamma_fn=GAMMA_FN, shape=(256, 1), num_steps=steps, **kwargs)
      - exact))) for steps in (8, 16)]
  ratio = errors[0] / errors[1]
  if order == 1:
    assert 1.6 < ratio < 2.6 and errors[1] < 0.25, errors
  else:
    assert ratio > 3.5 and errors[1] < 5e-3, errors


def test_pc_ends_with_the_predictor():
  """With T = 1 the corrector runs at t = 1 and the predictor to t = 0 comes last, so
  z_0 ~ N(alpha_0 x_hat(z_1), sigma_Q^2) with x_hat(z_1) ~ E[x] = 0.4 (alpha_1 = 0.007)."""
  z = sampling.pc_sample(jax.random.key(2), eps_fn=mixture_eps, gamma_fn=GAMMA_FN,
                         shape=(500, 1), num_steps=1, corrector_steps=2)
  assert abs(float(jnp.mean(z)) - 0.4) < 0.02 and float(jnp.std(z)) < 0.02, (jnp.mean(z), jnp.std(z))


# ----------------------------------------------------------------------------------------------
# Guidance.


def test_classifier_guidance_with_weight_one_is_the_conditional_eps():
  z = jax.random.normal(jax.random.key(3), (50, 1)) * 1.5
  gamma = jnp.linspace(-6.0, 6.0, 50)
  for y in (0, 1):
    guided = guidance.classifier_guided_eps_fn(mixture_eps, class_log_prob(y), guidance=1.0)
    chex.assert_trees_all_close(guided(z, gamma), component_eps(y)(z, gamma), atol=1e-4)
  free = guidance.classifier_free_eps_fn(component_eps(0), mixture_eps, guidance=2.0)
  chex.assert_trees_all_close(free(z, gamma),
                              3.0 * component_eps(0)(z, gamma) - 2.0 * mixture_eps(z, gamma))


@pytest.mark.parametrize("kind,w", [("free", 1.0), ("free", 3.0), ("classifier", 3.0)])
@pytest.mark.parametrize("y", [0, 1])
def test_guidance_puts_samples_in_requested_component(kind, w, y):
  if kind == "free":
    eps_fn = guidance.classifier_free_eps_fn(component_eps(y), mixture_eps, guidance=w)
  else:
    eps_fn = guidance.classifier_guided_eps_fn(mixture_eps, class_log_prob(y), guidance=w)
  z = sampling.ancestral_sample(jax.random.key(5), eps_fn=eps_fn, gamma_fn=GAMMA_FN,
                                shape=(2000, 1), num_steps=100)
  in_component = np.mean((np.asarray(z)[:, 0] > 0) == (y == 1))
  assert in_component > 0.95, in_component


# ----------------------------------------------------------------------------------------------
# One compiled loop, one trace of eps_fn.

ALL_CASES = [
    ("ancestral", dict(num_steps=5)), ("ddim", dict(num_steps=5, eta=0.3)),
    ("ode", dict(num_steps=5, method="heun")), ("ode", dict(num_steps=5, method="euler")),
    ("langevin", dict(num_levels=3, steps_per_level=2)), ("pc", dict(num_steps=5, corrector_steps=2)),
    ("ddpm", dict(num_steps=5, variance="posterior")),
]


@pytest.mark.parametrize("name,kwargs", ALL_CASES)
@pytest.mark.parametrize("vocab_size", [None, VOCAB])
def test_sampler_is_one_scan_tracing_eps_fn_once(name, kwargs, vocab_size):
  calls = []

  def eps_fn(z, gamma):
    calls.append(1)
    chex.assert_shape(gamma, (z.shape[0],))
    return elbo.oracle_eps_fn(DATA, vocab_size=VOCAB)(z, gamma)

  fn = lambda key: sampling.get_sampler(name)(key, eps_fn=eps_fn, gamma_fn=GAMMA_FN,
                                              shape=(3, 2), vocab_size=vocab_size, **kwargs)
  jaxpr = jax.make_jaxpr(fn)(jax.random.key(0))
  loops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("scan", "while")]
  assert len(loops) == 1 and len(calls) == 1, (len(loops), len(calls))
  out = jax.eval_shape(fn, jax.random.key(0))
  assert out.shape == (3, 2) and out.dtype == (jnp.float32 if vocab_size is None else jnp.int32)


# ----------------------------------------------------------------------------------------------
# Errors.

KW = dict(eps_fn=mixture_eps, gamma_fn=GAMMA_FN, shape=(4, 1))


@pytest.mark.parametrize("call,match", [
    (lambda: sampling.ancestral_sample(jax.random.key(0), num_steps=0, **KW), "num_steps"),
    (lambda: sampling.ddim_sample(jax.random.key(0), num_steps=-3, **KW), "-3"),
    (lambda: sampling.ddim_sample(jax.random.key(0), num_steps=4, eta=1.5, **KW), "eta"),
    (lambda: sampling.ode_sample(jax.random.key(0), num_steps=4, method="rk4", **KW), "rk4"),
    (lambda: sampling.ode_sample(jax.random.key(0), num_steps=0, **KW), "num_steps"),
    (lambda: sampling.langevin_sample(jax.random.key(0), num_levels=0, steps_per_level=2, **KW),
     "num_levels"),
    (lambda: sampling.langevin_sample(jax.random.key(0), num_levels=2, steps_per_level=2,
                                      snr=-1.0, **KW), "snr"),
    (lambda: sampling.pc_sample(jax.random.key(0), num_steps=4, corrector_steps=-1, **KW),
     "corrector_steps"),
    (lambda: sampling.ancestral_sample(jax.random.key(0), num_steps=4, vocab_size=1, **KW),
     "vocab_size"),
    (lambda: sampling.ancestral_sample(jax.random.key(0), eps_fn=mixture_eps, gamma_fn=GAMMA_FN,
                                       shape=(0, 1), num_steps=4), "shape"),
    (lambda: sampling.get_sampler("euler_maruyama"), "euler_maruyama.*ancestral"),
    (lambda: sampling.ddpm_sample(jax.random.key(0), num_steps=4, variance="learned", **KW),
     "variance 'learned'.*posterior"),
    (lambda: sampling.ddpm_sample(jax.random.key(0), num_steps=0, **KW), "num_steps"),
    (lambda: sampling.decode(None, jnp.zeros((2, 1)), gamma_0=-10.0, vocab_size=4, mode="mode"),
     "mode"),
    (lambda: sampling.decode(None, jnp.zeros((2, 1)), gamma_0=-10.0, vocab_size=4, mode="sample"),
     "key"),
    (lambda: guidance.classifier_free_eps_fn(mixture_eps, mixture_eps, guidance=float("nan")),
     "guidance"),
])
def test_bad_arguments_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_bad_eps_fn_output_shape_raises():
  with pytest.raises(ValueError, match="eps_fn returned shape"):
    sampling.ancestral_sample(jax.random.key(0), eps_fn=lambda z, g: z[:, :0], gamma_fn=GAMMA_FN,
                              shape=(4, 1), num_steps=3)
  guided = guidance.classifier_guided_eps_fn(mixture_eps, lambda z, g: jnp.sum(z), guidance=1.0)
  with pytest.raises(ValueError, match="log_prob_fn returned shape"):
    guided(jnp.zeros((4, 1)), jnp.zeros((4,)))


def test_registry_names():
  assert set(sampling.SAMPLERS) == {"ancestral", "ddim", "ode", "langevin", "pc", "ddpm"}
  assert sampling.get_sampler("ddpm") is sampling.ddpm_sample
  assert sampling.get_sampler("ode") is sampling.ode_sample
  with pytest.raises(ValueError, match=r"unknown sampler 'euler'; expected one of \('ancestral'"):
    sampling.get_sampler("euler")


def _step_count(key, *, eps_fn, gamma_fn, shape, num_steps, vocab_size=None):
  """A toy sampler: every value is the number of steps it was given."""
  del key, eps_fn, gamma_fn
  return jnp.full(shape, num_steps % vocab_size, jnp.int32)


def test_a_registered_sampler_is_usable_by_name(registered, smoke_config):
  registered(sampling.SAMPLERS, sampling.register_sampler, "test_step_count", _step_count)
  smoke_config.sample.sampler = "test_step_count"
  config_checks.check_config(smoke_config)
  fns = (lambda z, g: z, GAMMA_FN, (2, 2, 1), None)
  images = steps.draw_samples(fns, sampler="test_step_count", key=jax.random.key(0),
                              num_images=3, num_steps=4, info=data.static_info("digits"))
  np.testing.assert_array_equal(images, np.full((3, 2, 2, 1), 4))


# ----------------------------------------------------------------------------------------------
# DDPM (Ho et al. 2020): beta 1e-4 -> 0.02, T = 1000, sampled with algorithm 2.

DDPM_T = 1000
DDPM_BETAS = np.linspace(1e-4, 0.02, DDPM_T)                 # float64
DDPM_ALPHA_BAR = np.cumprod(1.0 - DDPM_BETAS)
DDPM_LEVELS = np.log1p(-DDPM_ALPHA_BAR) - np.log(DDPM_ALPHA_BAR)   # gamma_n, n = 1..T
# The DDPM configuration: level n at t = n / T (up to the offsets measured below) and, at t = 0,
# gamma = -13.3 (VDM's gamma_min) for the discrete decoder.
DDPM_GAMMA = schedules.BetaLinear(gamma_min=-13.3, gamma_max=schedules.BetaLinear().endpoints[1])


def test_beta_linear_gives_ddpm_alpha_bar_on_the_grid():
  """BetaLinear is exact on DDPM's grid (float32 rounding: measured 3e-6 in gamma). With its
  default endpoints level n sits at t = (n - 1) / (T - 1); with gamma_min = -13.3, t = n / T lands
  0.0186 (1 - n / T) steps past level n: measured 0.020 in gamma at n = 1, 3.4e-4 at n = 100,
  0 at n = T, alpha_bar within 9.5e-5 relative."""
  default = schedules.BetaLinear()(np.arange(DDPM_T) / (DDPM_T - 1))
  np.testing.assert_allclose(np.asarray(default, np.float64), DDPM_LEVELS, atol=1e-5)
  config = DDPM_GAMMA(np.arange(1, DDPM_T + 1) / DDPM_T)
  err = np.abs(np.asarray(config, np.float64) - DDPM_LEVELS)
  assert err.max() < 0.021 and err[99:].max() < 4e-4 and err[-1] < 1e-5, (err.max(), err[99:].max())
  alpha_bar = np.asarray(schedules.alpha_sigma(config)[0], np.float64)**2
  np.testing.assert_allclose(alpha_bar, DDPM_ALPHA_BAR, rtol=2e-4)


def _ddpm_table_gamma_fn():
  """gamma exact on the grid: DDPM's level n at t = n / T, alpha_bar = 1 (gamma = -30) at t = 0."""
  table = jnp.asarray(np.concatenate([[-30.0], DDPM_LEVELS]), jnp.float32)
  return lambda t: table[jnp.round(jnp.asarray(t) * DDPM_T).astype(jnp.int32)]


def _ddpm_reference(key, shape, variance):
  """Algorithm 2 of Ho et al. 2020 in float64 NumPy with DDPM's own beta_t, alpha_t, alpha_bar_t,
  on the samplers' noise: z_T from split(key)[0], step i's from split(split(key)[1], T)[i]."""
  alphas, prev = 1.0 - DDPM_BETAS, np.concatenate([[1.0], DDPM_ALPHA_BAR[:-1]])
  key_init, key_loop = jax.random.split(key)
  x = np.asarray(jax.random.normal(key_init, shape), np.float64)
  noise = jax.vmap(lambda k: jax.random.normal(k, shape))(jax.random.split(key_loop, DDPM_T))
  eps_fn = jax.jit(mixture_eps)
  for i, n in enumerate(range(DDPM_T, 0, -1)):
    beta, alpha_bar = DDPM_BETAS[n - 1], DDPM_ALPHA_BAR[n - 1]
    gamma = np.full(shape[:1], DDPM_LEVELS[n - 1], np.float32)
    eps = np.asarray(eps_fn(x.astype(np.float32), gamma))
    var = beta if variance == "beta" else beta * (1 - prev[n - 1]) / (1 - alpha_bar)
    z = np.asarray(noise[i], np.float64) if n > 1 else 0.0          # no noise at the last step
    x = (x - beta / np.sqrt(1 - alpha_bar) * eps) / np.sqrt(alphas[n - 1]) + np.sqrt(var) * z
  return x


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_sampler_is_algorithm_2(variance):
  key, shape = jax.random.key(11), (256, 1)
  out = sampling.ddpm_sample(key, eps_fn=mixture_eps, gamma_fn=_ddpm_table_gamma_fn(), shape=shape,
                             num_steps=DDPM_T, variance=variance)
  # float32 against float64 over 1000 steps: measured max difference 3e-5.
  np.testing.assert_allclose(out, _ddpm_reference(key, shape, variance), atol=2e-4)


# Biases measured with 400k samples (w, mean towards 0, var/true - 1): beta (0.000, 0.002, +0.01),
# posterior (-0.001, 0.002, -0.027); the Gaussian recursion of the variance predicts +0.007 and
# -0.030 at T = 1000 (and +0.002, -0.008 at T = 4000): an O(1/T) discretisation bias.
@pytest.mark.parametrize("variance,var_allow", [("beta", 0.02), ("posterior", 0.04)])
def test_ddpm_configuration_matches_gaussian_mixture(variance, var_allow):
  n = 8000
  run = jax.jit(lambda key: sampling.ddpm_sample(key, eps_fn=mixture_eps, gamma_fn=DDPM_GAMMA,
                                                 shape=(n, 1), num_steps=DDPM_T, variance=variance))
  _assert_matches_mixture(np.asarray(run(jax.random.key(42)))[:, 0], DDPM_GAMMA, 0.01, 0.01,
                          var_allow)


def test_ddpm_posterior_variance_is_ancestral_without_its_last_noise():
  key, shape, steps = jax.random.key(7), (64, 1), 30
  kw = dict(eps_fn=mixture_eps, gamma_fn=GAMMA_FN, shape=shape, num_steps=steps)
  ddpm = sampling.ddpm_sample(key, variance="posterior", **kw)
  last_noise = jax.random.normal(jax.random.split(jax.random.split(key)[1], steps)[-1], shape)
  _, var_q = diffusion.posterior(jnp.zeros(shape), jnp.zeros(shape), gamma_s=GAMMA_FN(0.0),
                                 gamma_t=GAMMA_FN(np.float32(1 / steps)))
  chex.assert_trees_all_close(ddpm + jnp.sqrt(var_q) * last_noise,
                              sampling.ancestral_sample(key, **kw), atol=1e-4, rtol=1e-4)
  assert not np.allclose(sampling.ddpm_sample(key, variance="beta", **kw), ddpm, atol=1e-2)
