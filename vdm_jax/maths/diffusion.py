"""The forward (noising) process and the conversions between network targets.

Notation (VDM paper, Kingma et al. 2021; "Understanding Diffusion Models: A Unified
Perspective", Luo 2022): gamma = -log SNR, alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma),
q(z_t | x) = N(alpha_t x, sigma_t^2 I).

Shapes: data-like arrays are [B, ...] (e.g. [B, H, W, C]); `gamma` arguments are scalars, [B]
(one value per example, broadcast over the trailing axes) or of the full data shape.

Only jax / jax.numpy are imported here.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vdm_jax.core import checks
from vdm_jax.maths.schedules import alpha_sigma, snr  # noqa: F401  (re-exported: public API)

# The network as the maths sees it: (z_t [B, ...], gamma_t [B]) -> eps_hat [B, ...].
EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
PARAMETERIZATIONS = ("eps", "x", "score", "v")


def broadcast_to_data(a: ArrayLike, like: ArrayLike) -> jax.Array:
  """Reshapes a scalar or per-example [B] array so it broadcasts against data [B, ...].

  Raises:
    ValueError: if `a` is neither a scalar, nor [B], nor broadcastable to `like`'s shape.
  """
  a, like_shape = jnp.asarray(a), jnp.shape(like)
  if a.ndim == 0 or a.shape == like_shape:
    return a
  if a.ndim == 1 and len(like_shape) >= 1 and a.shape[0] == like_shape[0]:
    return a.reshape(a.shape + (1,) * (len(like_shape) - 1))
  try:
    jnp.broadcast_shapes(a.shape, like_shape)
  except ValueError:
    raise ValueError(f"expected a scalar, a [B={like_shape[0] if like_shape else '?'}] array or an "
                     f"array broadcastable to {like_shape}, got shape {a.shape}") from None
  return a


def q_sample(x: ArrayLike, gamma: ArrayLike, eps: ArrayLike) -> jax.Array:
  """A draw z_t = alpha_t x + sigma_t eps of q(z_t | x) (VDM eq. 1; survey eq. 61).

  Args:
    x: data [B, ...].
    gamma: gamma_t, scalar or [B] or [B, ...].
    eps: standard normal noise of the shape of `x`.

  Returns:
    z_t, shape of `x`.
  """
  x, eps = jnp.asarray(x), jnp.asarray(eps)
  if x.shape != eps.shape:
    raise ValueError(f"x and eps must have the same shape, got {x.shape} and {eps.shape}")
  alpha, sigma = alpha_sigma(broadcast_to_data(gamma, x))
  return alpha * x + sigma * eps


def predict_eps(eps_fn: EpsFn, z: jax.Array, gamma: jax.Array) -> jax.Array:
  """eps_fn(z, gamma), checked to have the shape of z [B, ...] (ValueError otherwise)."""
  eps_hat = eps_fn(z, gamma)
  if jnp.shape(eps_hat) != jnp.shape(z):
    raise ValueError(f"eps_fn returned shape {jnp.shape(eps_hat)}; expected the shape of z_t, "
                     f"{jnp.shape(z)}")
  return eps_hat


def flow_drift(z: ArrayLike, eps_hat: ArrayLike, *, gamma: ArrayLike,
               gamma_prime: ArrayLike) -> jax.Array:
  """dz/dt = 1/2 gamma'(t) sigma_t (eps_hat - sigma_t z): the VP probability-flow ODE (Song et
  al. 2021 SDE, eq. 13; derived in `sampling.ode_sample`). gamma and gamma' broadcastable to z."""
  _, sigma = alpha_sigma(gamma)
  return 0.5 * gamma_prime * sigma * (eps_hat - sigma * z)


def transition(*, gamma_s: ArrayLike, gamma_t: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Coefficients of q(z_t | z_s) = N(alpha_{t|s} z_s, sigma_{t|s}^2 I) for s < t (VDM eq. 5-6).

  alpha_{t|s} = alpha_t / alpha_s = exp((log_sigmoid(-gamma_t) - log_sigmoid(-gamma_s)) / 2) and
  sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2 = -expm1(softplus(gamma_s) -
  softplus(gamma_t)), which stays exact where the naive difference cancels (s close to t, or both
  gammas large).

  Returns:
    (alpha_ts, sigma2_ts) of the broadcast shape of the gammas.
  """
  gamma_s, gamma_t = jnp.asarray(gamma_s), jnp.asarray(gamma_t)
  alpha_ts = jnp.exp(0.5 * (jax.nn.log_sigmoid(-gamma_t) - jax.nn.log_sigmoid(-gamma_s)))
  sigma2_ts = -jnp.expm1(jax.nn.softplus(gamma_s) - jax.nn.softplus(gamma_t))
  return alpha_ts, sigma2_ts


def gaussian_bridge(z_a: ArrayLike, z_c: ArrayLike, *, coef_ab: ArrayLike, var_ab: ArrayLike,
                    coef_bc: ArrayLike, var_bc: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Middle of a Gaussian chain: p(z_b | z_a, z_c) for z_b ~ N(a z_a, v1), z_c ~ N(b z_b, v2).

  By Bayes' rule on the two Gaussians (survey eq. 71-84, general form)::

    mean = (b v1 z_c + a v2 z_a) / (b^2 v1 + v2),  variance = v1 v2 / (b^2 v1 + v2).

  The denominator is a sum of positives (no cancellation).

  Args:
    z_a, z_c: [B, ...].
    coef_ab, var_ab: a and v1 (scalars, [B] or [B, ...]).
    coef_bc, var_bc: b and v2.

  Returns:
    (mean [B, ...], variance broadcastable to [B, ...]).
  """
  a, v1 = broadcast_to_data(coef_ab, z_a), broadcast_to_data(var_ab, z_a)
  b, v2 = broadcast_to_data(coef_bc, z_a), broadcast_to_data(var_bc, z_a)
  denom = b * b * v1 + v2
  return (b * v1 * z_c + a * v2 * z_a) / denom, v1 * v2 / denom


def posterior(z_t: ArrayLike, x: ArrayLike, *, gamma_s: ArrayLike,
              gamma_t: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """The posterior q(z_s | z_t, x) = N(mu, sigma_Q^2 I) for s < t (VDM eq. 23-24; survey eq. 84).

  mu = alpha_{t|s} sigma_s^2 / sigma_t^2 z_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x,
  sigma_Q^2 = sigma_{t|s}^2 sigma_s^2 / sigma_t^2: the Gaussian bridge with a = alpha_s,
  v1 = sigma_s^2 (x -> z_s) and b = alpha_{t|s}, v2 = sigma_{t|s}^2 (z_s -> z_t).

  Args:
    z_t: [B, ...].
    x: data (or a prediction of it) [B, ...].
    gamma_s, gamma_t: scalars or [B] with gamma_s < gamma_t.

  Returns:
    (mean [B, ...], variance broadcastable to [B, ...]).
  """
  z_t, x = jnp.asarray(z_t), jnp.asarray(x)
  if z_t.shape != x.shape:
    raise ValueError(f"z_t and x must have the same shape, got {z_t.shape} and {x.shape}")
  alpha_s, sigma_s = alpha_sigma(gamma_s)
  alpha_ts, sigma2_ts = transition(gamma_s=gamma_s, gamma_t=gamma_t)
  return gaussian_bridge(x, z_t, coef_ab=alpha_s, var_ab=sigma_s**2,
                         coef_bc=alpha_ts, var_bc=sigma2_ts)


# ----------------------------------------------------------------------------------------------
# Conversions among eps / x / score / v predictions (Tweedie's formula).


def x_from_eps(z: ArrayLike, eps: ArrayLike, *, gamma: ArrayLike) -> jax.Array:
  """x_hat = (z - sigma eps_hat) / alpha (reparameterisation of z = alpha x + sigma eps)."""
  z = jnp.asarray(z)
  alpha, sigma = alpha_sigma(broadcast_to_data(gamma, z))
  return (z - sigma * eps) / alpha


def eps_from_x(z: ArrayLike, x: ArrayLike, *, gamma: ArrayLike) -> jax.Array:
  """eps_hat = (z - alpha x_hat) / sigma."""
  z = jnp.asarray(z)
  alpha, sigma = alpha_sigma(broadcast_to_data(gamma, z))
  return (z - alpha * x) / sigma


def score_from_eps(eps: ArrayLike, *, gamma: ArrayLike) -> jax.Array:
  """score = grad_z log q(z_t) = -eps_hat / sigma (Tweedie: E[alpha x | z] = z + sigma^2 score;
  survey eq. 133-151)."""
  eps = jnp.asarray(eps)
  _, sigma = alpha_sigma(broadcast_to_data(gamma, eps))
  return -eps / sigma


def eps_from_score(score: ArrayLike, *, gamma: ArrayLike) -> jax.Array:
  """eps_hat = -sigma score."""
  score = jnp.asarray(score)
  _, sigma = alpha_sigma(broadcast_to_data(gamma, score))
  return -sigma * score


def v_from_eps(z: ArrayLike, eps: ArrayLike, *, gamma: ArrayLike) -> jax.Array:
  """v = alpha eps - sigma x (Salimans & Ho 2022), with x = (z - sigma eps) / alpha, i.e.
  v = (eps - sigma z) / alpha."""
  z = jnp.asarray(z)
  alpha, sigma = alpha_sigma(broadcast_to_data(gamma, z))
  return (eps - sigma * z) / alpha


def eps_from_v(z: ArrayLike, v: ArrayLike, *, gamma: ArrayLike) -> jax.Array:
  """eps = sigma z + alpha v (since alpha^2 + sigma^2 = 1)."""
  z = jnp.asarray(z)
  alpha, sigma = alpha_sigma(broadcast_to_data(gamma, z))
  return sigma * z + alpha * v


_TO_EPS = {
    "eps": lambda pred, z, gamma: jnp.asarray(pred),
    "x": lambda pred, z, gamma: eps_from_x(z, pred, gamma=gamma),
    "score": lambda pred, z, gamma: eps_from_score(pred, gamma=gamma),
    "v": lambda pred, z, gamma: eps_from_v(z, pred, gamma=gamma),
}
_FROM_EPS = {
    "eps": lambda eps, z, gamma: jnp.asarray(eps),
    "x": lambda eps, z, gamma: x_from_eps(z, eps, gamma=gamma),
    "score": lambda eps, z, gamma: score_from_eps(eps, gamma=gamma),
    "v": lambda eps, z, gamma: v_from_eps(z, eps, gamma=gamma),
}


def _lookup(table: dict, parameterization: str):
  return table[checks.check_choice("parameterization", parameterization, PARAMETERIZATIONS)]


def to_eps(prediction: ArrayLike, *, parameterization: str, z: ArrayLike,
           gamma: ArrayLike) -> jax.Array:
  """Converts a network output in `parameterization` ("eps", "x", "score", "v") to eps_hat."""
  return _lookup(_TO_EPS, parameterization)(prediction, z, gamma)


def from_eps(eps: ArrayLike, *, parameterization: str, z: ArrayLike,
             gamma: ArrayLike) -> jax.Array:
  """Converts eps_hat to `parameterization` ("eps", "x", "score", "v"); inverse of `to_eps`."""
  return _lookup(_FROM_EPS, parameterization)(eps, z, gamma)
