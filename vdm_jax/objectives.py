"""Training objectives: what the network is trained on, as reweightings of the bound's terms.

Only "elbo" is a likelihood bound (`vdm_jax.elbo.elbo_terms`); "simple" is DDPM's L_simple
(Ho et al. 2020) and "weighted" the Kingma & Gao (2023) weighted loss. Whatever the objective,
the reported bpd comes from `elbo.elbo_terms` (evaluated separately), never from
`training_loss`. Only jax / jax.numpy are imported here (plus the sibling maths modules).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vdm_jax import checks, diffusion, elbo
from vdm_jax.diffusion import EpsFn
from vdm_jax.schedules import GammaFn

OBJECTIVES = ("elbo", "simple", "weighted")
WEIGHTINGS = ("uniform", "sigmoid")


def loss_weight(gamma: ArrayLike, *, weighting: str, bias: float = 0.0) -> jax.Array:
  """Weighting w(lambda) of the diffusion loss, lambda = log SNR = -gamma.

  - "uniform": w = 1, the ELBO (VDM eq. 17).
  - "sigmoid": w = sigmoid(bias - lambda) = sigmoid(bias + gamma) (Kingma & Gao 2023,
    "Understanding Diffusion Objectives as the ELBO with Simple Data Augmentation", NeurIPS):
    ~1 where noise dominates, ~exp(bias - lambda) towards clean data; a larger bias moves weight
    to lower noise levels. It decreases monotonically in lambda, so the weighted loss is the ELBO
    of the data perturbed by Gaussian noise (their main theorem): likelihood-based, but not a
    bound on the likelihood of the data itself.

  Args:
    gamma: gamma(t), any shape.
    weighting: one of WEIGHTINGS.
    bias: b of the sigmoid weighting (unused by "uniform").

  Returns:
    w, float32, shape of `gamma`.
  """
  checks.check_choice("weighting", weighting, WEIGHTINGS)
  gamma = jnp.asarray(gamma, jnp.float32)
  if weighting == "uniform":
    return jnp.ones_like(gamma)
  return jax.nn.sigmoid(bias + gamma)


def weighted_diffusion_loss(eps: ArrayLike, eps_hat: ArrayLike, *, gamma_prime: ArrayLike,
                            weight: ArrayLike) -> jax.Array:
  """Weighted continuous diffusion loss 1/2 w(lambda_t) gamma'(t) ||eps - eps_hat||^2.

  Kingma & Gao 2023's weighted loss L_w = -1/2 E_t [w(lambda_t) dlambda/dt ||eps - eps_hat||^2]
  with lambda = -gamma, so dlambda/dt = -gamma'(t). It is `weight` times
  `elbo.diffusion_loss_continuous`, so w = 1 is exactly the ELBO's term.

  Args:
    eps, eps_hat: [B, ...].
    gamma_prime: d gamma / dt, [B] or scalar.
    weight: w(lambda_t), e.g. from `loss_weight`, [B] or scalar.

  Returns:
    [B].
  """
  return jnp.asarray(weight, jnp.float32) * elbo.diffusion_loss_continuous(
      eps, eps_hat, gamma_prime=gamma_prime)


def simple_loss(eps: ArrayLike, eps_hat: ArrayLike) -> jax.Array:
  """L_simple (Ho et al. 2020, eq. 14): the mean over dimensions of (eps - eps_hat)^2 -> [B].

  The mean (not the sum) over the D dimensions of an example, as in the DDPM code, so the value
  does not depend on the image size (~1 for eps_hat = 0) and DDPM's learning rates carry over.
  The T-step ELBO term at the same (t, eps) is T/2 expm1(gamma_t - gamma_s) D times this.
  """
  return elbo.squared_error(eps, eps_hat) / math.prod(jnp.shape(eps)[1:])


def training_loss(key: jax.Array, x: ArrayLike, *, eps_fn: EpsFn, gamma_fn: GammaFn,
                  vocab_size: int, objective: str = "elbo", num_steps: int = 0,
                  weighting: str = "sigmoid", weighting_bias: float = 0.0,
                  t: ArrayLike | None = None, antithetic: bool = True) -> jax.Array:
  """Per-example training loss [B] for the chosen objective.

  - "elbo": `elbo.elbo_terms(...).total` in nats (continuous time, or T steps when num_steps = T).
  - "simple": L_simple = mean_dims (eps - eps_hat(z_t))^2 with t uniform on {1/T, ..., 1}
    (Ho et al. 2020, algorithm 1); needs num_steps = T >= 1. Not in nats.
  - "weighted": prior + reconstruction + w(lambda_t) x diffusion term of `elbo_terms` at the same
    t, i.e. `weighted_diffusion_loss` in continuous time (the T-step term weighted likewise when
    num_steps > 0). The prior and reconstruction terms have no network parameters, so they do
    not change the network's gradient; they are kept so that weighting="uniform" is exactly the
    ELBO, and the value stays in nats. Use it with a fixed schedule: a learned one would get
    gradients from the weight itself.

  The same key gives the same t and eps as `elbo_terms` (same key split), so each objective is a
  reweighting of the same draw.

  Args:
    key, x, eps_fn, gamma_fn, vocab_size, num_steps, t, antithetic: as `elbo_terms`.
    objective: one of OBJECTIVES.
    weighting, weighting_bias: `loss_weight`'s weighting and bias ("weighted" only; the name is
      checked whatever the objective).

  Returns:
    [B] float32.
  """
  checks.check_choice("objective", objective, OBJECTIVES)
  checks.check_choice("weighting", weighting, WEIGHTINGS)
  checks.check_number("num_steps", num_steps, integer=True, low=0)
  if objective == "simple" and num_steps < 1:
    raise ValueError(f"objective 'simple' samples t from {{1/T, ..., 1}} and needs num_steps = T "
                     f">= 1, got num_steps={num_steps!r}")
  kw = dict(eps_fn=eps_fn, gamma_fn=gamma_fn, vocab_size=vocab_size, num_steps=num_steps,
            antithetic=antithetic)
  if objective == "elbo":
    return elbo.elbo_terms(key, x, t=t, **kw).total
  k = elbo.check_data(x, vocab_size=vocab_size)
  key_t, key_eps, _ = jax.random.split(key, 3)                  # as in elbo_terms
  if t is None:
    t = elbo.sample_time(key_t, k.shape[0], num_steps=num_steps, antithetic=antithetic)
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), k.shape[:1])
  gamma_t = gamma_fn(t)
  if objective == "weighted":
    terms = elbo.elbo_terms(key, k, t=t, **kw)
    weight = loss_weight(gamma_t, weighting=weighting, bias=weighting_bias)
    return terms.prior + terms.reconstruction + weight * terms.diffusion
  x = elbo.encode(k, vocab_size=vocab_size)
  eps = jax.random.normal(key_eps, x.shape)
  z_t = diffusion.q_sample(x, gamma_t, eps)
  return simple_loss(eps, diffusion.predict_eps(eps_fn, z_t, gamma_t))
