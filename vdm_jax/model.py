"""The VDM as a Flax (Linen) module: a noise schedule with its parameters, and a score network.

The module owns parameters only; every loss term comes from `vdm_jax.elbo` (nothing is written
twice). Parameter tree: {"gamma": schedule parameters, "score_net": network parameters}; the
optimiser keys on "gamma" for its schedule learning-rate multiplier and weight-decay mask.

Use from outside (sampling, evaluation) through pure closures, so the samplers' `lax.scan` never
sees a bound module:

    eps_fn = lambda z, g: model.apply(variables, z, g, labels, method=VDM.eps)
    gamma_fn = lambda t: model.apply(variables, t, method=VDM.gamma)
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vdm_jax import diffusion, elbo, schedules
from vdm_jax.networks import ScoreUNet

FIXED_SCHEDULES = ("fixed_linear", "beta_linear", "cosine")
SCHEDULES = FIXED_SCHEDULES + ("learned_linear", "learned_monotone", "learned_nnet")


class NoiseSchedule(nn.Module):
  """gamma(t) as a Flax module; returns a pure callable t -> gamma(t) over its parameters.

  Attributes:
    kind: "fixed_linear", "beta_linear", "cosine" (no parameters), "learned_linear" (learned
      endpoints; the official `learnable_scalar`), "learned_monotone" (monotone network with
      exactly the learned endpoints) or "learned_nnet" (the official `learnable_nnet`: the same
      network, its parameters {"l1", "l2", "l3"} named and initialised as the official ones,
      endpoints implicit).
    gamma_min, gamma_max: endpoints (initial values for the learned kinds).
    hidden: width of the monotone network.
  """

  kind: str = "learned_linear"
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  hidden: int = 1024

  @nn.compact
  def __call__(self) -> schedules.GammaFn:
    gmin, gmax = self.gamma_min, self.gamma_max
    if self.kind == "learned_nnet":
      init = lambda key: schedules.init_nnet(key, gamma_min=gmin, gamma_max=gmax,
                                             hidden=self.hidden)
      params = {name: self.param(name, lambda key, n=name: init(key)[n])
                for name in ("l1", "l2", "l3")}
      return functools.partial(schedules.nnet_gamma, params=params)
    if self.kind == "fixed_linear":
      return functools.partial(schedules.linear_gamma, gamma_min=gmin, gamma_max=gmax)
    if self.kind == "beta_linear":
      return schedules.BetaLinear(gamma_min=gmin, gamma_max=gmax)
    if self.kind == "cosine":
      return schedules.Cosine(gamma_min=gmin, gamma_max=gmax)
    init = schedules.init_learned_linear(gamma_min=gmin, gamma_max=gmax)
    params = {"gamma_min": self.param("gamma_min", lambda _: init["gamma_min"]),
              "delta": self.param("delta", lambda _: init["delta"])}
    if self.kind == "learned_linear":
      return functools.partial(schedules.learned_linear_gamma, params=params)
    if self.kind == "learned_monotone":
      params["net"] = self.param("net", lambda key: schedules.init_monotone(
          key, gamma_min=gmin, gamma_max=gmax, hidden=self.hidden)["net"])
      return functools.partial(schedules.monotone_gamma, params=params)
    raise ValueError(f"unknown schedule {self.kind!r}; expected one of {SCHEDULES}")


class VDM(nn.Module):
  """Variational Diffusion Model: discrete encoder/decoder, schedule, score network.

  Attributes:
    vocab_size: K, the number of values of each data dimension.
    schedule: a NoiseSchedule.
    score_net: a network (z [B, H, W, C], t_cond [B], label [B] | None, *, train) -> eps_hat.
    num_steps: T for the training loss; 0 = continuous time.
    cond_gamma_min, cond_gamma_max: the network sees t_cond = (gamma - min) / (max - min), fixed
      constants (the initial endpoints), so conditioning does not move with a learned schedule.
    objective, weighting, weighting_bias: the training objective (`elbo.training_loss`): "elbo"
      (the bound), "simple" (DDPM's L_simple, needs num_steps = T) or "weighted" (w(log-SNR) on
      the continuous loss). The reported bound (`__call__`) is always the unweighted ELBO.
  """

  vocab_size: int
  schedule: NoiseSchedule
  score_net: nn.Module
  num_steps: int = 0
  cond_gamma_min: float = -13.3
  cond_gamma_max: float = 5.0
  objective: str = "elbo"
  weighting: str = "sigmoid"
  weighting_bias: float = 0.0

  def gamma_fn(self) -> schedules.GammaFn:
    return self.schedule()

  def gamma(self, t: ArrayLike) -> jax.Array:
    """gamma(t), shape of `t`."""
    return self.schedule()(t)

  def eps(self, z: ArrayLike, gamma: ArrayLike, label: Optional[ArrayLike] = None,
          conditioning: Optional[ArrayLike] = None, *, train: bool = False) -> jax.Array:
    """eps_hat(z_t; gamma_t[, label, conditioning]): z [B, H, W, C], gamma [B] (or scalar),
    label [B] int or None, conditioning [B] (the official scalar input) or None -> [B, H, W, C]."""
    z = jnp.asarray(z)
    gamma = jnp.broadcast_to(jnp.asarray(gamma, jnp.float32), (z.shape[0],))
    t_cond = (gamma - self.cond_gamma_min) / (self.cond_gamma_max - self.cond_gamma_min)
    if conditioning is None:
      return self.score_net(z, t_cond, label, train=train)
    return self.score_net(z, t_cond, label, conditioning, train=train)

  def __call__(self, images: ArrayLike, label: Optional[ArrayLike] = None,
               conditioning: Optional[ArrayLike] = None, *, train: bool,
               num_steps: Optional[int] = None, t: Optional[ArrayLike] = None) -> elbo.ELBOTerms:
    """Per-example ELBO terms in nats for integer images [B, H, W, C] (rng stream "diffusion").

    Args:
      images: integer data in [0, vocab_size).
      label: [B] int labels for a class-conditional network, or None.
      conditioning: [B] the official scalar conditioning input (e.g. the augmentation flag), or
        None (read as 0 by a network with the input).
      train: enables dropout (rng stream "dropout").
      num_steps: overrides the module's T (e.g. to evaluate a continuous model with T steps).
      t: optional explicit times [B].
    """
    gamma_fn = self.schedule()
    eps_fn = lambda z, g: self.eps(z, g, label, conditioning, train=train)
    steps = self.num_steps if num_steps is None else num_steps
    return elbo.elbo_terms(self.make_rng("diffusion"), images, eps_fn=eps_fn, gamma_fn=gamma_fn,
                           vocab_size=self.vocab_size, num_steps=steps, t=t)

  def training_loss(self, images: ArrayLike, label: Optional[ArrayLike] = None,
                    conditioning: Optional[ArrayLike] = None, *, train: bool) -> jax.Array:
    """Per-example loss [B] of `objective` (`elbo.training_loss`; rng "diffusion", "dropout")."""
    eps_fn = lambda z, g: self.eps(z, g, label, conditioning, train=train)
    return elbo.training_loss(self.make_rng("diffusion"), images, eps_fn=eps_fn,
                              gamma_fn=self.schedule(), vocab_size=self.vocab_size,
                              objective=self.objective, num_steps=self.num_steps,
                              weighting=self.weighting, weighting_bias=self.weighting_bias)

  def endpoints(self) -> tuple[jax.Array, jax.Array]:
    """(gamma(0), gamma(1))."""
    fn = self.schedule()
    return fn(jnp.zeros((), jnp.float32)), fn(jnp.ones((), jnp.float32))


def build_model(*, vocab_size: int, schedule: str, gamma_min: float, gamma_max: float,
                channels: int, num_blocks: int, fourier_exponents: tuple[int, ...],
                attention_everywhere: bool, dropout: float, num_classes: int, block_impl: str,
                remat: bool, dtype: Any, num_steps: int = 0, schedule_hidden: int = 1024,
                objective: str = "elbo", weighting: str = "sigmoid",
                weighting_bias: float = 0.0, norm_groups: int = 0,
                conditioning_input: bool = False) -> VDM:
  """A VDM from typed hyperparameters (train.py unpacks the config into these)."""
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
  schedules.check_endpoints(gamma_min, gamma_max)
  net = ScoreUNet(channels=channels, num_blocks=num_blocks,
                  fourier_exponents=tuple(fourier_exponents),
                  attention_everywhere=attention_everywhere, dropout=dropout,
                  num_classes=num_classes, conditioning_input=conditioning_input,
                  norm_groups=norm_groups, block_impl=block_impl, remat=remat, dtype=dtype)
  return VDM(vocab_size=vocab_size,
             schedule=NoiseSchedule(kind=schedule, gamma_min=gamma_min, gamma_max=gamma_max,
                                    hidden=schedule_hidden),
             score_net=net, num_steps=num_steps, cond_gamma_min=gamma_min,
             cond_gamma_max=gamma_max, objective=objective, weighting=weighting,
             weighting_bias=weighting_bias)


class NoisyClassifierModel(nn.Module):
  """A noise-conditional classifier p(y | z_t, gamma_t) for classifier guidance.

  It sees z_t = alpha_t x + sigma_t eps (VDM eq. 1, `diffusion.q_sample`) at gamma ~
  Uniform(gamma_min, gamma_max), conditioned like the VDM's score net on
  t_cond = (gamma - cond_gamma_min) / (cond_gamma_max - cond_gamma_min), so its gradient can be
  added to a VDM's eps at the same gamma (survey eq. 163-166; Dhariwal & Nichol 2021).

  Attributes:
    vocab_size: K of the data.
    classifier: a network (z [B, H, W, C], t_cond [B], *, train) -> logits [B, num_classes].
    gamma_min, gamma_max: training range of gamma (cover the diffusion model's endpoints).
  """

  vocab_size: int
  classifier: nn.Module
  gamma_min: float = -13.3
  gamma_max: float = 5.0

  def log_probs(self, z: ArrayLike, gamma: ArrayLike, *, train: bool = False) -> jax.Array:
    """log p(y | z_t, gamma_t): z [B, H, W, C], gamma [B] or scalar -> [B, num_classes]."""
    z = jnp.asarray(z)
    gamma = jnp.broadcast_to(jnp.asarray(gamma, jnp.float32), (z.shape[0],))
    t_cond = (gamma - self.gamma_min) / (self.gamma_max - self.gamma_min)
    return jax.nn.log_softmax(self.classifier(z, t_cond, train=train), axis=-1)

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
    log_p = self.log_probs(z, gamma, train=train)
    labels = jnp.asarray(labels, jnp.int32)
    nll = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
    return nll, (jnp.argmax(log_p, axis=-1) == labels).astype(jnp.float32)
