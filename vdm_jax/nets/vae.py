"""Latent diffusion in Flax (Linen): a discrete-decoder VAE, and a VDM over its frozen latents.

`VAE` is a convolutional VAE for integer images: encoder [B, H, W, C] -> q(y | x) =
N(mean, diag(exp(log_var))) on a latent [B, H / 2^n, W / 2^n, latent_channels], decoder y ->
logits [B, H, W, C, K] of a per-dimension softmax p(x | y). Its negative ELBO (Kingma & Welling
2014) comes from `vdm_jax.maths.latent.vae_terms`.

`LatentVDM` keeps a trained VAE frozen and models its latent with a VDM (schedule + score net, as
`vdm_jax.nets.model.VDM`); its bound on -log p(x) (the VAE's reconstruction, minus the entropy of
q(y | x), plus the VDM bound on -log p_VDM(y)) comes from `vdm_jax.maths.latent.composed_terms`.
The VAE's parameters live in the variable collection "vae", not "params", so an optimiser over
"params" never sees them::

    variables = {"params": vdm_params, "vae": {"autoencoder": vae_params}}   # make_variables
    terms = model.apply(variables, images, train=True,
                        rngs={"latent": k1, "diffusion": k2, "dropout": k3})

Samplers from `vdm_jax.maths.sampling` run on latents through the same closures as for a VDM::

    eps_fn = lambda z, g: model.apply(variables, z, g, label, method=LatentVDM.eps)
    gamma_fn = lambda t: model.apply(variables, t, method=LatentVDM.gamma)
    y = sampling.ancestral_sample(key, eps_fn=eps_fn, gamma_fn=gamma_fn, shape=latent_shape, ...)
    images = model.apply(variables, y, method=LatentVDM.decode)

References: Kingma & Welling 2014 (VAE); Vahdat et al. 2021 (LSGM: score-based prior in latent
space); Rombach et al. 2022 (latent diffusion); Kingma et al. 2021 (VDM).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vdm_jax.maths import elbo, latent
from vdm_jax.core.checks import check_number
from vdm_jax.nets.model import NoiseSchedule
from vdm_jax.nets.networks import num_groups

VAETerms = latent.VAETerms
ComposedTerms = latent.ComposedTerms
VAE_COLLECTION = "vae"
VAE_NAME = "autoencoder"
LOG_VAR_RANGE = (-30.0, 20.0)


class _ResBlock(nn.Module):
  """GroupNorm-swish-conv twice, plus a (1x1-projected) skip: [B, H, W, C_in] -> [..., out]."""
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.swish(nn.GroupNorm(num_groups(x.shape[-1]), dtype=self.dtype)(x))
    h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype)(h)
    h = nn.swish(nn.GroupNorm(num_groups(self.out_channels), dtype=self.dtype)(h))
    h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = nn.Dense(self.out_channels, dtype=self.dtype, name="skip")(x)
    return x + h


def _level_channels(channels: int, level: int) -> int:
  """Width at resolution level `level` (0 = full): channels * 2^level, at most 4 channels."""
  return channels * min(2**level, 4)


class _Encoder(nn.Module):
  """Encoded images [B, H, W, C] -> (mean, log_var), each [B, H/2^n, W/2^n, latent_channels]."""
  channels: int
  latent_channels: int
  num_down: int
  num_blocks: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = nn.Conv(self.channels, (3, 3), dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
    for level in range(self.num_down + 1):
      for _ in range(self.num_blocks):
        h = _ResBlock(_level_channels(self.channels, level), self.dtype)(h)
      if level < self.num_down:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype)(h)
    h = nn.swish(nn.GroupNorm(num_groups(h.shape[-1]), dtype=self.dtype)(h))
    h = nn.Conv(2 * self.latent_channels, (3, 3), dtype=self.dtype, name="conv_out")(h)
    mean, log_var = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(log_var, *LOG_VAR_RANGE)


class _Decoder(nn.Module):
  """Latent y [B, h, w, c] -> logits [B, h 2^n, w 2^n, data_channels, vocab_size]."""
  channels: int
  data_channels: int
  vocab_size: int
  num_down: int
  num_blocks: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    top = _level_channels(self.channels, self.num_down)
    h = nn.Conv(top, (3, 3), dtype=self.dtype, name="conv_in")(y.astype(self.dtype))
    for level in range(self.num_down, -1, -1):
      for _ in range(self.num_blocks):
        h = _ResBlock(_level_channels(self.channels, level), self.dtype)(h)
      if level > 0:
        b, hh, ww, c = h.shape
        h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), method="nearest")
        h = nn.Conv(c, (3, 3), dtype=self.dtype)(h)
    h = nn.swish(nn.GroupNorm(num_groups(h.shape[-1]), dtype=self.dtype)(h))
    logits = nn.Conv(self.data_channels * self.vocab_size, (3, 3), dtype=self.dtype,
                     name="conv_out")(h)
    return logits.astype(jnp.float32).reshape(h.shape[:3] + (self.data_channels, self.vocab_size))


class VAE(nn.Module):
  """Convolutional VAE with a Gaussian encoder and a discrete (softmax) decoder.

  Attributes:
    vocab_size: K, the number of values of each data dimension (17 for digits, 256 for CIFAR-10).
    channels: width at full resolution (doubled per level, at most 4x).
    latent_channels: channels of the latent y.
    num_down: stride-2 downsamplings: the latent is [B, H / 2^num_down, W / 2^num_down, c].
    dtype: computation dtype; params, latents and logits are float32.
    data_channels: C of the images.
    num_blocks: residual blocks per resolution level (encoder and decoder each; 0 = convs only).
  """
  vocab_size: int
  channels: int = 32
  latent_channels: int = 4
  num_down: int = 1
  dtype: Any = jnp.float32
  data_channels: int = 1
  num_blocks: int = 1

  def __post_init__(self):
    check_number("vocab_size", self.vocab_size, integer=True, low=2)
    for name in ("channels", "latent_channels", "data_channels"):
      check_number(name, getattr(self, name), integer=True, low=1)
    for name in ("num_down", "num_blocks"):
      check_number(name, getattr(self, name), integer=True, low=0)
    super().__post_init__()

  def setup(self):
    self.encoder = _Encoder(self.channels, self.latent_channels, self.num_down, self.num_blocks,
                            self.dtype)
    self.decoder = _Decoder(self.channels, self.data_channels, self.vocab_size, self.num_down,
                            self.num_blocks, self.dtype)

  def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """[B, H, W, C] -> [B, H / 2^num_down, W / 2^num_down, latent_channels] (ValueError if bad)."""
    image_shape = tuple(image_shape)
    f = 2**self.num_down
    if len(image_shape) != 4 or image_shape[3] != self.data_channels or any(
        d % f for d in image_shape[1:3]):
      raise ValueError(f"expected images [B, H, W, {self.data_channels}] with H and W divisible "
                       f"by 2^num_down = {f}, got shape {image_shape}")
    return (image_shape[0], image_shape[1] // f, image_shape[2] // f, self.latent_channels)

  def encode(self, images: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """q(y | x) of integer images [B, H, W, C]: (mean, log_var), each of `latent_shape`."""
    k = elbo.check_data(images, vocab_size=self.vocab_size)
    self.latent_shape(k.shape)
    return self.encoder(elbo.encode(k, vocab_size=self.vocab_size))

  def decode_logits(self, y: ArrayLike) -> jax.Array:
    """Logits of p(x | y): latent [B, h, w, latent_channels] -> [B, H, W, C, vocab_size]."""
    y = jnp.asarray(y, jnp.float32)
    if y.ndim != 4 or y.shape[-1] != self.latent_channels:
      raise ValueError(f"expected a latent [B, h, w, {self.latent_channels}], got {y.shape}")
    return self.decoder(y)

  def decode(self, y: ArrayLike) -> jax.Array:
    """The most probable image under p(x | y): int32 [B, H, W, C] in [0, vocab_size)."""
    return jnp.argmax(self.decode_logits(y), axis=-1).astype(jnp.int32)

  def __call__(self, images: ArrayLike, label: Optional[ArrayLike] = None, *,
               train: bool) -> latent.VAETerms:
    """Negative ELBO terms (reconstruction, kl), each [B] nats (rng stream "latent").

    `label` must be None (the VAE is unconditional); `train` is accepted for the trainer's
    interface (no dropout).
    """
    del train
    if label is not None:
      raise ValueError("label given to the unconditional VAE; pass label=None")
    mean, log_var = self.encode(images)
    return latent.vae_terms(self.make_rng("latent"), images, mean=mean, log_var=log_var,
                            logits_fn=self.decode_logits, vocab_size=self.vocab_size)


def _frozen_vae(vae: VAE, *, init: bool) -> VAE:
  """A copy of `vae` whose "params" are stored in the collection "vae" (map_variables)."""
  fields = {f.name: getattr(vae, f.name) for f in dataclasses.fields(vae)
            if f.init and f.name not in ("parent", "name")}
  wrapped = nn.map_variables(
      type(vae), ["params", VAE_COLLECTION],
      trans_in_fn=lambda v: {"params": v.get(VAE_COLLECTION, {})},
      trans_out_fn=lambda v: {VAE_COLLECTION: v.get("params", {})},
      init=init, mutable=init, methods=["encode", "decode_logits", "decode"])
  return wrapped(**fields, name=VAE_NAME)


class LatentVDM(nn.Module):
  """A VDM prior over the latent of a frozen VAE; its bound is on -log p(x) of the data.

  Attributes:
    vae: the VAE (its parameters come from the collection "vae", see `make_variables`).
    schedule: a NoiseSchedule for the latent VDM.
    score_net: a network `(z [B, h, w, c], t_cond [B], label [B] | None, *, train)` -> eps_hat.
    num_steps: T for the training loss; 0 = continuous time.
    cond_gamma_min, cond_gamma_max: the network sees t_cond = (gamma - min) / (max - min).
    control_variate: use the unbiased control variate of `latent.latent_vdm_terms` at the unit
      scale (cv_log_var = 0; exact for the N(0, I) base below): a lower variance of the bound
      estimate, the same expectation.
    gaussian_base: eps_hat = sigma_t z_t + net(z_t): the network predicts a residual on the exact
      eps_hat of y ~ N(0, I) (E[eps | z_t] = sigma_t z_t there), the VAE's own prior. With a
      zero-initialised output layer (ScoreUNet) the latent VDM starts as N(0, I), so the
      composed bound starts at the VAE's bound (up to the small VDM gap) and training improves
      on it (LSGM's "mixed score", Vahdat et al. 2021, section 3.2).
  """
  vae: VAE
  schedule: NoiseSchedule
  score_net: nn.Module
  num_steps: int = 0
  cond_gamma_min: float = -13.3
  cond_gamma_max: float = 5.0
  control_variate: bool = True
  gaussian_base: bool = True

  def setup(self):
    self.autoencoder = _frozen_vae(self.vae, init=self.is_initializing())

  def gamma(self, t: ArrayLike) -> jax.Array:
    """gamma(t), shape of `t`."""
    return self.schedule()(t)

  def endpoints(self) -> tuple[jax.Array, jax.Array]:
    """(gamma(0), gamma(1))."""
    fn = self.schedule()
    return fn(jnp.zeros((), jnp.float32)), fn(jnp.ones((), jnp.float32))

  def eps(self, z: ArrayLike, gamma: ArrayLike, label: Optional[ArrayLike] = None, *,
          train: bool = False) -> jax.Array:
    """eps_hat(z_t; gamma_t[, label]): z [B, h, w, c], gamma [B] or scalar -> [B, h, w, c]."""
    z = jnp.asarray(z)
    gamma = jnp.broadcast_to(jnp.asarray(gamma, jnp.float32), (z.shape[0],))
    t_cond = (gamma - self.cond_gamma_min) / (self.cond_gamma_max - self.cond_gamma_min)
    eps_hat = self.score_net(z, t_cond, label, train=train)
    if self.gaussian_base:   # + E[eps | z_t] of y ~ N(0, I), i.e. sigma_t z_t
      eps_hat = eps_hat + latent.gaussian_eps(z, gamma)
    return eps_hat

  def encode(self, images: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """The frozen encoder's q(y | x): (mean, log_var) [B, h, w, c] of integer images."""
    return self.autoencoder.encode(images)

  def decode(self, y: ArrayLike) -> jax.Array:
    """Integer images [B, H, W, C] (argmax of p(x | y)) from latents [B, h, w, c]."""
    return self.autoencoder.decode(y)

  def __call__(self, images: ArrayLike, label: Optional[ArrayLike] = None, *, train: bool,
               num_steps: Optional[int] = None,
               t: Optional[ArrayLike] = None) -> latent.ComposedTerms:
    """Per-example terms of the composed bound on -log p(x), in nats, for integer images.

    Rng streams: "latent" (y ~ q(y | x)), "diffusion" (t, eps) and "dropout" (when train).

    Args:
      images: integer data [B, H, W, C] in [0, vocab_size).
      label: [B] int labels for a class-conditional score net, or None.
      train: enables dropout in the score net.
      num_steps: overrides the module's T (e.g. to evaluate with T steps).
      t: optional explicit times [B].
    """
    mean, log_var = self.encode(images)
    steps = self.num_steps if num_steps is None else num_steps
    y = latent.sample_gaussian(self.make_rng("latent"), mean, log_var)
    return latent.composed_terms_at(
        self.make_rng("diffusion"), images, y, log_var=log_var,
        logits_fn=self.autoencoder.decode_logits,
        eps_fn=lambda z, g: self.eps(z, g, label, train=train), gamma_fn=self.schedule(),
        vocab_size=self.vae.vocab_size, num_steps=steps,
        t=t, cv_log_var=0.0 if self.control_variate else None)


def make_variables(params: Any, vae_params: Any) -> dict[str, Any]:
  """LatentVDM variables from its own "params" and a trained VAE's "params" (frozen).

  Returns:
    {"params": params, "vae": {"autoencoder": vae_params}}: pass to `LatentVDM.apply`; the
    optimiser sees only "params". `frozen_collections(vae_params)` is the part without "params".
  """
  return {"params": params, **frozen_collections(vae_params)}


def frozen_collections(vae_params: Any) -> dict[str, Any]:
  """{"vae": {"autoencoder": vae_params}}: the LatentVDM collections that hold the frozen VAE."""
  return {VAE_COLLECTION: {VAE_NAME: vae_params}}


def vae_params_of(variables: Any) -> Any:
  """The VAE "params" inside LatentVDM variables (inverse of `make_variables`)."""
  try:
    return variables[VAE_COLLECTION][VAE_NAME]
  except (KeyError, TypeError):
    raise ValueError(f"expected LatentVDM variables with a {VAE_COLLECTION!r} collection holding "
                     f"{VAE_NAME!r}, got keys {list(getattr(variables, 'keys', lambda: [])())}"
                     ) from None
