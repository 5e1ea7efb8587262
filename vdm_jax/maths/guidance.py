"""Guidance: eps functions that steer a sampler towards a class (imports jax only).

Both wrappers map eps functions (z [B, ...], gamma [B]) -> eps_hat [B, ...] to another one, so
any sampler of `vdm_jax.maths.sampling` runs them unchanged.

References:
  Ho & Salimans 2021, Classifier-Free Diffusion Guidance, eq. 6.
  Dhariwal & Nichol 2021, Diffusion Models Beat GANs on Image Synthesis, algorithm 2.
  Luo 2022, Understanding Diffusion Models: A Unified Perspective (survey), eq. 163-166.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from vdm_jax.maths import diffusion
from vdm_jax.core.checks import check_number
from vdm_jax.maths.diffusion import EpsFn

# (z [B, ...], gamma [B]) -> log p(y | z_t, gamma_t) [B] of the requested labels (closed over).
LogProbFn = Callable[[jax.Array, jax.Array], jax.Array]


def classifier_free_eps_fn(cond_eps_fn: EpsFn, uncond_eps_fn: EpsFn, *,
                           guidance: float) -> EpsFn:
  """Classifier-free guidance (Ho & Salimans 2021, eq. 6): (1 + w) eps(z, y) - w eps(z, null).

  w = 0 is the conditional model; w > 0 samples (approximately) from
  p(z | y)^(1 + w) / p(z)^w = p(z | y) p(y | z)^w, sharper around class y.

  Args:
    cond_eps_fn: (z [B, ...], gamma [B]) -> eps_hat [B, ...] given the requested labels.
    uncond_eps_fn: the same with the null label.
    guidance: w.

  Returns:
    eps_fn(z, gamma) -> [B, ...].
  """
  w = check_number("guidance", guidance)

  def eps_fn(z: jax.Array, gamma: jax.Array) -> jax.Array:
    return (1.0 + w) * cond_eps_fn(z, gamma) - w * uncond_eps_fn(z, gamma)

  return eps_fn


def classifier_guided_eps_fn(eps_fn: EpsFn, log_prob_fn: LogProbFn, *,
                             guidance: float) -> EpsFn:
  """Classifier guidance (Dhariwal & Nichol 2021, algorithm 2; survey eq. 163-166).

  Since grad log p(z_t | y) = grad log p(z_t) + grad log p(y | z_t) and eps = -sigma_t score::

    eps_guided = eps_hat - w sigma_t grad_z log p(y | z_t, gamma_t).

  With w = 1 and an exact eps_hat and classifier this is exactly the conditional eps(z_t | y).

  Args:
    eps_fn: (z [B, ...], gamma [B]) -> eps_hat [B, ...], the unconditional model.
    log_prob_fn: (z [B, ...], gamma [B]) -> [B] log p(y | z_t) of the requested labels (closed
      over).
    guidance: w.

  Returns:
    eps_fn(z, gamma) -> [B, ...].
  """
  w = check_number("guidance", guidance)

  def total_log_prob(z, gamma):
    log_prob = log_prob_fn(z, gamma)
    if jnp.shape(log_prob) != z.shape[:1]:
      raise ValueError(f"log_prob_fn returned shape {jnp.shape(log_prob)}; expected [B] = "
                       f"{z.shape[:1]}")
    return jnp.sum(log_prob)

  def guided(z: jax.Array, gamma: jax.Array) -> jax.Array:
    grad = jax.grad(total_log_prob)(z, gamma)
    _, sigma = diffusion.alpha_sigma(diffusion.broadcast_to_data(gamma, z))
    return eps_fn(z, gamma) - w * sigma * grad

  return guided
