"""The VDM as a Flax (Linen) module: a noise schedule with its parameters, and a score network.

The module owns parameters only; every loss term comes from `vdm_jax.maths.elbo` (the training
objectives from `vdm_jax.maths.objectives`; nothing is written twice). Parameter tree:
{SCHEDULE_KEY: schedule parameters, "score_net": network parameters}; the optimiser keys on
SCHEDULE_KEY for its schedule learning-rate multiplier and weight-decay mask.

Configs name their schedule (`model.schedule`) from the registry below: a new one is a function
returning a `ScheduleDef` and one `register_schedule` line.

Use from outside (sampling, evaluation) through pure closures, so the samplers' `lax.scan` never
sees a bound module:

    eps_fn = lambda z, g: model.apply(variables, z, g, labels, method=VDM.eps)
    gamma_fn = lambda t: model.apply(variables, t, method=VDM.gamma)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vdm_jax.core import checks, registry
from vdm_jax.maths import elbo, objectives, schedules
from vdm_jax.nets import networks

# The name of the VDM's (and the latent VDM's) NoiseSchedule attribute, hence the top-level key
# of the schedule's parameters: the one place the optimiser learns it from.
SCHEDULE_KEY = "schedule"


# ----------------------------------------------------------------------------------------------
# The registry of named schedules.


class ScheduleDef(NamedTuple):
  """One schedule of a family, for given endpoints.

  Attributes:
    gamma_fn: params -> the schedule t -> gamma(t) (params is {} for a fixed schedule).
    init: PRNG key -> the initial params ({} for a fixed schedule).
    param_names: the top-level keys of params, in creation order: each becomes one parameter of
      `NoiseSchedule` (initialised to `init(key)[name]`).
  """

  gamma_fn: Callable[[schedules.Params], schedules.GammaFn]
  init: Callable[[jax.Array], schedules.Params] = lambda key: {}
  param_names: tuple[str, ...] = ()


class ScheduleSpec(NamedTuple):
  """A registered family of schedules.

  Attributes:
    make: `(*, gamma_min, gamma_max, hidden)` -> ScheduleDef with these endpoints (the initial
      ones of a learned schedule); `hidden` is the width of a schedule network (unused by others).
    learned: whether the schedule has parameters (trained with the model).
    learned_interior: whether its parameters shape gamma(t) between the endpoints (not only the
      endpoints), so that `schedule_objective = "variance"` has something to train.
  """

  make: Callable[..., ScheduleDef]
  learned: bool
  learned_interior: bool = False


SCHEDULES: registry.Registry[ScheduleSpec] = registry.Registry("schedule")


def register_schedule(name: str, make: Callable[..., ScheduleDef], *, learned: bool,
                      learned_interior: bool = False, replace: bool = False) -> ScheduleSpec:
  """Makes `model.schedule = name` build `make(gamma_min=, gamma_max=, hidden=)`."""
  return SCHEDULES.register(name, ScheduleSpec(make, learned, learned and learned_interior),
                            replace=replace)


def get_schedule(name: str) -> ScheduleSpec:
  """The family registered as `name` (ValueError naming the registered ones if none)."""
  return SCHEDULES.get(name)


def fixed_schedule(make_fn: Callable[..., schedules.GammaFn]) -> Callable[..., ScheduleDef]:
  """The `make` of a parameter-free family `make_fn(gamma_min=, gamma_max=) -> GammaFn`."""
  def make(*, gamma_min: float, gamma_max: float, hidden: int) -> ScheduleDef:
    del hidden
    return ScheduleDef(lambda params: make_fn(gamma_min=gamma_min, gamma_max=gamma_max))
  return make


def learned_schedule(init: Callable[..., schedules.Params], gamma: Callable[..., jax.Array],
                     names: tuple[str, ...]) -> Callable[..., ScheduleDef]:
  """The `make` of a learned family `gamma(t, params)`, params from
  `init(key, gamma_min=, gamma_max=, hidden=)` with the top-level keys `names`."""
  def make(*, gamma_min: float, gamma_max: float, hidden: int) -> ScheduleDef:
    first = lambda key: init(key, gamma_min=gamma_min, gamma_max=gamma_max, hidden=hidden)
    return ScheduleDef(lambda params: functools.partial(gamma, params=params), first, names)
  return make


def _linear(*, gamma_min: float, gamma_max: float) -> schedules.GammaFn:
  return functools.partial(schedules.linear_gamma, gamma_min=gamma_min, gamma_max=gamma_max)


def _init_linear(key: jax.Array, *, hidden: int, **endpoints: float) -> schedules.Params:
  del key, hidden
  return schedules.init_learned_linear(**endpoints)


register_schedule("fixed_linear", fixed_schedule(_linear), learned=False)
register_schedule("learned_linear", learned_schedule(
    _init_linear, schedules.learned_linear_gamma, ("gamma_min", "delta")), learned=True)
register_schedule("learned_monotone", learned_schedule(
    schedules.init_monotone, schedules.monotone_gamma, ("gamma_min", "delta", "net")),
                  learned=True, learned_interior=True)
register_schedule("learned_nnet", learned_schedule(
    schedules.init_nnet, schedules.nnet_gamma, ("l1", "l2", "l3")), learned=True,
                  learned_interior=True)
register_schedule("beta_linear", fixed_schedule(schedules.BetaLinear), learned=False)
register_schedule("cosine", fixed_schedule(schedules.Cosine), learned=False)


class NoiseSchedule(nn.Module):
  """gamma(t) as a Flax module; returns a pure callable t -> gamma(t) over its parameters.

  Attributes:
    kind: a registered schedule (`register_schedule`): "fixed_linear", "beta_linear", "cosine"
      (no parameters), "learned_linear" (learned endpoints; the official `learnable_scalar`),
      "learned_monotone" (monotone network with exactly the learned endpoints) or "learned_nnet"
      (the official `learnable_nnet`: the same network, its parameters {"l1", "l2", "l3"} named
      and initialised as the official ones, endpoints implicit).
    gamma_min, gamma_max: endpoints (initial values for the learned kinds).
    hidden: width of the monotone network.
  """

  kind: str = "learned_linear"
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  hidden: int = 1024

  @nn.compact
  def __call__(self) -> schedules.GammaFn:
    spec = get_schedule(self.kind).make(gamma_min=self.gamma_min, gamma_max=self.gamma_max,
                                        hidden=self.hidden)
    params = {name: self.param(name, lambda key, n=name: spec.init(key)[n])
              for name in spec.param_names}
    return spec.gamma_fn(params)


class VDM(nn.Module):
  """Variational Diffusion Model: discrete encoder/decoder, schedule, score network.

  Attributes:
    vocab_size: K, the number of values of each data dimension.
    schedule: a NoiseSchedule.
    score_net: a network `(z [B, H, W, C], t_cond [B], label [B] | None, *, train)` -> eps_hat.
    num_steps: T for the training loss; 0 = continuous time.
    cond_gamma_min, cond_gamma_max: the network sees t_cond = (gamma - min) / (max - min), fixed
      constants (the initial endpoints), so conditioning does not move with a learned schedule.
    objective, weighting, weighting_bias: the training objective (`objectives.training_loss`):
      "elbo" (the bound), "simple" (DDPM's L_simple, needs num_steps = T) or "weighted"
      (w(log-SNR) on the continuous loss). The reported bound (`__call__`) is always the
      unweighted ELBO.
    schedule_objective: what a learned schedule's interior is trained on with `train=True`:
      "elbo" (the bound's gradient) or "variance" (the gradient of E[L^2], the endpoints keeping
      the bound's gradient: `objectives.variance_elbo_terms`; continuous time, objective "elbo").
      The values of the terms are the same either way.
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
  schedule_objective: str = "elbo"

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
    if train and self.schedule_objective == "variance":
      if steps:
        raise ValueError(f"schedule_objective 'variance' trains in continuous time; got "
                         f"num_steps={steps}")
      return objectives.variance_elbo_terms(self.make_rng("diffusion"), images, eps_fn=eps_fn,
                                            gamma_fn=gamma_fn, vocab_size=self.vocab_size, t=t)
    return elbo.elbo_terms(self.make_rng("diffusion"), images, eps_fn=eps_fn, gamma_fn=gamma_fn,
                           vocab_size=self.vocab_size, num_steps=steps, t=t)

  def training_loss(self, images: ArrayLike, label: Optional[ArrayLike] = None,
                    conditioning: Optional[ArrayLike] = None, *, train: bool) -> jax.Array:
    """Per-example loss [B] of `objective` (`objectives.training_loss`; rng "diffusion",
    "dropout")."""
    eps_fn = lambda z, g: self.eps(z, g, label, conditioning, train=train)
    return objectives.training_loss(
        self.make_rng("diffusion"), images, eps_fn=eps_fn, gamma_fn=self.schedule(),
        vocab_size=self.vocab_size, objective=self.objective, num_steps=self.num_steps,
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
                conditioning_input: bool = False,
                network: str = networks.DEFAULT_NETWORK,
                schedule_objective: str = "elbo") -> VDM:
  """A VDM from typed hyperparameters (`tasks.build_vdm` unpacks the config into these);
  `schedule` and `network` are registered names (`register_schedule`,
  `networks.register_network`)."""
  spec = get_schedule(schedule)   # an unknown name fails here, naming the registered ones
  schedules.check_endpoints(gamma_min, gamma_max)
  checks.check_choice("schedule objective", schedule_objective, objectives.SCHEDULE_OBJECTIVES)
  if schedule_objective == "variance" and (
      not spec.learned_interior or objective != "elbo" or num_steps):
    raise ValueError(f"schedule_objective 'variance' needs a schedule with a learned interior, "
                     f"objective 'elbo' and num_steps 0; got schedule={schedule!r}, "
                     f"objective={objective!r}, num_steps={num_steps}")
  net = networks.get_network(network)(
      channels=channels, num_blocks=num_blocks, fourier_exponents=tuple(fourier_exponents),
      attention_everywhere=attention_everywhere, dropout=dropout, num_classes=num_classes,
      conditioning_input=conditioning_input, norm_groups=norm_groups, block_impl=block_impl,
      remat=remat, dtype=dtype)
  return VDM(vocab_size=vocab_size,
             schedule=NoiseSchedule(kind=schedule, gamma_min=gamma_min, gamma_max=gamma_max,
                                    hidden=schedule_hidden),
             score_net=net, num_steps=num_steps, cond_gamma_min=gamma_min,
             cond_gamma_max=gamma_max, objective=objective, weighting=weighting,
             weighting_bias=weighting_bias, schedule_objective=schedule_objective)
