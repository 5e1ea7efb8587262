"""Every term of the VDM variational bound, per example, in nats.

-log p(x) <= prior + reconstruction + diffusion   (VDM eq. 11; survey eq. 58)

- prior:          KL(q(z_1 | x) || N(0, I))                              (survey: prior matching)
- reconstruction: E_q(z_0|x) [-log p(x | z_0)], discrete decoder          (survey: reconstruction)
- diffusion:      continuous time 1/2 E_t [gamma'(t) ||eps - eps_hat||^2] (VDM eq. 17), or with T
                  steps T/2 E_t [expm1(gamma_t - gamma_s) ||eps - eps_hat||^2] (VDM eq. 13-14),
                  T times the expected KL(q(z_s | z_t, x) || p(z_s | z_t))
                  (survey: denoising matching)

Data are integers k in {0..K-1} of any shape [B, ...] and any vocabulary size K, encoded to the
bin centres x = 2 (k + 1/2) / K - 1. The network enters only through `eps_fn(z_t, gamma_t)`, and
the schedule only through `gamma_fn(t)`, so any network and any schedule plug in.

This module is the single home of every term of the bound; the training objectives that reweight
them (DDPM's L_simple, weighted losses) are in `vdm_jax.maths.objectives`. Only jax / jax.numpy are
imported here (plus the sibling maths modules).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from vdm_jax.core import checks
from vdm_jax.maths import diffusion
from vdm_jax.maths.diffusion import EpsFn
from vdm_jax.maths.schedules import GammaFn, alpha_sigma, gamma_and_derivative


class ELBOTerms(NamedTuple):
  """Per-example terms of the negative ELBO in nats, each of shape [B]."""

  prior: jax.Array
  reconstruction: jax.Array
  diffusion: jax.Array

  @property
  def total(self) -> jax.Array:
    return self.prior + self.reconstruction + self.diffusion


# ----------------------------------------------------------------------------------------------
# Data encoding and validation.


def check_data(x: ArrayLike, *, vocab_size: int) -> jax.Array:
  """Validates integer data [B, ...] in [0, vocab_size) and returns it as an array.

  The dtype and shape are checked always (at trace time under jit). The value range can only be
  checked when `x` is concrete (outside jit); under jit out-of-range values are not detected here
  (the data pipeline checks every batch before it reaches the device).

  Raises:
    ValueError: non-integer dtype, scalar data, vocab_size < 2 or a value outside [0, vocab_size).
  """
  if not isinstance(vocab_size, int) or vocab_size < 2:
    raise ValueError(f"expected an integer vocab_size >= 2, got {vocab_size!r}")
  dtype, shape = (x.dtype, x.shape) if hasattr(x, "dtype") else (np.asarray(x).dtype, np.shape(x))
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"expected integer data in [0, {vocab_size}), got dtype {dtype}")
  if len(shape) < 1:
    raise ValueError(f"expected data of shape [B, ...], got shape {shape}")
  if not isinstance(x, jax.core.Tracer) and np.size(x):
    lo, hi = int(np.min(np.asarray(x))), int(np.max(np.asarray(x)))
    if lo < 0 or hi >= vocab_size:
      bad = lo if lo < 0 else hi
      raise ValueError(f"data value {bad} is outside [0, {vocab_size}) (vocab_size={vocab_size})")
  x = jnp.asarray(x)
  return x


def encode(k: ArrayLike, *, vocab_size: int) -> jax.Array:
  """Bin centres x = 2 (k + 1/2) / K - 1 in (-1, 1) of integer data k. Shape of `k`, float32."""
  return 2.0 * (jnp.asarray(k, jnp.float32) + 0.5) / vocab_size - 1.0


def sum_per_example(a: ArrayLike) -> jax.Array:
  """[B, ...] -> [B] by summing over all but the leading axis."""
  a = jnp.asarray(a)
  return jnp.sum(a.reshape(a.shape[0], -1), axis=-1)


def categorical_nll(k: ArrayLike, logits: ArrayLike) -> jax.Array:
  """-sum_d log softmax(logits_d)[k_d]: the NLL of integer data under per-dimension categorical
  distributions, summed per example -> [B] nats.

  Args:
    k: integer data [B, ...] in [0, K).
    logits: [B, ..., K] (the shape of `k` plus a category axis).
  """
  k, logits = jnp.asarray(k), jnp.asarray(logits, jnp.float32)
  if logits.shape[:-1] != k.shape:
    raise ValueError(f"expected logits of shape {k.shape + ('K',)}, got {logits.shape}")
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, k[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return -sum_per_example(picked)


# ----------------------------------------------------------------------------------------------
# The three terms.


def gaussian_kl(mean1: ArrayLike, var1: ArrayLike, mean2: ArrayLike, var2: ArrayLike) -> jax.Array:
  """KL(N(mean1, var1 I) || N(mean2, var2 I)) summed over all but the leading axis -> [B].

  Per dimension 1/2 (var1 / var2 + (mean1 - mean2)^2 / var2 - 1 + log var2 - log var1).
  Variances broadcast against the means [B, ...].
  """
  mean1, mean2 = jnp.asarray(mean1), jnp.asarray(mean2)
  ratio = jnp.broadcast_to(var1 / var2, mean1.shape)
  kl = 0.5 * (ratio - 1.0 - jnp.log(ratio) + (mean1 - mean2)**2 / var2)
  return sum_per_example(kl)


def prior_kl(x: ArrayLike, *, gamma_1: ArrayLike) -> jax.Array:
  """Prior matching KL(q(z_1 | x) || N(0, I)) = 1/2 sum(alpha_1^2 x^2 + sigma_1^2
  - log sigma_1^2 - 1).

  Written as 1/2 sum(alpha_1^2 (x^2 - 1) + softplus(-gamma_1)), using sigma^2 - 1 = -alpha^2 and
  -log sigma^2 = softplus(-gamma). (VDM eq. 9's L_prior; survey eq. 58's prior matching term.)

  Args:
    x: encoded data [B, ...].
    gamma_1: gamma(1), scalar or [B].

  Returns:
    [B] nats.
  """
  x = jnp.asarray(x, jnp.float32)
  gamma_1 = diffusion.broadcast_to_data(jnp.asarray(gamma_1, jnp.float32), x)
  alpha2 = jax.nn.sigmoid(-gamma_1)
  return sum_per_example(0.5 * (alpha2 * (x * x - 1.0) + jax.nn.softplus(-gamma_1)))


def decoder_logits(z_0: ArrayLike, *, gamma_0: ArrayLike, vocab_size: int) -> jax.Array:
  """Logits of the discrete decoder p(k | z_0) proportional to q(z_0 | x_k) (VDM eq. 8, appendix C).

  logit_k = -(z_0 / alpha_0 - x_k)^2 / (2 sigma_0^2 / alpha_0^2) for the K bin centres x_k.

  Args:
    z_0: [B, ...] latent at t = 0.
    gamma_0: gamma(0), scalar or [B].
    vocab_size: K.

  Returns:
    [B, ..., K] float32 logits.
  """
  z_0 = jnp.asarray(z_0, jnp.float32)
  gamma_0 = diffusion.broadcast_to_data(jnp.asarray(gamma_0, jnp.float32), z_0)
  alpha_0, sigma_0 = alpha_sigma(gamma_0)
  x_vals = encode(jnp.arange(vocab_size), vocab_size=vocab_size)
  z_rescaled = (z_0 / alpha_0)[..., None]
  inv_var = (alpha_0 / sigma_0)[..., None] ** 2
  return -0.5 * inv_var * (z_rescaled - x_vals) ** 2


def reconstruction_nll(k: ArrayLike, z_0: ArrayLike, *, gamma_0: ArrayLike,
                       vocab_size: int) -> jax.Array:
  """Reconstruction -log p(k | z_0) with the discrete decoder, summed per example -> [B] nats."""
  return categorical_nll(k, decoder_logits(z_0, gamma_0=gamma_0, vocab_size=vocab_size))


def squared_error(eps: ArrayLike, eps_hat: ArrayLike) -> jax.Array:
  """||eps - eps_hat||^2 per example: [B, ...] twice -> [B] (ValueError if the shapes differ)."""
  eps, eps_hat = jnp.asarray(eps, jnp.float32), jnp.asarray(eps_hat, jnp.float32)
  if eps.shape != eps_hat.shape:
    raise ValueError(f"eps_hat has shape {eps_hat.shape}; expected the data shape {eps.shape}")
  return sum_per_example((eps - eps_hat) ** 2)


def diffusion_loss_continuous(eps: ArrayLike, eps_hat: ArrayLike, *,
                              gamma_prime: ArrayLike) -> jax.Array:
  """Continuous-time diffusion loss at one t: 1/2 gamma'(t) ||eps - eps_hat||^2 (VDM eq. 17).

  Args:
    eps, eps_hat: [B, ...].
    gamma_prime: d gamma / dt at each example's t, [B] (or scalar).

  Returns:
    [B] nats (an unbiased one-sample estimate of the term when t ~ U(0, 1)).
  """
  return 0.5 * jnp.asarray(gamma_prime, jnp.float32) * squared_error(eps, eps_hat)


def diffusion_loss_discrete(eps: ArrayLike, eps_hat: ArrayLike, *, gamma_s: ArrayLike,
                            gamma_t: ArrayLike, num_steps: int) -> jax.Array:
  """T-step diffusion loss at one step: T/2 expm1(gamma_t - gamma_s) ||eps - eps_hat||^2.

  This is T KL(q(z_s | z_t, x) || p(z_s | z_t)) with p(z_s | z_t) = q(z_s | z_t, x = x_hat): the
  means differ by alpha_s sigma_{t|s}^2 / sigma_t^2 (x - x_hat), and
  SNR(s) - SNR(t) = expm1(gamma_t - gamma_s) SNR(t) (VDM eq. 13-14).

  Returns:
    [B] nats (an unbiased estimate when t is uniform on {1/T, ..., 1}).
  """
  gamma_s, gamma_t = jnp.asarray(gamma_s, jnp.float32), jnp.asarray(gamma_t, jnp.float32)
  return 0.5 * num_steps * jnp.expm1(gamma_t - gamma_s) * squared_error(eps, eps_hat)


def sample_time(key: jax.Array, batch_size: int, *, num_steps: int = 0,
                antithetic: bool = True) -> jax.Array:
  """Times for one batch: t_i = mod(u + i / B, 1) (antithetic / low-discrepancy, VDM appendix
  I.1) or i.i.d. uniform. With num_steps = T > 0 they are rounded up to the grid {1/T, ..., 1}.

  Returns:
    [B] float32 times.
  """
  if antithetic:
    u = jax.random.uniform(key, ())
    t = jnp.mod(u + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)
  else:
    t = jax.random.uniform(key, (batch_size,))
  if num_steps:
    t = (jnp.floor(t * num_steps) + 1.0) / num_steps
  return t


def _noise(given: ArrayLike | None, key: jax.Array, shape: tuple[int, ...], name: str) -> jax.Array:
  """`given` as float32 of the data's shape, or a standard normal draw from `key` when None."""
  if given is None:
    return jax.random.normal(key, shape)
  given = jnp.asarray(given, jnp.float32)
  if given.shape != shape:
    raise ValueError(f"{name} has shape {given.shape}; expected the data shape {shape}")
  return given


def elbo_terms(key: jax.Array, x: ArrayLike, *, eps_fn: EpsFn, gamma_fn: GammaFn,
               vocab_size: int, num_steps: int = 0, t: ArrayLike | None = None,
               antithetic: bool = True, eps: ArrayLike | None = None,
               eps_0: ArrayLike | None = None, gamma_t: ArrayLike | None = None,
               gamma_prime: ArrayLike | None = None) -> ELBOTerms:
  """One-sample estimate of the three terms of the negative ELBO, per example, in nats.

  Args:
    key: PRNG key.
    x: integer data [B, ...] in [0, vocab_size).
    eps_fn: (z_t [B, ...], gamma_t [B]) -> eps_hat [B, ...].
    gamma_fn: t -> gamma(t), elementwise and increasing.
    vocab_size: K.
    num_steps: T; 0 means continuous time.
    t: optional explicit times [B] (on the grid {1/T..1} when T > 0); sampled when None.
    antithetic: low-discrepancy times over the batch (VDM appendix I.1).
    eps: optional explicit noise [B, ...] of z_t (diffusion term); drawn from `key` when None.
    eps_0: optional explicit noise [B, ...] of z_0 (reconstruction term); drawn when None.
      (Explicit draws reproduce another implementation's estimate, e.g. the official code's.)
    gamma_t, gamma_prime: optional gamma(t), gamma'(t) [B] at the given `t` (continuous time;
      both or neither), as the caller computed them from `gamma_fn`, e.g. with their gradients
      routed (`objectives.variance_elbo_terms`); computed here when None.

  Returns:
    ELBOTerms(prior, reconstruction, diffusion), each [B] float32.
  """
  checks.check_number("num_steps", num_steps, integer=True, low=0)
  k = check_data(x, vocab_size=vocab_size)
  x = encode(k, vocab_size=vocab_size)
  batch = x.shape[0]
  key_t, key_eps, key_0 = jax.random.split(key, 3)
  given_t = t
  if t is None:
    t = sample_time(key_t, batch, num_steps=num_steps, antithetic=antithetic)
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
  eps = _noise(eps, key_eps, x.shape, "eps")

  if (gamma_t is None) != (gamma_prime is None) or (gamma_t is not None and
                                                     (num_steps or given_t is None)):
    raise ValueError("gamma_t and gamma_prime go together, with explicit times t and "
                     "num_steps = 0 (continuous time)")
  if gamma_t is not None:
    gamma_t, gamma_prime = (jnp.broadcast_to(jnp.asarray(g, jnp.float32), (batch,))
                            for g in (gamma_t, gamma_prime))
  elif num_steps == 0:
    gamma_t, gamma_prime = gamma_and_derivative(gamma_fn, t)
  else:
    gamma_t = gamma_fn(t)
  eps_hat = diffusion.predict_eps(eps_fn, diffusion.q_sample(x, gamma_t, eps), gamma_t)
  if num_steps == 0:
    loss_diff = diffusion_loss_continuous(eps, eps_hat, gamma_prime=gamma_prime)
  else:
    gamma_s = gamma_fn(t - 1.0 / num_steps)
    loss_diff = diffusion_loss_discrete(eps, eps_hat, gamma_s=gamma_s, gamma_t=gamma_t,
                                        num_steps=num_steps)

  gamma_0 = gamma_fn(jnp.zeros((), jnp.float32))
  z_0 = diffusion.q_sample(x, gamma_0, _noise(eps_0, key_0, x.shape, "eps_0"))
  loss_recon = reconstruction_nll(k, z_0, gamma_0=gamma_0, vocab_size=vocab_size)
  loss_prior = prior_kl(x, gamma_1=gamma_fn(jnp.ones((), jnp.float32)))
  return ELBOTerms(prior=jnp.broadcast_to(loss_prior, (batch,)), reconstruction=loss_recon,
                   diffusion=loss_diff)


def consistency_terms(key: jax.Array, x: ArrayLike, *, eps_fn: EpsFn, gamma_fn: GammaFn,
                      vocab_size: int, num_steps: int, antithetic: bool = True) -> ELBOTerms:
  """The same T-step bound estimated the survey's "consistency" way (Luo 2022, eq. 45-47).

  Writing z_i for the latent at t_i = i / T (and z_{-1} = x), the negative ELBO regroups as::

    E[-log p(x | z_0)] + E[KL(q(z_T | z_{T-1}) || N(0, I))]
    + sum_{i=1..T} E[log q(z_{i-1} | z_{i-2}) - log p(z_{i-1} | z_i)],

  comparing the model's step p(z_{i-1} | z_i) with the forward step q(z_{i-1} | z_{i-2}).
  The survey writes each summand as KL(q(z_{i-1} | z_{i-2}) || p(z_{i-1} | z_i)) under
  q(z_{i-2}, z_i | x); that is not exact, because z_{i-1} depends on z_i too. Here the exact
  summand is used: with r = q(z_{i-1} | z_{i-2}, z_i) (a Gaussian bridge) it equals
  E_r[log q - log p] = KL(r || p) - KL(r || q), so the estimate is unbiased for the same bound as
  `elbo_terms(..., num_steps=T)`, but it has two noisy endpoints (z_{i-2}, z_i) per term instead
  of one: a larger variance, which is the survey's argument for the denoising form.

  Args and returns as `elbo_terms` (num_steps >= 1 required; one random step i per example,
  weighted by T).
  """
  checks.check_number("num_steps", num_steps, integer=True, low=1)
  k = check_data(x, vocab_size=vocab_size)
  x = encode(k, vocab_size=vocab_size)
  batch, steps = x.shape[0], num_steps
  key_t, key_a, key_c, key_0, key_p = jax.random.split(key, 5)
  t = sample_time(key_t, batch, num_steps=steps, antithetic=antithetic)
  first = t < 1.5 / steps                                   # i == 1: z_{i-2} is x itself
  g_c, g_b = gamma_fn(t), gamma_fn(t - 1.0 / steps)
  g_a = gamma_fn(jnp.maximum(t - 2.0 / steps, 0.0))
  alpha_b, sigma_b = alpha_sigma(g_b)
  alpha_ba, var_ba = diffusion.transition(gamma_s=g_a, gamma_t=g_b)
  coef_ab = jnp.where(first, alpha_b, alpha_ba)
  var_ab = jnp.where(first, sigma_b**2, var_ba)
  coef_bc, var_bc = diffusion.transition(gamma_s=g_b, gamma_t=g_c)

  z_a = jnp.where(diffusion.broadcast_to_data(first, x), x,
                  diffusion.q_sample(x, g_a, jax.random.normal(key_a, x.shape)))
  z_c = (diffusion.broadcast_to_data(coef_ab * coef_bc, x) * z_a
         + diffusion.broadcast_to_data(jnp.sqrt(coef_bc**2 * var_ab + var_bc), x)
         * jax.random.normal(key_c, x.shape))
  x_hat = diffusion.x_from_eps(z_c, diffusion.predict_eps(eps_fn, z_c, g_c), gamma=g_c)
  p_mean, p_var = diffusion.posterior(z_c, x_hat, gamma_s=g_b, gamma_t=g_c)
  r_mean, r_var = diffusion.gaussian_bridge(z_a, z_c, coef_ab=coef_ab, var_ab=var_ab,
                                            coef_bc=coef_bc, var_bc=var_bc)
  q_mean = diffusion.broadcast_to_data(coef_ab, x) * z_a
  q_var = diffusion.broadcast_to_data(var_ab, x)
  loss_diff = steps * (gaussian_kl(r_mean, r_var, p_mean, p_var)
                       - gaussian_kl(r_mean, r_var, q_mean, q_var))

  g_pen, g_1 = gamma_fn(jnp.full((batch,), 1.0 - 1.0 / steps)), gamma_fn(jnp.ones((batch,)))
  z_pen = diffusion.q_sample(x, g_pen, jax.random.normal(key_p, x.shape))
  alpha_1p, var_1p = diffusion.transition(gamma_s=g_pen, gamma_t=g_1)
  loss_prior = gaussian_kl(diffusion.broadcast_to_data(alpha_1p, x) * z_pen,
                           diffusion.broadcast_to_data(var_1p, x), jnp.zeros_like(x), 1.0)
  gamma_0 = gamma_fn(jnp.zeros((), jnp.float32))
  z_0 = diffusion.q_sample(x, gamma_0, jax.random.normal(key_0, x.shape))
  loss_recon = reconstruction_nll(k, z_0, gamma_0=gamma_0, vocab_size=vocab_size)
  return ELBOTerms(prior=loss_prior, reconstruction=loss_recon, diffusion=loss_diff)


def oracle_eps_fn(data: ArrayLike, *, vocab_size: int) -> EpsFn:
  """The Bayes-optimal eps predictor for the uniform distribution over a finite data set.

  For data {x_n} (n = 1..N), the posterior over the data point given z_t is
  softmax_n(-||z_t - alpha_t x_n||^2 / (2 sigma_t^2)), computed from the logits
  (alpha z.x_n - alpha^2 ||x_n||^2 / 2) / sigma^2 with a stable (logsumexp) softmax; Tweedie's
  formula gives E[x | z_t] = sum_n w_n x_n and eps_hat = (z_t - alpha_t E[x | z_t]) / sigma_t
  (survey eq. 133). Cost O(B N D) per call: fine for thousands of points.

  Args:
    data: integer data [N, ...] in [0, vocab_size).
    vocab_size: K.

  Returns:
    eps_fn(z_t [B, ...], gamma_t scalar or [B]) -> eps_hat [B, ...] float32.
  """
  data = check_data(data, vocab_size=vocab_size)
  points = encode(data, vocab_size=vocab_size).reshape(data.shape[0], -1)   # [N, D]
  half_sq_norms = 0.5 * jnp.sum(points**2, axis=-1)                        # [N]
  hi = jax.lax.Precision.HIGHEST

  def eps_fn(z_t: jax.Array, gamma_t: jax.Array) -> jax.Array:
    z = jnp.asarray(z_t, jnp.float32)
    if z.shape[1:] != data.shape[1:]:
      raise ValueError(f"z_t has shape {z.shape}; expected [B, *{data.shape[1:]}]")
    flat = z.reshape(z.shape[0], -1)
    gamma = jnp.broadcast_to(jnp.asarray(gamma_t, jnp.float32), (z.shape[0],))
    alpha, sigma = alpha_sigma(gamma)
    logits = (alpha[:, None] * jnp.matmul(flat, points.T, precision=hi)
              - (alpha**2)[:, None] * half_sq_norms[None, :]) / (sigma**2)[:, None]
    x_mean = jnp.matmul(jax.nn.softmax(logits, axis=-1), points, precision=hi)
    return ((flat - alpha[:, None] * x_mean) / sigma[:, None]).reshape(z.shape)

  return eps_fn


def bits_per_dim(nats: ArrayLike, *, num_dims: int) -> jax.Array:
  """bpd = nats / (D ln 2) for D = num_dims dimensions per example."""
  if num_dims < 1:
    raise ValueError(f"expected num_dims >= 1, got {num_dims}")
  return jnp.asarray(nats) / (num_dims * math.log(2.0))
