"""Lossless compression with a VDM: bits-back coding with ANS over the T-step chain (Bit-Swap).

The T-step VDM is a hierarchical latent-variable model x -> z_0 -> z_{1/T} -> ... -> z_1 with the
fixed encoder q and the generative model p (VDM eq. 23-24; survey eq. 84). With bits-back coding
(Townsend et al. 2019, BB-ANS) in the Bit-Swap order (Kingma, Abbeel & Ho 2019), one batch of
images is coded on an ANS stack (`constriction.stream.stack.AnsCoder`) as::

  decode z_0 ~ q(z_0 | x);  encode x with the discrete decoder p(x | z_0);
  for i = 1..T:  decode z_i ~ q(z_i | z_{i-1});  encode z_{i-1} with p(z_{i-1} | z_i);
  encode z_1 with N(0, I),

and decoded by the exact inverse, in reverse order. The net code length of an image is::

  -log p(x|z_0) + log q(z_0|x) + sum_i [log q(z_i|z_{i-1}) - log p(z_{i-1}|z_i)] - log p(z_1),

a one-sample estimate of the T-step negative ELBO in its "consistency" form
(`elbo.consistency_terms`): the file size is the bound, plus the coder's overheads.

Latents live on a grid per level: z_i = j * delta_i with an integer j and delta_i the largest power
of two <= s_i / 2^grid_bits, where s_i is the smaller standard deviation of the two Gaussians that
code z_i (q(z_i | z_{i-1}) and p(z_i | z_{i+1})): 16-32 grid points per standard deviation with the
default grid_bits = 4, at every noise level and every T. Not one absolute grid (such as 2^-16):
constriction's models have 24-bit probabilities with at least one unit per symbol, and N(0, 1) on
a 2^-16 grid over +-6 standard deviations is 786,000 symbols whose least masses alone take 4.7%
of the probability. With a grid relative to each level a window (+- `window` standard deviations)
holds a few hundred symbols. Measured on the digits test split at T = 1000 (compress_stream.Tally):
the grid (bin masses instead of densities) -0.0003 bits per dimension, the 24-bit models +0.0014
(+0.006 with grid_bits = 6, +0.04 with 8, on 48 images: the least masses grow with the window).

Encoding with p uses per-symbol escapes (a value outside p's window is sent raw), so a bad model
costs bits but stays exact; means are clipped to [-16, 16] (latents `|z| < 32` always).

Bits-back pops each step's latents from the bits the previous step just pushed; where p misfits,
those bits are not uniform, and popped as they are they widen the latents' noise and cost rate
(+8% at T = 20 on a briefly trained digits model). Between a push and the next pop the top of the
stack is XORed with a keyed pseudo-random stream (`Stack.scramble`): a bijection that costs no
bits, after which the popped bits are uniform and the realised rate is the bound's.

Exactness needs encoder and decoder to compute bit-identical model outputs: both call the same
compiled step on the same float32 inputs (the grid latents) with the same batch composition (the
same schedule, padded to the same power-of-two buckets). Another machine, backend or XLA version
may round the network's last bits differently and decode garbage; the file header holds a digest
of the network's outputs on a fixed probe (`compress_format`), so such a mismatch is an error.
`portable.PortableChain` is this chain with an integer network and exactly computed levels:
its files decode on any machine.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import constriction
import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.core import checks, parallel
from vdm_jax.maths import diffusion, elbo
from vdm_jax.maths.diffusion import EpsFn
from vdm_jax.maths.schedules import GammaFn, alpha_sigma

MEAN_CLIP = 16.0        # |mean| of every coding Gaussian is clipped here: latents stay < 32
LATENT_BITS_ABOVE_ONE = 5   # |z| < 2^5: the range of a raw (escaped) latent
PRECISION_BITS = 24     # constriction's Python models: probabilities in units of 2^-24
SCRAMBLE_KEY = 0x5C4A_B1E


class CoderSettings(NamedTuple):
  """Settings that encoder and decoder must share (all stored in the file header).

  Attributes:
    num_steps: T, the number of steps of the coded chain (any T >= 1).
    grid_bits: B; each level's grid is 2^-B times its smallest standard deviation or finer.
    window: k; the quantized Gaussians cover mean +- k standard deviations (1..8).
    max_batch: the largest batch of images coded together (one network call per step).
  """

  num_steps: int
  grid_bits: int = 4
  window: int = 6
  max_batch: int = 256


def check_settings(settings: CoderSettings) -> CoderSettings:
  """The settings, validated (ValueError naming the field otherwise)."""
  checks.check_number("num_steps", settings.num_steps, integer=True, low=1, high=2**20)
  checks.check_number("grid_bits", settings.grid_bits, integer=True, low=0, high=16)
  checks.check_number("window", settings.window, integer=True, low=1, high=8)
  checks.check_number("max_batch", settings.max_batch, integer=True, low=1, high=2**16)
  return settings


def bucket(size: int) -> int:
  """The batch a batch of `size` images is padded to: the next power of two (encoder and
  decoder pad alike, so both run the same compiled program on the same inputs)."""
  return 1 << (size - 1).bit_length()


class ChainModel(NamedTuple):
  """A model as the coder sees it (build with `chain_model`).

  Attributes:
    table: () -> dict of float32 [T+1] arrays over the levels t_i = i / T: "gamma", "alpha",
      "sigma", "q_coef" / "q_var" (q(z_i | z_{i-1}) = N(q_coef z_{i-1}, q_var), i >= 1) and
      "p_var" (the variance of p(z_{i-1} | z_i), i >= 1).
    step: (z_t [B, ...] float32, gamma_s, gamma_t) -> (mean of p(z_s | z_t), x_hat), each
      [B, ...].
    probs: (z_0 [B, ...], gamma_0) -> p(k | z_0) [B, ..., K] (the discrete decoder).
    shape: the shape of one image (H, W, C).
    vocab_size: K.
  """

  table: Callable[[], dict]
  step: Callable
  probs: Callable
  shape: tuple[int, ...]
  vocab_size: int


@functools.lru_cache(maxsize=16)
def _network(eps_fn: EpsFn, vocab_size: int) -> tuple[Callable, Callable]:
  """The compiled step and decoder of a network, shared by every T (gamma_s, gamma_t are
  arguments): compiled once per batch bucket."""

  def step(z_t, gamma_s, gamma_t):
    g_t = jnp.full((z_t.shape[0],), gamma_t, jnp.float32)
    x_hat = diffusion.x_from_eps(z_t, diffusion.predict_eps(eps_fn, z_t, g_t), gamma=g_t)
    mean, _ = diffusion.posterior(z_t, x_hat, gamma_s=gamma_s, gamma_t=g_t)
    return mean, x_hat

  def probs(z_0, gamma_0):
    return jax.nn.softmax(elbo.decoder_logits(z_0, gamma_0=gamma_0, vocab_size=vocab_size), -1)

  return parallel.jit(step), parallel.jit(probs)


def chain_model(eps_fn: EpsFn, gamma_fn: GammaFn, *, shape: tuple[int, ...], vocab_size: int,
                num_steps: int) -> ChainModel:
  """The compiled functions of the T-step chain of a VDM (eps_fn, gamma_fn as in `elbo`).

  p(z_s | z_t) = q(z_s | z_t, x = x_hat), x_hat = (z_t - sigma_t eps_hat) / alpha_t (VDM eq.
  23-24): `diffusion.posterior`, `diffusion.x_from_eps`; p(k | z_0): `elbo.decoder_logits`.
  """
  steps = checks.check_number("num_steps", num_steps, integer=True, low=1)

  def table():
    gamma = gamma_fn(jnp.arange(steps + 1, dtype=jnp.float32) / steps)
    alpha, sigma = alpha_sigma(gamma)
    q_coef, q_var = diffusion.transition(gamma_s=gamma[:-1], gamma_t=gamma[1:])
    zeros = jnp.zeros((steps,), jnp.float32)
    _, p_var = diffusion.posterior(zeros, zeros, gamma_s=gamma[:-1], gamma_t=gamma[1:])
    pad = lambda a: jnp.concatenate([jnp.full((1,), jnp.nan, jnp.float32), a])
    return {"gamma": gamma, "alpha": alpha, "sigma": sigma, "q_coef": pad(q_coef),
            "q_var": pad(q_var), "p_var": pad(jnp.broadcast_to(p_var, (steps,)))}

  step, probs = _network(eps_fn, vocab_size)
  return ChainModel(parallel.jit(table), step, probs, tuple(shape), vocab_size)


class Grid(NamedTuple):
  """How one level's Gaussians are coded: their std, the grid spacing delta (a power of two) and
  the window radius in grid points."""

  std: float
  delta: float
  radius: int


class Levels(NamedTuple):
  """Per-level constants in float64 (from the model's float32 table), index i = 0..T.

  q_mean_coef[i], q_std[i]: q(z_0 | x) = N(alpha_0 x, sigma_0^2) at i = 0, q(z_i | z_{i-1}) above;
  p_std[i]: the std of the Gaussian that encodes z_i (p(z_i | z_{i+1}); 1 for the prior at T);
  delta[i]: the grid of z_i; q_radius[i], p_radius[i]: windows in grid units.
  """

  gamma: np.ndarray
  q_mean_coef: np.ndarray
  q_std: np.ndarray
  p_std: np.ndarray
  delta: np.ndarray
  q_radius: np.ndarray
  p_radius: np.ndarray

  def q(self, i: int) -> Grid:
    """The grid of z_i as q(z_i | z_{i-1}) (q(z_0 | x) at i = 0) codes it."""
    return Grid(self.q_std[i], self.delta[i], int(self.q_radius[i]))

  def p(self, i: int) -> Grid:
    """The grid of z_i as p(z_i | z_{i+1}) (N(0, I) at i = T) codes it."""
    return Grid(self.p_std[i], self.delta[i], int(self.p_radius[i]))


def levels(model: ChainModel, settings: CoderSettings) -> Levels:
  """Grids and windows of every level (ValueError if T is too large for float32 here)."""
  tab = {k: np.asarray(v, np.float64) for k, v in jax.device_get(model.table()).items()}
  q_std = np.sqrt(np.concatenate([tab["sigma"][:1] ** 2, tab["q_var"][1:]]))
  p_std = np.concatenate([np.sqrt(tab["p_var"][1:]), [1.0]])
  coef = np.concatenate([tab["alpha"][:1], tab["q_coef"][1:]])
  return grid_levels(tab["gamma"].astype(np.float32), coef, q_std, p_std, settings,
                     where="in float32")


def grid_levels(gamma: np.ndarray, coef: np.ndarray, q_std: np.ndarray, p_std: np.ndarray,
                settings: CoderSettings, *, where: str) -> Levels:
  """`Levels` from the per-level coefficients and standard deviations (float64 [T+1], the
  `Levels` conventions): grids 2^-B below the smaller std, windows of `settings.window` stds.
  Only exact float64 operations (frexp, ldexp, multiplication, ceil): the same on every
  machine for the same inputs."""
  if not (np.all(np.isfinite(q_std)) and np.all(q_std > 0) and np.all(p_std > 0)):
    raise ValueError(f"num_steps={settings.num_steps}: some step of this schedule has a zero or "
                     f"non-finite variance {where}; use fewer steps")
  _, exponent = np.frexp(np.minimum(q_std, p_std))      # 2^(e-1) <= s < 2^e, exactly
  delta = np.ldexp(1.0, exponent - 1 - settings.grid_bits)
  q_radius = np.ceil(settings.window * q_std / delta).astype(np.int64)
  p_radius = np.ceil(settings.window * p_std / delta).astype(np.int64)
  if max(q_radius.max(), p_radius.max()) >= 2**(PRECISION_BITS - 2):
    raise ValueError(f"grid_bits={settings.grid_bits} makes a window of "
                     f"{max(q_radius.max(), p_radius.max())} grid points, too many for 24-bit "
                     f"coding; lower grid_bits")
  return Levels(gamma, coef, q_std, p_std, delta, q_radius, p_radius)


# ----------------------------------------------------------------------------------------------
# Quantized Gaussians on a grid, with per-symbol escapes for the model p.

_MODELS: dict[int, object] = {}


def _window_model(radius: int):
  if radius not in _MODELS:
    _MODELS[radius] = constriction.stream.model.QuantizedGaussian(-int(radius), int(radius))
  return _MODELS[radius]


def grid_params(mean: np.ndarray, g: Grid):
  """Centre c (int64 grid index nearest the clipped mean), residual mean and std in grid units."""
  u = np.clip(np.nan_to_num(mean, nan=0.0), -MEAN_CLIP, MEAN_CLIP) / g.delta
  c = np.rint(u)
  return c.astype(np.int64), u - c, np.full(u.shape, g.std / g.delta)


def raw_chunks(delta: float) -> list[int]:
  """Bit widths of the chunks of a raw latent index j + 2^(L-1) in [0, 2^L), `|z| < 32`."""
  total = LATENT_BITS_ABOVE_ONE + 1 - int(np.frexp(delta)[1] - 1)
  return [min(16, total - s) for s in range(0, total, 16)]


def decode_q(stack: "Stack", mean: np.ndarray, g: Grid) -> np.ndarray:
  """Pops grid indices j [n] ~ N(mean [n], g.std^2) on the grid g.delta, within +- g.radius."""
  c, r, s = grid_params(mean, g)
  return c + stack.decode(_window_model(g.radius), r, s)


def encode_q(stack: "Stack", j: np.ndarray, mean: np.ndarray, g: Grid) -> None:
  """Pushes grid indices j (inverse of `decode_q`; `|j - centre| <= radius` by construction)."""
  c, r, s = grid_params(mean, g)
  stack.encode_reverse((j - c).astype(np.int32), _window_model(g.radius), r, s)


def encode_p(stack: "Stack", j: np.ndarray, mean: np.ndarray, g: Grid) -> np.ndarray:
  """Pushes grid indices j [n] under N(mean, g.std^2); values beyond the window are escaped (the
  window's end symbol, then the raw index). Returns the mask [n] of escaped symbols."""
  c, r, s = grid_params(mean, g)
  off = j - c
  esc = np.abs(off) > g.radius
  if esc.any():
    widths = raw_chunks(g.delta)
    raw = j[esc] + (1 << (sum(widths) - 1))
    starts = np.cumsum([0] + widths[:-1])
    for width, start in reversed(list(zip(widths, starts))):   # popped low chunk first
      stack.encode_reverse(((raw >> start) & ((1 << width) - 1)).astype(np.int32),
                           constriction.stream.model.Uniform(1 << width))
  sym = np.where(esc, np.sign(off) * (g.radius + 1), off).astype(np.int32)
  stack.encode_reverse(sym, _window_model(g.radius + 1), r, s)
  return esc


def decode_p(stack: "Stack", mean: np.ndarray, g: Grid) -> np.ndarray:
  """Pops grid indices pushed by `encode_p` with the same mean and grid."""
  c, r, s = grid_params(mean, g)
  sym = stack.decode(_window_model(g.radius + 1), r, s).astype(np.int64)
  j = c + sym
  esc = np.abs(sym) > g.radius
  if esc.any():
    widths = raw_chunks(g.delta)
    raw = np.zeros(int(esc.sum()), np.int64)
    for width, start in zip(widths, np.cumsum([0] + widths[:-1])):
      raw |= stack.decode(constriction.stream.model.Uniform(1 << width),
                          int(esc.sum())).astype(np.int64) << int(start)
    j[esc] = raw - (1 << (sum(widths) - 1))
  return j


# ----------------------------------------------------------------------------------------------
# The chain of one batch.


class Stack:
  """An `AnsCoder` that records the lowest size (bits) it reached while decoding."""

  def __init__(self, words: np.ndarray):
    self.coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, np.uint32))
    self.low = self.coder.num_valid_bits()

  def decode(self, *args):
    out = self.coder.decode(*args)
    self.low = min(self.low, self.coder.num_valid_bits())
    return out

  def encode_reverse(self, *args) -> None:
    self.coder.encode_reverse(*args)

  def bits(self) -> int:
    return self.coder.num_valid_bits()

  def restore(self, words: np.ndarray) -> None:
    """Back to the stack `words` (from `coder.get_compressed()`)."""
    self.coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, np.uint32))

  def scramble(self, key: list[int], num_words: int) -> None:
    """XORs the `num_words` words below the coder's 64-bit head (the top two words) with a
    pseudo-random key stream (`key`): a bijection on the stack that is its own inverse.

    Bits-back pops the next latents from what was just pushed, whose leading bits are not
    uniform where the model p misfits (each symbol's cumulative probability under p); popped as
    they are, they widen the latents' noise (measured: variance 1.13 instead of 1 at the first
    steps of a briefly trained digits model, +8% file size at T = 20). Scrambled, they are
    uniform. The head is left alone: changing its value changes how many bits the state holds
    (measured: +0.027 bits per dimension at T = 1000), and only the first symbol or two of a
    step are popped from it."""
    words = self.coder.get_compressed()
    n = min(int(num_words), len(words) - 2)
    if n > 0:
      stream = np.random.PCG64(key).random_raw((n + 1) // 2).astype("<u8").view("<u4")
      words[-2 - n:-2] ^= stream[:n].astype(np.uint32)
      self.coder = constriction.stream.stack.AnsCoder(words)


CATEGORICAL = constriction.stream.model.Categorical(perfect=False)


class Chain:
  """Codes batches of integer images [b, H, W, C] on a `Stack` (encode: `encode`, the exact
  inverse: `decode`). One compiled network call per step for the whole batch, padded to a
  power-of-two bucket with zero rows so encoder and decoder see the same inputs."""

  def __init__(self, model: ChainModel, settings: CoderSettings):
    self.model, self.settings = model, check_settings(settings)
    self.lv = levels(model, self.settings)
    self.dims = int(np.prod(model.shape))
    # x = 2 (k + 1/2) / K - 1 for the K values (`elbo.encode`), looked up per pixel.
    self.bin_centres = np.asarray(elbo.encode(np.arange(model.vocab_size),
                                              vocab_size=model.vocab_size), np.float64)

  def _padded(self, j: np.ndarray, i: int, b: int) -> np.ndarray:
    z = np.zeros((bucket(b),) + self.model.shape, np.float32)
    z[:b] = (j * self.lv.delta[i]).astype(np.float32).reshape((b,) + self.model.shape)
    return z

  def network(self, j: np.ndarray, i: int, b: int):
    """p(z_{i-1} | z_i)'s mean [b * D] (float64) and x_hat [bucket, H, W, C] (a device array,
    rows past b are padding) at the grid latent j."""
    mean, x_hat = self.model.step(self._padded(j, i, b), self.lv.gamma[i - 1], self.lv.gamma[i])
    return np.asarray(mean, np.float64)[:b].reshape(-1), x_hat   # x_hat: padded, on device

  def probs(self, j: np.ndarray, b: int) -> np.ndarray:
    """p(k | z_0) [b * D, K] float32 at the grid latent z_0 = j * delta_0."""
    p = self.model.probs(self._padded(j, 0, b), self.lv.gamma[0])
    return np.asarray(p, np.float32)[:b].reshape(-1, self.model.vocab_size)

  def _scramble(self, stack: Stack, batch_id: int, level: int, b: int) -> None:
    """`Stack.scramble` of what the decode of level `level` pops on average: the entropy of
    its grid Gaussians, log2(std / delta) + log2(sqrt(2 pi e)) bits per symbol (scrambling far
    deeper would alter seed words the coder never reads, which then cost initial bits)."""
    g = self.lv.q(level)
    per_symbol = math.log2(g.std / g.delta * math.sqrt(2 * math.pi * math.e))
    stack.scramble([SCRAMBLE_KEY, batch_id, level], 1 + math.ceil(b * self.dims * per_symbol / 32))

  def encode(self, stack: Stack, images: np.ndarray, tally: Any = None,
             batch_id: int = 0) -> int:
    """Bit-Swap: pops z_0 ~ q(z_0|x), pushes x; per step pops z_i ~ q(z_i|z_{i-1}) and pushes
    z_{i-1} with p(z_{i-1}|z_i); pushes z_1 with N(0, I). Between a push and the next pop the
    stack is scrambled (`Stack.scramble`, keyed by `batch_id` and the step). `tally`
    (`compress_stream.Tally`) accounts for every symbol. Returns the number of escapes."""
    lv, b, esc, steps = self.lv, len(images), 0, self.settings.num_steps
    k = np.asarray(images).reshape(-1).astype(np.int32)
    x = self.bin_centres[k]
    j = decode_q(stack, lv.q_mean_coef[0] * x, lv.q(0))
    if tally:
      tally.gaussian(-1, j, lv.q_mean_coef[0] * x, lv.q(0))
    probs = self.probs(j, b)
    stack.encode_reverse(k, CATEGORICAL, probs)
    if tally:
      tally.categorical(k, probs)
    self._scramble(stack, batch_id, 1, b)
    for i in range(1, steps + 1):
      q_mean = lv.q_mean_coef[i] * (j * lv.delta[i - 1])
      j_new = decode_q(stack, q_mean, lv.q(i))
      p_mean, _ = self.network(j_new, i, b)
      escaped = encode_p(stack, j, p_mean, lv.p(i - 1))
      if i < steps:
        self._scramble(stack, batch_id, i + 1, b)
      if tally:
        tally.gaussian(-1, j_new, q_mean, lv.q(i))
        tally.gaussian(1, j, p_mean, lv.p(i - 1), escaped)
      esc, j = esc + int(escaped.sum()), j_new
    zero = np.zeros(j.shape)
    escaped = encode_p(stack, j, zero, lv.p(steps))
    if tally:
      tally.gaussian(1, j, zero, lv.p(steps), escaped)
    return esc + int(escaped.sum())

  def decode(self, stack: Stack, b: int, batch_id: int = 0,
             on_step: Callable[[int, np.ndarray, np.ndarray], None] | None = None
             ) -> np.ndarray:
    """The inverse of `encode` for a batch of b images: int32 [b, H, W, C]. `on_step(i, z_i,
    x_hat)` sees the latent z_i and the reconstruction x_hat(z_i) (float32 [b, H, W, C]) at
    every step, from i = T down: progressive decoding."""
    lv, steps = self.lv, self.settings.num_steps
    j = decode_p(stack, np.zeros(b * self.dims), lv.p(steps))
    for i in range(steps, 0, -1):
      p_mean, x_hat = self.network(j, i, b)
      if on_step:
        on_step(i, self._padded(j, i, b)[:b], np.asarray(x_hat)[:b])
      if i < steps:
        self._scramble(stack, batch_id, i + 1, b)
      j_prev = decode_p(stack, p_mean, lv.p(i - 1))
      encode_q(stack, j, lv.q_mean_coef[i] * (j_prev * lv.delta[i - 1]), lv.q(i))
      j = j_prev
    self._scramble(stack, batch_id, 1, b)
    k = stack.decode(CATEGORICAL, self.probs(j, b)).astype(np.int32)
    x = self.bin_centres[k]
    encode_q(stack, j, lv.q_mean_coef[0] * x, lv.q(0))
    return k.reshape((b,) + self.model.shape)
