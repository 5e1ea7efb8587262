"""What the one trainer optimises: a task turns a config into a module and pure closures.

`train.py` runs every task through the same jitted step, checkpointing, evaluation loop and
metrics. The contract is the `Task` protocol. Tasks are registered by name in `TASKS` (as
schedules, networks, samplers and data sets are), each with a builder
`(config, info, *, vae_params) -> Task`; `config.task` names one: "vdm" (the VDM bound or another
objective, optionally class-conditional), "classifier" (a noise-conditional classifier for
classifier guidance), "vae" (a discrete-decoder VAE) and "latent_vdm" (a VDM on the latents of a
trained, frozen VAE; its bound is on -log p(x)).
Tasks never read run directories: the latent VDM's trained VAE parameters are passed in
(`build_task(..., vae_params=)`, read by `runs.load_vae_params`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdm_jax.core import registry
from vdm_jax.nets import classifier as classifier_lib
from vdm_jax.datasets import data
from vdm_jax.maths import elbo, latent, schedules
from vdm_jax.nets import model as model_lib, networks, vae as vae_lib

PyTree = Any
SamplerFns = tuple[Callable, Callable, tuple[int, ...], Callable | None]


@runtime_checkable
class Task(Protocol):
  """What the trainer, the evaluation and the samplers need of a task (methods pure, traced
  under jit).

  Attributes:
    name: the registered name (config.task).
    headline: the eval value whose standard error is reported ("bpd" for generative tasks).
    info: the data set the task models.
  """
  name: str
  headline: str
  info: data.DatasetInfo

  def init(self, key: jax.Array) -> tuple[PyTree, PyTree]:
    """(params, frozen): the trained parameters, and {} or parameters kept fixed."""

  def loss(self, params: PyTree, frozen: PyTree, batch: dict[str, jax.Array], key: jax.Array
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar loss, {name: scalar} metrics) of a batch, in train mode."""

  def eval_terms(self, params: PyTree, frozen: PyTree, batch: dict[str, jax.Array],
                 key: jax.Array, *, num_steps: int) -> dict[str, jax.Array]:
    """{name: [B] per-example values} (the headline among them); T = num_steps (0: continuous)."""

  def param_metrics(self, params: PyTree) -> dict[str, jax.Array]:
    """{name: scalar} logged every step (e.g. the schedule's endpoints)."""

  def sampler_fns(self, params: PyTree, frozen: PyTree, labels: jax.Array | None = None
                  ) -> SamplerFns:
    """(eps_fn, gamma_fn, shape of one sample, decode or None) for the samplers; raises where
    the task does not sample."""


def _dummy_images(info: data.DatasetInfo, batch: int = 1) -> jax.Array:
  return jnp.zeros((batch,) + tuple(info.shape), jnp.int32)


def terms_bpd(terms: Any, *, num_dims: int) -> dict[str, jax.Array]:
  """{"bpd": the bound, "<term>_bpd": each term} in bits per dimension, [B] each, of per-example
  terms in nats (a NamedTuple with a `total`: `elbo.ELBOTerms`, `latent.VAETerms`, ...)."""
  out = {"bpd": elbo.bits_per_dim(terms.total, num_dims=num_dims)}
  out.update({f"{k}_bpd": elbo.bits_per_dim(v, num_dims=num_dims)
              for k, v in terms._asdict().items()})
  return out


@dataclasses.dataclass(frozen=True)
class VDMTask:
  """A (possibly class-conditional) VDM trained on its bound.

  Class-conditional training replaces each label by the null label with probability p_uncond
  (classifier-free guidance, Ho & Salimans 2021). Evaluation reports the unconditional bound
  (null label), i.e. a bound on -log p(x).
  """

  model: model_lib.VDM
  info: data.DatasetInfo
  p_uncond: float = 0.0
  name: str = "vdm"
  headline: str = "bpd"

  @property
  def num_dims(self) -> int:
    return int(np.prod(self.info.shape))

  @property
  def num_classes(self) -> int:
    return self.model.score_net.num_classes

  def init(self, key: jax.Array) -> tuple[PyTree, PyTree]:
    k_params, k_diff = jax.random.split(key)
    params = self.model.init({"params": k_params, "diffusion": k_diff, "dropout": k_diff},
                             _dummy_images(self.info), train=False)["params"]
    return params, {}

  def _labels(self, batch: dict[str, jax.Array], key: jax.Array) -> jax.Array | None:
    if not self.num_classes:
      return None
    drop = jax.random.bernoulli(key, self.p_uncond, batch["label"].shape)
    return jnp.where(drop, self.num_classes, batch["label"])

  def loss(self, params, frozen, batch, key):
    """The bound in bpd (objective "elbo", its terms logged), else the objective's batch mean."""
    del frozen
    k_diff, k_drop, k_label = jax.random.split(key, 3)
    args = ({"params": params}, batch["image"], self._labels(batch, k_label),
            batch.get("conditioning"))
    rngs = {"diffusion": k_diff, "dropout": k_drop}
    if self.model.objective != "elbo":
      loss = jnp.mean(self.model.apply(*args, train=True, rngs=rngs,
                                       method=model_lib.VDM.training_loss))
      return loss, {self.model.objective + "_loss": loss}
    terms = self.model.apply(*args, train=True, rngs=rngs)
    out = {k: jnp.mean(v) for k, v in terms_bpd(terms, num_dims=self.num_dims).items()}
    return out["bpd"], out

  def eval_terms(self, params, frozen, batch, key, *, num_steps: int) -> dict[str, jax.Array]:
    del frozen
    terms = self.model.apply({"params": params}, batch["image"], None, train=False,
                             num_steps=num_steps, rngs={"diffusion": key})
    return terms_bpd(terms, num_dims=self.num_dims)

  def param_metrics(self, params) -> dict[str, jax.Array]:
    gamma_0, gamma_1 = self.model.apply({"params": params}, method=model_lib.VDM.endpoints)
    return {"gamma_0": gamma_0, "gamma_1": gamma_1}

  def sampler_fns(self, params, frozen, labels=None):
    """(eps_fn, gamma_fn, shape of one sample, decode or None: samplers decode z_0 themselves)."""
    del frozen
    if labels is not None and not self.num_classes:
      raise ValueError("labels were given but this VDM is unconditional (model.conditional="
                       "False); train with configs/digits_cond.py-style configs for labels")
    variables = {"params": params}
    eps_fn = lambda z, g: self.model.apply(variables, z, g, labels, method=model_lib.VDM.eps)
    gamma_fn = lambda t: self.model.apply(variables, t, method=model_lib.VDM.gamma)
    return eps_fn, gamma_fn, tuple(self.info.shape), None


@dataclasses.dataclass(frozen=True)
class ClassifierTask:
  """A noise-conditional classifier p(y | z_t, gamma_t), trained with cross-entropy over noise
  levels gamma ~ Uniform(gamma_min, gamma_max); evaluated at random noise levels ("accuracy",
  "nll") and at gamma_min, the cleanest level ("accuracy_clean")."""

  model: classifier_lib.NoisyClassifierModel
  info: data.DatasetInfo
  name: str = "classifier"
  headline: str = "accuracy"
  num_classes: int = 0

  def init(self, key: jax.Array) -> tuple[PyTree, PyTree]:
    k_params, k_diff = jax.random.split(key)
    labels = jnp.zeros((1,), jnp.int32)
    params = self.model.init({"params": k_params, "diffusion": k_diff},
                             _dummy_images(self.info), labels, train=False)["params"]
    return params, {}

  def loss(self, params, frozen, batch, key):
    del frozen
    nll, correct = self.model.apply({"params": params}, batch["image"], batch["label"],
                                    train=True, rngs={"diffusion": key})
    out = {"nll": jnp.mean(nll), "accuracy": jnp.mean(correct)}
    return out["nll"], out

  def eval_terms(self, params, frozen, batch, key, *, num_steps: int) -> dict[str, jax.Array]:
    del frozen, num_steps
    apply = lambda **kw: self.model.apply({"params": params}, batch["image"], batch["label"],
                                          train=False, rngs={"diffusion": key}, **kw)
    nll, correct = apply()
    _, clean = apply(gamma=jnp.full(batch["label"].shape, self.model.gamma_min))
    return {"accuracy": correct, "nll": nll, "accuracy_clean": clean}

  def param_metrics(self, params) -> dict[str, jax.Array]:
    del params
    return {}

  def sampler_fns(self, params, frozen, labels=None):
    raise ValueError("a classifier run cannot sample; sample from a VDM run and pass this run "
                     "as --classifier_workdir for classifier guidance")

  def log_prob_fn(self, params, labels: jax.Array) -> Callable:
    """(z [B, ...], gamma [B]) -> log p(labels | z_t, gamma_t) [B], for classifier guidance."""
    return lambda z, gamma: self.model.apply(
        {"params": params}, z, gamma, labels,
        method=classifier_lib.NoisyClassifierModel.label_log_prob)


@dataclasses.dataclass(frozen=True)
class VAETask:
  """A convolutional VAE with a discrete decoder (Kingma & Welling 2014) trained on its bound
  (reconstruction + KL, in bpd); the first stage of latent diffusion."""

  model: vae_lib.VAE
  info: data.DatasetInfo
  name: str = "vae"
  headline: str = "bpd"
  num_classes: int = 0

  @property
  def num_dims(self) -> int:
    return int(np.prod(self.info.shape))

  def init(self, key: jax.Array) -> tuple[PyTree, PyTree]:
    k_params, k_latent = jax.random.split(key)
    return self.model.init({"params": k_params, "latent": k_latent}, _dummy_images(self.info),
                           train=False)["params"], {}

  def _terms(self, params, batch, key, train):
    terms = self.model.apply({"params": params}, batch["image"], train=train,
                             rngs={"latent": key})
    return terms_bpd(terms, num_dims=self.num_dims)

  def loss(self, params, frozen, batch, key):
    del frozen
    out = {k: jnp.mean(v) for k, v in self._terms(params, batch, key, True).items()}
    return out["bpd"], out

  def eval_terms(self, params, frozen, batch, key, *, num_steps: int) -> dict[str, jax.Array]:
    del frozen, num_steps
    return self._terms(params, batch, key, False)

  def param_metrics(self, params) -> dict[str, jax.Array]:
    del params
    return {}

  def sampler_fns(self, params, frozen, labels=None):
    """Samples y ~ N(0, I) through any sampler (the exact eps of N(0, I) data is sigma_t z), then
    decodes them: the VAE's own generative model, for comparison with latent diffusion."""
    del frozen
    if labels is not None:
      raise ValueError("labels were given but the VAE is unconditional")
    eps_fn = lambda z, g: latent.gaussian_eps(z, g)
    gamma_fn = schedules.FixedLinear(gamma_min=-10.0, gamma_max=10.0)
    shape = self.model.latent_shape((1,) + tuple(self.info.shape))[1:]
    decode = lambda y: self.model.apply({"params": params}, y, method=type(self.model).decode)
    return eps_fn, gamma_fn, shape, decode


@dataclasses.dataclass(frozen=True)
class LatentVDMTask:
  """A VDM on the latents y ~ q(y|x) of a frozen, trained VAE (LSGM / latent diffusion).

  Its loss and evaluation are the composed bound on -log p(x) in bpd of the data:
  E_q[-log p(x|y)] - H[q(y|x)] + the VDM bound on -log p(y) (`latent.composed_terms_at`). The
  VAE's parameters are the state's `frozen` part: loaded once from the VAE run, checkpointed with
  this run, never updated.
  """

  model: vae_lib.LatentVDM
  info: data.DatasetInfo
  vae_params: PyTree = None   # None: shapes only (restoring a run from its own checkpoint)
  name: str = "latent_vdm"
  headline: str = "bpd"
  num_classes: int = 0

  @property
  def num_dims(self) -> int:
    return int(np.prod(self.info.shape))

  def init(self, key: jax.Array) -> tuple[PyTree, PyTree]:
    k_params, k_latent, k_diff = jax.random.split(key, 3)
    variables = self.model.init({"params": k_params, "latent": k_latent, "diffusion": k_diff,
                                 "dropout": k_diff}, _dummy_images(self.info), train=False)
    frozen = {k: v for k, v in variables.items() if k != "params"}
    if self.vae_params is not None:
      frozen = vae_lib.frozen_collections(self.vae_params)
    return variables["params"], frozen

  def _terms(self, params, frozen, batch, key, train, num_steps=None):
    k_latent, k_diff, k_drop = jax.random.split(key, 3)
    terms = self.model.apply({"params": params, **frozen}, batch["image"], train=train,
                             num_steps=num_steps,
                             rngs={"latent": k_latent, "diffusion": k_diff, "dropout": k_drop})
    return terms_bpd(terms, num_dims=self.num_dims)

  def loss(self, params, frozen, batch, key):
    out = {k: jnp.mean(v) for k, v in self._terms(params, frozen, batch, key, True).items()}
    return out["bpd"], out

  def eval_terms(self, params, frozen, batch, key, *, num_steps: int) -> dict[str, jax.Array]:
    return self._terms(params, frozen, batch, key, False, num_steps)

  def param_metrics(self, params) -> dict[str, jax.Array]:
    gamma_0, gamma_1 = self.model.apply({"params": params}, method=vae_lib.LatentVDM.endpoints)
    return {"gamma_0": gamma_0, "gamma_1": gamma_1}

  def sampler_fns(self, params, frozen, labels=None):
    if labels is not None:
      raise ValueError("labels were given but this latent VDM is unconditional")
    variables = {"params": params, **frozen}
    eps_fn = lambda z, g: self.model.apply(variables, z, g, None, method=vae_lib.LatentVDM.eps)
    gamma_fn = lambda t: self.model.apply(variables, t, method=vae_lib.LatentVDM.gamma)
    decode = lambda y: self.model.apply(variables, y, method=vae_lib.LatentVDM.decode)
    shape = self.model.vae.latent_shape((1,) + tuple(self.info.shape))[1:]
    return eps_fn, gamma_fn, shape, decode


def block_impl(config: ml_collections.ConfigDict) -> str:
  """Scanned blocks on accelerators (compile time), unrolled on CPU (XLA:CPU is slower with the
  convolution weight-gradients inside a scan; see experiments/bench_scan.py)."""
  if config.model.block_impl != "auto":
    return config.model.block_impl
  return "unrolled" if jax.default_backend() == "cpu" else "scan"


def build_vdm(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> model_lib.VDM:
  """The VDM module of a config (the config is unpacked here; models get typed arguments)."""
  m = config.model
  return model_lib.build_model(
      vocab_size=info.vocab_size, schedule=m.schedule, gamma_min=m.gamma_min,
      gamma_max=m.gamma_max, schedule_hidden=m.schedule_hidden, channels=m.channels,
      num_blocks=m.num_blocks, fourier_exponents=tuple(m.fourier_exponents),
      attention_everywhere=m.attention_everywhere, dropout=m.dropout,
      num_classes=info.num_classes if m.conditional else 0, block_impl=block_impl(config),
      remat=m.remat, dtype=jnp.dtype(m.dtype), num_steps=m.num_steps,
      objective=m.objective, weighting=m.weighting, weighting_bias=m.weighting_bias,
      norm_groups=m.get("norm_groups", 0), conditioning_input=m.get("conditioning_input", False),
      network=m.get("network", networks.DEFAULT_NETWORK),
      schedule_objective=m.get("schedule_objective", "elbo"))


def build_classifier(config: ml_collections.ConfigDict,
                     info: data.DatasetInfo) -> classifier_lib.NoisyClassifierModel:
  if info.num_classes < 2:
    raise ValueError(f"data set {info.name!r} has no class labels (num_classes="
                     f"{info.num_classes}); a classifier needs >= 2 classes")
  m = config.model
  net = classifier_lib.NoisyClassifier(num_classes=info.num_classes, channels=m.channels,
                                       num_blocks=m.num_blocks, dtype=jnp.dtype(m.dtype))
  return classifier_lib.NoisyClassifierModel(vocab_size=info.vocab_size, classifier=net,
                                             gamma_min=m.gamma_min, gamma_max=m.gamma_max)


def build_vae(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> vae_lib.VAE:
  v = config.vae
  return vae_lib.VAE(vocab_size=info.vocab_size, channels=v.channels,
                     latent_channels=v.latent_channels, num_down=v.num_down,
                     num_blocks=v.num_blocks, data_channels=info.shape[-1],
                     dtype=jnp.dtype(config.model.dtype))


def build_latent_vdm(config: ml_collections.ConfigDict,
                     info: data.DatasetInfo) -> vae_lib.LatentVDM:
  """A LatentVDM: the VAE of config.vae, a schedule and score net from config.model."""
  m = config.model
  pixel = build_vdm(config, info)   # the same schedule and score-net construction
  return vae_lib.LatentVDM(vae=build_vae(config, info), schedule=pixel.schedule,
                           score_net=pixel.score_net, num_steps=m.num_steps,
                           cond_gamma_min=m.gamma_min, cond_gamma_max=m.gamma_max)


TaskBuilder = Callable[..., Task]   # (config, info, *, vae_params) -> Task
TASKS: registry.Registry[TaskBuilder] = registry.Registry("task")


def register_task(name: str, builder: TaskBuilder, *, replace: bool = False) -> TaskBuilder:
  """Registers `builder(config, info, *, vae_params) -> Task` as the task `name`."""
  return TASKS.register(name, builder, replace=replace)


def build_task(config: ml_collections.ConfigDict, info: data.DatasetInfo, *,
               vae_params: PyTree = None) -> Task:
  """The task named by config.task (`TASKS`).

  Args:
    vae_params: task "latent_vdm" only: the trained VAE's parameters, frozen into a fresh state
      (`runs.load_vae_params` reads them from latent.vae_workdir); None when the state comes
      from the run's own checkpoint (only their shapes are needed then).

  Raises:
    ValueError: an unknown task (the message lists the registered ones), or a builder that does
      not return a `Task`.
  """
  task = TASKS.get(config.task)(config, info, vae_params=vae_params)
  if not isinstance(task, Task):
    raise ValueError(f"the builder of task {config.task!r} returned {type(task).__name__}, "
                     f"which lacks part of the Task protocol (name, headline, info, init, loss, "
                     f"eval_terms, param_metrics, sampler_fns)")
  return task


register_task("vdm", lambda config, info, vae_params=None: VDMTask(
    build_vdm(config, info), info, p_uncond=config.model.p_uncond))
register_task("classifier", lambda config, info, vae_params=None: ClassifierTask(
    build_classifier(config, info), info, num_classes=info.num_classes))
register_task("vae", lambda config, info, vae_params=None: VAETask(build_vae(config, info), info))
register_task("latent_vdm", lambda config, info, vae_params=None: LatentVDMTask(
    build_latent_vdm(config, info), info, vae_params=vae_params))
