"""The integer ScoreUNet's forward pass and its per-level conditioning (`portable_net`'s layers).

  unet(backend, q, spec, z, cond_bias)   -> eps_hat in units of 2^-EPS_FRAC
  cond_biases(q, spec, gamma_fixed)      -> every residual block's conditioning bias per level

The forward pass runs stage by stage (input convolution, each residual or attention block, the
output), each stage compiled on its own for JAX. The conditioning (`networks.Conditioning`: the
time embedding of gamma and its two-layer MLP, then each block's projection) depends on the
level only, so it is computed once per level on the host, in integers (the NUMPY backend).
"""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np

from vdm_jax.compression.portable_net import (
    EPS_FRAC, INT8_MAX, JAX, NUMPY, PHASE_BITS, Z_FRAC, Backend, activate, attention_block,
    block_names, conv_in, linear_conv, norm_act, requant, resnet_block, rshift_round, saturate)
from vdm_jax.core import parallel


def _stages(be: Backend, spec_key: str) -> dict:
  """The forward pass's stages for one backend and spec; JAX compiles each one separately
  (`parallel.jit`): XLA would otherwise fuse the whole residual stream's integer arithmetic
  into every later consumer and recompute it there (measured: 10x the time)."""
  key = (id(be), spec_key)
  if key in _STAGE_CACHE:
    return _STAGE_CACHE[key]
  spec = json.loads(spec_key)
  groups = lambda x: spec["groups"][str(x.shape[-1])]

  def first(q, luts, z):
    return saturate(be, conv_in(be, q, z, spec["fourier_exponents"], luts))

  def block(q, luts, x, skip, cond_bias):
    if skip is not None:
      x = be.xp.concatenate([x, skip], axis=-1)
    return resnet_block(be, x, cond_bias, q, luts, spec)

  def attn(q, luts, x):
    return attention_block(be, x, q, luts, spec)

  def out(q_norm, q_conv, luts, h, z):
    a = norm_act(be, h, q_norm, luts, groups=groups(h), swish=True)
    nn_out = requant(be, linear_conv(be, a, q_conv), q_conv)
    return nn_out + rshift_round(be, z, Z_FRAC - EPS_FRAC)

  wrap = parallel.jit if be is JAX else (lambda f: f)
  stages = {"first": wrap(first), "block": wrap(block), "attn": wrap(attn), "out": wrap(out)}
  _STAGE_CACHE[key] = stages
  return stages


_STAGE_CACHE: dict = {}


def unet(be: Backend, q: dict, spec: dict, z, cond_bias):
  """eps_hat (units 2^-EPS_FRAC) [N, H, W, C] of the integer ScoreUNet at z (units 2^-Z_FRAC)
  [N, H, W, C] with the level's conditioning biases [num residual blocks, channels]
  (`cond_biases`). Same structure as `networks.ScoreUNet` (unrolled blocks)."""
  xp, luts = be.xp, q["luts"]
  st = _stages(be, json.dumps(spec, sort_keys=True))
  z = xp.asarray(z, be.int_dtype)
  cond_bias = xp.asarray(cond_bias, be.int_dtype)
  rows = {name: i for i, name in enumerate(block_names(spec))}
  block = lambda name, x, skip=None: st["block"](q[name], luts, x, skip, cond_bias[rows[name]])
  attn = lambda name, x: st["attn"](q[name], luts, x)
  h = st["first"]({k: q[k] for k in ("conv_in_z", "conv_in_f") if k in q}, luts, z)
  skips = [h]
  for i in range(spec["num_blocks"]):
    h = block(f"down_{i}", h)
    if spec["attention_everywhere"]:
      h = attn(f"down_{i}_attn", h)
    skips.append(h)
  h = block("mid_block2", attn("mid_attn", block("mid_block1", h)))
  for i in range(spec["num_blocks"] + 1):
    h = block(f"up_{i}", h, skips.pop())
    if spec["attention_everywhere"]:
      h = attn(f"up_{i}_attn", h)
  return st["out"](q["norm_out"], q["conv_out"], luts, h, z)


# ----------------------------------------------------------------------------------------------
# The conditioning, per level, on the host.


def time_embedding_int8(gamma_fixed: np.ndarray, q: dict, spec: dict) -> np.ndarray:
  """`networks.timestep_embedding` of t = (gamma - cond_gamma_min) / (cond_gamma_max -
  cond_gamma_min) as int8 (sin * 128) [L, channels], from gamma in units of 2^-GAMMA_FRAC
  (Python ints): t in units of 2^-24 (exact rational rounding), the phase of 1000 t w_k / (2 pi)
  as (t q["freq"][k]) mod 2^64 with the frequencies in units of 2^-40."""
  lo, hi = Fraction(spec["cond_gamma_min"]), Fraction(spec["cond_gamma_max"])
  sin_lut = np.asarray(q["luts"]["sin"], np.int64)
  dim, half, mask = spec["channels"], spec["channels"] // 2, (1 << PHASE_BITS) - 1
  out = np.zeros((len(gamma_fixed), dim), np.int64)
  for row, g in enumerate(gamma_fixed):
    t = (Fraction(int(g), 1 << spec["gamma_frac"]) - lo) / (hi - lo) * (1 << 24)
    u = round(t)
    for k in range(half):
      phase = (u * int(q["freq"][k])) % (1 << 64)
      idx = ((phase + (1 << (63 - PHASE_BITS))) >> (64 - PHASE_BITS)) & mask
      out[row, k] = sin_lut[idx]
      out[row, half + k] = sin_lut[(idx + (1 << (PHASE_BITS - 2))) & mask]
  return np.clip(out, -INT8_MAX, INT8_MAX).astype(np.int8)


def cond_biases(q: dict, spec: dict, gamma_fixed: np.ndarray) -> np.ndarray:
  """The bias each residual block adds after conv1 at each level: int64 [L, blocks, channels]
  in that conv1's accumulator units. The conditioning MLP (`networks.Conditioning`: dense0,
  swish, dense1, swish; the null label and a zero conditioning input are folded into dense0's
  bias) and the blocks' cond_proj, in integers (the NUMPY backend: exact and host-independent)."""
  be, c = NUMPY, q["cond"]
  a = time_embedding_int8(gamma_fixed, q, spec)
  for name in ("dense0", "dense1"):
    v = requant(be, be.dense(a, c[name]["w"]) + c[name]["b"], c[name])
    a = activate(be, v, c[name], q["luts"], swish=True)
  rows = [requant(be, be.dense(a, q[b]["cond_proj"]["w"]), q[b]["cond_proj"])
          for b in block_names(spec)]
  return np.stack(rows, axis=1)
