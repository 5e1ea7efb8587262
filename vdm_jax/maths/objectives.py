"""Training objectives: what the network is trained on, as reweightings of the bound's terms.

Only "elbo" is a likelihood bound (`vdm_jax.maths.elbo.elbo_terms`); "simple" is DDPM's L_simple
(Ho et al. 2020) and "weighted" the Kingma & Gao (2023) weighted loss. Whatever the objective,
the reported bpd comes from `elbo.elbo_terms` (evaluated separately), never from
`training_loss`.

What a learned schedule is trained on (`SCHEDULE_OBJECTIVES`): "elbo", the bound's gradient for
every schedule parameter, or "variance" (`variance_elbo_terms`): the bound's gradient for the
endpoints and the gradient of E[L^2] for the interior (VDM appendix I.2). Only jax / jax.numpy
are imported here (plus the sibling maths modules).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vdm_jax.core import checks
from vdm_jax.maths import diffusion, elbo
from vdm_jax.maths.diffusion import EpsFn
from vdm_jax.maths.schedules import GammaFn, gamma_and_derivative

OBJECTIVES = ("elbo", "simple", "weighted")
WEIGHTINGS = ("uniform", "sigmoid")
SCHEDULE_OBJECTIVES = ("elbo", "variance")


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


# ----------------------------------------------------------------------------------------------
# The schedule's interior trained to minimise the variance of the bound's estimate.


@jax.custom_vjp
def _variance_tap(shape, slope, value_probe, weight_probe):
  """Identity on four [B] arrays. Backward: the cotangents of `shape` and `slope` are multiplied
  by 2 ct(value_probe) / ct(weight_probe), which is 2 L per example when the probes are attached
  to L by `_attach_probes`; the probes themselves pass nothing back."""
  return shape, slope, value_probe, weight_probe


def _variance_tap_fwd(shape, slope, value_probe, weight_probe):
  return (shape, slope, value_probe, weight_probe), None


def _variance_tap_bwd(_, cotangents):
  ct_shape, ct_slope, ct_value, ct_weight = cotangents
  nonzero = ct_weight != 0
  scale = jnp.where(nonzero, 2.0 * ct_value / jnp.where(nonzero, ct_weight, 1.0), 0.0)
  return ct_shape * scale, ct_slope * scale, jnp.zeros_like(ct_value), jnp.zeros_like(ct_weight)


_variance_tap.defvjp(_variance_tap_fwd, _variance_tap_bwd)


def variance_routed_schedule(gamma_fn: GammaFn, t: ArrayLike
                             ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
  """gamma(t) and gamma'(t) [B] with their gradients split: endpoints by the bound, shape by 2 L.

  With gamma_0 = gamma(0), gamma_1 = gamma(1) and the shape s(t) = (gamma(t) - gamma_0) /
  (gamma_1 - gamma_0), gamma(t) = gamma_0 + (gamma_1 - gamma_0) s(t) and
  gamma'(t) = (gamma_1 - gamma_0) s'(t). The values returned are exactly `gamma_fn`'s (its jvp);
  their gradients are those of that decomposition with (s, s') passed through a tap whose
  backward pass multiplies their cotangent by 2 L, L the example's diffusion loss, once the
  returned probes are attached to L (`variance_elbo_terms`).

  Args:
    gamma_fn: an elementwise schedule t -> gamma(t).
    t: times [B].

  Returns:
    (gamma_t [B], gamma_prime [B], probes): probes, two zero [B] arrays, to attach to L.
  """
  t = jnp.asarray(t, jnp.float32)
  gamma_t, gamma_prime = gamma_and_derivative(gamma_fn, t)
  gamma_0, gamma_1 = gamma_fn(jnp.zeros((), jnp.float32)), gamma_fn(jnp.ones((), jnp.float32))
  width = gamma_1 - gamma_0
  zeros = jnp.zeros_like(gamma_t)
  shape, slope, value_probe, weight_probe = _variance_tap(
      (gamma_t - gamma_0) / width, gamma_prime / width, zeros, zeros)
  routed_t, routed_prime = gamma_0 + width * shape, width * slope
  # The values of gamma_fn (bit for bit); the gradients of the routed decomposition.
  keep_value = lambda value, routed: (jax.lax.stop_gradient(value)
                                      + (routed - jax.lax.stop_gradient(routed)))
  return (keep_value(gamma_t, routed_t), keep_value(gamma_prime, routed_prime),
          (value_probe, weight_probe))


def _attach_probes(loss: jax.Array, probes: tuple[jax.Array, jax.Array]) -> jax.Array:
  """L + p sg(L) + q = L (p = q = 0): the backward pass then carries c L to p and c to q, where
  c is the cotangent of L (e.g. 1 / B for a batch mean), so the tap can read L = ct_p / ct_q."""
  value_probe, weight_probe = probes
  return loss + value_probe * jax.lax.stop_gradient(loss) + weight_probe


def variance_elbo_terms(key: jax.Array, x: ArrayLike, *, eps_fn: EpsFn, gamma_fn: GammaFn,
                        vocab_size: int, t: ArrayLike | None = None, antithetic: bool = True,
                        eps: ArrayLike | None = None,
                        eps_0: ArrayLike | None = None) -> elbo.ELBOTerms:
  """The continuous-time bound's terms, with the schedule's interior trained on E[L^2].

  Values: exactly `elbo.elbo_terms(key, x, ..., num_steps=0)` (same key, same draws). Gradients:
  the same for every parameter outside the schedule (the network), and for the schedule's
  endpoints; the schedule's interior gets the gradient of E[L^2] instead (VDM appendix I.2).

  Derivation. The continuous-time diffusion loss is
  L_inf(x) = 1/2 int_{gamma_0}^{gamma_1} E_eps ||eps - eps_hat(z_gamma, gamma)||^2 d gamma
  (VDM eq. 17 with gamma as the variable, section 5.1): with a network conditioned on gamma it
  depends on the schedule only through its endpoints gamma_0 = gamma(0), gamma_1 = gamma(1).
  Write gamma(t) = gamma_0 + (gamma_1 - gamma_0) s(t) with a shape s, s(0) = 0, s(1) = 1. The
  one-sample estimate L = 1/2 gamma'(t) ||eps - eps_hat||^2, t ~ U(0, 1), has a mean independent
  of s, so the bound's gradient in s is zero in expectation (noise only), and
  grad_s Var[L] = grad_s E[L^2] = E[2 L grad_s L]: the gradient of L with its cotangent
  multiplied by 2 L. Here, for a loss J = sum_i c_i l_i of per-example values (c_i = 1 / B for a
  batch mean; any differentiable J works, c_i = dJ / dl_i), a schedule parameter theta receives::

    dJ/dgamma_0 dgamma_0/dtheta + dJ/dgamma_1 dgamma_1/dtheta      (the bound, via the endpoints:
                                                                  prior, reconstruction and the
                                                                  diffusion loss's range)
    + sum_i c_i 2 L_i dL_i/ds_i ds_i/dtheta                        (= grad_theta sum_i c_i L_i^2
                                                                  with the endpoints held fixed)

  in one backward pass. For `schedules.monotone_gamma` the endpoints are the parameters
  {"gamma_min", "delta"} and the shape depends on "net" only, so the endpoints get exactly the
  bound's gradient and the net exactly grad sum_i c_i L_i^2 (L in nats; the trainer's mean-bpd
  loss scales it by 1 / (D ln 2), to which Adam is insensitive). The network's parameters enter
  only through eps_hat, whose backward pass never meets the tap: their gradient is the bound's.

  How 2 L reaches the tap: `variance_routed_schedule` passes (s, s') through an identity that
  also emits two zero probes p, q; they are attached as L + p sg(L) + q, so the backward pass
  delivers c_i L_i to p and c_i to q, and the tap scales the shape's cotangent by
  2 ct_p / ct_q = 2 L_i. This needs each example's gamma(t_i) to reach only its own loss (true
  for networks that treat the examples of a batch independently: no batch normalisation).

  Args:
    key, x, eps_fn, gamma_fn, vocab_size, t, antithetic, eps, eps_0: as `elbo.elbo_terms`
      (continuous time only: with T steps the bound depends on the whole schedule).

  Returns:
    ELBOTerms(prior, reconstruction, diffusion), each [B] float32 nats.
  """
  k = elbo.check_data(x, vocab_size=vocab_size)
  batch = k.shape[0]
  if t is None:
    key_t = jax.random.split(key, 3)[0]                      # as in elbo_terms
    t = elbo.sample_time(key_t, batch, antithetic=antithetic)
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
  gamma_t, gamma_prime, probes = variance_routed_schedule(gamma_fn, t)
  terms = elbo.elbo_terms(key, k, eps_fn=eps_fn, gamma_fn=gamma_fn, vocab_size=vocab_size,
                          t=t, eps=eps, eps_0=eps_0, gamma_t=gamma_t, gamma_prime=gamma_prime)
  return terms._replace(diffusion=_attach_probes(terms.diffusion, probes))
