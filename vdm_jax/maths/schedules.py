"""Noise schedules, written as gamma(t) = -log SNR(t) on t in [0, 1].

Every schedule here is a strictly increasing map t -> gamma(t), with endpoints
gamma_min = gamma(0) and gamma_max = gamma(1) (VDM paper, Kingma et al. 2021, section 3.1).
All losses in `vdm_jax.maths.elbo` only ever see such a callable, so the fixed log-SNR-linear
schedule, DDPM's beta-linear and cosine schedules and the learned ones plug into the same code.

Fixed schedules are frozen dataclasses (hashable, usable as static jit arguments). Learned
schedules are a pure function of a parameter pytree plus an `init_*` function; the Flax wrapper
that owns the parameters lives in `vdm_jax.nets.model`.

Configs name a schedule (`model.schedule`): the registry of those names is in `vdm_jax.nets.model`.

Only jax / jax.numpy are imported here (house rule: the maths never depends on the network
library).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

GammaFn = Callable[[jax.Array], jax.Array]   # t (any shape) -> gamma(t) (same shape)
Params = dict[str, Any]


def _is_concrete(x: Any) -> bool:
  """True when `x` holds values we can inspect now (not a tracer under jit/grad/vmap)."""
  return not isinstance(x, jax.core.Tracer)


def check_endpoints(gamma_min: Any, gamma_max: Any) -> None:
  """Raises ValueError unless gamma_min < gamma_max (when both values are concrete)."""
  if _is_concrete(gamma_min) and _is_concrete(gamma_max):
    lo, hi = float(np.min(np.asarray(gamma_min))), float(np.max(np.asarray(gamma_max)))
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
      raise ValueError(
          f"expected finite gamma_min < gamma_max, got gamma_min={lo!r}, gamma_max={hi!r}")


def check_time(t: ArrayLike) -> jax.Array:
  """Returns `t` as an array; raises ValueError if concrete values fall outside [0, 1].

  Under jit the values are tracers and cannot be checked; they are then used as given.
  """
  if _is_concrete(t) and np.size(t):
    lo, hi = float(np.min(np.asarray(t))), float(np.max(np.asarray(t)))
    if lo < 0.0 or hi > 1.0 or not (math.isfinite(lo) and math.isfinite(hi)):
      raise ValueError(f"expected times t in [0, 1], got values in [{lo}, {hi}]")
  t = jnp.asarray(t)
  return t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Stable functions of gamma.


def snr(gamma: ArrayLike) -> jax.Array:
  """Signal-to-noise ratio SNR = alpha^2 / sigma^2 = exp(-gamma). Shape of `gamma`."""
  return jnp.exp(-jnp.asarray(gamma))


def alpha_sigma(gamma: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """(alpha, sigma) with alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma) (VDM eq. 3-4).

  Computed as exp(log_sigmoid(.) / 2), which is exact in float32 for gamma in [-30, 30] (and
  beyond) where 1 - sigmoid would cancel. Output shapes equal the shape of `gamma`.
  """
  gamma = jnp.asarray(gamma)
  return jnp.exp(0.5 * jax.nn.log_sigmoid(-gamma)), jnp.exp(0.5 * jax.nn.log_sigmoid(gamma))


def gamma_and_derivative(gamma_fn: GammaFn, t: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """gamma(t) and d gamma / dt by forward-mode differentiation (one jvp, elementwise schedules).

  Args:
    gamma_fn: an elementwise schedule t -> gamma(t).
    t: times, any shape.

  Returns:
    (gamma, gamma_prime), both of the shape of `t`.
  """
  t = jnp.asarray(t, dtype=jnp.result_type(t, jnp.float32))
  return jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))


# ----------------------------------------------------------------------------------------------
# Fixed schedules.


def linear_gamma(t: ArrayLike, *, gamma_min: ArrayLike, gamma_max: ArrayLike) -> jax.Array:
  """Log-SNR-linear schedule gamma(t) = gamma_min + (gamma_max - gamma_min) t (VDM eq. 12's
  linear case). Shape of `t`."""
  t = jnp.asarray(t)
  return gamma_min + (gamma_max - gamma_min) * t


@dataclasses.dataclass(frozen=True)
class FixedLinear:
  """The fixed log-SNR-linear schedule, a callable t -> gamma(t).

  Attributes:
    gamma_min: gamma(0) (VDM CIFAR-10: -13.3).
    gamma_max: gamma(1) (VDM CIFAR-10: 5.0).
  """

  gamma_min: float = -13.3
  gamma_max: float = 5.0

  def __post_init__(self):
    check_endpoints(self.gamma_min, self.gamma_max)

  def __call__(self, t: ArrayLike) -> jax.Array:
    return linear_gamma(check_time(t), gamma_min=self.gamma_min, gamma_max=self.gamma_max)


def _affine_time(t: jax.Array, lo: float, hi: float) -> jax.Array:
  return lo + (hi - lo) * t


_SERIES_TOL = 1e-10      # bound on the neglected tail of -log alpha_bar_T (nats)
_SERIES_MAX_ORDER = 64


def _series_order(beta_end: float, num_steps: int) -> int:
  """Smallest K with sum_{n<=T} sum_{k>K} beta_n^k / k <= _SERIES_TOL, bounded by
  T beta_end^(K+1) / ((K + 1) (1 - beta_end)); 0 when no K <= _SERIES_MAX_ORDER suffices."""
  for order in range(1, _SERIES_MAX_ORDER + 1):
    tail = num_steps * beta_end**(order + 1) / ((order + 1) * (1.0 - beta_end))
    if tail <= _SERIES_TOL:
      return order
  return 0


def _power_sum_coefs(beta_start: float, step: float, order: int) -> tuple[float, ...]:
  """h_0..h_K with sum_{j<m} sum_{k<=K} (beta_start + step j)^k / k = sum_q h_q step^q C(m, q+1).

  With g(j) = sum_k (b + d j)^k / k = sum_r A_r d^r j^r, A_r = sum_k C(k, r) b^(k-r) / k, the
  falling-factorial identity j^r = sum_q S(r, q) q! C(j, q) (S: Stirling numbers of the second
  kind) and the hockey stick sum_{j<m} C(j, q) = C(m, q+1) give
  h_q = q! sum_{r>=q} S(r, q) d^(r-q) A_r, a sum of non-negative terms (no cancellation).
  """
  b, d, k_max = beta_start, step, order
  stirling = [[1] + [0] * k_max]                       # S(r, q), r, q = 0..K
  for r in range(1, k_max + 1):
    prev = stirling[-1]
    stirling.append([0] + [q * prev[q] + prev[q - 1] for q in range(1, k_max + 1)])
  a = [sum(math.comb(k, r) * b**(k - r) / k for k in range(max(r, 1), k_max + 1))
       for r in range(k_max + 1)]
  return tuple(math.factorial(q) * sum(stirling[r][q] * d**(r - q) * a[r]
                                       for r in range(q, k_max + 1))
               for q in range(k_max + 1))


@dataclasses.dataclass(frozen=True)
class BetaLinear:
  """DDPM's beta-linear schedule (Ho et al. 2020) as a continuous gamma(t), exact on its grid.

  DDPM takes beta_n linear from beta_start to beta_end over n = 1..T and
  alpha_bar_n = prod_{i<=n} (1 - beta_i) (Ho et al. 2020, eq. 4 and section 2), so
  c_n = -log alpha_bar_n = sum_{i<=n} -log(1 - beta_i) = sum_{k>=1} sum_{i<=n} beta_i^k / k.
  Each inner sum runs over powers of an arithmetic sequence, a polynomial in n (Faulhaber); with
  m = T tau the truncated series is the polynomial c(tau) = sum_{q<=K} h_q d^q C(m, q+1),
  d = (beta_end - beta_start) / (T - 1), its order K chosen so that the neglected tail is below
  1e-10 nats at n = T (K = 7 for DDPM's 1e-4 -> 0.02, T = 1000). So at every grid point
  tau = n / T, c equals -log alpha_bar_n to float64 precision (alpha_bar to ~1e-10 relative), and
  between grid points it is a smooth, strictly increasing interpolation (checked on construction).
  Since alpha^2 = alpha_bar, gamma = log((1 - alpha_bar) / alpha_bar) = log(expm1(c(tau))).

  The time t in [0, 1] is mapped affinely onto tau in [tau_min, tau_max], chosen so that
  gamma(0) = gamma_min and gamma(1) = gamma_max (the inverse tau(gamma) is a float64 bisection,
  run once on Python floats, outside jit). The defaults (None) take tau_min = 1/T and
  tau_max = 1, i.e. DDPM's own levels 1 and T (gamma_min = -9.2103, gamma_max = 10.1177), so
  level n sits at t = (n - 1) / (T - 1). Passing endpoints keeps the beta-linear *shape* with
  other endpoints, as in the VDM paper's schedule comparison; beyond tau = 1 the polynomial
  continues the linear beta sequence.
  """

  beta_start: float = 1e-4
  beta_end: float = 0.02
  num_steps: int = 1000
  gamma_min: float | None = None
  gamma_max: float | None = None

  def __post_init__(self):
    if not 0.0 < self.beta_start < self.beta_end < 1.0:
      raise ValueError("expected 0 < beta_start < beta_end < 1, got "
                       f"beta_start={self.beta_start}, beta_end={self.beta_end}")
    if self.num_steps < 2 or self.beta_start <= self._step / 2:
      raise ValueError(f"expected num_steps >= 2 and beta_start > (beta_end - beta_start) / "
                       f"(2 (num_steps - 1)), got beta_start={self.beta_start}, "
                       f"beta_end={self.beta_end}, num_steps={self.num_steps}")
    if not _series_order(self.beta_end, self.num_steps):
      raise ValueError(f"expected beta_end small enough for sum_k beta^k / k to converge within "
                       f"{_SERIES_MAX_ORDER} terms, got beta_end={self.beta_end}")
    check_endpoints(*self.endpoints)
    hi = max(1.0, self._tau_range[1])
    c = self.neg_log_alpha_bar(np.linspace(0.0, hi, 8 * self.num_steps + 1))
    if not np.all(np.diff(c) > 0):
      raise ValueError(f"expected -log alpha_bar increasing on tau in [0, {hi}], got a decrease "
                       f"for beta_start={self.beta_start}, beta_end={self.beta_end}")

  @property
  def _step(self) -> float:
    return (self.beta_end - self.beta_start) / (self.num_steps - 1)

  @functools.cached_property
  def _coefs(self) -> tuple[float, ...]:
    order = _series_order(self.beta_end, self.num_steps)
    return _power_sum_coefs(self.beta_start, self._step, order)

  def neg_log_alpha_bar(self, tau):
    """c(tau) = -log alpha_bar at step m = T tau: sum_{i<=m} -log(1 - beta_i) at integer m.

    Args:
      tau: continuous step index over T, any shape; NumPy float64 in gives float64 out.

    Returns:
      c(tau), the shape of `tau` (0 at tau = 0, -log alpha_bar_T at tau = 1).
    """
    m = self.num_steps * tau
    term = m                                   # step^q C(m, q+1), q = 0
    out = self._coefs[0] * term
    for q, h in enumerate(self._coefs[1:], start=1):
      term = term * (self._step * (m - q) / (q + 1))
      out = out + h * term
    return out

  def _tau(self, gamma: float) -> float:
    """Inverse of tau -> gamma: solves c(tau) = softplus(gamma) by float64 bisection."""
    target = gamma + math.log1p(math.exp(-gamma)) if gamma > 0 else math.log1p(math.exp(gamma))
    lo, hi = 0.0, 1.0
    while float(self.neg_log_alpha_bar(hi)) < target:
      lo, hi = hi, 2.0 * hi
    for _ in range(200):
      mid = 0.5 * (lo + hi)
      if mid in (lo, hi):
        break
      lo, hi = (mid, hi) if float(self.neg_log_alpha_bar(mid)) < target else (lo, mid)
    return 0.5 * (lo + hi)

  @functools.cached_property
  def _tau_range(self) -> tuple[float, float]:
    return tuple(self._tau(g) for g in self.endpoints)

  @property
  def endpoints(self) -> tuple[float, float]:
    gmin = self.gamma_min
    gmax = self.gamma_max
    if gmin is None:
      gmin = math.log(math.expm1(self.neg_log_alpha_bar(1.0 / self.num_steps)))
    if gmax is None:
      gmax = math.log(math.expm1(self.neg_log_alpha_bar(1.0)))
    return float(gmin), float(gmax)

  def __call__(self, t: ArrayLike) -> jax.Array:
    tau = _affine_time(check_time(t), *self._tau_range)
    c = self.neg_log_alpha_bar(tau)
    # log(expm1(c)) = c + log(-expm1(-c)), stable for small and large c.
    return c + jnp.log(-jnp.expm1(-c))


@dataclasses.dataclass(frozen=True)
class Cosine:
  """The cosine schedule (Nichol & Dhariwal 2021) as a continuous gamma(t).

  alpha^2 = cos^2(pi/2 tau') with tau' = (tau + s) / (1 + s), so
  gamma = log(sigma^2 / alpha^2) = 2 log tan(pi/2 tau'). Its inverse is
  tau' = (2/pi) arctan(exp(gamma / 2)). Time t in [0, 1] maps affinely onto tau' between the
  values that give gamma_min and gamma_max. Defaults (None): gamma_min from tau = 0 with offset s
  (2 log tan(pi/2 s/(1+s)) ~ -8.77 for s = 0.008) and gamma_max from tau = 1 - 1/1000, the last
  step before the schedule's singular end (~ 12.9); the normalisation by alpha_bar(0) of the
  discrete version is dropped (it only matters at tau = 0, where it makes gamma = -inf).
  """

  s: float = 0.008
  gamma_min: float | None = None
  gamma_max: float | None = None

  def __post_init__(self):
    if not self.s > 0.0:
      raise ValueError(f"expected offset s > 0, got s={self.s}")
    check_endpoints(*self.endpoints)

  @property
  def endpoints(self) -> tuple[float, float]:
    gmin, gmax = self.gamma_min, self.gamma_max
    if gmin is None:
      gmin = 2 * math.log(math.tan(0.5 * math.pi * self.s / (1 + self.s)))
    if gmax is None:
      gmax = 2 * math.log(math.tan(0.5 * math.pi * (1 - 1e-3 + self.s) / (1 + self.s)))
    return float(gmin), float(gmax)

  def __call__(self, t: ArrayLike) -> jax.Array:
    gmin, gmax = self.endpoints
    lo, hi = (2 / math.pi * math.atan(math.exp(0.5 * g)) for g in (gmin, gmax))
    half_angle = 0.5 * jnp.pi * _affine_time(check_time(t), lo, hi)
    return 2.0 * (jnp.log(jnp.sin(half_angle)) - jnp.log(jnp.cos(half_angle)))


# ----------------------------------------------------------------------------------------------
# Learned schedules: pure functions of a parameter pytree.


def init_learned_linear(*, gamma_min: float = -13.3, gamma_max: float = 5.0) -> Params:
  """Parameters of the learned-endpoint linear schedule: {"gamma_min", "delta"} scalars."""
  check_endpoints(gamma_min, gamma_max)
  return {"gamma_min": jnp.asarray(gamma_min, jnp.float32),
          "delta": jnp.asarray(gamma_max - gamma_min, jnp.float32)}


def learned_linear_gamma(t: ArrayLike, params: Params) -> jax.Array:
  """`gamma(t) = gamma_min + |delta| t`: linear with learned endpoints (VDM section 3.1).

  The absolute value keeps gamma increasing whatever the optimiser does; gamma_max is
  `gamma_min + |delta|`. Shape of `t`.
  """
  return params["gamma_min"] + jnp.abs(params["delta"]) * jnp.asarray(t)


def learned_endpoints(params: Params) -> tuple[jax.Array, jax.Array]:
  """(gamma_min, gamma_max) of a learned schedule (either kind)."""
  return params["gamma_min"], params["gamma_min"] + jnp.abs(params["delta"])


def init_nnet(key: jax.Array, *, gamma_min: float = -13.3, gamma_max: float = 5.0,
              hidden: int = 1024) -> Params:
  """Parameters of the official VDM `learnable_nnet` schedule (its initialisation, VDM app. H.2).

  Three positive-weight dense layers, named and shaped as the official ones:
  l1 (1 -> 1): kernel [1, 1] = gamma_max - gamma_min, bias [1] = gamma_min;
  l2 (1 -> hidden): kernel [1, hidden] ~ N(0, 0.01^2), bias [hidden] = 0;
  l3 (hidden -> 1, no bias): kernel [hidden, 1] ~ N(0, 0.01^2).
  At this initialisation gamma(t) is linear from gamma_min to gamma_max to within ~1e-4.

  Returns:
    {"l1": {"kernel", "bias"}, "l2": {"kernel", "bias"}, "l3": {"kernel"}}, float32.
  """
  check_endpoints(gamma_min, gamma_max)
  if hidden < 1:
    raise ValueError(f"expected hidden >= 1, got {hidden}")
  k2, k3 = jax.random.split(key)
  return {"l1": {"kernel": jnp.full((1, 1), gamma_max - gamma_min, jnp.float32),
                 "bias": jnp.full((1,), gamma_min, jnp.float32)},
          "l2": {"kernel": 0.01 * jax.random.normal(k2, (1, hidden), jnp.float32),
                 "bias": jnp.zeros((hidden,), jnp.float32)},
          "l3": {"kernel": 0.01 * jax.random.normal(k3, (hidden, 1), jnp.float32)}}


def nnet_gamma(t: ArrayLike, params: Params) -> jax.Array:
  """The official VDM `learnable_nnet` schedule, a monotone network (VDM appendix H.2).

  `gamma(t) = b1 + |W1| t + |W3| (2 sigmoid(|W2| (2 t - 1) + b2) - 1) / hidden`,

  increasing in t since every weight enters through its absolute value. Its endpoints
  gamma(0), gamma(1) are whatever the weights give (they are not pinned). Shape of `t`.

  Args:
    t: times in [0, 1], any shape.
    params: `init_nnet`'s tree (the official parameter names and shapes).
  """
  t = jnp.asarray(t, dtype=jnp.float32)
  l1, l2, l3 = params["l1"], params["l2"], params["l3"]
  hidden = l2["kernel"].shape[-1]
  linear = l1["bias"][0] + jnp.abs(l1["kernel"][0, 0]) * t
  inner = jax.nn.sigmoid((2.0 * t - 1.0)[..., None] * jnp.abs(l2["kernel"][0]) + l2["bias"])
  return linear + jnp.sum(2.0 * (inner - 0.5) * jnp.abs(l3["kernel"][:, 0]), axis=-1) / hidden


def init_monotone(key: jax.Array, *, gamma_min: float = -13.3, gamma_max: float = 5.0,
                  hidden: int = 1024) -> Params:
  """Parameters of the monotone schedule with exact learned endpoints: {"gamma_min", "delta"}
  (as `init_learned_linear`) and "net", the official `learnable_nnet` tree (`init_nnet`), whose
  shape the schedule takes. At initialisation it is linear to within ~1e-4, like the official."""
  params = init_learned_linear(gamma_min=gamma_min, gamma_max=gamma_max)
  params["net"] = init_nnet(key, gamma_min=gamma_min, gamma_max=gamma_max, hidden=hidden)
  return params


def monotone_gamma(t: ArrayLike, params: Params) -> jax.Array:
  """Learned monotone schedule with exactly the learned endpoints.

  gamma(t) = gamma_min + (gamma_max - gamma_min) (f(t) - f(0)) / (f(1) - f(0)),
  with f = `nnet_gamma` of params["net"]. The renormalisation makes gamma(0) = gamma_min and
  gamma(1) = gamma_max exactly, with the endpoints as their own parameters (the official
  `learnable_nnet`, `nnet_gamma`, leaves them implicit). Any official schedule is represented
  exactly: gamma_min = f(0), delta = f(1) - f(0) with f the official network. Shape of `t`.
  """
  t = jnp.asarray(t, dtype=jnp.float32)
  net = params["net"]
  f0, f1 = nnet_gamma(jnp.zeros(()), net), nnet_gamma(jnp.ones(()), net)
  shape = (nnet_gamma(t, net) - f0) / (f1 - f0)
  gmin, gmax = learned_endpoints(params)
  return gmin + (gmax - gmin) * shape
