"""The head of a stream: its first images coded directly, without latents, so that bits-back
coding pops their bits instead of seed bits.

Bits-back coding pops latents before it pushes anything: the first image of a stream takes about
2 (grid_bits + 3) bits per dimension from the seed (the latents z_0 and z_{1/T}), and those
initial bits are stored in the file. For one photograph that is a few percent of the file. A few
images coded first by a direct (latent-free) pixel coder push real information where the seed was:
the chain's first batch pops those bits, and the file pays only the direct code's excess over the
model's on the head images (`compress_stream` decides how many: enough to cover the first batch's
dip, `head_size`).

The direct coder is a small LOCO-I style predictive coder (Weinberger, Seroussi & Sapiro 2000,
the JPEG-LS algorithm; not its bit format), in integer arithmetic only, so that it codes the same
bits on every machine (it also serves the portable coder):

- values in raster order, channels in order; a = left, b = above, c = above-left, d = above-right
  neighbour of the same channel (0 outside the image); the median edge predictor
  MED = median(a, b, a + b - c); from the second channel on, the previous channel's error at the
  same pixel (x - MED there) is added, clipped to [0, K - 1]: the prediction P;
- the symbol s = (x - P) mod K; its centred value e (s, or s - K above K / 2);
- a context per channel and activity class (the bit length of abs(a - c) + abs(b - c) +
  abs(d - b) (+ the previous channel's abs(error)), rescaled to 256 levels);
- per context the counters A (sum of abs(e)) and N (count), halved when N reaches 64, choose the
  coding table: the first of a fixed family of two-sided geometric tables (`tables`) whose mean
  abs(e) is at least A / N. The counters carry over from image to image.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from vdm_jax.compression import compress

THETA_STEP = 55109     # 2^16 * 2^(-1/4), rounded: successive tables' 1 - theta shrink by 2^(1/4)
FIRST_GAP = 61440      # the first table's 1 - theta, in units of 2^-16 (theta = 1/16)
NUM_TABLES = 48        # down to 1 - theta = 2^-11 or so: mean abs(e) beyond K / 4 for K = 256
RESET = 64             # the counters are halved when N reaches this (JPEG-LS's RESET)
ACTIVITY_CLASSES = 11  # bit lengths 0..10 of an activity of at most 3 * 255 (+ 128)
MEAN_FRAC = 8          # table means in units of 2^-8


@functools.lru_cache(maxsize=8)
def tables(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The coding tables for K = vocab_size levels, from integer arithmetic only.

  Table j is the two-sided geometric distribution P(e) ~ theta_j^abs(e) over the centred
  residuals e of the symbols s = 0..K-1, with 1 - theta_j = FIRST_GAP (THETA_STEP / 2^16)^j /
  2^16 in fixed point (each power rounded down).

  Returns:
    (weights, means): weights [NUM_TABLES, K] int64, integer weights summing to 2^24 - K per
    row (constriction's `Categorical` uses such weights as they are:
    `compress.PRECISION_BITS`), the rounding remainder on s = 0; means [NUM_TABLES] int64, each
    table's mean abs(e) in units of 2^-MEAN_FRAC, increasing.
  """
  k = int(vocab_size)
  s = np.arange(k)
  centred = np.where(s <= k // 2, s, s - k)
  size = np.abs(centred)
  total = (1 << compress.PRECISION_BITS) - k
  weights, means, gap = [], [], FIRST_GAP
  for _ in range(NUM_TABLES):
    power = [1 << 30]
    for _ in range(int(size.max())):
      power.append(power[-1] * ((1 << 16) - gap) >> 16)
    p = np.asarray(power, np.int64)[size]
    w = p * total // p.sum()
    w[0] += total - w.sum()
    weights.append(w)
    means.append(int((w * size).sum() << MEAN_FRAC) // total)
    gap = gap * THETA_STEP >> 16
  return np.stack(weights), np.asarray(means, np.int64)


def activity_class(activity: int, vocab_size: int) -> int:
  """The activity class of one value: the bit length of activity * 256 // K, at most
  ACTIVITY_CLASSES - 1."""
  return min(ACTIVITY_CLASSES - 1, (activity * 256 // vocab_size).bit_length())


def _activity_classes(activity: np.ndarray, vocab_size: int) -> np.ndarray:
  """`activity_class` of every element (int64 arrays; the count of powers of two <= the scaled
  activity is its bit length)."""
  scaled = activity * 256 // vocab_size
  return (scaled[..., None] >= (1 << np.arange(ACTIVITY_CLASSES - 1))).sum(-1)


def _med(a, b, c):
  """The median edge predictor: min(a, b) if c >= max(a, b), max(a, b) if c <= min(a, b), else
  a + b - c (the median of a, b and a + b - c)."""
  return np.where(c >= np.maximum(a, b), np.minimum(a, b),
                  np.where(c <= np.minimum(a, b), np.maximum(a, b), a + b - c))


def predictions(image: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(P, context) int64 [H, W, C] of a whole image (module docstring), vectorised: the encoder
  knows every pixel; the decoder computes the same pixel by pixel (`HeadCoder.decode_image`)."""
  x = np.asarray(image, np.int64)
  pad = np.pad(x, ((1, 0), (1, 1), (0, 0)))
  a, b, c, d = pad[1:, :-2], pad[:-1, 1:-1], pad[:-1, :-2], pad[:-1, 2:]
  med = _med(a, b, c)
  activity = np.abs(a - c) + np.abs(b - c) + np.abs(d - b)
  err = x - med
  pred = med.copy()
  pred[..., 1:] = np.clip(med[..., 1:] + err[..., :-1], 0, vocab_size - 1)
  activity[..., 1:] += np.abs(err[..., :-1])
  context = np.arange(x.shape[-1]) * ACTIVITY_CLASSES + _activity_classes(activity, vocab_size)
  return pred, context


class HeadCoder:
  """The direct coder's adaptive state (the counters A, N per context) over a stream's head:
  `symbols` for the encoder, `decode_image` for the decoder, image after image in the same
  order."""

  def __init__(self, shape: tuple[int, ...], vocab_size: int):
    self.shape, self.vocab_size = tuple(shape), int(vocab_size)
    self.weights, self.means = tables(self.vocab_size)
    self.rows = self.weights.astype(np.float64)     # constriction's input: exact integers
    contexts = ACTIVITY_CLASSES * self.shape[-1]
    self.a = np.full(contexts, max(2, (self.vocab_size + 32) // 64), np.int64)
    self.n = np.ones(contexts, np.int64)

  def _table(self, ctx: int) -> int:
    target = (int(self.a[ctx]) << MEAN_FRAC) // int(self.n[ctx])
    return min(NUM_TABLES - 1, int(np.searchsorted(self.means, target)))

  def _update(self, ctx: int, s: int) -> None:
    self.a[ctx] += min(s, self.vocab_size - s)       # abs(e) of the symbol
    self.n[ctx] += 1
    if self.n[ctx] >= RESET:
      self.a[ctx] >>= 1
      self.n[ctx] >>= 1

  def symbols(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """One image's symbols [D] (raster order) and table indices [D], and its code length in bits
    (constriction adds one unit of 2^-24 to every weight); advances the counters."""
    pred, ctx = predictions(image, self.vocab_size)
    sym = ((np.asarray(image, np.int64) - pred) % self.vocab_size).reshape(-1)
    table = np.empty(sym.size, np.int64)
    for i, (s, c) in enumerate(zip(sym.tolist(), ctx.reshape(-1).tolist())):
      table[i] = self._table(c)
      self._update(c, s)
    units = self.weights[table, sym] + 1
    return sym, table, float(np.sum(compress.PRECISION_BITS - np.log2(units)))

  def push(self, stack: compress.Stack, symbols: np.ndarray, table: np.ndarray) -> None:
    """Pushes the symbols of one or more images (from `symbols`, concatenated in order) so that
    `decode_image` pops them in order."""
    stack.encode_reverse(np.asarray(symbols, np.int32), compress.CATEGORICAL, self.rows[table])

  def decode_image(self, stack: compress.Stack) -> np.ndarray:
    """Pops one image pushed by `push` (int64 [H, W, C]); advances the counters as `symbols`."""
    k, (h, w, channels) = self.vocab_size, self.shape
    x = np.zeros((h + 1, w + 2, channels), np.int64)   # zero border: top, left and right
    rows = self.rows
    for y in range(1, h + 1):
      up, here = x[y - 1].tolist(), x[y]
      for col in range(1, w + 1):
        left = here[col - 1].tolist()
        prev_err = 0
        for ch in range(channels):
          a, b, c, d = left[ch], up[col][ch], up[col - 1][ch], up[col + 1][ch]
          med = int(_med(a, b, c))
          activity = abs(a - c) + abs(b - c) + abs(d - b)
          pred = med
          if ch:
            pred = min(k - 1, max(0, med + prev_err))
            activity += abs(prev_err)
          ctx = ch * ACTIVITY_CLASSES + activity_class(activity, k)
          s = int(stack.decode(compress.CATEGORICAL, rows[self._table(ctx)][None, :])[0])
          self._update(ctx, s)
          value = (pred + s) % k
          here[col, ch] = value
          prev_err = value - med
    return x[1:, 1:-1]
