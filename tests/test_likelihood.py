"""Tests of vdm_jax.maths.likelihood on cases with a known answer.

- Correlated Gaussian data x ~ N(MU, SIGMA) in D = 3 (float64). q(z_t) = N(alpha_t MU, C_t) with
  C_t = alpha_t^2 SIGMA + sigma_t^2 I, so eps = sigma_t C_t^{-1} (z - alpha_t MU) is exact, the
  flow is affine (z_1 = alpha_1 MU + (C_1 C_0^{-1})^{1/2} (z_0 - alpha_0 MU), all C_t share the
  eigenvectors of SIGMA) and log p_ODE(z_0) = log N(z_1; 0, I) + 1/2 log det(C_1 C_0^{-1}) exactly.
  With gamma_max = 20 it differs from the marginal log N(z_0; alpha_0 MU, C_0) by 1.4e-4 only
  (the prior mismatch q(z_1) vs N(0, I)). SIGMA is not diagonal, so the Hutchinson estimate is
  random (Rademacher probes are exact for diagonal Jacobians).
- Discrete data: 5 integer points (D = 2, K = 8) with the oracle eps of their uniform
  distribution (`elbo.oracle_eps_fn`). The data distribution has -log P(k) = log 5 for each point;
  with sigma_0 = e^-5 far below the bin width, the model's bound should be log 5 to solver accuracy.

Errors measured once against the exact model value (max over the 6 points, rtol = atol = 1e-5):
rk45 1.4e-4 (linear), 5.5e-6 (cosine), 2.7e-5 (beta-linear), rk23 4.2e-4 / 1.7e-4 / 1.2e-4,
rk45 at 1e-9: 7.6e-8; Heun (linear, in t) 1.9e-2 / 4.9e-3 / 1.2e-3 / 3.1e-4 at 100 / 200 / 400 /
800 steps (second order), Euler 5.4e-2 / 2.7e-2 at 1000 / 2000 (first order). Oracle bound (rk45,
exact trace, 200 samples): 1.60947 +- 0.00065 (sd) against log 5 = 1.60944 (Hutchinson: sd 1.0
per sample); the continuous-time ELBO of the same model: log 5 to within its standard error
(~0.02 with 200,000 samples; ~8 nats per sample).
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax.maths import elbo, likelihood, schedules

# ----------------------------------------------------------------------------------------------
# The Gaussian case.

D = 3
MU = np.array([0.5, -0.3, 0.8])
_L = np.array([[0.6, 0.0, 0.0], [0.4, 0.35, 0.0], [-0.3, 0.2, 0.15]])
SIGMA = _L @ _L.T
LAM, EIG = np.linalg.eigh(SIGMA)
Z0 = MU + np.random.default_rng(0).normal(size=(6, D)) @ _L.T * 1.5   # up to ~3 sd out
LINEAR = schedules.FixedLinear(gamma_min=-10.0, gamma_max=20.0)
SCHEDULES = {"linear": LINEAR, "cosine": schedules.Cosine(gamma_min=-10.0, gamma_max=20.0),
             "beta_linear": schedules.BetaLinear(gamma_min=-10.0, gamma_max=20.0)}


def gaussian_eps(z, gamma, scale=1.0):
  """Exact eps = sigma C^{-1} (z - alpha MU) in the eigenbasis of SIGMA: [B, D], [B] -> [B, D]."""
  alpha, sigma = schedules.alpha_sigma(gamma[:, None])
  w = (z - alpha * MU) @ EIG / (alpha**2 * LAM + sigma**2)
  return scale * sigma * (w @ EIG.T)


def exact_log_p(z_0, gamma_fn):
  """(log p_ODE(z_0) of the model with prior N(0, I), log q(z_0) of the data), numpy float64."""
  (a_0, s_0), (a_1, s_1) = (np.asarray(schedules.alpha_sigma(float(gamma_fn(t)))) for t in (0., 1.))
  c_0, c_1 = a_0**2 * LAM + s_0**2, a_1**2 * LAM + s_1**2
  w_0 = (z_0 - a_0 * MU) @ EIG
  z_1 = a_1 * MU + (w_0 * np.sqrt(c_1 / c_0)) @ EIG.T
  log_2pi = D * math.log(2 * math.pi)
  model = -0.5 * (z_1**2).sum(-1) - 0.5 * log_2pi + 0.5 * np.log(c_1 / c_0).sum()
  marginal = -0.5 * (w_0**2 / c_0).sum(-1) - 0.5 * log_2pi - 0.5 * np.log(c_0).sum()
  return model, marginal


def gaussian_log_p(key=None, z_0=Z0, *, gamma_fn=LINEAR, eps_scale=1.0, **kwargs):
  kwargs.setdefault("trace", "exact")
  with jax.enable_x64(True):
    eps_fn = functools.partial(gaussian_eps, scale=eps_scale)
    fn = jax.jit(functools.partial(likelihood.ode_log_likelihood, eps_fn=eps_fn,
                                   gamma_fn=gamma_fn, **kwargs))
    log_p, nfe = fn(key, jnp.asarray(z_0, jnp.float64))
    return np.asarray(log_p), int(nfe)


def test_exact_reference_matches_the_marginal():
  model, marginal = exact_log_p(Z0, LINEAR)
  np.testing.assert_allclose(model, marginal, atol=2e-4)   # prior mismatch only


@pytest.mark.parametrize("method,steps,ratio", [("heun", 200, 4.0), ("euler", 1000, 2.0)])
def test_fixed_steps_converge_at_their_order(method, steps, ratio):
  model, marginal = exact_log_p(Z0, LINEAR)
  err_n = np.abs(gaussian_log_p(method=method, num_steps=steps)[0] - model).max()
  log_p, nfe = gaussian_log_p(method=method, num_steps=2 * steps)
  err_2n = np.abs(log_p - model).max()
  assert nfe == (2 if method == "heun" else 1) * 2 * steps
  assert 0.8 * ratio < err_n / err_2n < 1.2 * ratio, (err_n, err_2n)
  tol = {"heun": 2e-3, "euler": 0.04}[method]              # measured 1.3e-3 and 0.027
  np.testing.assert_allclose(log_p, marginal, atol=tol)


@pytest.mark.parametrize("method,schedule", [("rk45", "linear"), ("rk45", "cosine"),
                                             ("rk45", "beta_linear"), ("rk23", "linear")])
def test_adaptive_matches_closed_form(method, schedule):
  gamma_fn = SCHEDULES[schedule]
  model, marginal = exact_log_p(Z0, gamma_fn)
  log_p, nfe = gaussian_log_p(method=method, gamma_fn=gamma_fn)
  np.testing.assert_allclose(log_p, model, atol=1e-3)      # measured <= 4.2e-4
  np.testing.assert_allclose(log_p, marginal, atol=1e-3)
  num_stages = {"rk45": 7, "rk23": 4}[method]
  assert nfe > 1 and (nfe - 1) % (num_stages - 1) == 0     # FSAL: 1 + (S - 1) per step try


def test_adaptive_tolerance_controls_the_error():
  model, _ = exact_log_p(Z0, LINEAR)
  log_p, nfe = gaussian_log_p(method="adaptive", rtol=1e-9, atol=1e-9, max_steps=5000)
  np.testing.assert_allclose(log_p, model, atol=3e-7)      # measured 7.6e-8
  assert nfe > gaussian_log_p(method="adaptive")[1]        # more work for a tighter tolerance


def test_ode_in_gamma_gives_the_same_answer():
  """p_ODE depends on the schedule through its endpoints only: cosine in gamma == linear in t."""
  cosine = SCHEDULES["cosine"]
  by_gamma, _ = gaussian_log_p(method="rk45", gamma_fn=cosine, time_variable="gamma")
  by_t, _ = gaussian_log_p(method="rk45", gamma_fn=LINEAR, rtol=1e-7, atol=1e-7)
  np.testing.assert_allclose(by_gamma, by_t, atol=1e-3)
  np.testing.assert_allclose(by_gamma, exact_log_p(Z0, cosine)[0], atol=1e-3)


def test_wrong_eps_fn_gives_a_clearly_different_value():
  model, _ = exact_log_p(Z0, LINEAR)
  log_p, _ = gaussian_log_p(method="rk45", eps_scale=1.1)
  assert np.abs(log_p - model).min() > 0.1                # 100x the tolerance above


@pytest.mark.parametrize("trace,num_probes", [("hutchinson_rademacher", 1),
                                              ("hutchinson_rademacher", 16),
                                              ("hutchinson_gaussian", 1)])
def test_hutchinson_is_unbiased(trace, num_probes):
  """400 copies of one point, each with its own probes: mean within 4 standard errors."""
  z_0 = np.repeat(Z0[:1], 400, axis=0)
  exact, _ = exact_log_p(z_0[:1], LINEAR)
  log_p, _ = gaussian_log_p(jax.random.key(0), z_0, method="heun", num_steps=400, trace=trace,
                            num_probes=num_probes)
  sd = np.std(log_p)
  assert sd > 0.05 / math.sqrt(num_probes)                 # really random: not the exact trace
  assert abs(log_p.mean() - exact[0]) < 4 * sd / math.sqrt(len(log_p)) + 3e-3   # + heun error
  if num_probes > 1:                                       # the variance falls as 1 / num_probes
    sd_1 = np.std(gaussian_log_p(jax.random.key(0), z_0, method="heun", num_steps=400,
                                 trace=trace)[0])
    assert 2.5 < sd_1 / sd < 6.5, (sd_1, sd)


def test_jit_eager_and_image_shapes():
  """[B, H, W, C] latents of isotropic Gaussian data N(0, 0.5^2 I), float32, jit and eager."""
  z_0 = jnp.asarray(np.random.default_rng(1).normal(size=(2, 2, 2, 3)) * 0.5, jnp.float32)

  def eps_fn(z, gamma):
    alpha, sigma = schedules.alpha_sigma(gamma[:, None, None, None])
    return sigma * z / (0.25 * alpha**2 + sigma**2)

  fn = functools.partial(likelihood.ode_log_likelihood, eps_fn=eps_fn, gamma_fn=LINEAR)
  key = jax.random.key(3)
  log_p, nfe = jax.jit(functools.partial(fn, method="rk23", rtol=1e-4, atol=1e-4))(key, z_0)
  chex.assert_shape(log_p, (2,))
  alpha_0, sigma_0 = schedules.alpha_sigma(-10.0)
  var_0 = 0.25 * alpha_0**2 + sigma_0**2
  expected = -0.5 * jnp.sum(z_0**2, axis=(1, 2, 3)) / var_0 - 6 * jnp.log(2 * jnp.pi * var_0)
  chex.assert_trees_all_close(log_p, expected, atol=2e-3)
  assert int(nfe) > 1
  jit_euler = jax.jit(functools.partial(fn, method="euler", num_steps=4))(key, z_0)
  eager_euler = fn(key, z_0, method="euler", num_steps=4)
  chex.assert_trees_all_close(eager_euler, jit_euler, rtol=1e-5)
  chex.assert_tree_all_finite(eager_euler)


def test_too_few_adaptive_steps_give_nan():
  log_p, nfe = gaussian_log_p(method="rk45", max_steps=3)
  assert np.isnan(log_p).all() and nfe == 1 + 6 * 3


# ----------------------------------------------------------------------------------------------
# Discrete data: the oracle model.

VOCAB = 8
DATA = np.array([[0, 7], [3, 3], [5, 1], [6, 6], [1, 4]], np.int32)
IMAGES = DATA.reshape(5, 1, 2, 1)                              # [B, H, W, C]
ORACLE_GAMMA = schedules.FixedLinear(gamma_min=-10.0, gamma_max=12.0)
LOG_N = math.log(len(DATA))


@functools.lru_cache(maxsize=None)
def oracle_bound(trace="exact", dequantization="variational", copies=40, gamma_fn=ORACLE_GAMMA):
  images = np.tile(IMAGES, (copies, 1, 1, 1))
  eps_fn = elbo.oracle_eps_fn(IMAGES, vocab_size=VOCAB)
  out = jax.jit(functools.partial(
      likelihood.ode_bpd, eps_fn=eps_fn, gamma_fn=gamma_fn, vocab_size=VOCAB, method="rk45",
      trace=trace, dequantization=dequantization))(jax.random.key(1), images)
  return {name: np.asarray(value) for name, value in out.items()}


def test_ode_bound_of_the_oracle_is_log_n():
  out = oracle_bound()
  for name in ("reconstruction", "log_q", "ode_nll", "total", "bpd"):
    chex.assert_shape(out[name], (200,))
    chex.assert_tree_all_finite(out[name])
  np.testing.assert_allclose(out["total"], out["reconstruction"] + out["log_q"] + out["ode_nll"],
                             rtol=1e-6)
  np.testing.assert_allclose(out["bpd"], out["total"] / (2 * math.log(2)), rtol=1e-6)
  assert abs(out["total"].mean() - LOG_N) < 5e-3          # measured 3e-5
  assert out["total"].min() > LOG_N - 1e-2                 # a bound: never far below log N
  assert out["nfe"] > 1


@pytest.mark.slow
def test_ode_bound_with_hutchinson_is_unbiased():
  total = oracle_bound(trace="hutchinson_rademacher")["total"]
  assert total.std() > 0.1
  assert abs(total.mean() - LOG_N) < 4 * total.std() / math.sqrt(len(total)) + 5e-3


def oracle_neg_log_prob(gamma_fn, num_samples=20_000):
  """-log P(k) of each data point under the oracle model with its discrete decoder, [5], by MC:
  P(k) = 1/N sum_n E_{z_0 ~ N(alpha_0 x_n, sigma_0^2)} p(k | z_0)."""
  gamma_0 = gamma_fn(0.0)
  alpha_0, sigma_0 = schedules.alpha_sigma(gamma_0)
  x = elbo.encode(IMAGES, vocab_size=VOCAB)
  noise = jax.random.normal(jax.random.key(7), (num_samples,) + x.shape[1:])
  z_0 = alpha_0 * x[:, None] + sigma_0 * noise                            # [N, M, ...]
  k = jnp.broadcast_to(IMAGES[:, None, None], (len(IMAGES),) + z_0.shape)   # [N_k, N, M, ...]
  nll = jax.vmap(lambda k_, z_: elbo.reconstruction_nll(k_, z_, gamma_0=gamma_0,
                                                        vocab_size=VOCAB), (0, None))
  log_p = jax.jit(jax.vmap(nll, (1, 0), 1))(k, z_0)                     # [N_k, N, M]
  return -np.log(np.mean(np.exp(-np.asarray(log_p)), axis=(1, 2)))


def test_ode_bound_and_elbo_agree_and_bound_the_likelihood():
  """sigma_0 comparable to the bin width (gamma_min = -4): the decoder matters (~1.4 nats).

  Both the ODE bound and the ELBO bound -log P(k) of the same discrete model (measured: truth
  2.757, ODE 3.04 +- 0.03, ELBO 3.00 +- 0.014); for an exact model their expectations coincide.
  """
  gamma_fn = schedules.FixedLinear(gamma_min=-4.0, gamma_max=12.0)
  ode = oracle_bound(copies=200, gamma_fn=gamma_fn)
  images = np.tile(IMAGES, (40_000, 1, 1, 1))
  eps_fn = elbo.oracle_eps_fn(IMAGES, vocab_size=VOCAB)
  elbo_fn = jax.jit(lambda key: elbo.elbo_terms(key, images, eps_fn=eps_fn, gamma_fn=gamma_fn,
                                                vocab_size=VOCAB).total)
  elbo_total = np.asarray(elbo_fn(jax.random.key(5)))
  se_ode, se_elbo = (np.std(v) / math.sqrt(len(v)) for v in (ode["total"], elbo_total))
  truth = oracle_neg_log_prob(gamma_fn).mean()
  assert ode["reconstruction"].mean() > 1.0
  assert ode["total"].mean() > truth - 4 * se_ode
  assert elbo_total.mean() > truth - 4 * se_elbo
  assert abs(elbo_total.mean() - ode["total"].mean()) < 4 * math.hypot(se_ode, se_elbo)
  assert ode["total"].std() < 0.2 * elbo_total.std()             # the ODE bound is less noisy


def test_uniform_dequantization_is_a_looser_bound():
  uniform, variational = oracle_bound(dequantization="uniform"), oracle_bound()
  np.testing.assert_array_equal(uniform["reconstruction"], 0.0)
  np.testing.assert_allclose(uniform["log_q"], -2 * math.log(2 / VOCAB * math.sqrt(
      float(jax.nn.sigmoid(10.0)))), rtol=1e-5)            # -log of the bin's volume in z
  assert uniform["total"].mean() > variational["total"].mean() + 10.0


def test_elbo_and_ode_bpd_side_by_side():
  images = np.tile(IMAGES, (2, 1, 1, 1))
  eps_fn = elbo.oracle_eps_fn(IMAGES, vocab_size=VOCAB)
  kwargs = dict(eps_fn=eps_fn, gamma_fn=ORACLE_GAMMA, vocab_size=VOCAB)
  out = jax.jit(functools.partial(likelihood.elbo_and_ode_bpd, elbo_num_steps=10, method="euler",
                                  num_steps=3, trace="exact", **kwargs))(jax.random.key(4), images)
  key_elbo, key_ode = jax.random.split(jax.random.key(4))
  terms = jax.jit(functools.partial(elbo.elbo_terms, num_steps=10, **kwargs))(key_elbo, images)
  ode = jax.jit(functools.partial(likelihood.ode_bpd, method="euler", num_steps=3, trace="exact",
                                  **kwargs))(key_ode, images)
  chex.assert_shape((out["elbo_bpd"], out["ode_bpd"]), (10,))
  chex.assert_trees_all_close(out["elbo_bpd"], terms.total / (2 * math.log(2)), atol=1e-5)
  chex.assert_trees_all_close(out["ode_bpd"], ode["bpd"], atol=1e-5)
  assert int(out["ode_nfe"]) == 3


# ----------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="rk4"), "'rk4'"), (dict(trace="skilling"), "'skilling'"),
    (dict(num_steps=0), "num_steps.*0"), (dict(num_probes=0), "num_probes.*0"),
    (dict(rtol=0.0), "rtol.*0.0"), (dict(max_steps=-1), "max_steps.*-1"),
    (dict(time_variable="snr"), "'snr'"), (dict(z_0=np.zeros(4)), r"\(4,\)"),
    (dict(z_0=np.zeros((2, 3), np.int32)), "int32"),
    (dict(trace="hutchinson_gaussian", key=None), "key=None"),
    (dict(eps_fn=lambda z, g: z[:, :1]), r"\(6, 1\)"),
])
def test_bad_arguments_raise(kwargs, match):
  args = dict(key=jax.random.key(0), z_0=Z0.astype(np.float32), eps_fn=gaussian_eps,
              gamma_fn=LINEAR, trace="exact")
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    likelihood.ode_log_likelihood(args.pop("key"), args.pop("z_0"), **args)


@pytest.mark.parametrize("images,kwargs,match", [
    (IMAGES, dict(dequantization="logistic"), "'logistic'"),
    (IMAGES + 3, {}, r"10 is outside \[0, 8\)"), (IMAGES.astype(np.float32), {}, "float32"),
    (DATA[:, 0], {}, r"\(5,\)"),
])
def test_bad_ode_bpd_arguments_raise(images, kwargs, match):
  eps_fn = elbo.oracle_eps_fn(IMAGES, vocab_size=VOCAB)
  with pytest.raises(ValueError, match=match):
    likelihood.ode_bpd(jax.random.key(0), images, eps_fn=eps_fn, gamma_fn=ORACLE_GAMMA,
                       vocab_size=VOCAB, **kwargs)
