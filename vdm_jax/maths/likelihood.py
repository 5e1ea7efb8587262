"""Likelihood of a VDM through its probability-flow ODE (Song et al. 2021 SDE, section 4.3).

The probability-flow ODE of the VP process with gamma(t) = -log SNR(t) (derived in
`sampling.ode_sample`, the drift is `diffusion.flow_drift`)

    dz/dt = f(z, t) = 1/2 gamma'(t) sigma_t (eps_hat(z, gamma_t) - sigma_t z)

maps q(z_0) onto q(z_1) ~ N(0, I) deterministically, so it defines a continuous density p_ODE(z_0)
= the push-forward of the prior N(0, I) by the flow run backwards. By the instantaneous change of
variables (Chen et al. 2018, theorem 1) d log p(z_t) / dt = -div f along a trajectory, hence

    log p_ODE(z_0) = log N(z_1; 0, I) + int_0^1 div f(z_t, t) dt,

with z_t and the integral solved together from t = 0 to t = 1 (`ode_log_likelihood`). The
divergence is exact (D Jacobian-vector products, for tiny D) or a Hutchinson estimate v^T J v
with one probe v per example fixed over the whole trajectory (Grathwohl et al. 2019, FFJORD), an
unbiased estimate of log p_ODE. Unlike score_sde, no t = eps offset is needed: gamma(0) is finite.

"In gamma or t": the ODE in gamma reads dz/dgamma = 1/2 sigma (eps_hat(z, gamma) - sigma z), so the
solution, hence p_ODE, depends on the schedule only through its endpoints gamma(0), gamma(1) (the
ODE twin of VDM's invariance of the continuous-time loss, VDM eq. 18). `time_variable="gamma"`
integrates on a grid uniform in gamma, "t" on a grid uniform in t; the answer is the same and only
the discretisation differs.

Discrete data (`ode_bpd`): see its docstring; the default dequantiser is the model's own encoder
q(z_0 | x), so the ODE number and the ELBO share the discrete decoder and compare directly.

Solvers: explicit Runge-Kutta written with a Butcher tableau; fixed steps ("euler", "heun") are one
`lax.scan` over steps; the adaptive ones ("rk45" = Dormand-Prince 5(4), alias "adaptive"; "rk23" =
Bogacki-Shampine 3(2)) run a `lax.while_loop` with per-example step sizes and error control
(Hairer, Norsett & Wanner, Solving ODEs I, section II.4). Every step is an inner `lax.scan` over
the stages, so eps_fn is traced once. eps_fn must treat the examples of a batch independently.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.maths import diffusion, elbo, schedules
from vdm_jax.core.checks import check_choice, check_number
from vdm_jax.maths.diffusion import EpsFn
from vdm_jax.maths.schedules import GammaFn

TRACES = ("hutchinson_rademacher", "hutchinson_gaussian", "exact")
TIME_VARIABLES = ("t", "gamma")
DEQUANTIZATIONS = ("variational", "uniform")


class Tableau(NamedTuple):
  """Butcher tableau of an explicit Runge-Kutta method (a lower triangular [S, S])."""

  a: np.ndarray
  b: np.ndarray
  c: np.ndarray
  b_err: np.ndarray | None = None   # b - b_hat (embedded error estimate); None: fixed steps only
  order: int = 1                    # order of the lower method, for the step-size exponent


def _tableau(a, b, c, b_hat=None, order=1) -> Tableau:
  s = len(b)
  a_full = np.zeros((s, s))
  for i, row in enumerate(a):
    a_full[i, :len(row)] = row
  b_err = None if b_hat is None else np.asarray(b, float) - np.asarray(b_hat, float)
  return Tableau(a_full, np.asarray(b, float), np.asarray(c, float), b_err, order)


TABLEAUS = {
    "euler": _tableau([[]], [1.0], [0.0]),
    "heun": _tableau([[], [1.0]], [0.5, 0.5], [0.0, 1.0]),
    "rk23": _tableau([[], [1 / 2], [0, 3 / 4], [2 / 9, 1 / 3, 4 / 9]], [2 / 9, 1 / 3, 4 / 9, 0],
                     [0, 1 / 2, 3 / 4, 1], b_hat=[7 / 24, 1 / 4, 1 / 3, 1 / 8], order=2),
    "rk45": _tableau(
        [[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
         [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
         [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
         [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]],
        [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0],
        [0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1],
        b_hat=[5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40],
        order=4),
}
TABLEAUS["adaptive"] = TABLEAUS["rk45"]
FIXED_METHODS = ("euler", "heun")
ADAPTIVE_METHODS = ("rk45", "rk23", "adaptive")
METHODS = FIXED_METHODS + ADAPTIVE_METHODS


# ----------------------------------------------------------------------------------------------
# The augmented ODE y = [z (flattened), int div f] and its solvers.


def _probes(key: Any, trace: str, num_probes: int, shape: tuple[int, ...], dtype) -> tuple:
  """Tangents [P, B, ...] and the factor that turns sum_p v_p^T J v_p into div f."""
  if trace == "exact":           # the D basis vectors, the same in every example: sum = tr(J)
    dims = math.prod(shape[1:])
    basis = jnp.eye(dims, dtype=dtype).reshape((dims, 1) + shape[1:])
    return jnp.broadcast_to(basis, (dims,) + shape), 1.0
  if key is None:
    raise ValueError(f"trace={trace!r} needs a PRNG key, got key=None")
  draw = jax.random.rademacher if trace == "hutchinson_rademacher" else jax.random.normal
  return draw(key, (num_probes,) + shape, dtype=dtype), 1.0 / num_probes


def _make_rhs(eps_fn: EpsFn, gamma_fn: GammaFn, shape: tuple[int, ...], probes: jax.Array,
              scale: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """(t [B], y [B, D + 1]) -> dy/dt = [f(z, t), div f(z, t)], div by one jvp per probe."""
  batch, dims = shape[0], math.prod(shape[1:])

  def rhs(t, y):
    z = y[:, :dims].reshape(shape)
    gamma, gamma_prime = schedules.gamma_and_derivative(gamma_fn, t)
    g_b, gp_b = diffusion.broadcast_to_data(gamma, z), diffusion.broadcast_to_data(gamma_prime, z)

    def drift(z):
      eps_hat = jnp.asarray(diffusion.predict_eps(eps_fn, z, gamma), z.dtype)
      return diffusion.flow_drift(z, eps_hat, gamma=g_b, gamma_prime=gp_b)

    f, jv = jax.vmap(lambda v: jax.jvp(drift, (z,), (v,)), out_axes=(None, 0))(probes)
    div = scale * jnp.sum((probes * jv).reshape(probes.shape[0], batch, dims), axis=(0, 2))
    return jnp.concatenate([f.reshape(batch, dims), div[:, None].astype(y.dtype)], axis=1)

  return rhs


def _rk_step(rhs, tab: Tableau, t: jax.Array, y: jax.Array, h: jax.Array,
             k1: jax.Array | None) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """One explicit RK step of size h [B] from (t [B], y [B, N]); one scan over the stages.

  k1 = f(t, y) when already known (first-same-as-last methods). Returns (y_new, error estimate
  or None, last stage derivative), the last being f(t + h, y_new) for FSAL tableaus.
  """
  num_stages, first = len(tab.b), int(k1 is not None)
  ks = jnp.zeros((num_stages,) + y.shape, y.dtype)
  ks = ks if k1 is None else ks.at[0].set(k1)
  combine = lambda w, ks: jnp.sum(w[:, None, None] * ks, axis=0)   # no matmul: exact on TPU too

  def stage(ks, xs):
    i, a_i, c_i = xs
    k_i = rhs(t + c_i * h, y + h[:, None] * combine(a_i, ks))
    return jax.lax.dynamic_update_index_in_dim(ks, k_i, i, 0), None

  xs = (jnp.arange(first, num_stages), jnp.asarray(tab.a[first:], y.dtype),
        jnp.asarray(tab.c[first:], y.dtype))
  ks = jax.lax.scan(stage, ks, xs)[0]
  y_new = y + h[:, None] * combine(jnp.asarray(tab.b, y.dtype), ks)
  err = None if tab.b_err is None else h[:, None] * combine(jnp.asarray(tab.b_err, y.dtype), ks)
  return y_new, err, ks[-1]


def _solve_fixed(rhs, tab: Tableau, y0: jax.Array, num_steps: int):
  """num_steps equal steps from t = 0 to 1: one lax.scan. Returns (y_1, nfe, finished [B])."""
  batch, h = y0.shape[0], 1.0 / num_steps
  grid = jnp.asarray(np.arange(num_steps) / num_steps, y0.dtype)
  step_h = jnp.full((batch,), h, y0.dtype)

  def step(y, t_n):
    return _rk_step(rhs, tab, jnp.full((batch,), t_n, y0.dtype), y, step_h, None)[0], None

  y1 = jax.lax.scan(step, y0, grid)[0]
  return y1, jnp.asarray(len(tab.b) * num_steps, jnp.int32), jnp.ones((batch,), bool)


def _error_norm(err, y, y_new, rtol, atol):
  """Per-example RMS of err / (atol + rtol max(|y|, |y_new|)) -> [B] (accept a step when <= 1)."""
  scale = atol + rtol * jnp.maximum(jnp.abs(y), jnp.abs(y_new))
  return jnp.sqrt(jnp.mean((err / scale)**2, axis=-1))


def _solve_adaptive(rhs, tab: Tableau, y0: jax.Array, *, rtol: float, atol: float,
                    max_steps: int):
  """Embedded RK with per-example step sizes in one lax.while_loop (at most max_steps tries).

  Step control as in Hairer et al. (II.4): accept when the error norm is <= 1, next
  h = h clip(0.9 err^(-1/(order + 1)), 0.2, 10); the initial h = 0.01 ||y0|| / ||f(0, y0)||.
  Returns (y_1, nfe, finished [B]); nfe counts batched evaluations of the right-hand side.
  """
  batch, dtype = y0.shape[0], y0.dtype
  t0 = jnp.zeros((batch,), dtype)
  k1 = rhs(t0, y0)
  d0, d1 = (_error_norm(v, y0, y0, rtol, atol) for v in (y0, k1))
  h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, jnp.minimum(0.01 * d0 / d1, 1.0))

  def body(state):
    t, y, h, k1, n = state
    done, last = t >= 1.0, h >= 1.0 - t
    h_eff = jnp.where(done, 0.0, jnp.where(last, 1.0 - t, h))
    y_new, err, k_new = _rk_step(rhs, tab, t, y, h_eff, k1)
    err_norm = _error_norm(err, y, y_new, rtol, atol)
    accept = (err_norm <= 1.0) & ~done
    factor = jnp.where(jnp.isfinite(err_norm),
                       jnp.clip(0.9 * err_norm**(-1.0 / (tab.order + 1)), 0.2, 10.0), 0.2)
    t = jnp.where(accept, jnp.where(last, 1.0, t + h_eff), t)
    y = jnp.where(accept[:, None], y_new, y)
    k1 = jnp.where(accept[:, None], k_new, k1)
    return t, y, jnp.where(done, h, h_eff * factor), k1, n + 1

  cond = lambda state: (state[-1] < max_steps) & jnp.any(state[0] < 1.0)
  t, y, _, _, n = jax.lax.while_loop(cond, body, (t0, y0, h0.astype(dtype), k1, jnp.int32(0)))
  return y, 1 + (len(tab.b) - 1) * n, t >= 1.0


# ----------------------------------------------------------------------------------------------
# Public API.


def _check_options(method: str, trace: str, num_steps: int, rtol: float, atol: float,
                   max_steps: int, num_probes: int, time_variable: str) -> None:
  check_choice("ODE method", method, METHODS)
  check_choice("trace estimator", trace, TRACES)
  check_choice("time_variable", time_variable, TIME_VARIABLES)
  check_number("num_steps", num_steps, integer=True, low=1)
  check_number("max_steps", max_steps, integer=True, low=1)
  check_number("num_probes", num_probes, integer=True, low=1)
  check_number("rtol", rtol, low=0.0, strict=True)
  check_number("atol", atol, low=0.0, strict=True)


def _integration_schedule(gamma_fn: GammaFn, time_variable: str, dtype) -> GammaFn:
  """gamma_fn itself ("t"), or the linear map between its endpoints ("gamma": the ODE in gamma)."""
  if time_variable == "t":
    return gamma_fn
  g_0, g_1 = (jnp.asarray(gamma_fn(jnp.full((), v, dtype)), dtype) for v in (0.0, 1.0))
  return lambda s: g_0 + (g_1 - g_0) * s


def ode_log_likelihood(key: jax.Array | None, z_0: jax.typing.ArrayLike, *, eps_fn: EpsFn,
                       gamma_fn: GammaFn, method: str = "heun", num_steps: int = 100,
                       rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 1000,
                       trace: str = "hutchinson_rademacher", num_probes: int = 1,
                       time_variable: str = "t") -> tuple[jax.Array, jax.Array]:
  """log p_ODE(z_0) of continuous latents at t = 0 under the model's probability-flow ODE.

  Solves dz/dt = f(z, t) and d delta/dt = div f from t = 0 to 1 and returns
  log N(z_1; 0, I) + delta (instantaneous change of variables; Song et al. 2021 SDE, appendix
  D.2). The fixed-step solvers are reverse-differentiable (lax.scan); the adaptive ones are not
  (lax.while_loop).

  Args:
    key: PRNG key of the Hutchinson probes (one per example and probe, fixed over the
      trajectory); may be None for trace="exact".
    z_0: [B, ...] float latents (at least one data axis), e.g. [B, H, W, C].
    eps_fn: (z [B, ...], gamma [B]) -> eps_hat [B, ...]; gamma_fn: t -> gamma(t), increasing.
    method: "euler" or "heun" (num_steps fixed steps), or "rk45" / "adaptive" (Dormand-Prince)
      or "rk23" (Bogacki-Shampine) with error control by rtol, atol and at most max_steps tries.
    num_steps: fixed steps (ignored by the adaptive methods); Heun uses 2 evaluations per step.
    rtol, atol: tolerances of the adaptive methods, per example on [z, delta].
    max_steps: adaptive step attempts; examples that do not reach t = 1 get log_p = NaN.
    trace: "hutchinson_rademacher", "hutchinson_gaussian" (unbiased, one jvp per probe) or
      "exact" (D jvps per evaluation: tiny D only).
    num_probes: Hutchinson probes averaged per example (the variance falls as 1 / num_probes).
    time_variable: "t" (grid uniform in t) or "gamma" (uniform in gamma = -log SNR).

  Returns:
    (log_p [B] in nats, nfe) with nfe an int32 scalar: the number of batched evaluations of the
    augmented right-hand side (each costs one jvp of eps_fn per probe).

  Raises:
    ValueError: an unknown method / trace / time_variable, a non-positive count or tolerance, a
      z_0 that is not a float array [B, ...], or an eps_fn returning another shape.
  """
  _check_options(method, trace, num_steps, rtol, atol, max_steps, num_probes, time_variable)
  z_0 = jnp.asarray(z_0)
  if z_0.ndim < 2 or not jnp.issubdtype(z_0.dtype, jnp.floating) or not z_0.size:
    raise ValueError(f"expected float latents z_0 of shape [B, ...] with at least one data axis, "
                     f"got shape {z_0.shape} and dtype {z_0.dtype}")
  shape, dtype = z_0.shape, z_0.dtype
  batch, dims = shape[0], math.prod(shape[1:])
  probes, scale = _probes(key, trace, num_probes, shape, dtype)
  rhs = _make_rhs(eps_fn, _integration_schedule(gamma_fn, time_variable, dtype), shape, probes,
                  scale)
  y0 = jnp.concatenate([z_0.reshape(batch, dims), jnp.zeros((batch, 1), dtype)], axis=1)
  if method in FIXED_METHODS:
    y1, nfe, finished = _solve_fixed(rhs, TABLEAUS[method], y0, num_steps)
  else:
    y1, nfe, finished = _solve_adaptive(rhs, TABLEAUS[method], y0, rtol=rtol, atol=atol,
                                        max_steps=max_steps)
  z_1, delta = y1[:, :dims], y1[:, dims]
  log_prior = -0.5 * jnp.sum(z_1**2, axis=-1) - 0.5 * dims * math.log(2.0 * math.pi)
  return jnp.where(finished, log_prior + delta, jnp.nan), nfe


def _dequantize(key: jax.Array, k: jax.Array, *, gamma_0: jax.Array, vocab_size: int,
                dequantization: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(z_0 ~ q(z_0 | k), log q(z_0 | k) [B], -log p(k | z_0) [B]) for either dequantiser."""
  x = elbo.encode(k, vocab_size=vocab_size)
  alpha_0, sigma_0 = schedules.alpha_sigma(gamma_0)
  dims = math.prod(x.shape[1:])
  if dequantization == "variational":        # q(z_0 | x) = N(alpha_0 x, sigma_0^2 I)
    eps = jax.random.normal(key, x.shape)
    z_0 = alpha_0 * x + sigma_0 * eps
    log_q = (-0.5 * elbo.sum_per_example(eps**2)
             - dims * (0.5 * math.log(2.0 * math.pi) + 0.5 * jax.nn.log_sigmoid(gamma_0)))
    recon = elbo.reconstruction_nll(k, z_0, gamma_0=gamma_0, vocab_size=vocab_size)
    return z_0, log_q, recon
  # uniform on the box alpha_0 (x +- 1/K) of z-space: the bin of k, volume (2 alpha_0 / K)^D
  u = jax.random.uniform(key, x.shape, minval=-1.0 / vocab_size, maxval=1.0 / vocab_size)
  log_volume = dims * (math.log(2.0 / vocab_size) + 0.5 * jax.nn.log_sigmoid(-gamma_0))
  return alpha_0 * (x + u), jnp.full((x.shape[0],), -log_volume), jnp.zeros((x.shape[0],))


def ode_bpd(key: jax.Array, images_int: jax.typing.ArrayLike, *, eps_fn: EpsFn,
            gamma_fn: GammaFn, vocab_size: int, dequantization: str = "variational",
            method: str = "heun", num_steps: int = 100, rtol: float = 1e-5, atol: float = 1e-5,
            max_steps: int = 1000, trace: str = "hutchinson_rademacher", num_probes: int = 1,
            time_variable: str = "t") -> dict[str, jax.Array]:
  """A one-sample upper bound on -log P(k) of discrete data under the ODE model, per example.

  The ODE gives a density of the continuous z_0, not a probability of integers. Evaluating it at
  the data themselves (score_sde without dequantisation) is no bound at all: a density can exceed
  1 and the "bpd" goes negative (score_sde issue 24). Here the discrete model is
  P(k) = int p(k | z_0) p_ODE(z_0) dz_0 with VDM's discrete decoder p(k | z_0), and the
  dequantiser q(z_0 | k) gives (Jensen, as in variational dequantisation, Ho et al. 2019)

      -log P(k) <= E_q[-log p(k | z_0)] + E_q[log q(z_0 | k) - log p_ODE(z_0)].

  "variational" (default): q(z_0 | k) = N(alpha_0 x, sigma_0^2 I), the model's own encoder (VDM
  eq. 8). The reconstruction term is `elbo.reconstruction_nll`, the decoder of the ELBO, so this
  bound and `elbo.elbo_terms` bound the same kind of discrete model and compare directly. For an
  exact eps_fn (and q(z_1) = N(0, I)) their expectations coincide: the ELBO's extra gap
  E KL(q(z_{t>0} | z_0) || p(z_{t>0} | z_0)) vanishes because the reverse SDE is then exact.
  "uniform": z_0 uniform on the bin alpha_0 (x +- 1/K) and the decoder replaced by the bin
  indicator, P(k) = int_bin p_ODE: a valid bound on another discretisation of the same p_ODE,
  but loose whenever p_ODE is much narrower than a bin (sigma_0 << alpha_0 / K, as for VDM).

  Args:
    key: PRNG key (dequantisation noise and Hutchinson probes).
    images_int: integer data [B, ...] in [0, vocab_size), e.g. [B, H, W, C].
    eps_fn, gamma_fn, method, num_steps, rtol, atol, max_steps, trace, num_probes, time_variable:
      as `ode_log_likelihood`.
    vocab_size: K.
    dequantization: "variational" or "uniform".

  Returns:
    {"reconstruction", "log_q", "ode_nll", "total"}: [B] nats (-log p(k | z_0), log q(z_0 | k),
    -log p_ODE(z_0) and their sum, the bound); "bpd": [B] = total / (D ln 2); "nfe": int32 scalar.
  """
  check_choice("dequantization", dequantization, DEQUANTIZATIONS)
  k = elbo.check_data(images_int, vocab_size=vocab_size)
  if k.ndim < 2:
    raise ValueError(f"expected images_int of shape [B, ...] with at least one data axis, got "
                     f"shape {k.shape}")
  key_q, key_ode = jax.random.split(key)
  gamma_0 = jnp.asarray(gamma_fn(jnp.zeros((), jnp.float32)), jnp.float32)
  z_0, log_q, recon = _dequantize(key_q, k, gamma_0=gamma_0, vocab_size=vocab_size,
                                  dequantization=dequantization)
  log_p, nfe = ode_log_likelihood(
      key_ode, z_0, eps_fn=eps_fn, gamma_fn=gamma_fn, method=method, num_steps=num_steps,
      rtol=rtol, atol=atol, max_steps=max_steps, trace=trace, num_probes=num_probes,
      time_variable=time_variable)
  total = recon + log_q - log_p
  return {"reconstruction": recon, "log_q": log_q, "ode_nll": -log_p, "total": total,
          "bpd": elbo.bits_per_dim(total, num_dims=math.prod(k.shape[1:])), "nfe": nfe}


def elbo_and_ode_bpd(key: jax.Array, images_int: jax.typing.ArrayLike, *, eps_fn: EpsFn,
                     gamma_fn: GammaFn, vocab_size: int, elbo_num_steps: int = 0,
                     **ode_options: Any) -> dict[str, jax.Array]:
  """The two bounds of the same model side by side, per example, in bits per dimension.

  Args:
    key: PRNG key (split between the two estimates).
    images_int: integer data [B, ...] in [0, vocab_size).
    eps_fn, gamma_fn, vocab_size: as `ode_bpd`.
    elbo_num_steps: T of the ELBO (0: continuous time), as `elbo.elbo_terms`.
    **ode_options: keyword options of `ode_bpd` (method, num_steps, trace, dequantization, ...).

  Returns:
    {"elbo_bpd": [B], "ode_bpd": [B], "ode_nfe": int32 scalar}: one-sample estimates of two upper
    bounds on -log2 P(k) / D; average them over a data set.
  """
  key_elbo, key_ode = jax.random.split(key)
  terms = elbo.elbo_terms(key_elbo, images_int, eps_fn=eps_fn, gamma_fn=gamma_fn,
                          vocab_size=vocab_size, num_steps=elbo_num_steps)
  ode = ode_bpd(key_ode, images_int, eps_fn=eps_fn, gamma_fn=gamma_fn, vocab_size=vocab_size,
                **ode_options)
  num_dims = math.prod(jnp.shape(images_int)[1:])
  return {"elbo_bpd": elbo.bits_per_dim(terms.total, num_dims=num_dims), "ode_bpd": ode["bpd"],
          "ode_nfe": ode["nfe"]}
