"""A noise-conditional classifier p(y | z_t, gamma_t) for classifier guidance: network and model.

`NoisyClassifier` is a small conditioned ResNet (the score network's blocks,
`vdm_jax.nets.networks`); `NoisyClassifierModel` trains it on z_t = alpha_t x + sigma_t eps at
random noise levels, with the cross-entropy `elbo.categorical_nll`. Its `label_log_prob` is what
`guidance.classifier_guided_eps_fn` differentiates (Dhariwal & Nichol 2021).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vdm_jax.maths import diffusion, elbo
from vdm_jax.nets import networks
from vdm_jax.core.checks import check_number


class NoisyClassifier(nn.Module):
  """Noise-conditional classifier log p(y | z_t) for classifier guidance (Dhariwal & Nichol 2021).

  3x3 conv, `num_blocks` residual blocks conditioned on t, GroupNorm, swish, global average
  pooling, dense to logits.

  Attributes:
    num_classes: number of classes (>= 2).
    channels: width of the residual blocks.
    num_blocks: number of residual blocks (>= 1).
    dtype: computation dtype; params are always float32.
  """
  num_classes: int
  channels: int = 32
  num_blocks: int = 2
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_number("num_classes", self.num_classes, integer=True, low=2)
    check_number("channels", self.channels, integer=True, low=1)
    check_number("num_blocks", self.num_blocks, integer=True, low=1)
    networks.check_dtype(self.dtype)
    super().__post_init__()

  @nn.compact
  def __call__(self, z: ArrayLike, t: ArrayLike, *, train: bool) -> jax.Array:
    """Logits [B, num_classes] float32 for z [B, H, W, C] and t [B] (no dropout: `train` unused)."""
    del train
    z = jnp.asarray(z)
    if z.ndim != 4:
      raise ValueError(f"z must be [B, H, W, C], got shape {z.shape}")
    cond = networks.Conditioning(self.channels, dtype=self.dtype, name="cond")(
        networks.batch_times(t, z.shape[0]))
    h = nn.Conv(self.channels, (3, 3), dtype=self.dtype, name="conv_in")(z.astype(self.dtype))
    for i in range(self.num_blocks):
      h = networks.ResnetBlock(self.channels, 0.0, False, self.dtype, name=f"block_{i}")(h, cond)
    h = nn.swish(nn.GroupNorm(networks.num_groups(self.channels), dtype=self.dtype,
                            name="norm_out")(h))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(h.mean(axis=(1, 2)))
    return logits.astype(jnp.float32)


class NoisyClassifierModel(nn.Module):
  """A noise-conditional classifier p(y | z_t, gamma_t) for classifier guidance.

  It sees z_t = alpha_t x + sigma_t eps (VDM eq. 1, `diffusion.q_sample`) at gamma ~
  Uniform(gamma_min, gamma_max), conditioned like the VDM's score net on
  t_cond = (gamma - cond_gamma_min) / (cond_gamma_max - cond_gamma_min), so its gradient can be
  added to a VDM's eps at the same gamma (survey eq. 163-166; Dhariwal & Nichol 2021).

  Attributes:
    vocab_size: K of the data.
    classifier: a network `(z [B, H, W, C], t_cond [B], *, train)` -> logits [B, num_classes].
    gamma_min, gamma_max: training range of gamma (cover the diffusion model's endpoints).
  """

  vocab_size: int
  classifier: nn.Module
  gamma_min: float = -13.3
  gamma_max: float = 5.0

  def logits(self, z: ArrayLike, gamma: ArrayLike, *, train: bool = False) -> jax.Array:
    """Logits of p(y | z_t, gamma_t): z [B, H, W, C], gamma [B] or scalar -> [B, num_classes]."""
    z = jnp.asarray(z)
    gamma = jnp.broadcast_to(jnp.asarray(gamma, jnp.float32), (z.shape[0],))
    t_cond = (gamma - self.gamma_min) / (self.gamma_max - self.gamma_min)
    return self.classifier(z, t_cond, train=train)

  def log_probs(self, z: ArrayLike, gamma: ArrayLike, *, train: bool = False) -> jax.Array:
    """log p(y | z_t, gamma_t): z [B, H, W, C], gamma [B] or scalar -> [B, num_classes]."""
    return jax.nn.log_softmax(self.logits(z, gamma, train=train), axis=-1)

  def label_log_prob(self, z: ArrayLike, gamma: ArrayLike, labels: ArrayLike) -> jax.Array:
    """log p(labels | z_t, gamma_t) [B] for int labels [B] (what classifier guidance needs)."""
    return -elbo.categorical_nll(labels, self.logits(z, gamma))

  def __call__(self, images: ArrayLike, labels: ArrayLike, *, train: bool,
               gamma: Optional[ArrayLike] = None) -> tuple[jax.Array, jax.Array]:
    """(cross-entropy [B] in nats, correct [B] in {0, 1}) on noised integer images [B, H, W, C].

    gamma: [B] noise levels; None draws them from Uniform(gamma_min, gamma_max) (rng "diffusion").
    """
    x = elbo.encode(elbo.check_data(images, vocab_size=self.vocab_size),
                    vocab_size=self.vocab_size)
    key_gamma, key_eps = jax.random.split(self.make_rng("diffusion"))
    if gamma is None:
      gamma = jax.random.uniform(key_gamma, x.shape[:1], minval=self.gamma_min,
                                 maxval=self.gamma_max)
    gamma = jnp.broadcast_to(jnp.asarray(gamma, jnp.float32), x.shape[:1])
    z = diffusion.q_sample(x, gamma, jax.random.normal(key_eps, x.shape))
    logits = self.logits(z, gamma, train=train)
    labels = jnp.asarray(labels, jnp.int32)
    correct = jnp.argmax(jax.nn.log_softmax(logits, axis=-1), axis=-1) == labels
    return elbo.categorical_nll(labels, logits), correct.astype(jnp.float32)
