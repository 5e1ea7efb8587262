"""Post-training quantisation of a trained VDM into the integer model of `portable_net`.

  calibrate(vdm, params, images)   -> activation ranges of the float network (`Ranges`)
  quantize(vdm, params, ranges)    -> (spec, arrays): the integer model

Calibration runs the float ScoreUNet on training images at noise levels spread over t in [0, 1]
(z_t = alpha_t x + sigma_t eps) and records, per layer, the largest magnitude of what the
integer network will hold there: per channel for the int8 inputs of convolutions and dense
layers (each channel then gets its own power-of-two scale 2^-fa, folded into the next layer's
weights), per tensor for the residual stream and GroupNorm inputs (int32, largest value at
2^24). Quantisation then rounds every weight to int8 with one scale per output channel, every
bias to the accumulator's units, and every change of units to an integer multiplier in
[2^14, 2^15) and a shift; the lookup tables (swish, sin, exp) and the schedule's gamma at 1025
times are tabulated once, here, in float64, and stored: the decoder never recomputes them.

What it costs: int8 rounding of activations and weights, 2^-8 steps in the swish and exp tables,
the time embedding's phase in 2^-12 of a period; docs/results/portable_coder.md measures the bits.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.compression import portable_net as pn
from vdm_jax.nets import model as model_lib, networks

GAMMA_FRAC = 20           # gamma(t) tabulated in units of 2^-20
GAMMA_TABLE = 1024        # intervals of the gamma table on [0, 1]
ACT_TARGET = 1 << 24      # int32 tensors: their calibrated largest value lands near here
SPEC_VERSION = 1

Ranges = dict   # path -> float64 array of largest magnitudes (per channel, or a scalar)


# ----------------------------------------------------------------------------------------------
# Calibration.


def unrolled(vdm: model_lib.VDM, params: Any) -> tuple[model_lib.VDM, Any]:
  """The VDM with an unrolled ScoreUNet and its parameters (scanned blocks unstacked)."""
  net = vdm.score_net
  if not isinstance(net, networks.ScoreUNet):
    raise ValueError(f"the portable coder quantises the ScoreUNet; this run's network is "
                     f"{type(net).__name__}")
  if net.block_impl != "scan":
    return vdm, params
  sp = dict(params["score_net"])
  for stack, count in (("down", net.num_blocks), ("up", net.num_blocks + 1)):
    tree = sp.pop(stack)
    for i in range(count):
      sp[f"{stack}_{i}"] = jax.tree.map(lambda a, i=i: a[i], tree)
  return vdm.clone(score_net=net.clone(block_impl="unrolled")), dict(params, score_net=sp)


def _swish(v):
  return v / (1.0 + np.exp(-v))


class _Max:
  """Running elementwise maxima of named arrays."""

  def __init__(self):
    self.values: dict[str, np.ndarray] = {}

  def add(self, name: str, value, axes) -> None:
    m = np.max(np.abs(np.asarray(value, np.float64)), axis=axes)
    self.values[name] = np.maximum(self.values.get(name, m), m)


def _record(rec: _Max, acts: dict, net: networks.ScoreUNet, z: np.ndarray) -> None:
  """Largest magnitudes of one batch's captured intermediates (`flax` capture_intermediates)."""
  s = acts["score_net"]
  out = lambda *path: np.asarray(_get(s, path)["__call__"][0], np.float64)
  pix = (0, 1, 2)
  rec.add("z", z, pix)
  rec.add("cond/dense0", _swish(out("cond", "dense0")), 0)
  rec.add("cond/dense1", _swish(out("cond", "dense1")), 0)
  h = out("conv_in")
  rec.add("residual", h, None)
  skips = [h]

  def block(name, path, x_in):
    blk = _get(s, path)
    res = lambda k: np.asarray(blk[k]["__call__"][0], np.float64)
    rec.add(f"{name}/norm1", _swish(res("norm1")), pix)
    rec.add(f"{name}/norm2", _swish(res("norm2")), pix)
    rec.add(f"{name}/h", res("conv1") + res("cond_proj")[:, None, None, :], None)
    rec.add(f"{name}/shortcut", x_in, pix)
    y = np.asarray(blk["__call__"][0], np.float64)
    rec.add("residual", y, None)
    return y

  def attn(name, path):
    blk = _get(s, path)
    res = lambda k: np.asarray(blk[k]["__call__"][0], np.float64)
    rec.add(f"{name}/norm", res("norm"), pix)
    for k in ("q", "k", "v"):
      rec.add(f"{name}/{k}", res(k), None)
    y = np.asarray(blk["__call__"][0], np.float64)
    rec.add("residual", y, None)
    return y

  for i in range(net.num_blocks):
    h = block(f"down_{i}", (f"down_{i}", "ResnetBlock_0"), h)
    if net.attention_everywhere:
      h = attn(f"down_{i}_attn", (f"down_{i}", "AttentionBlock_0"))
    skips.append(h)
  h = block("mid_block1", ("mid_block1",), h)
  h = attn("mid_attn", ("mid_attn",))
  h = block("mid_block2", ("mid_block2",), h)
  for i in range(net.num_blocks + 1):
    h = block(f"up_{i}", (f"up_{i}", "ResnetBlock_0"), np.concatenate([h, skips.pop()], -1))
    if net.attention_everywhere:
      h = attn(f"up_{i}_attn", (f"up_{i}", "AttentionBlock_0"))
  rec.add("norm_out", _swish(out("norm_out")), pix)


def _get(tree: dict, path) -> dict:
  for key in path:
    tree = tree[key]
  return tree


def calibrate(vdm: model_lib.VDM, params: Any, images: np.ndarray, *, levels: int = 8,
              batch: int = 256, seed: int = 0) -> Ranges:
  """Largest magnitudes of the float network's activations on integer `images` [N, H, W, C]
  at `levels` noise levels per image (t stratified over [0, 1], Gaussian noise of `seed`)."""
  vdm, params = unrolled(vdm, params)
  variables = {"params": params}

  @jax.jit
  def run(x, t, eps):
    gamma = vdm.apply(variables, t, method=model_lib.VDM.gamma)
    g = gamma[:, None, None, None]
    z = jnp.sqrt(jax.nn.sigmoid(-g)) * x + jnp.sqrt(jax.nn.sigmoid(g)) * eps
    label = (jnp.full((x.shape[0],), vdm.score_net.num_classes, jnp.int32)
             if vdm.score_net.num_classes else None)
    _, acts = vdm.apply(variables, z, gamma, label, method=model_lib.VDM.eps,
                        capture_intermediates=True, mutable=["intermediates"])
    return z, acts["intermediates"]

  rec, rng = _Max(), np.random.default_rng(seed)
  k = vdm.vocab_size
  x_all = (2.0 * (np.asarray(images, np.float64) + 0.5) / k - 1.0).astype(np.float32)
  x_all = np.repeat(x_all, levels, axis=0)
  t_all = ((np.arange(len(x_all)) % levels + rng.random(len(x_all))) / levels).astype(np.float32)
  for start in range(0, len(x_all), batch):
    x, t = x_all[start:start + batch], t_all[start:start + batch]
    eps = rng.standard_normal(x.shape).astype(np.float32)
    z, acts = run(x, t, eps)
    _record(rec, jax.device_get(acts), vdm.score_net, np.asarray(z))
  return rec.values


# ----------------------------------------------------------------------------------------------
# Quantisation.


def _fa(largest, limit: int = pn.V_FRAC) -> np.ndarray:
  """Power-of-two int8 scales 2^-fa with largest * 2^fa <= 127 (fa in [0, limit])."""
  m = np.asarray(largest, np.float64)
  with np.errstate(divide="ignore"):
    fa = np.floor(np.log2(pn.INT8_MAX / np.maximum(m, 1e-30)))
  return np.clip(fa, 0, limit).astype(np.int32)


def _frac(largest: float, hi: int = 28) -> int:
  """Units 2^-f of an int32 tensor whose largest calibrated value is `largest` (near 2^24)."""
  return int(np.clip(math.floor(math.log2(ACT_TARGET / max(float(largest), 1e-30))), 0, hi))


def _multiplier(ratio) -> dict:
  """ratio (> 0, per channel) as m 2^-sh with m in [2^14, 2^15), and lim = the largest input
  whose product stays below 2^30 (`portable_net.requant`)."""
  ratio = np.asarray(ratio, np.float64)
  f, e = np.frexp(ratio)
  m = np.rint(f * 2.0**15).astype(np.int64)
  e = np.where(m == 1 << 15, e + 1, e)
  m = np.where(m == 1 << 15, 1 << 14, m)
  sh = 15 - e
  if np.any((ratio > 0) & (sh < 0)):
    raise ValueError(f"a change of units by {ratio.max():.3g} is too large for the integer "
                     f"network (at most 2^15)")
  tiny = (ratio <= 0) | (sh > 46)
  m, sh = np.where(tiny, 0, m), np.where(tiny, 0, sh)
  with np.errstate(divide="ignore"):
    lim = np.where(m > 0, np.floor(2.0**30 * 2.0**sh / np.maximum(m, 1)), 2.0**31 - 1)
  lim = np.minimum(lim, 2.0**31 - 1)
  i32 = lambda a: np.asarray(a, np.int64).astype(np.int32)
  return {"m": i32(m), "sh": i32(sh), "lim": i32(lim)}


def _linear(kernel, bias, in_scale, out_unit) -> dict:
  """An int8 layer: w int8 (kernel [..., I, O] times the input scales [I], one scale s_o per
  output channel), b = round(bias / s_o), and the multiplier from s_o to `out_unit` (per O)."""
  w = np.asarray(kernel, np.float64) * np.asarray(in_scale, np.float64)[:, None]
  s_o = np.max(np.abs(w.reshape(-1, w.shape[-1])), axis=0) / pn.INT8_MAX
  s_o = np.where(s_o > 0, s_o, 1.0)
  wq = np.clip(np.rint(w / s_o), -pn.INT8_MAX, pn.INT8_MAX).astype(np.int8)
  b = np.zeros(w.shape[-1]) if bias is None else np.asarray(bias, np.float64)
  bq = np.clip(np.rint(b / s_o), -2.0**30, 2.0**30).astype(np.int32)
  return {"w": wq, "b": bq, "scale": s_o, **_multiplier(s_o / np.asarray(out_unit, np.float64))}


def _norm(p: dict, group_size: int, fa) -> dict:
  """GroupNorm's affine on `portable_net.group_norm`'s output (units 2^-Y_FRAC, the normalised
  value / sqrt(n)) into units 2^-V_FRAC, and the activation scales fa of its consumer."""
  g = np.asarray(p["scale"], np.float64)
  q = _multiplier(np.abs(g) * math.sqrt(group_size) * 2.0**(pn.V_FRAC - pn.Y_FRAC))
  del q["lim"]    # |input| <= 2^20: no saturation needed
  q["sign"] = np.where(g < 0, -1, 1).astype(np.int32)
  q["b"] = np.rint(np.asarray(p["bias"], np.float64) * 2.0**pn.V_FRAC).astype(np.int32)
  q["fa"] = np.asarray(fa, np.int32)
  return q


def luts(exp_bits: int) -> dict:
  """The lookup tables (int32): swish(i 2^-8) 2^14 for -2^11 <= i <= 2^11, sin(2 pi i / 2^12) 128,
  exp(-i 2^-8) (2^exp_bits - 1) for 0 <= i <= 24 2^8 (attention), and the same exp times 2^24
  (the discrete decoder's probabilities, `portable.PortableChain.probs`)."""
  lim = pn.SWISH_RANGE << pn.SWISH_FRAC
  v = np.arange(-lim, lim + 1) / 2.0**pn.SWISH_FRAC
  top = (1 << exp_bits) - 1
  d = np.arange((pn.EXP_RANGE << pn.LOGIT_FRAC) + 1) / 2.0**pn.LOGIT_FRAC
  return {"swish": np.rint(_swish(v) * 2.0**pn.V_FRAC).astype(np.int32),
          "sin": np.clip(np.rint(128.0 * np.sin(2 * np.pi * np.arange(1 << pn.PHASE_BITS)
                                                / (1 << pn.PHASE_BITS))), -127, 127
                         ).astype(np.int32),
          "exp": np.minimum(np.rint(np.exp(-d) * (top + 1)), top).astype(np.int32),
          "exp24": np.rint(np.exp(-d) * 2.0**24).astype(np.int32)}


def _resnet(p: dict, name: str, ranges: Ranges, *, res_frac: int, cond_fa, group_size) -> dict:
  cin, cout = p["conv1"]["kernel"].shape[2], p["conv1"]["kernel"].shape[3]
  fa1, fa2 = _fa(ranges[f"{name}/norm1"]), _fa(ranges[f"{name}/norm2"])
  h_unit = 2.0**-_frac(ranges[f"{name}/h"])
  blk = {"norm1": _norm(p["norm1"], group_size(cin), fa1),
         "conv1": _linear(p["conv1"]["kernel"], p["conv1"]["bias"], 2.0**-fa1, h_unit),
         "norm2": _norm(p["norm2"], group_size(cout), fa2),
         "conv2": _linear(p["conv2"]["kernel"], p["conv2"]["bias"], 2.0**-fa2, 2.0**-res_frac)}
  blk["cond_proj"] = _linear(p["cond_proj"]["kernel"], None, 2.0**-cond_fa,
                             blk["conv1"]["scale"])
  if "shortcut" in p:
    fa = np.minimum(_fa(ranges[f"{name}/shortcut"]), res_frac).astype(np.int32)
    blk["shortcut"] = dict(_linear(p["shortcut"]["kernel"], p["shortcut"]["bias"], 2.0**-fa,
                                   2.0**-res_frac), fa=fa)
  return blk


def _attention(p: dict, name: str, ranges: Ranges, *, res_frac: int, group_size: int) -> dict:
  c = p["q"]["kernel"].shape[0]
  fa = _fa(ranges[f"{name}/norm"])
  blk = {"norm": _norm(p["norm"], group_size, fa)}
  fr = {}
  for k in ("q", "k", "v"):
    fr[k] = int(_fa(ranges[f"{name}/{k}"], limit=20))
    blk[k] = _linear(p[k]["kernel"], p[k]["bias"], 2.0**-fa, 2.0**-fr[k])
  blk["logits"] = _multiplier(2.0**(pn.LOGIT_FRAC - fr["q"] - fr["k"]) / math.sqrt(c))
  blk["proj_out"] = _linear(p["proj_out"]["kernel"], p["proj_out"]["bias"],
                            np.full(c, 2.0**-fr["v"]), 2.0**-res_frac)
  return blk


def _cond(net: networks.ScoreUNet, p: dict, ranges: Ranges) -> dict:
  """The conditioning MLP on the int8 time embedding (sin * 128); the null label's embedding
  and the zero conditioning input become part of dense0's bias."""
  c = net.channels
  w0, b0 = np.asarray(p["dense0"]["kernel"], np.float64), np.asarray(p["dense0"]["bias"])
  if net.num_classes:
    null = np.asarray(p["label_embed"]["embedding"], np.float64)[net.num_classes]
    b0 = b0 + null @ w0[c:2 * c]
  fa0, fa1 = _fa(ranges["cond/dense0"]), _fa(ranges["cond/dense1"])
  return {"dense0": dict(_linear(w0[:c], b0, np.full(c, 2.0**-7), 2.0**-pn.V_FRAC), fa=fa0),
          "dense1": dict(_linear(p["dense1"]["kernel"], p["dense1"]["bias"], 2.0**-fa0,
                                 2.0**-pn.V_FRAC), fa=fa1)}


def gamma_table(gamma_fn, *, size: int = GAMMA_TABLE) -> np.ndarray:
  """round(gamma(k / size) 2^GAMMA_FRAC) for k = 0..size (int64), made strictly increasing."""
  g = np.asarray(jax.jit(gamma_fn)(jnp.arange(size + 1, dtype=jnp.float32) / size), np.float64)
  if not np.all(np.isfinite(g)):
    raise ValueError("the schedule gamma(t) is not finite on [0, 1]")
  return _increasing(np.rint(g * 2.0**GAMMA_FRAC).astype(np.int64))


def _increasing(table: np.ndarray) -> np.ndarray:
  out = table.copy()
  for k in range(1, len(out)):
    out[k] = max(out[k], out[k - 1] + 1)
  return out


def quantize(vdm: model_lib.VDM, params: Any, ranges: Ranges, *,
             shape: tuple[int, int, int]) -> tuple[dict, dict]:
  """(spec, arrays) of the integer model of a VDM (`portable_unet.unet`, `cond_biases`).

  spec: the architecture and units (JSON); arrays: nested dict of int8 / int32 / int64 arrays.
  """
  vdm, params = unrolled(vdm, params)
  net, sp = vdm.score_net, params["score_net"]
  h, w, _ = shape
  widths = (net.channels, 2 * net.channels)
  groups = {str(c): networks.group_count(c, net.norm_groups) for c in widths}
  group_size = lambda c: h * w * c // groups[str(c)]
  res_frac = _frac(ranges["residual"])
  c_in = shape[-1]
  kernel = np.asarray(sp["conv_in"]["kernel"])
  fa_z = _fa(np.asarray(ranges["z"]) * (pn.INT8_MAX / pn.Z15_MAX), limit=pn.Z_FRAC)
  q = {"conv_in_z": dict(_linear(kernel[:, :, :c_in], sp["conv_in"]["bias"], 2.0**-fa_z,
                                 2.0**-res_frac), fa=fa_z)}
  if net.fourier_exponents:
    q["conv_in_f"] = _linear(kernel[:, :, c_in:], None, np.full(kernel.shape[2] - c_in, 2.0**-7),
                             2.0**-res_frac)
  q["cond"] = _cond(net, sp["cond"], ranges)
  kw = dict(res_frac=res_frac, cond_fa=q["cond"]["dense1"]["fa"], group_size=group_size)
  for name in pn.block_names({"num_blocks": net.num_blocks}):
    path = (name,) if name.startswith("mid") else (name, "ResnetBlock_0")
    q[name] = _resnet(_get(sp, path), name, ranges, **kw)
  attn = ["mid_attn"] + ([f"{s}_{i}_attn" for s, n in (("down", net.num_blocks),
                                                       ("up", net.num_blocks + 1))
                          for i in range(n)] if net.attention_everywhere else [])
  for name in attn:
    path = (name,) if name == "mid_attn" else (name[:-5], "AttentionBlock_0")
    q[name] = _attention(_get(sp, path), name, ranges, res_frac=res_frac,
                         group_size=group_size(net.channels))
  fa_o = _fa(ranges["norm_out"])
  q["norm_out"] = _norm(sp["norm_out"], group_size(net.channels), fa_o)
  q["conv_out"] = _linear(sp["conv_out"]["kernel"], sp["conv_out"]["bias"], 2.0**-fa_o,
                          2.0**-pn.EPS_FRAC)
  exp_bits = min(14, 22 - math.ceil(math.log2(h * w)))
  q["luts"] = luts(exp_bits)
  half = net.channels // 2
  freqs = np.exp(-math.log(10000.0) / max(half - 1, 1) * np.arange(half))
  q["freq"] = np.rint(1000.0 * freqs / (2 * math.pi) * 2.0**40).astype(np.int64)
  q["gamma"] = gamma_table(lambda t: vdm.apply({"params": params}, t,
                                               method=model_lib.VDM.gamma))
  q = _drop_scales(q)
  spec = {"version": SPEC_VERSION, "shape": list(shape), "vocab_size": int(vdm.vocab_size),
          "channels": net.channels, "num_blocks": net.num_blocks,
          "fourier_exponents": [int(n) for n in net.fourier_exponents],
          "attention_everywhere": bool(net.attention_everywhere), "groups": groups,
          "res_frac": res_frac, "exp_bits": exp_bits, "gamma_frac": GAMMA_FRAC,
          "cond_gamma_min": float(vdm.cond_gamma_min),
          "cond_gamma_max": float(vdm.cond_gamma_max)}
  return spec, q


def _drop_scales(tree):
  if isinstance(tree, dict):
    return {k: _drop_scales(v) for k, v in tree.items() if k != "scale"}
  return tree
