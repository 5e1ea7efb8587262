"""Samplers for the learned reverse process, and guidance wrappers.

Every sampler is a pure function
`sampler(key, *, eps_fn, gamma_fn, shape, <steps>, ..., vocab_size=None) -> jax.Array` with
  eps_fn(z [B, ...], gamma [B]) -> eps_hat [B, ...]   (the network's noise prediction),
  gamma_fn(t) -> gamma(t) = -log SNR(t)               (elementwise, increasing on [0, 1]),
and `shape` = [B, ...] including the batch axis. The whole loop is ONE `jax.lax.scan` over
"stages", and each stage calls eps_fn exactly once, so the network is traced (and compiled) once
whatever the sampler: samplers that need several evaluations per step (Heun, predictor-corrector)
run one stage per evaluation and select the update with `jnp.where`.
The schedule is evaluated once, outside the loop, on the whole time grid.

Output: when `vocab_size` is given, the final latent z_0 (at t = 0) is decoded to int32 data with
the discrete decoder (`decode`, argmax); otherwise the float z_0 itself is returned (not the
denoised x_hat: z_0 ~ q(z_0 | x) = N(alpha_0 x, sigma_0^2), which is what the tests compare).

Only jax is imported (no Flax). The maths comes from `vdm_jax.diffusion` and `vdm_jax.elbo`.

References:
  Kingma et al. 2021, Variational Diffusion Models (VDM), eq. 23-24 and appendix C.
  Luo 2022, Understanding Diffusion Models: A Unified Perspective (survey), eq. 84, 133-151.
  Song et al. 2021, Denoising Diffusion Implicit Models (DDIM), eq. 12 and 16.
  Song et al. 2021, Score-Based Generative Modeling through SDEs, eq. 13 and algorithms 2-3.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax import diffusion, elbo

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
GammaFn = Callable[[jax.Array], jax.Array]
DECODE_MODES = ("argmax", "sample")


# ----------------------------------------------------------------------------------------------
# Argument checks and shared pieces.


def _check_count(name: str, value: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"expected an integer {name} >= 1, got {value!r}")
  return int(value)


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
  shape = tuple(shape)
  if not shape or any(not isinstance(d, (int, np.integer)) or d < 1 for d in shape):
    raise ValueError(f"expected shape [B, ...] of positive integers, got {shape!r}")
  return tuple(int(d) for d in shape)


def _check_vocab(vocab_size: int | None) -> None:
  if vocab_size is not None and (isinstance(vocab_size, bool)
                                 or not isinstance(vocab_size, (int, np.integer))
                                 or vocab_size < 2):
    raise ValueError(f"expected vocab_size None or an integer >= 2, got {vocab_size!r}")


def _gammas(gamma_fn: GammaFn, t: np.ndarray) -> jax.Array:
  """gamma_fn on a whole (concrete, float32) time grid, once, outside the loop."""
  return jnp.asarray(gamma_fn(jnp.asarray(t, jnp.float32)), jnp.float32)


def _per_example(g: jax.Array, batch: int) -> jax.Array:
  return jnp.broadcast_to(g, (batch,))


def _call_eps(eps_fn: EpsFn, z: jax.Array, gamma: jax.Array) -> jax.Array:
  eps_hat = eps_fn(z, _per_example(gamma, z.shape[0]))
  if jnp.shape(eps_hat) != z.shape:
    raise ValueError(f"eps_fn returned shape {jnp.shape(eps_hat)}; expected {z.shape}")
  return jnp.asarray(eps_hat, z.dtype)


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
  _check_vocab(vocab_size)
  if vocab_size is None:
    raise ValueError("expected an integer vocab_size >= 2, got None")
  if mode not in DECODE_MODES:
    raise ValueError(f"unknown decode mode {mode!r}; expected one of {DECODE_MODES}")
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


def _ancestral_step(z, eps_hat, noise, gamma_t, gamma_s, clip_x: bool):
  """z_s ~ p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t)) (VDM eq. 23-24; survey eq. 84)."""
  x_hat = diffusion.x_from_eps(z, eps_hat, gamma=gamma_t)
  if clip_x:
    x_hat = jnp.clip(x_hat, -1.0, 1.0)
  mean, var = diffusion.posterior(z, x_hat, gamma_s=gamma_s, gamma_t=gamma_t)
  return mean + jnp.sqrt(var) * noise


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
    eps_fn: (z [B, ...], gamma [B]) -> eps_hat [B, ...].
    gamma_fn: t -> gamma(t).
    shape: [B, ...] output shape.
    num_steps: T >= 1.
    vocab_size: K; when given, z_0 is decoded to int32 data (argmax of p(k | z_0)).
    clip_x: clip x_hat to [-1, 1] (the data range) at every step.

  Returns:
    [*shape] int32 data (vocab_size given) or float32 z_0.
  """
  shape, num_steps = _check_shape(shape), _check_count("num_steps", num_steps)
  _check_vocab(vocab_size)
  t, s = _step_grid(num_steps)
  gamma_t, gamma_s = _gammas(gamma_fn, t), _gammas(gamma_fn, s)
  key_init, key_loop = jax.random.split(key)

  def body(z, xs):
    g_t, g_s, k = xs
    eps_hat = _call_eps(eps_fn, z, g_t)
    return _ancestral_step(z, eps_hat, jax.random.normal(k, shape), g_t, g_s, clip_x), None

  xs = (gamma_t, gamma_s, jax.random.split(key_loop, num_steps))
  z_0, _ = jax.lax.scan(body, jax.random.normal(key_init, shape), xs)
  return _finish(z_0, gamma_fn, vocab_size)


SAMPLERS: dict[str, Callable[..., jax.Array]] = {
    "ancestral": ancestral_sample,
}


def get_sampler(name: str) -> Callable[..., jax.Array]:
  """The sampler registered under `name` (see SAMPLERS)."""
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; expected one of {tuple(SAMPLERS)}")
  return SAMPLERS[name]
