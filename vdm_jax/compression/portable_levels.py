"""The portable coder's schedule: the T + 1 levels' constants, the same bits on every machine.

The integer model stores gamma(t) at 1025 times (`portable_quant.gamma_table`, integers in units
of 2^-20). For a chain of T steps, gamma at t_i = i / T is interpolated linearly between them in
exact integer arithmetic (`gammas`), and every constant the coder needs (alpha, sigma, the
transitions q(z_i | z_{i-1}), the posteriors p(z_{i-1} | z_i) = q(z_{i-1} | z_i, x = x_hat)) is
computed from it in decimal arithmetic with 50 significant digits (Python's `decimal`: exp, ln
and sqrt correctly rounded, no float) and rounded once to float64 (`float(Decimal)` is correctly
rounded). Float exp / log / sqrt of the platform (libm, SIMD) may differ in the last bit between
machines and would misplace a coding interval; these values do not.

The formulas are those of `diffusion.transition` and `diffusion.posterior` (VDM eq. 5-6, 23-24):
  alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 = sigmoid(gamma_t),
  sigma_{t|s}^2 = -expm1(softplus(gamma_s) - softplus(gamma_t)), alpha_{t|s} = alpha_t / alpha_s,
  p(z_s | z_t): variance sigma_{t|s}^2 sigma_s^2 / sigma_t^2, mean A z_t + B eps_hat with
  A = alpha_{t|s} sigma_s^2 / sigma_t^2 + alpha_s sigma_{t|s}^2 / (sigma_t^2 alpha_t),
  B = -alpha_s sigma_{t|s}^2 / (sigma_t alpha_t)   (x_hat = (z_t - sigma_t eps_hat) / alpha_t).
"""

from __future__ import annotations

import decimal
from typing import NamedTuple

import numpy as np

DIGITS = 50
_LOG2_SQRT_2PIE = None   # log2(sqrt(2 pi e)), set on first use


class LevelTable(NamedTuple):
  """float64 [T + 1] per level i (t_i = i / T); index conventions of `compress.Levels`.

  gamma_fixed: gamma_i in units of 2^-gamma_frac (Python ints, object array).
  alpha, sigma: of z_i. coef: alpha_0 at 0, alpha_{i|i-1} above. q_std: sigma_0 at 0,
  sigma_{i|i-1} above. p_std: the std of p(z_i | z_{i+1}) (1 at T, the prior).
  mean_a, mean_b: p(z_{i-1} | z_i)'s mean A_i z_i + B_i eps_hat (index 0 unused).
  """

  gamma_fixed: np.ndarray
  alpha: np.ndarray
  sigma: np.ndarray
  coef: np.ndarray
  q_std: np.ndarray
  p_std: np.ndarray
  mean_a: np.ndarray
  mean_b: np.ndarray


def gammas(table: np.ndarray, num_steps: int) -> list[int]:
  """gamma at t_i = i / T, i = 0..T, interpolated linearly in the table of gamma(k / N),
  k = 0..N (integers), rounded half up: exact integer arithmetic."""
  n, steps = len(table) - 1, int(num_steps)
  out = []
  for i in range(steps + 1):
    k, r = divmod(i * n, steps)
    g = int(table[k])
    if r:
      g += (2 * (int(table[k + 1]) - g) * r + steps) // (2 * steps)
    out.append(g)
  return out


def level_table(gamma_fixed: list[int], *, gamma_frac: int) -> LevelTable:
  """The constants of every level from gamma_i (integers in units of 2^-gamma_frac)."""
  ctx = decimal.Context(prec=DIGITS)
  one = decimal.Decimal(1)
  scale = decimal.Decimal(2) ** gamma_frac
  g = [ctx.divide(decimal.Decimal(v), scale) for v in gamma_fixed]
  softplus = [ctx.ln(one + ctx.exp(v)) for v in g]
  alpha2 = [ctx.divide(one, one + ctx.exp(v)) for v in g]       # sigmoid(-gamma)
  sigma2 = [ctx.divide(one, one + ctx.exp(-v)) for v in g]      # sigmoid(gamma)
  steps = len(g) - 1
  f = lambda d: float(d)
  alpha = np.array([f(ctx.sqrt(a)) for a in alpha2])
  sigma = np.array([f(ctx.sqrt(s)) for s in sigma2])
  coef, q_std = [f(ctx.sqrt(alpha2[0]))], [f(ctx.sqrt(sigma2[0]))]
  p_std, mean_a, mean_b = [], [0.0], [0.0]
  for i in range(1, steps + 1):
    s2_ts = one - ctx.exp(softplus[i - 1] - softplus[i])    # -expm1(sp(g_s) - sp(g_t))
    a_ts = ctx.sqrt(ctx.divide(alpha2[i], alpha2[i - 1]))
    a_s, a_t = ctx.sqrt(alpha2[i - 1]), ctx.sqrt(alpha2[i])
    s_t = ctx.sqrt(sigma2[i])
    coef.append(f(a_ts))
    q_std.append(f(ctx.sqrt(s2_ts)))
    p_std.append(f(ctx.sqrt(ctx.divide(s2_ts * sigma2[i - 1], sigma2[i]))))
    mean_a.append(f(ctx.divide(a_ts * sigma2[i - 1], sigma2[i])
                    + ctx.divide(a_s * s2_ts, sigma2[i] * a_t)))
    mean_b.append(f(-ctx.divide(a_s * s2_ts, s_t * a_t)))
  p_std.append(1.0)
  arr = lambda v: np.asarray(v, np.float64)
  return LevelTable(np.asarray(gamma_fixed, dtype=object), alpha, sigma, arr(coef), arr(q_std),
                    arr(p_std), arr(mean_a), arr(mean_b))


def scramble_words(std: float, delta: float, num_symbols: int) -> int:
  """1 + ceil(num_symbols (log2(std / delta) + log2 sqrt(2 pi e)) / 32): the words
  `compress.Chain._scramble` covers, in exact decimal arithmetic (a float log2 may round the
  other way on another machine near an integer)."""
  global _LOG2_SQRT_2PIE
  ctx = decimal.Context(prec=DIGITS)
  ln2 = ctx.ln(decimal.Decimal(2))
  if _LOG2_SQRT_2PIE is None:
    pi = decimal.Decimal("3.14159265358979323846264338327950288419716939937510582097494")
    _LOG2_SQRT_2PIE = ctx.divide(ctx.ln(2 * pi) + 1, 2 * ln2)
  ratio = ctx.divide(decimal.Decimal(std), decimal.Decimal(delta))
  bits = ctx.divide(ctx.ln(ratio), ln2) + _LOG2_SQRT_2PIE
  words = ctx.divide(num_symbols * bits, 32).to_integral_value(rounding=decimal.ROUND_CEILING)
  return 1 + int(words)
