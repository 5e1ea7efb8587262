"""The train state, its abstract shapes, and the optimiser of a config.

A run directory's checkpoints are `TrainState`s; `abstract_state` gives their shapes and
shardings for a restore, `abstract_eval_state` the part that evaluation needs (no optimiser
state). The optimiser and its learning-rate schedule are built together (`build_optimizer`): the
rate the train step logs is the one the optimiser applies.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vdm_jax.datasets import data
from vdm_jax.nets import model as model_lib
from vdm_jax.training import optim, tasks
from vdm_jax.core import parallel

PyTree = Any
# The parts of a TrainState that evaluation and sampling read: the EMA parameters, the frozen
# parameters and the step. `abstract_eval_state` restores these and nothing else.
EVAL_FIELDS = ("step", "ema_params", "frozen")


@flax.struct.dataclass
class TrainState:
  """Everything a step changes, replicated over the mesh.

  `rng` is the base key data (uint32 [2]); the step's key is fold_in(rng, step), so the random
  stream is a pure function of (seed, step) and resumption is exact. `frozen` holds parameters
  the task uses but never updates (e.g. a latent model's VAE), checkpointed with the run.
  """

  step: jax.Array
  params: PyTree
  ema_params: PyTree
  opt_state: optax.OptState
  rng: jax.Array
  nonfinite_count: jax.Array   # non-finite steps in a row (their updates were skipped)
  frozen: PyTree = flax.struct.field(default_factory=dict)


class Optimizer(NamedTuple):
  """A config's optimiser: the optax transformation and the learning-rate schedule it applies."""

  tx: optax.GradientTransformation
  learning_rate: optax.Schedule


def build_optimizer(config: ml_collections.ConfigDict) -> Optimizer:
  """AdamW of config.optim (`optim.make_optimizer`), with its one learning-rate schedule; the
  schedule's parameters are found under `model.SCHEDULE_KEY`."""
  o = config.optim
  learning_rate = optim.learning_rate_schedule(
      learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
      decay=o.get("lr_decay", "constant"), total_steps=config.training.num_steps)
  tx = optim.make_optimizer(
      learning_rate=learning_rate, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
      grad_clip_norm=o.grad_clip_norm or None, schedule_lr_multiplier=o.schedule_lr_multiplier,
      schedule_key=model_lib.SCHEDULE_KEY, weight_decay_rule=o.get("weight_decay_rule", "kernels"))
  return Optimizer(tx, learning_rate)


def init_state(task: tasks.Task, tx: optax.GradientTransformation, *, seed: int) -> TrainState:
  """A fresh train state of a task (`tasks.build_task`); call under jit with replicated
  out_shardings."""
  key = jax.random.PRNGKey(seed)
  params, frozen = task.init(key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=tx.init(params), rng=key, nonfinite_count=jnp.zeros((), jnp.int32),
                    frozen=frozen)


def abstract_state(init_fn: Callable[[], PyTree], mesh) -> PyTree:
  """The shapes and dtypes of `init_fn()` (nothing computed), replicated over `mesh`: the target
  of a restore."""
  shapes = jax.eval_shape(init_fn)
  rep = parallel.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)


def abstract_eval_state(task, *, seed: int, mesh) -> dict[str, PyTree]:
  """{"step", "ema_params", "frozen"} of a task's TrainState, abstract and replicated over
  `mesh`: the part of a checkpoint that evaluation restores (`EVAL_FIELDS`). Its parameter
  shapes come from `task.init` alone, so no optimiser is built and no optimiser state restored."""
  def init():
    params, frozen = task.init(jax.random.PRNGKey(seed))
    return {"step": jnp.zeros((), jnp.int32), "ema_params": params, "frozen": frozen}
  return abstract_state(init, mesh)
