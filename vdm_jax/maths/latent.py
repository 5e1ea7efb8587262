"""Latent diffusion as a bound on -log p(x): a VAE whose prior is a VDM over its latent y.

Two bounds, per example, in nats (x: integer data [B, ...]; y: continuous latent [B, ...]):

VAE (Kingma & Welling 2014, eq. 3; the survey's VAE section), encoder q(y | x) = N(mu(x),
diag(v(x))), discrete decoder p(x | y) = prod_d softmax(logits_d(y))[x_d] over the K values of each
dimension:

  -log p(x) <= E_q(y|x)[-log p(x | y)] + KL(q(y | x) || N(0, I))                          (1)

Latent diffusion (Vahdat et al. 2021, LSGM; Rombach et al. 2022; here with a VDM prior): the
prior N(0, I) of (1) is replaced by a VDM density p_VDM(y), and KL(q || p) = E_q[log q - log p]:

  -log p(x) <= E_q[-log p(x | y)] - H[q(y | x)] + E_q(y|x)[-log p_VDM(y)]                   (2)

For a continuous y the VDM bound (VDM eq. 11 with a Gaussian instead of a discrete decoder) is

  -log p_VDM(y) <= KL(q(z_1 | y) || N(0, I)) + E_q(z_0|y)[-log p(y | z_0)] + L_diffusion(y)     (3)

with p(y | z_0) = N(y; z_0 / alpha_0, (sigma_0^2 / alpha_0^2) I): the inverse of z_0 = alpha_0 y +
sigma_0 eps, widened by the noise. Since z_0 / alpha_0 - y = (sigma_0 / alpha_0) eps exactly, its
NLL is D/2 log(2 pi sigma_0^2 / alpha_0^2) + ||eps||^2 / 2, independent of y, and its expectation
is exactly

  E[-log p(y | z_0)] = D/2 (log 2 pi + 1 + gamma_0)     (sigma_0^2 / alpha_0^2 = e^gamma_0)    (4)

so (4) is used in closed form: zero variance, and the gradient d/d gamma_0 = D/2 is exact.
Substituting (3) into (2) gives the composed bound `ComposedTerms.total`. With an exact eps_fn the
gap of (3) vanishes as gamma_0 -> -inf and gamma_1 -> +inf (the decoder noise and the prior
mismatch both vanish). -H[q] + (4) = 1/2 sum_d (gamma_0 - log v_d) is very negative then; the
diffusion loss between gamma_0 and the scale of p(y) makes up for it. That stretch of the loss is
a scaled chi-square with a large variance, which `diffusion_control_variate` removes (unbiased).

All terms reuse `vdm_jax.maths.elbo` (prior_kl, gaussian_kl, diffusion losses, time sampling) and
`vdm_jax.maths.diffusion.q_sample`. Only jax / jax.numpy are imported (no Flax): the VAE and the
latent VDM modules in `vdm_jax.nets.vae` call these functions.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vdm_jax.core import checks
from vdm_jax.maths import diffusion, elbo
from vdm_jax.maths.diffusion import EpsFn
from vdm_jax.maths.schedules import GammaFn, gamma_and_derivative

LogitsFn = Callable[[jax.Array], jax.Array]
LOG_2PI = math.log(2.0 * math.pi)


class VAETerms(NamedTuple):
  """Per-example terms of the negative VAE ELBO (1) in nats, each [B]."""

  reconstruction: jax.Array   # E_q[-log p(x | y)]
  kl: jax.Array               # KL(q(y | x) || N(0, I))

  @property
  def total(self) -> jax.Array:
    return self.reconstruction + self.kl


class ComposedTerms(NamedTuple):
  """Per-example terms of the latent-diffusion bound (2) + (3) in nats, each [B].

  data_reconstruction + neg_entropy + latent_prior + latent_reconstruction + latent_diffusion
  >= -log p(x). The last three are the VDM bound (3) on -log p_VDM(y) at y ~ q(y | x).
  """

  data_reconstruction: jax.Array   # E_q[-log p(x | y)]
  neg_entropy: jax.Array           # E_q[log q(y | x)] = -H[q(y | x)]
  latent_prior: jax.Array          # KL(q(z_1 | y) || N(0, I))
  latent_reconstruction: jax.Array  # E[-log p(y | z_0)], eq. (4)
  latent_diffusion: jax.Array      # continuous-time or T-step diffusion loss on y

  @property
  def latent_nll(self) -> jax.Array:
    """The VDM bound (3) on -log p_VDM(y)."""
    return self.latent_prior + self.latent_reconstruction + self.latent_diffusion

  @property
  def total(self) -> jax.Array:
    return self.data_reconstruction + self.neg_entropy + self.latent_nll


# ----------------------------------------------------------------------------------------------
# Gaussian encoder and discrete decoder pieces.


def _check_gaussian(mean: ArrayLike, log_var: ArrayLike) -> tuple[jax.Array, jax.Array]:
  mean, log_var = jnp.asarray(mean, jnp.float32), jnp.asarray(log_var, jnp.float32)
  if mean.shape != log_var.shape or mean.ndim < 1:
    raise ValueError(f"expected mean and log_var of the same shape [B, ...], got {mean.shape} "
                     f"and {log_var.shape}")
  return mean, log_var


def sample_gaussian(key: jax.Array, mean: ArrayLike, log_var: ArrayLike) -> jax.Array:
  """y = mean + exp(log_var / 2) eps, a reparameterised draw of q(y | x) (VAE eq. 4). [B, ...]."""
  mean, log_var = _check_gaussian(mean, log_var)
  return mean + jnp.exp(0.5 * log_var) * jax.random.normal(key, mean.shape)


def gaussian_entropy(log_var: ArrayLike) -> jax.Array:
  """H[N(mean, diag(exp(log_var)))] = 1/2 sum(log 2 pi + 1 + log_var), [B, ...] -> [B] nats."""
  log_var = jnp.asarray(log_var, jnp.float32)
  return elbo.sum_per_example(0.5 * (LOG_2PI + 1.0 + log_var))


def _decoded_nll(k: jax.Array, y: jax.Array, logits_fn: LogitsFn, vocab_size: int) -> jax.Array:
  logits = jnp.asarray(logits_fn(y))
  if logits.shape[-1] != vocab_size:
    raise ValueError(f"logits_fn returned {logits.shape[-1]} logits per dimension; expected "
                     f"vocab_size={vocab_size}")
  return elbo.categorical_nll(k, logits)   # -log p(x | y) of the discrete decoder


def vae_terms(key: jax.Array, x: ArrayLike, *, mean: ArrayLike, log_var: ArrayLike,
              logits_fn: LogitsFn, vocab_size: int) -> VAETerms:
  """One-sample estimate of the negative VAE ELBO (1), per example, in nats.

  Args:
    key: PRNG key for y ~ q(y | x).
    x: integer data [B, ...] in [0, vocab_size).
    mean, log_var: the encoder's q(y | x), latent shape [B, ...].
    logits_fn: y [B, ...latent] -> decoder logits [B, ...data, K].
    vocab_size: K.

  Returns:
    VAETerms(reconstruction, kl), each [B] float32. KL is in closed form (elbo.gaussian_kl).
  """
  k = elbo.check_data(x, vocab_size=vocab_size)
  mean, log_var = _check_gaussian(mean, log_var)
  y = sample_gaussian(key, mean, log_var)
  kl = elbo.gaussian_kl(mean, jnp.exp(log_var), jnp.zeros_like(mean), 1.0)
  return VAETerms(reconstruction=_decoded_nll(k, y, logits_fn, vocab_size), kl=kl)


# ----------------------------------------------------------------------------------------------
# The VDM bound (3) on a continuous latent.


def gaussian_decoder_nll(y: ArrayLike, z_0: ArrayLike, *, gamma_0: ArrayLike) -> jax.Array:
  """-log N(y; z_0 / alpha_0, e^gamma_0 I) for one z_0, summed per example -> [B] nats.

  The continuous decoder p(y | z_0) of (3); its expectation over z_0 ~ q(z_0 | y) is
  `expected_gaussian_decoder_nll` (4), which the bound uses.
  """
  y, z_0 = jnp.asarray(y, jnp.float32), jnp.asarray(z_0, jnp.float32)
  gamma_0 = diffusion.broadcast_to_data(jnp.asarray(gamma_0, jnp.float32), y)
  alpha_0, _ = diffusion.alpha_sigma(gamma_0)
  nll = 0.5 * (LOG_2PI + gamma_0 + (z_0 / alpha_0 - y) ** 2 * jnp.exp(-gamma_0))
  return elbo.sum_per_example(jnp.broadcast_to(nll, y.shape))


def expected_gaussian_decoder_nll(*, gamma_0: ArrayLike, num_dims: int) -> jax.Array:
  """E_q(z_0|y)[-log p(y | z_0)] = D/2 (log 2 pi + 1 + gamma_0), eq. (4); shape of gamma_0."""
  if not isinstance(num_dims, int) or num_dims < 1:
    raise ValueError(f"expected an integer num_dims >= 1, got {num_dims!r}")
  return 0.5 * num_dims * (LOG_2PI + 1.0 + jnp.asarray(gamma_0, jnp.float32))


def gaussian_eps(z: ArrayLike, gamma: ArrayLike, *, mean: ArrayLike = 0.0,
                 log_var: ArrayLike = 0.0) -> jax.Array:
  """The exact eps_hat = E[eps | z_t] when y ~ N(mean, v I), v = exp(log_var) per dimension.

  z_t = alpha y + sigma eps is Gaussian, so E[eps | z_t] = sigma (z_t - alpha mean) /
  (alpha^2 v + sigma^2) (Tweedie's formula). For N(0, I) it is sigma_t z_t. Shape of `z`
  ([B, ...]); gamma scalar or [B]; mean and log_var broadcastable to z.
  """
  z = jnp.asarray(z, jnp.float32)
  alpha, sigma = diffusion.alpha_sigma(diffusion.broadcast_to_data(gamma, z))
  var = jnp.exp(jnp.asarray(log_var, jnp.float32))
  return sigma * (z - alpha * jnp.asarray(mean, jnp.float32)) / (alpha**2 * var + sigma**2)


def _integrated_sigmoid_sq(u: jax.Array) -> jax.Array:
  """F(u) = softplus(u) - sigmoid(u), an antiderivative of sigmoid(u)^2 (= sigmoid - sigmoid')."""
  return jax.nn.softplus(u) - jax.nn.sigmoid(u)


def diffusion_control_variate(y: ArrayLike, eps: ArrayLike, *, mean: ArrayLike,
                              log_var: ArrayLike, gamma_t: ArrayLike,
                              loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
                              num_steps: int,
                              gamma_endpoints: tuple[ArrayLike, ArrayLike] | None = None
                              ) -> jax.Array:
  """A zero-mean correction to the diffusion loss of a continuous latent, [B] nats.

  It subtracts the loss w ||eps - eps_G||^2 of the base model y ~ N(mean, v I) (eps_G =
  `gaussian_eps`, w the loss weight: loss_fn(a, 0) = w ||a||^2) at the same (t, eps) and adds
  back its exact expectation, so `loss + correction` is unbiased (for the gradients too) and its
  variance is that of the difference between the model's and the base model's losses: zero when
  the model is the base model. Per dimension, with a = log v, s = sigmoid(a - gamma_t) and
  d = (y - mean)^2 / v:  E_eps ||eps - eps_G||_d^2 = s^2 + d s (1 - s).

  - T steps: the expectation over eps at the example's t: w sum_d (s^2 + d s (1 - s)).
  - continuous time (w = gamma'(t) / 2, t ~ U(0, 1)): over t as well,
    1/2 sum_d [F(a - gamma_0) - F(a - gamma_1) + d (sigmoid(gamma_1 - a) - sigmoid(gamma_0 - a))]
    with F(u) = softplus(u) - sigmoid(u) (d/du F = sigmoid^2, d/dgamma sigmoid(gamma - a) =
    s (1 - s)).

  Args:
    y: the latent [B, ...]; eps: the noise of z_t = alpha_t y + sigma_t eps, [B, ...].
    mean, log_var: the base model N(mean, exp(log_var)), broadcastable to y (independent of eps).
    gamma_t: gamma at each example's t, [B].
    loss_fn: (eps, eps_hat) -> [B], the diffusion loss at these t (elbo's, with its weights).
    num_steps: T (0 = continuous time).
    gamma_endpoints: (gamma_0, gamma_1), needed in continuous time.
  """
  y, eps = jnp.asarray(y, jnp.float32), jnp.asarray(eps, jnp.float32)
  a = jnp.broadcast_to(jnp.asarray(log_var, jnp.float32), y.shape)
  d = (y - jnp.asarray(mean, jnp.float32)) ** 2 * jnp.exp(-a)
  eps_base = gaussian_eps(diffusion.q_sample(y, gamma_t, eps), gamma_t, mean=mean, log_var=a)
  correction = -loss_fn(eps, eps_base)
  if num_steps:
    s = jax.nn.sigmoid(a - diffusion.broadcast_to_data(gamma_t, y))
    return correction + loss_fn(jnp.sqrt(s * s + d * s * (1.0 - s)), jnp.zeros_like(y))
  if gamma_endpoints is None:
    raise ValueError("continuous time (num_steps=0) needs gamma_endpoints=(gamma_0, gamma_1)")
  g0, g1 = (jnp.asarray(g, jnp.float32) for g in gamma_endpoints)
  integral = (_integrated_sigmoid_sq(a - g0) - _integrated_sigmoid_sq(a - g1)
              + d * (jax.nn.sigmoid(g1 - a) - jax.nn.sigmoid(g0 - a)))
  return correction + 0.5 * elbo.sum_per_example(integral)


def latent_vdm_terms(key: jax.Array, y: ArrayLike, *, eps_fn: EpsFn, gamma_fn: GammaFn,
                     num_steps: int = 0, t: ArrayLike | None = None, antithetic: bool = True,
                     cv_mean: ArrayLike = 0.0,
                     cv_log_var: ArrayLike | None = None) -> elbo.ELBOTerms:
  """One-sample estimate of the VDM bound (3) on -log p_VDM(y) for a continuous y, in nats.

  The diffusion loss w ||eps - eps_hat||^2 (w = gamma'/2, or T/2 expm1(gamma_t - gamma_s) with T
  steps) has a large variance for a continuous y: where sigma_t / alpha_t is below the scale on
  which p(y) varies, y cannot be told apart from y + (sigma_t / alpha_t) eps, eps_hat ~ 0 and the
  loss is ~ w ||eps||^2, a chi-square scaled by w, over a range of t. With `cv_log_var`, the
  loss of the base model N(cv_mean, exp(cv_log_var)) is subtracted and its exact expectation
  added back (`diffusion_control_variate`): still unbiased, with the variance of the difference
  between the two models' losses (zero for the base model itself).

  Args:
    key: PRNG key.
    y: continuous latent [B, ...] (float).
    eps_fn: (z_t [B, ...], gamma_t [B]) -> eps_hat [B, ...].
    gamma_fn: t -> gamma(t), elementwise and increasing.
    num_steps: T; 0 means continuous time (VDM eq. 17), else the T-step loss (VDM eq. 13-14).
    t: optional explicit times [B] (on the grid {1/T..1} when T > 0); sampled when None.
    antithetic: low-discrepancy times over the batch (VDM appendix I.1).
    cv_mean, cv_log_var: the control variate's base model N(cv_mean, exp(cv_log_var)),
      broadcastable to y; cv_log_var=None: no control variate.

  Returns:
    elbo.ELBOTerms(prior, reconstruction = eq. (4), diffusion), each [B] float32.
  """
  checks.check_number("num_steps", num_steps, integer=True, low=0)
  y = jnp.asarray(y)
  if not jnp.issubdtype(y.dtype, jnp.floating) or y.ndim < 1:
    raise ValueError(f"expected a float latent of shape [B, ...], got {y.dtype} {y.shape}")
  y = y.astype(jnp.float32)
  batch = y.shape[0]
  key_t, key_eps = jax.random.split(key)
  if t is None:
    t = elbo.sample_time(key_t, batch, num_steps=num_steps, antithetic=antithetic)
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
  eps = jax.random.normal(key_eps, y.shape)
  if num_steps == 0:
    gamma_t, gamma_prime = gamma_and_derivative(gamma_fn, t)
    loss_fn = functools.partial(elbo.diffusion_loss_continuous, gamma_prime=gamma_prime)
  else:
    gamma_t = gamma_fn(t)
    loss_fn = functools.partial(elbo.diffusion_loss_discrete, gamma_s=gamma_fn(t - 1.0 / num_steps),
                                gamma_t=gamma_t, num_steps=num_steps)
  eps_hat = diffusion.predict_eps(eps_fn, diffusion.q_sample(y, gamma_t, eps), gamma_t)
  loss_diff = loss_fn(eps, eps_hat)
  if cv_log_var is not None:
    loss_diff = loss_diff + diffusion_control_variate(
        y, eps, mean=cv_mean, log_var=cv_log_var, gamma_t=gamma_t, loss_fn=loss_fn,
        num_steps=num_steps,
        gamma_endpoints=None if num_steps else (gamma_fn(jnp.zeros(())), gamma_fn(jnp.ones(()))))
  gamma_0 = gamma_fn(jnp.zeros((), jnp.float32))
  loss_recon = expected_gaussian_decoder_nll(gamma_0=gamma_0, num_dims=math.prod(y.shape[1:]))
  loss_prior = elbo.prior_kl(y, gamma_1=gamma_fn(jnp.ones((), jnp.float32)))
  return elbo.ELBOTerms(prior=jnp.broadcast_to(loss_prior, (batch,)),
                        reconstruction=jnp.broadcast_to(loss_recon, (batch,)),
                        diffusion=loss_diff)


# ----------------------------------------------------------------------------------------------
# The composed bound (2) + (3).


def composed_terms(key: jax.Array, x: ArrayLike, *, mean: ArrayLike, log_var: ArrayLike,
                   logits_fn: LogitsFn, eps_fn: EpsFn, gamma_fn: GammaFn, vocab_size: int,
                   num_steps: int = 0, t: ArrayLike | None = None, antithetic: bool = True,
                   cv_log_var: ArrayLike | None = 0.0) -> ComposedTerms:
  """One-sample estimate of the latent-diffusion bound on -log p(x), per example, in nats.

  One y ~ q(y | x) (shared by every term) is decoded for E_q[-log p(x | y)] and diffused for the
  VDM bound (3); -H[q(y | x)] is in closed form. The sum `.total` is an unbiased estimate of an
  upper bound on -log p(x) with p(x) = integral p(x | y) p_VDM(y) dy; its expectation is
  -log p(x) + KL(q(y | x) || p(y | x)) + E_q[gap of (3)].

  Args:
    key: PRNG key (split into one for y and one for the VDM's t and eps).
    x: integer data [B, ...] in [0, vocab_size).
    mean, log_var: the encoder's q(y | x), latent shape [B, ...].
    logits_fn: y [B, ...latent] -> decoder logits [B, ...data, K].
    eps_fn, gamma_fn, num_steps, t, antithetic: the latent VDM, as in `latent_vdm_terms`.
    vocab_size: K.
    cv_log_var: the control variate of `latent_vdm_terms` with the base model
      N(0, exp(cv_log_var)), broadcastable to the latent: 0 (default) is the VAE's own prior
      N(0, I), near which its latents lie (and exact for `vae.LatentVDM`'s Gaussian base);
      None: no control variate.

  Returns:
    ComposedTerms, each field [B] float32.
  """
  key_y, key_vdm = jax.random.split(key)
  y = sample_gaussian(key_y, mean, log_var)
  return composed_terms_at(key_vdm, x, y, log_var=log_var, logits_fn=logits_fn, eps_fn=eps_fn,
                           gamma_fn=gamma_fn, vocab_size=vocab_size, num_steps=num_steps, t=t,
                           antithetic=antithetic, cv_log_var=cv_log_var)


def composed_terms_at(key: jax.Array, x: ArrayLike, y: ArrayLike, *, log_var: ArrayLike,
                      logits_fn: LogitsFn, eps_fn: EpsFn, gamma_fn: GammaFn, vocab_size: int,
                      num_steps: int = 0, t: ArrayLike | None = None, antithetic: bool = True,
                      cv_log_var: ArrayLike | None = 0.0) -> ComposedTerms:
  """`composed_terms` at a given draw y ~ q(y | x) = N(mean, diag(exp(log_var))), [B, ...].

  `key` is used by the VDM only. Only log_var enters (through the entropy): the mean is in y.
  """
  k = elbo.check_data(x, vocab_size=vocab_size)
  y, log_var = _check_gaussian(y, log_var)
  if y.shape[0] != k.shape[0]:
    raise ValueError(f"batch sizes differ: data {k.shape}, latent {y.shape}")
  terms = latent_vdm_terms(key, y, eps_fn=eps_fn, gamma_fn=gamma_fn, num_steps=num_steps, t=t,
                           antithetic=antithetic, cv_log_var=cv_log_var)
  return ComposedTerms(data_reconstruction=_decoded_nll(k, y, logits_fn, vocab_size),
                       neg_entropy=-gaussian_entropy(log_var), latent_prior=terms.prior,
                       latent_reconstruction=terms.reconstruction,
                       latent_diffusion=terms.diffusion)
