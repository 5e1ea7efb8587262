"""Score networks: the VDM noise-prediction U-Net and its building blocks; a registry by name.

`ScoreUNet` is the network of the official VDM code (Kingma et al. 2021, appendix B;
github.com/google-research/vdm `ScoreUNet`): Fourier features sin/cos(2^n 2 pi z) of z
concatenated to z, a 3x3 input conv, `num_blocks` residual blocks at full resolution (no
downsampling), a middle block with self-attention, `num_blocks + 1` up blocks that each
concatenate one skip connection, GroupNorm, swish, a zero-initialised 3x3 output conv, and the
output skip eps_hat = NN(z) + z. The conditioning vector (a sinusoidal embedding of t, optionally
with the official scalar `conditioning` input and a class embedding, through a 2-layer MLP)
enters every residual block. With `norm_groups=32` and `conditioning_input=True` it is the
official function exactly: `vdm_jax.official.convert` ports official weights into it and
tests/test_convert.py reproduces the official eps_hat to float32 rounding.

Additions to the official network (off by default where they change the function): any number of
channels (the official decoder hard-codes 3); a class label embedding with a "null" class for
classifier-free guidance (`num_classes`); GroupNorm groups below 64 channels chosen so that no
group holds a single channel (`norm_groups=0`, the default: see `num_groups`); scanned blocks and
remat; a computation dtype. Params are float32; `dtype` sets the computation dtype.

Configs name their score network (`model.network`, default "score_unet"): a new one is a Flax
module with ScoreUNet's call signature and keyword arguments (see `register_network`), and one
`register_network` line.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from vdm_jax.core import registry
from vdm_jax.core.checks import check_choice, check_number

BLOCK_IMPLS = ("unrolled", "scan")


def num_groups(channels: int, *, max_groups: int = 32) -> int:
  """GroupNorm group count: the largest divisor of `channels` <= `max_groups` with >= 2 channels
  in each group.

  32 for 128 and 256 channels (the official net's GroupNorm()). Groups of one channel are avoided
  (where channels >= 2): GroupNorm over a single channel subtracts any per-channel constant, which
  would erase the conditioning that each residual block adds right before its second norm.
  """
  limit = max(1, min(max_groups, channels // 2))
  return max(g for g in range(1, limit + 1) if channels % g == 0)


def group_count(channels: int, norm_groups: int) -> int:
  """GroupNorm groups for a layer of `channels`: `norm_groups` if > 0 (official: 32), else the
  project's rule `num_groups(channels)`; a ValueError when `norm_groups` does not divide it."""
  if norm_groups < 0:
    raise ValueError(f"norm_groups must be >= 0 (0 = the project's rule), got {norm_groups}")
  if norm_groups == 0:
    return num_groups(channels)
  if channels % norm_groups:
    raise ValueError(f"norm_groups={norm_groups} does not divide a layer of {channels} channels")
  return norm_groups


def timestep_embedding(t: ArrayLike, dim: int, *, scale: float = 1000.0) -> jax.Array:
  """Sinusoidal embedding of a conditioning scalar (Vaswani et al. 2017; DDPM; VDM code).

  Args:
    t: [B] conditioning scalars (VDM: the normalised gamma_t, roughly in [0, 1]).
    dim: embedding width; odd widths get a zero last column.
    scale: t is multiplied by this first (1000, as in the official code).

  Returns:
    [B, dim] float32: [sin(scale t w_k), cos(scale t w_k)], w_k = 10000^(-k / (dim/2 - 1)).
  """
  t = jnp.asarray(t, jnp.float32) * scale
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) / max(half - 1, 1) * jnp.arange(half, dtype=jnp.float32))
  angles = t[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def fourier_features(z: ArrayLike, *, exponents: tuple[int, ...]) -> jax.Array:
  """Fourier features sin(2^n 2 pi z), cos(2^n 2 pi z) of every channel (VDM appendix C).

  The official convention: with exponents (6, 7) the finest feature has period 2^-7 in z, exactly
  one step between the bin centres of 8-bit data (2 / 256).

  Args:
    z: [B, H, W, C].
    exponents: the n's.

  Returns:
    [B, H, W, 2 C len(exponents)] float32 (computed in float32: high frequencies need it),
    ordered [sin(c0, n0), sin(c0, n1), ..., sin(c1, n0), ..., cos(...)] (the official order).
  """
  z = jnp.asarray(z, jnp.float32)
  w = jnp.asarray([2.0**n * 2.0 * math.pi for n in exponents], jnp.float32)
  h = (z[..., None] * w).reshape(z.shape[:-1] + (-1,))
  return jnp.concatenate([jnp.sin(h), jnp.cos(h)], axis=-1)


class ResnetBlock(nn.Module):
  """A residual block: GroupNorm-swish-conv, + projected conditioning,
  GroupNorm-swish-dropout-conv (zero init), + skip.

  x [B, H, W, C_in], cond [B, E] -> [B, H, W, out_channels]; a 1x1 projection of x when C_in differs.
  """
  out_channels: int
  dropout: float
  train: bool
  dtype: Any = jnp.float32
  norm_groups: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    c_in, c_out = x.shape[-1], self.out_channels
    groups = lambda c: group_count(c, self.norm_groups)
    h = nn.swish(nn.GroupNorm(groups(c_in), dtype=self.dtype, name="norm1")(x))
    h = nn.Conv(c_out, (3, 3), dtype=self.dtype, name="conv1")(h)
    h += nn.Dense(c_out, use_bias=False, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                  name="cond_proj")(cond)[:, None, None, :]
    h = nn.swish(nn.GroupNorm(groups(c_out), dtype=self.dtype, name="norm2")(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not self.train)
    h = nn.Conv(c_out, (3, 3), kernel_init=nn.initializers.zeros, dtype=self.dtype,
                name="conv2")(h)
    if c_in != c_out:
      x = nn.Dense(c_out, dtype=self.dtype, name="shortcut")(x)
    return x + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over the H*W positions, residual, zero-initialised output.

  x [B, H, W, C] -> [B, H, W, C]; the softmax is computed in float32 whatever `dtype`.
  """
  dtype: Any = jnp.float32
  norm_groups: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    h = nn.GroupNorm(group_count(c, self.norm_groups), dtype=self.dtype, name="norm")(x)
    h = h.reshape(b, hh * ww, c)
    q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(h) for n in ("q", "k", "v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    h = jnp.einsum("bqk,bkc->bqc", weights, v)
    h = nn.Dense(c, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="proj_out")(h)
    return x + h.reshape(b, hh, ww, c)


class DownBlock(nn.Module):
  """Residual block (+ optional attention); a scan body: (h, cond) -> (h, h as the skip)."""
  channels: int
  dropout: float
  attention: bool
  train: bool
  dtype: Any = jnp.float32
  norm_groups: int = 0

  @nn.compact
  def __call__(self, h: jax.Array, cond: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = ResnetBlock(self.channels, self.dropout, self.train, self.dtype, self.norm_groups)(h, cond)
    if self.attention:
      h = AttentionBlock(self.dtype, self.norm_groups)(h)
    return h, h


class UpBlock(nn.Module):
  """Concatenates one skip, residual block (+ optional attention); (h, skip, cond) -> (h, None)."""
  channels: int
  dropout: float
  attention: bool
  train: bool
  dtype: Any = jnp.float32
  norm_groups: int = 0

  @nn.compact
  def __call__(self, h: jax.Array, skip: jax.Array, cond: jax.Array) -> tuple[jax.Array, None]:
    h = ResnetBlock(self.channels, self.dropout, self.train, self.dtype, self.norm_groups)(
        jnp.concatenate([h, skip], axis=-1), cond)
    if self.attention:
      h = AttentionBlock(self.dtype, self.norm_groups)(h)
    return h, None


def _scanned(block: type[nn.Module], *, length: int, in_axes: Any, remat: bool) -> Any:
  """`block` scanned over a leading parameter axis of `length` identical copies."""
  if remat:
    block = nn.remat(block, prevent_cse=False)
  return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 in_axes=in_axes, length=length)


def check_dtype(dtype: Any) -> None:
  """ValueError unless `dtype` is a floating dtype (float32, bfloat16, ...)."""
  try:
    ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f"dtype must be a floating dtype (float32, bfloat16, ...), got {dtype!r}")


def batch_times(t: ArrayLike, batch: int) -> jax.Array:
  """t as a [B] float32 array (a scalar is broadcast); ValueError for another shape."""
  t = jnp.asarray(t, jnp.float32)
  if t.ndim == 0:
    t = jnp.broadcast_to(t, (batch,))
  if t.shape != (batch,):
    raise ValueError(f"t must be a scalar or of shape [B={batch}], got shape {t.shape}")
  return t


def _label_ids(label: Optional[ArrayLike], batch: int, num_classes: int) -> jax.Array:
  """Embedding ids in [0, num_classes]; num_classes is the null label, used where label is None.

  Concrete labels outside [0, num_classes] raise ValueError. Under jit the values cannot be
  checked, so out-of-range labels are mapped to an id past the table: `jnp.take` then gives NaN
  embeddings and a NaN output (loud), instead of silently wrapping -1 to the null label.
  """
  if label is None:
    return jnp.full((batch,), num_classes, jnp.int32)
  try:
    values = np.asarray(label)   # before any jnp op, which could turn it into a tracer
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    values = None
  label = jnp.asarray(label)
  if label.shape != (batch,) or not jnp.issubdtype(label.dtype, jnp.integer):
    raise ValueError(f"label must be an int array of shape [B={batch}], got {label.dtype} "
                     f"{label.shape}")
  if values is not None and values.size and (values.min() < 0 or values.max() > num_classes):
    raise ValueError(f"labels must be in [0, num_classes={num_classes}] ({num_classes} = null "
                     f"label), got values in [{values.min()}, {values.max()}]")
  valid = (label >= 0) & (label <= num_classes)
  return jnp.where(valid, label, num_classes + 1).astype(jnp.int32)


class Conditioning(nn.Module):
  """t [B] (+ label ids [B]) (+ scalar conditioning [B]) -> conditioning vector [B, 4 channels].

  dense0 sees [timestep_embedding(t), label embedding (if num_classes), conditioning (if
  conditioning_input)]; the official network is the case num_classes = 0, conditioning_input.
  """
  channels: int
  num_classes: int = 0
  dtype: Any = jnp.float32
  conditioning_input: bool = False

  @nn.compact
  def __call__(self, t: jax.Array, label_ids: Optional[jax.Array] = None,
               conditioning: Optional[jax.Array] = None) -> jax.Array:
    emb = timestep_embedding(t, self.channels).astype(self.dtype)
    if self.num_classes > 0:
      label_emb = nn.Embed(self.num_classes + 1, self.channels, dtype=self.dtype,
                           name="label_embed")(label_ids)
      emb = jnp.concatenate([emb, label_emb], axis=-1)
    if self.conditioning_input:
      if conditioning is None:
        conditioning = jnp.zeros(t.shape, jnp.float32)
      emb = jnp.concatenate([emb, conditioning[:, None].astype(self.dtype)], axis=-1)
    emb = nn.swish(nn.Dense(4 * self.channels, dtype=self.dtype, name="dense0")(emb))
    return nn.swish(nn.Dense(4 * self.channels, dtype=self.dtype, name="dense1")(emb))


class ScoreUNet(nn.Module):
  """The VDM noise-prediction network eps_hat(z_t; t[, label]) (VDM appendix B).

  Attributes:
    channels: width of every residual block.
    num_blocks: residual blocks in the down stack; the up stack has num_blocks + 1 (one per skip).
    fourier_exponents: Fourier features sin/cos(2^n 2 pi z) for these n (empty: none); the
      official (6, 7).
    attention_everywhere: attention after every block, else only in the middle block.
    dropout: dropout rate in the residual blocks (active only when train=True).
    num_classes: 0 = unconditional; else an Embed(num_classes + 1), id num_classes = null label.
    conditioning_input: the official scalar `conditioning` input [B], concatenated to the time
      embedding before dense0 (the official augmented CIFAR-10 model feeds it the augmentation
      flag; None is read as 0).
    norm_groups: GroupNorm groups at every width (official: 32, Flax's default); 0 = the project's
      rule `num_groups` (the same at 64 channels and above).
    block_impl: "unrolled" (Python loop) or "scan" (nn.scan over the identical blocks: the same
      function and parameter count, parameters stacked on a leading axis; faster lowering).
      On CPU prefer "unrolled": XLA:CPU runs convolutions inside a loop body on a slow path
      (jax-ml/jax#12868), and the scanned backward pass was 20-30x slower in
      experiments/bench_scan.py.
    remat: rematerialise the blocks in the backward pass (nn.remat).
    dtype: computation dtype (bfloat16 for mixed precision); params are always float32.
  """
  channels: int = 128
  num_blocks: int = 32
  fourier_exponents: tuple[int, ...] = (6, 7)
  attention_everywhere: bool = False
  dropout: float = 0.1
  num_classes: int = 0
  conditioning_input: bool = False
  norm_groups: int = 0
  block_impl: str = "unrolled"
  remat: bool = False
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_number("channels", self.channels, integer=True, low=1)
    check_number("norm_groups", self.norm_groups, integer=True, low=0)
    if self.norm_groups:
      group_count(self.channels, self.norm_groups)
    check_number("num_blocks", self.num_blocks, integer=True, low=1)
    if not all(isinstance(n, int) for n in self.fourier_exponents):
      raise ValueError(f"fourier_exponents must be ints, got {self.fourier_exponents!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
    check_number("num_classes", self.num_classes, integer=True, low=0)
    check_choice("block_impl", self.block_impl, BLOCK_IMPLS)
    check_dtype(self.dtype)
    super().__post_init__()

  @nn.compact
  def __call__(self, z: ArrayLike, t: ArrayLike, label: Optional[ArrayLike] = None,
               conditioning: Optional[ArrayLike] = None, *, train: bool) -> jax.Array:
    """eps_hat for z [B, H, W, C] (any C), t [B] (normalised gamma_t), label [B] int or None,
    conditioning [B] float or None (the official scalar input; needs conditioning_input).

    Returns:
      eps_hat = NN(z) + z, [B, H, W, C] float32 (the official output skip); equal to z at
      initialisation (the output conv is zero-initialised).
    """
    z = jnp.asarray(z)
    if z.ndim != 4:
      raise ValueError(f"z must be [B, H, W, C], got shape {z.shape}")
    batch = z.shape[0]
    t = batch_times(t, batch)
    if label is not None and not self.num_classes:
      raise ValueError("label given to an unconditional ScoreUNet (num_classes=0); pass "
                       "label=None or set num_classes")
    ids = _label_ids(label, batch, self.num_classes) if self.num_classes else None
    if conditioning is not None:
      if not self.conditioning_input:
        raise ValueError("conditioning given to a ScoreUNet without the conditioning input; "
                         "pass conditioning=None or set conditioning_input=True")
      conditioning = batch_times(conditioning, batch)
    cond = Conditioning(self.channels, self.num_classes, self.dtype, self.conditioning_input,
                        name="cond")(t, ids, conditioning)

    h = z.astype(jnp.float32)
    if self.fourier_exponents:
      h = jnp.concatenate([h, fourier_features(h, exponents=self.fourier_exponents)], axis=-1)
    h = nn.Conv(self.channels, (3, 3), dtype=self.dtype, name="conv_in")(h.astype(self.dtype))
    h = self._stacks(h, cond, train)
    h = nn.swish(nn.GroupNorm(group_count(self.channels, self.norm_groups), dtype=self.dtype,
                              name="norm_out")(h))
    out = nn.Conv(z.shape[-1], (3, 3), kernel_init=nn.initializers.zeros, dtype=self.dtype,
                  name="conv_out")(h)
    return out.astype(jnp.float32) + z.astype(jnp.float32)   # the official base measure: + z

  def _stacks(self, h: jax.Array, cond: jax.Array, train: bool) -> jax.Array:
    """Down stack, middle (block, attention, block), up stack with the U-Net skips."""
    kw = dict(channels=self.channels, dropout=self.dropout, attention=self.attention_everywhere,
              train=train, dtype=self.dtype, norm_groups=self.norm_groups)
    n = self.num_blocks
    down, up = DownBlock, UpBlock
    if self.block_impl == "scan":
      h0 = h
      h, skips = _scanned(down, length=n, in_axes=nn.broadcast, remat=self.remat)(
          **kw, name="down")(h, cond)
      skips = jnp.concatenate([h0[None], skips], axis=0)[::-1]   # [n + 1, B, H, W, C], last first
      h = self._middle(h, cond, train)
      h, _ = _scanned(up, length=n + 1, in_axes=(0, nn.broadcast), remat=self.remat)(
          **kw, name="up")(h, skips, cond)
      return h
    if self.remat:
      down, up = nn.remat(down), nn.remat(up)
    skips = [h]
    for i in range(n):
      h, skip = down(**kw, name=f"down_{i}")(h, cond)
      skips.append(skip)
    h = self._middle(h, cond, train)
    for i in range(n + 1):
      h, _ = up(**kw, name=f"up_{i}")(h, skips.pop(), cond)
    return h

  def _middle(self, h: jax.Array, cond: jax.Array, train: bool) -> jax.Array:
    g = self.norm_groups
    h = ResnetBlock(self.channels, self.dropout, train, self.dtype, g, name="mid_block1")(h, cond)
    h = AttentionBlock(self.dtype, g, name="mid_attn")(h)
    return ResnetBlock(self.channels, self.dropout, train, self.dtype, g, name="mid_block2")(h, cond)


NETWORKS: registry.Registry[Callable[..., nn.Module]] = registry.Registry("network")
DEFAULT_NETWORK = "score_unet"


def register_network(name: str, make: Callable[..., nn.Module], *,
                     replace: bool = False) -> Callable[..., nn.Module]:
  """Makes `model.network = name` build the score network `make(**kwargs)`.

  `make` (e.g. a Flax module class) takes ScoreUNet's keyword arguments (channels, num_blocks,
  fourier_exponents, attention_everywhere, dropout, num_classes, conditioning_input,
  norm_groups, block_impl, remat, dtype; it may absorb those it does not use in `**kwargs`) and
  returns a module called as `(z [B, H, W, C], t [B], label [B] | None[, conditioning [B]], *,
  train)` -> eps_hat [B, H, W, C]; `conditioning` is passed only when the batch carries it.
  """
  return NETWORKS.register(name, make, replace=replace)


def get_network(name: str) -> Callable[..., nn.Module]:
  """The network constructor registered as `name` (ValueError naming the registered ones)."""
  return NETWORKS.get(name)


register_network(DEFAULT_NETWORK, ScoreUNet)
