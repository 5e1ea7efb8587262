"""Samplers for the learned reverse process (imports jax only); guidance is in
`vdm_jax.maths.guidance`.

Every sampler is a pure function `sampler(key, *, eps_fn, gamma_fn, shape, <steps>, ...,
vocab_size=None) -> jax.Array` with eps_fn(z [B, ...], gamma [B]) -> eps_hat [B, ...],
gamma_fn(t) -> gamma(t) = -log SNR(t) (elementwise, increasing) and `shape` = [B, ...] including
the batch axis. The whole loop is ONE `jax.lax.scan` over "stages" and each stage calls eps_fn
once, so the network is traced and compiled once whatever the sampler: samplers with several
evaluations per step (Heun, predictor-corrector) run one stage per evaluation and select the
update with `jnp.where`. gamma_fn is evaluated once, outside the loop, on the whole time grid.
All samplers draw z_1 ~ N(0, I) from `jax.random.split(key)[0]`: same key, same starting noise.
Samplers are chosen by name (`sample.sampler`, `vdm-jax sample --sampler`) from a registry: a new
one is a function with the signature above and one `register_sampler` line (see the end).

Output: with `vocab_size` the final latent z_0 (t = 0) is decoded to int32 data (`decode`,
argmax of the discrete decoder); without it the float z_0 itself is returned (not x_hat), a draw
of q(z_0) = E_x N(alpha_0 x, sigma_0^2) for an exact eps_fn.

References:
  Kingma et al. 2021, Variational Diffusion Models (VDM), eq. 23-24 and appendix C.
  Luo 2022, Understanding Diffusion Models: A Unified Perspective (survey), eq. 84, 133-151.
  Ho et al. 2020, Denoising Diffusion Probabilistic Models (DDPM), algorithm 2 and section 3.2.
  Song et al. 2021, Denoising Diffusion Implicit Models (DDIM), eq. 12 and 16.
  Song et al. 2021, Score-Based Generative Modeling through SDEs, eq. 13, algorithms 2-5.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.maths import diffusion, elbo, schedules
from vdm_jax.core import registry
from vdm_jax.core.checks import check_choice, check_number
from vdm_jax.maths.diffusion import EpsFn
from vdm_jax.maths.schedules import GammaFn

# (key, *, eps_fn, gamma_fn, shape, <steps>, ..., vocab_size=None) -> [*shape]
Sampler = Callable[..., jax.Array]
DECODE_MODES = ("argmax", "sample")
ODE_METHODS = ("euler", "heun")
DDPM_VARIANCES = ("beta", "posterior")


# ----------------------------------------------------------------------------------------------
# Argument checks and shared pieces.


def _check_common(shape: Sequence[int], vocab_size: int | None) -> tuple[int, ...]:
  """Validates `shape` ([B, ...] of positive ints) and `vocab_size` (None or >= 2)."""
  shape = tuple(shape)
  if not shape or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1
                      for d in shape):
    raise ValueError(f"expected shape [B, ...] of positive integers, got {shape!r}")
  if vocab_size is not None:
    check_number("vocab_size", vocab_size, integer=True, low=2)
  return tuple(int(d) for d in shape)


def _gammas(gamma_fn: GammaFn, t: np.ndarray) -> jax.Array:
  """gamma_fn on a whole (concrete, float32) time grid, once, outside the loop."""
  return jnp.asarray(gamma_fn(jnp.asarray(t, jnp.float32)), jnp.float32)


def _call_eps(eps_fn: EpsFn, z: jax.Array, gamma: jax.Array) -> jax.Array:
  """eps_hat at one noise level: gamma (scalar) broadcast to [B], the result in z's dtype."""
  return jnp.asarray(diffusion.predict_eps(eps_fn, z, jnp.broadcast_to(gamma, z.shape[:1])),
                     z.dtype)


def _finish(z_0: jax.Array, gamma_fn: GammaFn, vocab_size: int | None) -> jax.Array:
  """The float z_0, or its argmax decoding to int32 data when vocab_size is given."""
  if vocab_size is None:
    return z_0
  return decode(None, z_0, gamma_0=_gammas(gamma_fn, np.zeros((), np.float32)),
                vocab_size=vocab_size)


def decode(key: jax.Array | None, z_0: jax.Array, *, gamma_0: jax.Array, vocab_size: int,
           mode: str = "argmax") -> jax.Array:
  """Integer data from z_0 with the discrete decoder p(k | z_0) proportional to q(z_0 | x_k)
  (VDM eq. 8 and appendix C; logits from `elbo.decoder_logits`).

  Args:
    key: PRNG key for mode="sample"; may be None for mode="argmax".
    z_0: [B, ...] latent at t = 0.
    gamma_0: gamma(0), scalar or [B].
    vocab_size: K >= 2.
    mode: "argmax" (the most probable value per dimension) or "sample" (a draw of p(k | z_0)).

  Returns:
    [B, ...] int32 values in [0, K).
  """
  check_number("vocab_size", vocab_size, integer=True, low=2)
  check_choice("decode mode", mode, DECODE_MODES)
  logits = elbo.decoder_logits(z_0, gamma_0=gamma_0, vocab_size=vocab_size)
  if mode == "argmax":
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if key is None:
    raise ValueError("decode mode 'sample' needs a PRNG key, got key=None")
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _step_grid(num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Times t = 1, 1 - 1/T, ..., 1/T and s = t - 1/T (exactly 0 at the end), float32 [T]."""
  t = np.arange(num_steps, 0, -1, dtype=np.float64) / num_steps
  s = np.arange(num_steps - 1, -1, -1, dtype=np.float64) / num_steps
  return t.astype(np.float32), s.astype(np.float32)


def _scan(key: jax.Array, shape: tuple[int, ...], body: Callable, xs: tuple) -> jax.Array:
  """z_1 ~ N(0, I) from split(key)[0], then ONE lax.scan of z <- body(z, *xs_i, noise_i), with
  noise_i ~ N(0, I) from split(key)[1] (draws a body ignores are removed by the compiler)."""
  key_init, key_loop = jax.random.split(key)
  keys = jax.random.split(key_loop, xs[0].shape[0])
  step = lambda z, a: (body(z, *a[:-1], jax.random.normal(a[-1], shape)), None)
  return jax.lax.scan(step, jax.random.normal(key_init, shape), xs + (keys,))[0]


def _ancestral_step(z, eps_hat, noise, gamma_t, gamma_s, clip_x: bool) -> jax.Array:
  """z_s ~ p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t)) (VDM eq. 23-24; survey eq. 84)."""
  x_hat = diffusion.x_from_eps(z, eps_hat, gamma=gamma_t)
  if clip_x:
    x_hat = jnp.clip(x_hat, -1.0, 1.0)
  mean, var = diffusion.posterior(z, x_hat, gamma_s=gamma_s, gamma_t=gamma_t)
  return mean + jnp.sqrt(var) * noise


def _langevin_step(z, eps_hat, noise, gamma, *, snr: float, step_size: float | None):
  """One Langevin step z + delta score + sqrt(2 delta) xi towards q(z_t), score = -eps_hat/sigma.

  delta = step_size sigma_t^2 when step_size is given (Song & Ermon 2019: alpha_i proportional
  to sigma_i^2); otherwise delta = 2 (snr ||xi|| / ||score||)^2 with per-example norms averaged
  over the batch (Song et al. 2021 SDE, algorithm 5): adaptive, but shared by the whole batch.
  """
  score = diffusion.score_from_eps(eps_hat, gamma=gamma)
  if step_size is None:
    norm = lambda a: jnp.mean(jnp.linalg.norm(a.reshape(a.shape[0], -1), axis=-1))
    delta = 2.0 * (snr * norm(noise) / jnp.maximum(norm(score), 1e-20))**2
  else:
    delta = step_size * diffusion.alpha_sigma(gamma)[1]**2
  return z + delta * score + jnp.sqrt(2.0 * delta) * noise


# ----------------------------------------------------------------------------------------------
# Samplers.


def ancestral_sample(key: jax.Array, *, eps_fn: EpsFn, gamma_fn: GammaFn, shape: Sequence[int],
                     num_steps: int, vocab_size: int | None = None,
                     clip_x: bool = False) -> jax.Array:
  """Ancestral sampling of the T-step model (VDM eq. 23-24; survey eq. 84).

  z_1 ~ N(0, I); for t = 1, 1 - 1/T, ..., 1/T and s = t - 1/T:
  z_s ~ p(z_s | z_t) = q(z_s | z_t, x = x_hat), x_hat = (z_t - sigma_t eps_hat) / alpha_t.

  Args:
    key: PRNG key.
    eps_fn: (z [B, ...], gamma [B]) -> eps_hat [B, ...]; gamma_fn: t -> gamma(t).
    shape: [B, ...] output shape.
    num_steps: T >= 1.
    vocab_size: K; when given, z_0 is decoded to int32 data (argmax of p(k | z_0)).
    clip_x: clip x_hat to [-1, 1] (the data range) at every step.

  Returns:
    `[*shape]` int32 data (vocab_size given) or float32 z_0.
  """
  shape = _check_common(shape, vocab_size)
  t, s = _step_grid(check_number("num_steps", num_steps, integer=True, low=1))

  def body(z, g_t, g_s, noise):
    return _ancestral_step(z, _call_eps(eps_fn, z, g_t), noise, g_t, g_s, clip_x)

  z_0 = _scan(key, shape, body, (_gammas(gamma_fn, t), _gammas(gamma_fn, s)))
  return _finish(z_0, gamma_fn, vocab_size)


def ddim_sample(key: jax.Array, *, eps_fn: EpsFn, gamma_fn: GammaFn, shape: Sequence[int],
                num_steps: int, eta: float = 0.0, vocab_size: int | None = None) -> jax.Array:
  """DDIM sampling (Song et al. 2021, eq. 12 and 16) in VDM notation.

  For t = 1, ..., 1/T and s = t - 1/T, with x_hat = (z_t - sigma_t eps_hat) / alpha_t and
  c^2 = eta^2 sigma_Q^2 (sigma_Q^2 = sigma_{t|s}^2 sigma_s^2 / sigma_t^2, the variance of
  q(z_s | z_t, x))::

    z_s = alpha_s x_hat + sqrt(sigma_s^2 - c^2) eps_hat + c xi,   xi ~ N(0, I),

  with sigma_s^2 - c^2 = sigma_s^2 (1 - eta^2 + eta^2 alpha_{t|s}^2 sigma_s^2 / sigma_t^2)
  (from sigma_t^2 = sigma_{t|s}^2 + alpha_{t|s}^2 sigma_s^2; no cancellation). eta = 0 is the
  deterministic DDIM, a first-order solver of the probability-flow ODE; eta = 1 has exactly the
  mean and variance of q(z_s | z_t, x_hat): it is the ancestral sampler (same key, same samples).

  Args and returns as `ancestral_sample`, plus eta in [0, 1].
  """
  shape = _check_common(shape, vocab_size)
  t, s = _step_grid(check_number("num_steps", num_steps, integer=True, low=1))
  eta = check_number("eta", eta, low=0.0, high=1.0)

  def body(z, g_t, g_s, noise):
    eps_hat = _call_eps(eps_fn, z, g_t)
    x_hat = diffusion.x_from_eps(z, eps_hat, gamma=g_t)
    (alpha_s, sigma_s), (_, sigma_t) = diffusion.alpha_sigma(g_s), diffusion.alpha_sigma(g_t)
    alpha_ts, sigma2_ts = diffusion.transition(gamma_s=g_s, gamma_t=g_t)
    keep = (1.0 - eta**2) + eta**2 * (alpha_ts * sigma_s / sigma_t)**2
    c = eta * sigma_s * jnp.sqrt(sigma2_ts) / sigma_t
    return alpha_s * x_hat + sigma_s * jnp.sqrt(keep) * eps_hat + (c * noise if eta else 0.0)

  z_0 = _scan(key, shape, body, (_gammas(gamma_fn, t), _gammas(gamma_fn, s)))
  return _finish(z_0, gamma_fn, vocab_size)


def ddpm_sample(key: jax.Array, *, eps_fn: EpsFn, gamma_fn: GammaFn, shape: Sequence[int],
                num_steps: int, variance: str = "beta", vocab_size: int | None = None) -> jax.Array:
  """DDPM sampling (Ho et al. 2020, algorithm 2) on the grid t = 1, ..., 1/T of any schedule.

  DDPM's quantities at t and s = t - 1/T are read off gamma (VDM symbols on the right)::

    alpha_bar_t = sigmoid(-gamma_t) = alpha_t^2,   1 - alpha_bar_t = sigma_t^2,
    DDPM's alpha_t = alpha_bar_t / alpha_bar_s = alpha_{t|s}^2,
    beta_t = 1 - alpha_bar_t / alpha_bar_s = sigma_{t|s}^2 (from `diffusion.transition`, which
    does not cancel), and one step is
      z_s = (z_t - beta_t / sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_t) + sqrt(v) xi,

  with v = beta_t ("beta") or the posterior variance beta_t (1 - alpha_bar_s) / (1 - alpha_bar_t)
  ("posterior", DDPM's beta-tilde = sigma_Q^2 of q(z_s | z_t, x)). The mean equals that of
  q(z_s | z_t, x = x_hat), so with "posterior" every step is `ancestral_sample`'s. As in
  algorithm 2, the last step (t = 1/T to 0) adds no noise: the result is the mean of
  p(z_0 | z_{1/T}), i.e. the ancestral sample without its last noise term.

  With `schedules.BetaLinear` (DDPM's endpoints) the grid reproduces DDPM's levels exactly:
  alpha_bar_n = prod_{i<=n} (1 - beta_i) (Ho et al. 2020, eq. 4).

  Args and returns as `ancestral_sample`, plus variance "beta" or "posterior".
  """
  shape = _check_common(shape, vocab_size)
  steps = check_number("num_steps", num_steps, integer=True, low=1)
  check_choice("DDPM variance", variance, DDPM_VARIANCES)
  t, s = _step_grid(steps)
  last = jnp.asarray(np.arange(steps) == steps - 1)

  def body(z, g_t, g_s, last_i, noise):
    eps_hat = _call_eps(eps_fn, z, g_t)
    sqrt_alpha, beta = diffusion.transition(gamma_s=g_s, gamma_t=g_t)
    _, sigma_t = diffusion.alpha_sigma(g_t)                   # sqrt(1 - alpha_bar_t)
    mean = (z - beta / sigma_t * eps_hat) / sqrt_alpha
    var = beta
    if variance == "posterior":                                # beta (1 - ab_s) / (1 - ab_t)
      var = beta * jnp.exp(jax.nn.log_sigmoid(g_s) - jax.nn.log_sigmoid(g_t))
    return mean + jnp.where(last_i, 0.0, jnp.sqrt(var)) * noise

  z_0 = _scan(key, shape, body, (_gammas(gamma_fn, t), _gammas(gamma_fn, s), last))
  return _finish(z_0, gamma_fn, vocab_size)


def ode_sample(key: jax.Array, *, eps_fn: EpsFn, gamma_fn: GammaFn, shape: Sequence[int],
               num_steps: int, method: str = "heun", vocab_size: int | None = None) -> jax.Array:
  """Probability-flow ODE from t = 1 to t = 0 with fixed steps (Song et al. 2021 SDE, eq. 13).

  The forward process q(z_t | x) = N(alpha_t x, sigma_t^2) is the SDE dz = f z dt + g dW with
  f = d log alpha_t / dt = -1/2 sigma_t^2 gamma'(t) and g^2 = d sigma_t^2/dt - 2 f sigma_t^2
  = sigma_t^2 gamma'(t) (from alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma)). Its
  probability-flow ODE dz/dt = f z - g^2 / 2 score, with score = -eps_hat / sigma_t, is

      dz/dt = 1/2 gamma'(t) sigma_t (eps_hat(z, gamma_t) - sigma_t z),

  integrated on the uniform grid t_i = 1 - i/T by Euler (T evaluations) or Heun's second-order
  method (2T evaluations, run as 2T stages of one scan). gamma'(t) comes from
  `schedules.gamma_and_derivative` (one jvp of gamma_fn over the grid). The only randomness is
  z_1 ~ N(0, I).

  Args and returns as `ancestral_sample`, plus method "heun" or "euler".
  """
  shape = _check_common(shape, vocab_size)
  t, s = _step_grid(check_number("num_steps", num_steps, integer=True, low=1))
  check_choice("ODE method", method, ODE_METHODS)
  h = jnp.asarray(s - t)                                         # -1/T per step
  z_1 = jax.random.normal(jax.random.split(key)[0], shape)
  if method == "euler":
    g, g_prime = schedules.gamma_and_derivative(gamma_fn, jnp.asarray(t))

    def euler(z, xs):
      g_i, gp_i, h_i = xs
      drift = diffusion.flow_drift(z, _call_eps(eps_fn, z, g_i), gamma=g_i, gamma_prime=gp_i)
      return z + h_i * drift, None

    return _finish(jax.lax.scan(euler, z_1, (g, g_prime, h))[0], gamma_fn, vocab_size)

  # Heun: stage 2i evaluates d1 = f(z, t_i) and predicts z + h d1; stage 2i+1 evaluates
  # d2 = f(z + h d1, t_{i+1}) and corrects z + h/2 (d1 + d2).
  g, g_prime = schedules.gamma_and_derivative(gamma_fn, jnp.asarray(np.stack([t, s], 1).ravel()))
  first = jnp.asarray(np.arange(2 * num_steps) % 2 == 0)

  def heun(carry, xs):
    (z, z_pred, d1), (g_i, gp_i, h_i, first_i) = carry, xs
    z_in = jnp.where(first_i, z, z_pred)
    d = diffusion.flow_drift(z_in, _call_eps(eps_fn, z_in, g_i), gamma=g_i, gamma_prime=gp_i)
    return (jnp.where(first_i, z, z + 0.5 * h_i * (d1 + d)),
            jnp.where(first_i, z + h_i * d, z_pred), jnp.where(first_i, d, d1)), None

  carry = (z_1, z_1, jnp.zeros_like(z_1))
  z_0 = jax.lax.scan(heun, carry, (g, g_prime, jnp.repeat(h, 2), first))[0][0]
  return _finish(z_0, gamma_fn, vocab_size)


def langevin_sample(key: jax.Array, *, eps_fn: EpsFn, gamma_fn: GammaFn, shape: Sequence[int],
                    num_levels: int, steps_per_level: int, snr: float = 0.16,
                    step_size: float | None = None, vocab_size: int | None = None) -> jax.Array:
  """Annealed Langevin dynamics over VP noise levels (Song & Ermon 2019, algorithm 1).

  Levels t_j = 1 - j/L for j = 1..L (the last one is t = 0), starting from z ~ N(0, I) ~ q(z_1);
  at each level `steps_per_level` steps of `_langevin_step` towards q(z_{t_j}) with score
  -eps_hat/sigma_t. z is carried from level to level unscaled: the VP process keeps
  E[z_t^2] = alpha_t^2 E[x^2] + sigma_t^2 near 1 at every t, so the last level's samples are a good
  start. (Rescaling by alpha_s/alpha_t, i.e. annealing z/alpha as in VE models, inflates the
  variance where noise dominates, and the adaptive step then diverges.) The adaptive step needs
  enough steps in all (~1000 on the tests' 1-D and 2-D cases): with too few, stragglers dominate
  the batch-mean score norm and the step collapses for everyone.

  Args:
    key, eps_fn, gamma_fn, shape, vocab_size: as `ancestral_sample`.
    num_levels: L >= 1.
    steps_per_level: Langevin steps per level, >= 1.
    snr: target signal-to-noise ratio of the adaptive step (used when step_size is None).
    step_size: if given, the fixed step is step_size * sigma_t^2 at level t.

  Returns:
    `[*shape]` int32 data (vocab_size given) or float32 z at t = 0.
  """
  shape = _check_common(shape, vocab_size)
  levels = check_number("num_levels", num_levels, integer=True, low=1)
  per = check_number("steps_per_level", steps_per_level, integer=True, low=1)
  snr = check_number("snr", snr, low=0.0, strict=True)
  if step_size is not None:
    step_size = check_number("step_size", step_size, low=0.0, strict=True)
  gamma = jnp.repeat(_gammas(gamma_fn, _step_grid(levels)[1]), per)

  def body(z, g, noise):
    return _langevin_step(z, _call_eps(eps_fn, z, g), noise, g, snr=snr, step_size=step_size)

  return _finish(_scan(key, shape, body, (gamma,)), gamma_fn, vocab_size)


def pc_sample(key: jax.Array, *, eps_fn: EpsFn, gamma_fn: GammaFn, shape: Sequence[int],
              num_steps: int, corrector_steps: int = 1, snr: float = 0.16,
              vocab_size: int | None = None) -> jax.Array:
  """Predictor-corrector sampling (Song et al. 2021 SDE, algorithms 2-3): ancestral predictor,
  Langevin corrector.

  For t = 1, ..., 1/T: `corrector_steps` Langevin steps towards q(z_t) (adaptive step with `snr`,
  see `_langevin_step`), then one ancestral step to z_s ~ q(z_s | z_t, x_hat). One scan of
  T (corrector_steps + 1) stages, one eps_fn evaluation each. With corrector_steps = 0 it is
  `ancestral_sample` (same key, same samples).

  Args and returns as `ancestral_sample`, plus corrector_steps >= 0 and snr > 0.
  """
  shape = _check_common(shape, vocab_size)
  t, s = _step_grid(check_number("num_steps", num_steps, integer=True, low=1))
  corrector_steps = check_number("corrector_steps", corrector_steps, integer=True, low=0)
  snr = check_number("snr", snr, low=0.0, strict=True)
  per = corrector_steps + 1
  gamma_t, gamma_s = jnp.repeat(_gammas(gamma_fn, t), per), jnp.repeat(_gammas(gamma_fn, s), per)
  predict = jnp.asarray(np.arange(len(t) * per) % per == corrector_steps)

  def body(z, g_t, g_s, predict_i, noise):
    eps_hat = _call_eps(eps_fn, z, g_t)
    z_pred = _ancestral_step(z, eps_hat, noise, g_t, g_s, False)
    if corrector_steps == 0:
      return z_pred
    z_corr = _langevin_step(z, eps_hat, noise, g_t, snr=snr, step_size=None)
    return jnp.where(predict_i, z_pred, z_corr)

  return _finish(_scan(key, shape, body, (gamma_t, gamma_s, predict)), gamma_fn, vocab_size)


SAMPLERS: registry.Registry[Sampler] = registry.Registry("sampler")


def register_sampler(name: str, sampler: Sampler, *, replace: bool = False) -> Sampler:
  """Makes `name` usable as `sample.sampler` / `vdm-jax sample --sampler name`."""
  return SAMPLERS.register(name, sampler, replace=replace)


def get_sampler(name: str) -> Sampler:
  """The sampler registered as `name` (ValueError naming the registered ones if none)."""
  return SAMPLERS.get(name)


register_sampler("ancestral", ancestral_sample)
register_sampler("ddim", ddim_sample)
register_sampler("ode", ode_sample)
register_sampler("langevin", langevin_sample)
register_sampler("pc", pc_sample)
register_sampler("ddpm", ddpm_sample)
