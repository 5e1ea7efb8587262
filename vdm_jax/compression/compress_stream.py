"""Many images as one bits-back stream: the batch schedule, the initial bits and the accounting.

Bits-back coding pops latents before it pushes anything, so the stack must hold bits to begin
with: the initial bits. They grow with the number of latents popped before pushes return bits
(a batch of b images dips about b * D * 2 * (grid_bits + 3) bits below where it starts: the
latents z_0 and z_{1/T}; measured 15-19 bits per dimension on digits, grid_bits 4). Two things
keep them small. The head: the first images are coded directly, without latents
(`compress_head`, a predictive pixel coder), as many as it takes for their code to cover the
first batch's dip (`first_dip`): the first batch pops their bits instead of seed bits. Then the
images are chained: the first batch is one image, and each later batch takes its bits back from
the code of the batches before it, growing with the stack:

  b_1 = 1,  b_{n+1} = min(max_batch, max(1, floor(rho * (images coded so far, the head's too))))

with rho = safety * (expected net bits per image) / (bits one image's batch dipped below its
start), measured on the first image, so a batch dips about as far as the code below it reaches.
The stack starts as pseudo-random seed words (`seed_words`); the seed words the coder never read
are the same at the bottom of the final stack and are not stored (the decoder regenerates them),
so the file carries only the seed bits that were used: the initial bits, reported apart.

Where the model's code for a batch is longer than the batch stored raw (log2 K bits per value,
pushed with `Uniform(K)`), the batch is stored raw instead: the stack is restored to where the
batch began and the raw values pushed (the head too, as one batch). After every batch one flag
says which (a binary symbol of probability 2^-8 for raw: 0.006 bits on a coded batch, 8 bits on
a raw one), so a batch never costs more than its raw size plus 8 bits, whatever the model.
"""

from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple

import constriction
import numpy as np

from vdm_jax.compression import compress, compress_format as fmt, compress_head
from vdm_jax.compression.compress import Chain, Stack

SEED = 0x5EED_B175_BAC4
RHO_ONE = 1 << 16     # rho is stored as an integer in units of 2^-16
# The per-batch flag "stored raw": integer weights summing to 2^24 - 2 (constriction's
# Categorical then uses them as they are), P(raw) = (2^16 + 1) / 2^24.
RAW_FLAG = np.array([[(1 << 24) - 2 - (1 << 16), 1 << 16]], np.float64)


class Tally:
  """Ideal code lengths per image, in bits (+ encoded, - decoded), to account for the file:

  continuous: the Gaussians' densities times the grid (the consistency form of the bound,
    evaluated on the coder's own latents);

  grid: the exact masses of the grid bins under the same Gaussians;

  coder: the masses the coder's models give: the Gaussian clipped to its window, probabilities
    in units of 2^-24 with at least one unit per symbol (constriction's leaky quantization),
    escaped symbols as the window end's mass plus their raw bits.

  The ANS stream then adds its own (tiny) overhead: net bits - coder.
  """

  def __init__(self, batch: int):
    self.continuous, self.grid, self.coder = np.zeros(batch), np.zeros(batch), np.zeros(batch)

  def gaussian(self, sign: float, j: np.ndarray, mean: np.ndarray, g: compress.Grid,
               escaped: np.ndarray | None = None) -> None:
    """One coded array [b * D]: values j on the grid under N(mean, g.std^2); with `escaped`
    (the mask of `encode_p`) the window has the two escape symbols at +-(radius + 1)."""
    from scipy import special   # pylint: disable=g-import-not-at-top  (stats only)
    c, r, s = compress.grid_params(mean, g)
    window = g.radius if escaped is None else g.radius + 1
    off = j - c
    u = (off - r) / s
    cont = 0.5 * u * u / math.log(2.0) + math.log2(g.std * math.sqrt(2 * math.pi) / g.delta)
    h, a = 0.5 / s, -np.abs(u)      # the bin [|u| - h, |u| + h], mirrored to the left
    mass = special.ndtr(a + h) - special.ndtr(a - h)
    grid = np.where(mass > 1e-300, -np.log2(np.maximum(mass, 1e-300)), cont)
    sym = off if escaped is None else np.where(escaped, np.sign(off) * window, off)
    lo, hi = special.ndtr((-window - 0.5 - r) / s), special.ndtr((window + 0.5 - r) / s)
    free = 2.0**compress.PRECISION_BITS - (2 * window + 1)
    cdf = lambda x: np.floor((special.ndtr((x - r) / s) - lo) / (hi - lo) * free)
    coder = compress.PRECISION_BITS - np.log2(cdf(sym + 0.5) - cdf(sym - 0.5) + 1.0)
    if escaped is not None:
      coder = coder + np.where(escaped, sum(compress.raw_chunks(g.delta)), 0.0)
    for total, bits in ((self.continuous, cont), (self.grid, grid), (self.coder, coder)):
      total += sign * bits.reshape(len(total), -1).sum(-1)

  def categorical(self, k, probs) -> None:
    """Encoded integers k under per-symbol probabilities [n, K]; the coder's 24-bit ones with
    one unit at least are taken as p (1 - K 2^-24) + 2^-24. (The portable coder's integer
    tables may give a value weight 0, coded at 2^-24: its ideal length is counted at 2^-64.)"""
    p = np.take_along_axis(np.asarray(probs, np.float64), k.reshape(-1, 1), axis=-1)[:, 0]
    p = p / np.asarray(probs, np.float64).sum(-1)
    num = probs.shape[-1]
    least = 2.0**-compress.PRECISION_BITS
    coder = -np.log2(p * (1.0 - num * least) + least)
    ideal = -np.log2(np.maximum(p, 2.0**-64))
    for total, bits in ((self.continuous, ideal), (self.grid, ideal), (self.coder, coder)):
      total += bits.reshape(len(total), -1).sum(-1)


class StreamError(ValueError):
  """A payload that does not decode to a consistent stream (damaged, or another model)."""


def seed_words(num_words: int) -> np.ndarray:
  """The first `num_words` pseudo-random uint32 words of the stack (PCG64's raw stream, little
  endian, identical on every platform); the top word is made odd (ANS data never ends in 0)."""
  raw = np.random.PCG64(SEED).random_raw((num_words + 1) // 2).astype("<u8")
  words = raw.view("<u4")[:num_words].astype(np.uint32)
  words[-1] |= 1
  return words


def next_batch(done: int, num_images: int, *, rho: int, max_batch: int, head: int = 0,
               version: int = fmt.VERSION) -> int:
  """The size of the batch after `done` images: 1 first (after the `head` images coded directly),
  then min(max_batch, max(1, floor(rho * done / 2^16))), at most what is left; from format
  version 5 on, rounded down to a power of two (the batch is then its own bucket: no padding
  rows are computed; version 4 padded it)."""
  b = 1 if done == head else min(max_batch, max(1, (rho * done) >> 16))
  b = min(b, num_images - done)
  return b if version < 5 else 1 << (b.bit_length() - 1)


def schedule(num_images: int, *, rho: int, max_batch: int, head: int = 0,
             version: int = fmt.VERSION) -> list[int]:
  """All bits-back batch sizes (`next_batch`) for num_images images, the first `head` of them
  coded directly (`compress_head`), in format `version`'s rule."""
  sizes, done = [], head
  while done < num_images:
    sizes.append(next_batch(done, num_images, rho=rho, max_batch=max_batch, head=head,
                            version=version))
    done += sizes[-1]
  return sizes


class Encoded(NamedTuple):
  """A compressed stream and its accounting.

  Attributes:
    payload: uint32 words to store (the stack without the unread seed words below it).
    seed_words, seed_dropped: the seed's length and how many of its words are not stored.
    rho: the schedule's growth rate (units of 2^-16); schedule: the bits-back batch sizes.
    head: how many images (the first) the direct coder coded (`compress_head`).
    net_bits: bits the coding added to the stack (the ANS stream: file payload = initial + net).
    initial_bits: payload bits - net bits (the seed bits used, plus < 32 bits of word rounding).
    ideal_continuous, ideal_grid, ideal_coder: per-image ideal code lengths [N] in bits
      (`Tally`).
    escapes: symbols sent raw (beyond p's window); raw_batches: batches stored raw (the
      model's code was longer); seconds: wall time.
  """

  payload: np.ndarray
  seed_words: int
  seed_dropped: int
  rho: int
  schedule: list[int]
  head: int
  net_bits: int
  initial_bits: int
  ideal_continuous: np.ndarray
  ideal_grid: np.ndarray
  ideal_coder: np.ndarray
  escapes: int
  raw_batches: int
  seconds: float


def buckets(sizes: list[int]) -> set[int]:
  """The buckets (`compress.bucket`) of a batch schedule: one compiled program each."""
  return {compress.bucket(b) for b in sizes}


def raw_bits(num_values: int, vocab_size: int) -> float:
  """The ideal size of values stored raw: log2 K bits each."""
  return num_values * math.log2(vocab_size)


def push_raw(stack: Stack, images: np.ndarray, vocab_size: int) -> None:
  """Pushes integer images with `Uniform(K)` (popped in order by `pop_raw`)."""
  stack.encode_reverse(np.asarray(images).reshape(-1).astype(np.int32),
                       constriction.stream.model.Uniform(vocab_size))


def pop_raw(stack: Stack, count: int, vocab_size: int) -> np.ndarray:
  return stack.decode(constriction.stream.model.Uniform(vocab_size), count).astype(np.int32)


def _coded_or_raw(stack: Stack, batch: np.ndarray, vocab_size: int, raw_fallback: bool,
                  code: Callable[[], None]) -> bool:
  """Runs `code` (which pushes `batch`) or, where that is longer than the batch stored raw (and
  `raw_fallback`), restores the stack and pushes the batch raw; then the flag. Returns whether
  the batch was stored raw."""
  words, before = stack.coder.get_compressed(), stack.bits()
  code()
  raw = raw_fallback and stack.bits() - before > raw_bits(batch.size, vocab_size)
  if raw:
    low = stack.low
    stack.restore(words)
    stack.low = low
    push_raw(stack, batch, vocab_size)
  stack.encode_reverse(np.array([int(raw)], np.int32), compress.CATEGORICAL, RAW_FLAG)
  return raw


def first_dip(chain: Chain) -> float:
  """About how many bits the first image's chain pops before it pushes: the entropies of z_0
  and z_{1/T} on their grids, D (log2(std / delta) + log2(sqrt(2 pi e))) each."""
  return chain.dims * sum(math.log2(g.std / g.delta * math.sqrt(2 * math.pi * math.e))
                          for g in (chain.lv.q(0), chain.lv.q(1)))


def _push_head(chain: Chain, stack: Stack, images: np.ndarray, raw_fallback: bool
               ) -> tuple[int, list[float], bool]:
  """Codes the head (`compress_head`): the first images, as many as it takes for their direct
  code to cover `first_dip` (all of them at most), or raw where that is shorter; then the flag.
  Returns (head size, bits per head image, stored raw)."""
  coder = compress_head.HeadCoder(chain.model.shape, chain.model.vocab_size)
  need, symbols, tables, bits = first_dip(chain), [], [], []
  while len(bits) < len(images) and sum(bits) < need:
    s, t, b = coder.symbols(images[len(bits)])
    symbols.append(s)
    tables.append(t)
    bits.append(b)
  head = images[:len(bits)]
  raw = _coded_or_raw(stack, head, chain.model.vocab_size, raw_fallback,
                      lambda: coder.push(stack, np.concatenate(symbols), np.concatenate(tables)))
  if raw:
    bits = [raw_bits(chain.dims, chain.model.vocab_size)] * len(bits)
  return len(bits), bits, raw


def _pop_head(chain: Chain, stack: Stack, head: int) -> np.ndarray:
  """The inverse of `_push_head` for `head` images: int32 [head, H, W, C]."""
  shape = (head,) + chain.model.shape
  if stack.decode(compress.CATEGORICAL, RAW_FLAG)[0]:
    return pop_raw(stack, head * chain.dims, chain.model.vocab_size).reshape(shape)
  coder = compress_head.HeadCoder(chain.model.shape, chain.model.vocab_size)
  return np.stack([coder.decode_image(stack) for _ in range(head)]).astype(np.int32)


def _encode_batch(chain: Chain, stack: Stack, batch: np.ndarray, tally: Tally | None,
                  batch_id: int, raw_fallback: bool) -> tuple[int, bool]:
  """Codes one batch with the model or, where that is longer (and `raw_fallback`), raw; then
  its flag. Returns (escapes, stored raw)."""
  escapes = []
  raw = _coded_or_raw(stack, batch, chain.model.vocab_size, raw_fallback,
                      lambda: escapes.append(chain.encode(stack, batch, tally, batch_id)))
  return escapes[0], raw


def encode_images(chain: Chain, images: np.ndarray, *, expected_bits: float | None = None,
                  safety: float = 0.9, measure: bool = True, raw_fallback: bool = True,
                  head: bool = True, version: int = fmt.VERSION,
                  progress: Callable[[int, int], None] | None = None) -> Encoded:
  """Compresses integer images [N, H, W, C] into one stream (the head, then batches chained, see
  module doc).

  Args:
    expected_bits: the expected net bits per image (e.g. the model's T-step bound), for rho;
      None: the first image's own net bits.
    measure: accumulate the ideal code lengths per image (`Tally`; costs a little time).
    raw_fallback: store a batch raw where the model's code is longer (False: always the
      model's code, e.g. to measure it; the flags are written either way).
    head: code the first images directly (`compress_head`), as many as cover the first
      batch's dip, instead of taking those bits from the seed (False: no head, e.g. to measure
      the chain alone).
    version: the file format whose batch schedule to follow (4 only to write the files of
      that version, with head=False, to test that they are read).
    progress: called after each batch (the head counted as one) with (done, in all), from the
      first bits-back batch on, which sets rho and so the count.
  """
  start, n = time.perf_counter(), len(images)
  num_seed = 4096 + 8 * chain.dims * 4      # 1024 bits per dimension of the first image
  seed = seed_words(num_seed)
  stack = Stack(seed)
  bits0 = stack.bits()
  ideal = {"continuous": np.zeros(n), "grid": np.zeros(n), "coder": np.zeros(n)}
  sizes, done, rho, escapes, raw_batches = [], 0, 0, 0, 0
  if version < 5 and head:
    raise ValueError(f"format version {version} has no head")
  if head and n:
    done, bits, raw = _push_head(chain, stack, images, raw_fallback)
    raw_batches += raw
    for values in ideal.values():
      values[:done] = bits
    if progress and done == n:     # else reported with the first batch, which sets the count
      progress(1, 1)
  num_head = done
  while done < n:
    b = next_batch(done, n, rho=rho, max_batch=chain.settings.max_batch, head=num_head,
                   version=version)
    tally = Tally(b) if measure else None
    before = stack.bits()
    stack.low = before
    esc, raw = _encode_batch(chain, stack, images[done:done + b], tally, done, raw_fallback)
    escapes, raw_batches = escapes + esc, raw_batches + raw
    if tally:
      for name, values in ideal.items():
        values[done:done + b] = (raw_bits(chain.dims, chain.model.vocab_size) if raw
                                 else getattr(tally, name))
    if not sizes:   # the first image sets the growth rate
      net, dip = stack.bits() - before, max(before - stack.low, 1)
      per_image = net if expected_bits is None else expected_bits
      rho = int(min(RHO_ONE, max(1, safety * max(per_image, 1.0) / dip * RHO_ONE)))
    sizes.append(b)
    done += b
    if progress:
      progress(len(sizes) + bool(num_head), bool(num_head) + len(
          schedule(n, rho=rho, max_batch=chain.settings.max_batch, head=num_head,
                   version=version)))
  words = stack.coder.get_compressed()
  common = min(len(words), num_seed) - 1          # the top word is always stored
  differ = np.flatnonzero(words[:common] != seed[:common])
  dropped = int(differ[0]) if len(differ) else common   # the unread seed words at the bottom
  payload = words[dropped:]
  net = stack.bits() - bits0
  return Encoded(payload, num_seed, dropped, rho, sizes, num_head, int(net),
                 int(32 * len(payload) - net),
                 ideal["continuous"], ideal["grid"], ideal["coder"], escapes, raw_batches,
                 time.perf_counter() - start)


def decode_images(chain: Chain, payload: np.ndarray, *, num_images: int, num_seed_words: int,
                  seed_dropped: int, rho: int, head: int = 0, version: int = fmt.VERSION,
                  on_step: Callable[..., None] | None = None,
                  progress: Callable[[int, int], None] | None = None) -> np.ndarray:
  """The inverse of `encode_images`: integer images [N, H, W, C] (int32).

  `on_step(first_image, i, z_i, x_hat)` sees each batch's latents and reconstructions from z_1
  down (`Chain.decode`; not the head's images); `progress(done, in all)` is called after each
  batch and after the head.

  Raises:
    StreamError: the stack does not end as the seed it started from (damaged payload or a
      different model / numeric environment), or the coder refused a symbol.
  """
  seed = seed_words(num_seed_words)
  words = np.concatenate([seed[:seed_dropped], np.asarray(payload, np.uint32)])
  if not len(words) or words[-1] == 0:
    raise StreamError("the compressed stream is empty or ends in a zero word")
  if not 0 <= head <= num_images:
    raise StreamError(f"a head of {head} images in a stream of {num_images}")
  sizes = schedule(num_images, rho=rho, max_batch=chain.settings.max_batch, head=head,
                   version=version)
  stack = Stack(words)
  out, end, total = [], num_images, len(sizes) + bool(head)
  try:
    for b in reversed(sizes):
      end -= b
      step = None if on_step is None else (lambda i, z, x, e=end: on_step(e, i, z, x))
      if stack.decode(compress.CATEGORICAL, RAW_FLAG)[0]:
        out.append(pop_raw(stack, b * chain.dims, chain.model.vocab_size).reshape(
            (b,) + chain.model.shape))
      else:
        out.append(chain.decode(stack, b, end, step))
      if progress:
        progress(len(out), total)
    if head:
      out.append(_pop_head(chain, stack, head))
      if progress:
        progress(len(out), total)
  except (ValueError, KeyError, OverflowError) as e:   # constriction: KeyError = 0 mass
    raise StreamError(f"the coder refused the stream ({e})") from e
  rest = stack.coder.get_compressed()
  if len(rest) != len(seed) or np.any(rest != seed):
    raise StreamError("the decoded stream does not end in the seed it started from")
  return np.concatenate(out[::-1])


def header_settings(header: fmt.Header, *, name: str) -> compress.CoderSettings:
  """The coder settings a file's header stores, validated.

  Raises:
    CompressedFileError: kind "corrupted", settings no coder writes.
  """
  settings = compress.CoderSettings(header.num_steps, header.grid_bits, header.window,
                                    header.max_batch)
  try:
    return compress.check_settings(settings)
  except ValueError as e:
    raise fmt.CompressedFileError("corrupted", f"{name} has impossible coder settings ({e})")


def decode_file(chain: Chain, header: fmt.Header, payload: np.ndarray, *, name: str,
                model: str, on_step: Callable[..., None] | None = None,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
  """`decode_images` of a file's payload with its header's stream fields (int32 [N, H, W, C]).

  Raises:
    CompressedFileError: kind "stream", the payload does not decode consistently with `model`
      (the words naming the model in the message).
  """
  try:
    return decode_images(chain, payload, num_images=header.num_images,
                         num_seed_words=header.seed_words, seed_dropped=header.seed_dropped,
                         rho=header.rho, head=header.head, version=header.version,
                         on_step=on_step, progress=progress)
  except StreamError as e:
    raise fmt.CompressedFileError("stream", f"{name} does not decode consistently with {model} "
                                  f"({e}); no image is written") from e
