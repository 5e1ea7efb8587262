"""The integer ScoreUNet: a forward pass whose outputs are the same bits on every machine.

The portable coder (`vdm_jax.compression.portable`) needs the network's output eps_hat to be
reproduced exactly by a decoder on another CPU, under other XLA options, another jaxlib, or on a
GPU / TPU: one differing bit misplaces a coding interval and loses the rest of the stream. Float
rounding differs between such machines; integer arithmetic does not. So the network is run in
integers only (Balle, Johnston & Minnen 2019, "Integer networks for data compression with
latent-variable models"), the function of `networks.ScoreUNet` with:

  - convolutions and dense layers on int8 activations and int8 weights ([-127, 127], one scale
    per output channel, the input channels' scales folded in), their products summed exactly:
    float32 matrix products whose every partial sum stays below 2^24 (chunked where needed; any
    summation order, with or without FMA, is then exact), results in int32;
  - requantisation by an integer multiplier and a rounding shift (`Backend.mul_shift`, exact for
    any int32 input without 64-bit integers);
  - GroupNorm in integers: the mean and the sum of squares with shifts chosen from each group's
    largest value (no overflow for any input), 1/sqrt from a table over 11 bits of mantissa;
  - swish, the attention softmax's exp, sin / cos of the Fourier features from lookup tables
    built once when the model is quantised (`portable_quant`) and stored with it.

Integer addition, multiplication (without overflow), shifts, comparisons, gathers and integer
division have one result on every backend in any evaluation order, so the function is defined
by this code and the stored integers alone. The per-level conditioning (the time embedding and
its MLP, hence the bias each residual block adds) is computed on the host in the same integer
arithmetic (`portable_unet.cond_biases`).

Every function here takes a `Backend`: `JAX` (int32, the coder's compiled forward pass) or
`NUMPY` (int64 and float64 matrix products of integers, exact below 2^53: the reference the JAX
pass is tested against bit for bit, and the host-side conditioning). Values are integers with
a power-of-two scale stated in each name's docstring: V_FRAC for the input of activations, Z_FRAC
for z, EPS_FRAC for eps_hat, `spec["res_frac"]` for the residual stream.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Z_FRAC = 18        # the network's input z: integers in units of 2^-18 (|z| < 32)
EPS_FRAC = 12      # its output eps_hat: units of 2^-12
V_FRAC = 14        # activation inputs (GroupNorm's affine output): units of 2^-14
Y_FRAC = 20        # GroupNorm's normalised output c / sqrt(sum c^2) (at most 1): units of 2^-20
SWISH_FRAC = 8     # the swish table's step: 2^-8 over [-SWISH_RANGE, SWISH_RANGE]
SWISH_RANGE = 8
PHASE_BITS = 12    # sin / cos tables over 2^12 phases of a period
LOGIT_FRAC = 8     # attention logits: units of 2^-8 nats
EXP_RANGE = 24     # exp(-d) is tabulated for 0 <= d <= 24 nats (then 0)
RSQRT_BITS = 10    # 1/sqrt from a table over mantissas in [2^10, 2^12)
INT8_MAX = 127
Z15_MAX = 127 * 128 + 63   # z's 15-bit input: hi in [-127, 127], lo in [-64, 63]
RES_LIMIT = 1 << 29   # residual values are saturated here (adds of two never overflow int32)


@dataclasses.dataclass(frozen=True)
class Backend:
  """Integer primitives of one array library (see the module docstring)."""

  xp: Any
  int_dtype: Any
  conv3x3: Callable      # (a int8 [N, H, W, I], w int8 [3, 3, I, O]) -> int [N, H, W, O]
  dense: Callable        # (a int8 [..., K], w int8 [K, O]) -> int [..., O]
  qk: Callable           # (q int8 [B, Q, C], k int8 [B, K, C]) -> int [B, Q, K]
  av: Callable           # (e int8 [B, Q, K], v int8 [B, K, C]) -> int [B, Q, C]
  mul_shift: Callable    # (x int, m in [0, 2^15), sh >= 0) -> floor((x m + 2^(sh-1)) / 2^sh)
  bitlen: Callable       # x >= 0 -> number of bits (0 for 0)


def _jax_mul_shift(x, m, sh):
  """floor((x m + 2^(sh - 1)) / 2^sh) in int32 for any int32 x, 0 <= m < 2^15, 0 <= sh <= 46
  (the result must fit int32): x m is split as (x >> 16) m 2^16 + (x & 0xFFFF) m, each part
  below 2^31, and the shift is applied to the parts (floor(floor(a) / b) = floor(a / b))."""
  x, m, sh = (jnp.asarray(v, jnp.int32) for v in (x, m, sh))
  ph, pl = (x >> 16) * m, (x & 0xFFFF) * m
  r_lo = jnp.where(sh == 16, 1 << 15, 0)
  r_hi = jnp.where(sh >= 17, jnp.left_shift(1, jnp.clip(sh - 17, 0, 30)), 0)
  big = (ph + ((pl + r_lo) >> 16) + r_hi) >> jnp.clip(sh - 16, 0, 31)
  s2 = jnp.clip(sh, 0, 15)
  small = jnp.left_shift(ph, 16 - s2) + ((pl + (jnp.left_shift(1, s2) >> 1)) >> s2)
  return jnp.where(sh >= 16, big, small)


def _np_mul_shift(x, m, sh):
  """The same function in int64 (exact: |x m| < 2^46)."""
  x, m, sh = (np.asarray(v, np.int64) for v in (x, m, sh))
  return (x * m + ((np.int64(1) << sh) >> 1)) >> sh


def _np_matmul(a, b):
  """Exact integer product of int8-valued arrays through float64 (sums below 2^53)."""
  return np.rint(np.matmul(a.astype(np.float64), b.astype(np.float64))).astype(np.int64)


def _np_conv3x3(a, w):
  n, h, wd, c = a.shape
  ap = np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = np.concatenate([ap[:, i:i + h, j:j + wd, :] for i in range(3) for j in range(3)], -1)
  return _np_matmul(cols, w.reshape(9 * c, -1))


def _np_bitlen(x):
  return np.frexp(np.asarray(x, np.float64))[1].astype(np.int64)   # exact below 2^53


_DN = ("NHWC", "HWIO", "NHWC")
_F32_EXACT = 1 << 24          # float32 holds every integer below 2^24 exactly
_TERM = INT8_MAX * INT8_MAX   # the largest product of two int8 values


def _exact_f32(op, a, b, k: int):
  """op(a, b) of int8 arrays as float32 with every partial sum below 2^24 (exact in any order,
  with or without fused multiply-add), over chunks of at most 2^24 / 127^2 terms (the last axis
  of a, whose length is k), added in int32."""
  step = max(1, (_F32_EXACT - 1) // _TERM)
  f = lambda x: jnp.asarray(x).astype(jnp.float32)
  out = 0
  for s in range(0, k, step):
    out = out + op(f(a[..., s:s + step]), f(b[s:s + step] if b.ndim == 2 else b[..., s:s + step, :])
                   ).astype(jnp.int32)
  return out


def _im2col(a):
  """[N, H, W, C] -> [N, H, W, 9 C], the 3x3 neighbourhoods (zero padded), (dy, dx, c) order."""
  _, h, w, _ = a.shape
  ap = jnp.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.concatenate([ap[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)], -1)


_HIGHEST = jax.lax.Precision.HIGHEST
_dot = lambda a, b: jnp.matmul(a, b, precision=_HIGHEST)


def _jax_conv3x3(a, w, *, im2col: bool | None = None):
  """conv(a, w) exactly: on CPU XLA's float32 convolution (its kernels sum products directly;
  no Winograd or FFT transforms, which would round), per chunk of input channels; elsewhere
  (cuDNN may pick transforming algorithms) an explicit im2col and a float32 matmul at HIGHEST
  precision (no TF32 / bfloat16 passes). `im2col` forces the choice (tests)."""
  c = a.shape[-1]
  if im2col is None:
    im2col = jax.default_backend() != "cpu"
  if not im2col:
    conv = lambda x, y: jax.lax.conv_general_dilated(
        x, y, (1, 1), "SAME", dimension_numbers=_DN, precision=_HIGHEST)
    step = max(1, (_F32_EXACT - 1) // (9 * _TERM))
    out = 0
    for s in range(0, c, step):
      out = out + conv(a[..., s:s + step].astype(jnp.float32),
                       w[:, :, s:s + step].astype(jnp.float32)).astype(jnp.int32)
    return out
  return _exact_f32(_dot, _im2col(a), w.reshape(9 * c, -1), 9 * c)


JAX = Backend(
    jnp, jnp.int32,
    conv3x3=_jax_conv3x3,
    dense=lambda a, w: _exact_f32(_dot, a, w, a.shape[-1]),
    qk=lambda q, k: _exact_f32(_dot, q, jnp.swapaxes(k, -1, -2), q.shape[-1]),
    av=lambda e, v: _exact_f32(_dot, e, v, e.shape[-1]),
    mul_shift=_jax_mul_shift,
    bitlen=lambda x: 32 - jax.lax.clz(jnp.asarray(x, jnp.int32)))

NUMPY = Backend(
    np, np.int64, conv3x3=_np_conv3x3, dense=_np_matmul,
    qk=lambda q, k: _np_matmul(q, np.swapaxes(k, -1, -2)), av=_np_matmul,
    mul_shift=_np_mul_shift, bitlen=_np_bitlen)


# ----------------------------------------------------------------------------------------------
# Elementwise pieces.


def rshift_round(be: Backend, x, s):
  """round(x / 2^s) (halves up) for shifts s >= 0 (arrays broadcast)."""
  xp = be.xp
  s = xp.asarray(s, be.int_dtype)
  return (x + (xp.left_shift(xp.asarray(1, be.int_dtype), s) >> 1)) >> s


def to_int8(be: Backend, x):
  """Saturates to [-127, 127] and casts to int8 (the matmuls' input type)."""
  return be.xp.clip(x, -INT8_MAX, INT8_MAX).astype(be.xp.int8)


def signed_mul_shift(be: Backend, x, q: dict):
  """x * sign * m 2^-sh + b with per-channel q["m"], q["sh"], q["sign"] (+1 / -1), q["b"]."""
  return q["sign"] * be.mul_shift(x, q["m"], q["sh"]) + q["b"]


def activate(be: Backend, v, q: dict, luts: dict, swish: bool):
  """int8 input of a matmul from v (units 2^-V_FRAC): swish(v) from the table (v itself above
  its range, 0 below) or v, then per channel round(. 2^fa) with q["fa"] in [0, V_FRAC]."""
  xp = be.xp
  if swish:
    lim = SWISH_RANGE << SWISH_FRAC
    idx = rshift_round(be, v, V_FRAC - SWISH_FRAC)
    table = xp.take(luts["swish"], xp.clip(idx, -lim, lim) + lim)
    v = xp.where(idx > lim, v, xp.where(idx < -lim, 0, table))
  return to_int8(be, rshift_round(be, v, V_FRAC - q["fa"]))


def group_norm(be: Backend, x, groups: int):
  """c / sqrt(sum over the group of c^2 + 1) in units of 2^-Y_FRAC, c = x - mean, per example
  and group of channels: GroupNorm's normalised value divided by sqrt(n) (n = the group's size;
  `portable_quant` folds sqrt(n) into the scale). Exact integers for any int32 input x
  [N, H, W, C]: sums are taken after shifts chosen from each group's largest value so that they
  stay below 2^30; 1/sqrt comes from luts["rsqrt"] over an 11-bit mantissa."""
  xp, it = be.xp, be.int_dtype
  n_, h, w, c = x.shape
  xr = x.reshape(n_, h * w, groups, c // groups)
  n = h * w * (c // groups)
  log_n = int(np.ceil(np.log2(n))) if n > 1 else 0
  mx = lambda a: xp.max(xp.abs(a), axis=(1, 3), keepdims=True)
  k1 = xp.maximum(be.bitlen(mx(xr)) + log_n - 29, 0)
  s1 = xp.sum(xr >> k1, axis=(1, 3), keepdims=True)
  mean = xp.left_shift(xp.floor_divide(2 * s1 + n, 2 * n), k1)
  cen = xr - mean
  k2 = xp.maximum(be.bitlen(mx(cen)) - (30 - log_n) // 2, 0)
  cs = cen >> k2
  s2 = xp.sum(cs * cs, axis=(1, 3), keepdims=True) + 1
  e = be.bitlen(s2)
  s = e - 12 + ((e - 12) & 1)        # even, so that sqrt(2^s) = 2^(s / 2)
  mant = xp.where(s >= 0, s2 >> xp.maximum(s, 0), xp.left_shift(s2, xp.maximum(-s, 0)))
  r = xp.take(luts_rsqrt(be), mant - (1 << RSQRT_BITS))
  sh = (s >> 1) + k2 + 20 - Y_FRAC
  y = xp.where(sh >= 0, be.mul_shift(cen, r, xp.maximum(sh, 0)),
               xp.left_shift(cen * r, xp.maximum(-sh, 0)))
  return y.reshape(x.shape).astype(it)


_RSQRT: dict = {}


def luts_rsqrt(be: Backend):
  """min(2^15 - 1, round(2^20 / sqrt(m))) for m in [2^10, 2^12): a fixed table (integer square
  roots, identical everywhere), so that 1/sqrt(m 2^s) = r 2^(-20 - s/2)."""
  if be.xp not in _RSQRT:
    m = np.arange(1 << RSQRT_BITS, 4 << RSQRT_BITS, dtype=object)
    # round(2^20 / sqrt(m)) = round(sqrt(2^40 / m)) computed with integer square roots.
    vals = [min((1 << 15) - 1, _isqrt_round((1 << 40), int(v))) for v in m]
    _RSQRT[be.xp] = np.asarray(vals, np.int64)
  return be.xp.asarray(_RSQRT[be.xp], be.int_dtype)


def _isqrt_round(num: int, den: int) -> int:
  """round(sqrt(num / den)) in exact integer arithmetic."""
  import math   # pylint: disable=g-import-not-at-top
  # sqrt(num/den) rounded: the integer r with (r - 1/2)^2 <= num/den < (r + 1/2)^2.
  r = math.isqrt(num // den)
  while (2 * r + 1) ** 2 * den <= 4 * num:
    r += 1
  while r > 0 and (2 * r - 1) ** 2 * den > 4 * num:
    r -= 1
  return r


def requant(be: Backend, acc, q: dict):
  """Per output channel acc * q["m"] 2^-q["sh"] (the next tensor's units), acc first saturated
  at q["lim"] so that the result fits int32 whatever the input."""
  return be.mul_shift(be.xp.clip(acc, -q["lim"], q["lim"]), q["m"], q["sh"])


def linear_conv(be: Backend, a, q: dict, extra_bias=None):
  """A 3x3 convolution's int32 accumulator conv(a, w) + b (+ extra_bias [C_out])."""
  acc = be.conv3x3(a, q["w"]) + q["b"]
  return acc if extra_bias is None else acc + extra_bias


def norm_act(be: Backend, x, q: dict, luts: dict, *, groups: int, swish: bool):
  """GroupNorm, its per-channel affine (sqrt(n) folded in) and the activation: int8 [..., C]."""
  v = signed_mul_shift(be, group_norm(be, x, groups), q)
  return activate(be, v, q, luts, swish)


def saturate(be: Backend, x):
  return be.xp.clip(x, -RES_LIMIT, RES_LIMIT)


def resnet_block(be: Backend, x, cond_bias, q: dict, luts: dict, spec: dict):
  """`networks.ResnetBlock` on the residual stream x (units 2^-res_frac) [N, H, W, C_in] with
  the level's conditioning bias [C_out] (in conv1's accumulator units)."""
  g = lambda c: spec["groups"][str(c)]
  a = norm_act(be, x, q["norm1"], luts, groups=g(x.shape[-1]), swish=True)
  h = saturate(be, requant(be, linear_conv(be, a, q["conv1"], cond_bias), q["conv1"]))
  a = norm_act(be, h, q["norm2"], luts, groups=g(h.shape[-1]), swish=True)
  h = requant(be, linear_conv(be, a, q["conv2"]), q["conv2"])
  if "shortcut" in q:
    s = q["shortcut"]
    a = to_int8(be, rshift_round(be, x, spec["res_frac"] - s["fa"]))
    x = requant(be, be.dense(a, s["w"]) + s["b"], s)
  return saturate(be, x + h)


def attention_block(be: Backend, x, q: dict, luts: dict, spec: dict):
  """`networks.AttentionBlock`: softmax(q k^T / sqrt(C)) v with exp from luts["exp"] (units
  2^-exp_bits, at most 2^14 - 1, fed to the matmul as two int8 halves) and an exact rounded
  division by the row sum; the output is a convex combination of v, so it stays int8."""
  xp = be.xp
  n_, h, w, c = x.shape
  a = norm_act(be, x, q["norm"], luts, groups=spec["groups"][str(c)], swish=False)
  a = a.reshape(n_, h * w, c)
  qq, kk, vv = (to_int8(be, requant(be, be.dense(a, q[k]["w"]) + q[k]["b"], q[k]))
                for k in ("q", "k", "v"))
  logits = requant(be, be.qk(qq, kk), q["logits"])
  d = xp.minimum(xp.max(logits, axis=-1, keepdims=True) - logits, EXP_RANGE << LOGIT_FRAC)
  e = xp.take(luts["exp"], d)
  total = xp.sum(e, axis=-1, keepdims=True)
  num = (be.av((e >> 7).astype(xp.int8), vv) << 7) + be.av((e & 127).astype(xp.int8), vv)
  out = xp.sign(num) * xp.floor_divide(2 * xp.abs(num) + total, 2 * total)
  p = q["proj_out"]
  h2 = requant(be, be.dense(out.astype(xp.int8), p["w"]) + p["b"], p)
  return saturate(be, x + h2.reshape(x.shape))


def fourier_int8(be: Backend, z, exponents, luts: dict):
  """sin / cos(2 pi 2^n z) * 128 as int8 [..., 2 C len(exponents)] in the official order
  (`networks.fourier_features`) from z (units 2^-Z_FRAC): the phase of 2^n z is the integer
  z 2^(n + PHASE_BITS - Z_FRAC) modulo 2^PHASE_BITS (rounded where the shift is to the right)."""
  xp, mask = be.xp, (1 << PHASE_BITS) - 1
  idx = []
  for n in exponents:
    s = Z_FRAC - n - PHASE_BITS
    idx.append((rshift_round(be, z, s) if s > 0 else xp.left_shift(z, -s)) & mask)
  idx = xp.stack(idx, axis=-1).reshape(z.shape[:-1] + (-1,))
  sin = xp.take(luts["sin"], idx)
  cos = xp.take(luts["sin"], (idx + (1 << (PHASE_BITS - 2))) & mask)
  return to_int8(be, xp.concatenate([sin, cos], axis=-1))


def conv_in(be: Backend, q: dict, z, exponents, luts: dict):
  """The input convolution on [z, Fourier features] into the residual stream, as two layers:
  z with 15 bits (z 2^fa = hi 2^7 + lo, both int8: the network reads noise of a fraction of
  sigma_0 in z) and the int8 features, each with its own weight scales, summed after
  requantisation."""
  qz = q["conv_in_z"]
  z15 = be.xp.clip(rshift_round(be, z, Z_FRAC - qz["fa"]), -Z15_MAX, Z15_MAX)
  hi = (z15 + 64) >> 7
  lo = z15 - be.xp.left_shift(hi, 7)
  i8 = lambda a: a.astype(be.xp.int8)
  acc = be.conv3x3(i8(lo), qz["w"]) + be.xp.left_shift(be.conv3x3(i8(hi), qz["w"]), 7) + qz["b"]
  h = requant(be, acc, qz)
  if exponents:
    acc = be.conv3x3(fourier_int8(be, z, exponents, luts), q["conv_in_f"]["w"])
    h = h + requant(be, acc, q["conv_in_f"])
  return h


def block_names(spec: dict) -> list[str]:
  """The residual blocks in network order (the rows of the conditioning biases)."""
  n = spec["num_blocks"]
  return ([f"down_{i}" for i in range(n)] + ["mid_block1", "mid_block2"]
          + [f"up_{i}" for i in range(n + 1)])
