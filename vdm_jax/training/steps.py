"""The compiled programs that training and the run tools share.

  make_train_step / jit_train_step   (state, batch) -> (state, metrics): one optimiser step, EMA
  make_eval_step / jit_eval_step     masked sums of a task's per-example eval values
  evaluate                           the eval values' means over a split (and the headline's SE)
  draw_samples / sample_images       integer samples from a task's sampler closures

One code path for 1 device, N devices and N hosts: `jax.jit` with explicit shardings,
`NamedSharding` (batch split on "data", state replicated, state donated).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vdm_jax.datasets import data, pipeline
from vdm_jax.training import optim, state as state_lib, tasks
from vdm_jax.core import parallel
from vdm_jax.storage import metrics
from vdm_jax.maths import sampling

PyTree = Any

# A batch column [B] int32 the trainer adds: each process's stop request (`StopCode`); the train
# step returns its maximum over the global batch as metrics["stop"], so that every process of a
# multi-host run reads the same value and stops after the same step.
STOP_KEY = "stop"


def make_train_step(task: tasks.Task, tx: optax.GradientTransformation, *, ema_decay: float,
                    ema_warmup: bool = True, lr_schedule: optax.Schedule | None = None
                    ) -> Callable:
  """(state, batch) -> (state, metrics): one optimiser step on the task's loss, plus EMA.

  A batch column `STOP_KEY` (the processes' stop requests, not training data) is taken out of
  the batch and returned as metrics["stop"], its maximum over the global batch.

  The EMA decay is `optim.ema_decay(step, decay=ema_decay, warmup=ema_warmup)` (warmup=False:
  the official constant rate from the initial weights).

  A non-finite loss or gradient norm leaves the state unchanged (the update is skipped) and sets
  metrics["finite"] = 0, so a non-finite state can never be produced, let alone saved; the host
  decides whether to stop (`max_nonfinite_steps`).
  """

  def step_fn(state: state_lib.TrainState, batch: dict[str, jax.Array]):
    batch = dict(batch)
    stop = batch.pop(STOP_KEY, None)
    key = jax.random.fold_in(state.rng, state.step)
    loss_fn = lambda params: task.loss(params, state.frozen, batch, key)
    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optim.ema_update(state.ema_params, params,
                           decay=optim.ema_decay(state.step, decay=ema_decay,
                                                 warmup=ema_warmup))
    new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                        nonfinite_count=jnp.zeros((), jnp.int32))
    skipped = state.replace(step=state.step + 1, nonfinite_count=state.nonfinite_count + 1)
    state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, skipped)
    out = dict(out, loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32),
               nonfinite_count=state.nonfinite_count, **task.param_metrics(state.params))
    if lr_schedule is not None:
      out["learning_rate"] = lr_schedule(state.step - 1)
    if stop is not None:
      out[STOP_KEY] = jnp.max(stop).astype(jnp.float32)
    return state, out

  return step_fn


def make_eval_step(task: tasks.Task, *, num_steps: int, t_samples: int) -> Callable:
  """(params, frozen, batch, key) -> masked sums of the task's per-example eval values.

  Each example's values are averaged over `t_samples` independent draws (t, eps); returns
  {"sum": {name: scalar}, "sum_sq": scalar (of the headline value), "count": scalar}.
  """
  def eval_fn(params, frozen, batch, key):
    mask = batch["mask"].astype(jnp.float32)
    one = lambda k: task.eval_terms(params, frozen, batch, k, num_steps=num_steps)
    per = jax.tree.map(lambda a: jnp.mean(a, axis=0),
                       jax.lax.map(one, jax.random.split(key, t_samples)))
    return {"sum": {k: jnp.sum(v * mask) for k, v in per.items()},
            "sum_sq": jnp.sum(per[task.headline]**2 * mask), "count": jnp.sum(mask)}

  return eval_fn


def jit_train_step(config: ml_collections.ConfigDict, task, optimizer: state_lib.Optimizer,
                   mesh) -> Callable:
  """The trainer's compiled step: (state, batch) -> (state, metrics), state replicated and
  donated, batch split over the mesh's "data" axis, the backend's compiler options. It logs the
  learning rate of `optimizer` (`state.build_optimizer`), the one its transformation applies."""
  rep = parallel.replicated(mesh)
  step = make_train_step(task, optimizer.tx, ema_decay=config.optim.ema_decay,
                         ema_warmup=config.optim.get("ema_warmup", True),
                         lr_schedule=optimizer.learning_rate)
  return parallel.jit(step, in_shardings=(rep, parallel.batch_sharding(mesh)),
                      out_shardings=(rep, rep), donate_argnums=0)


def jit_eval_step(task, mesh, *, num_steps: int, t_samples: int) -> Callable:
  """`make_eval_step` compiled: (params, frozen, batch, key) -> sums, batch split over the mesh."""
  rep = parallel.replicated(mesh)
  return parallel.jit(make_eval_step(task, num_steps=num_steps, t_samples=t_samples),
                      in_shardings=(rep, rep, parallel.batch_sharding(mesh), rep),
                      out_shardings=rep)


def eval_num_steps(config: ml_collections.ConfigDict) -> int:
  """T of the evaluated bound: config.eval.num_steps, or the model's own T (model.num_steps,
  0 = continuous time) where that is -1, so a model trained on a T-step loss reports its
  T-step bound."""
  n = int(config.eval.num_steps)
  return int(config.model.num_steps) if n < 0 else n


def evaluate(task: tasks.Task, params, config, mesh, *, num_steps: int | None = None,
             t_samples: int | None = None, max_examples: int | None = None,
             split: str | None = None, frozen: PyTree = None, seed: int | None = None,
             progress: metrics.ProgressBar | None = None) -> dict[str, float]:
  """The task's eval values on a data split with `params`: their means, and the standard error
  of the headline value (e.g. "bpd" and "bpd_se", with the bound's three terms). `progress`
  (`eval_progress`): updated after each batch with the running headline value."""
  frozen = {} if frozen is None else frozen
  split = split or data.default_eval_split(config.data.name)   # None: test, or validation
  num_steps = eval_num_steps(config) if num_steps is None else num_steps
  t_samples = config.eval.t_samples if t_samples is None else t_samples
  max_examples = (config.eval.max_examples or None) if max_examples is None else max_examples
  step = jit_eval_step(task, mesh, num_steps=num_steps, t_samples=t_samples)
  totals, sum_sq, count = None, 0.0, 0.0
  it = pipeline.eval_iterator(config.data.name, split=split,
                              global_batch_size=config.eval.batch_size,
                              data_dir=config.data.data_dir or None, max_examples=max_examples)
  key = jax.random.PRNGKey((config.seed if seed is None else seed) + 1)
  for i, batch in enumerate(it):
    out = jax.device_get(step(params, frozen, parallel.shard_batch(batch, mesh),
                              jax.random.fold_in(key, i)))
    sums = {k: float(v) for k, v in out["sum"].items()}
    totals = sums if totals is None else {k: totals[k] + v for k, v in sums.items()}
    sum_sq += float(out["sum_sq"])
    count += float(out["count"])
    if progress is not None and count:
      progress.update(i + 1, **{task.headline: totals[task.headline] / count})
  if progress is not None:
    progress.close()
  if count == 0:
    raise ValueError(f"the {split!r} split of {config.data.name!r} is empty")
  result = {k: v / count for k, v in totals.items()}
  var = max(sum_sq / count - result[task.headline]**2, 0.0)
  result[task.headline + "_se"] = math.sqrt(var / max(count - 1, 1))
  result.update(num_examples=int(count), num_steps=num_steps, t_samples=t_samples)
  return result


def eval_batches(task: tasks.Task, config, *, split: str | None = None,
                 max_examples: int | None = None) -> tuple[int | None, int | None]:
  """(examples, batches) that `evaluate` reads of `split` (None if the data set does not say)."""
  split = split or data.default_eval_split(config.data.name)
  n = task.info.num_examples.get(split)
  max_examples = (config.eval.max_examples or None) if max_examples is None else max_examples
  if n is None:
    return None, None
  n = min(n, max_examples) if max_examples else n
  return n, math.ceil(n / config.eval.batch_size)


def draw_samples(fns, *, sampler: str, key: jax.Array, num_images: int, num_steps: int,
                 info: data.DatasetInfo, **sampler_kwargs) -> np.ndarray:
  """Integer samples [N, H, W, C] with `sampler` (one compiled loop) from task closures.

  Args:
    fns: (eps_fn, gamma_fn, shape of one sample, decode or None) from `task.sampler_fns`;
      decode maps the final latents to integer data (None: the sampler's discrete decoder).
    num_steps: reverse steps (for "langevin": noise levels, with steps_per_level default 5).
  """
  eps_fn, gamma_fn, shape, decode = fns
  fn = sampling.get_sampler(sampler)
  if sampler == "langevin":
    sampler_kwargs = dict({"num_levels": num_steps, "steps_per_level": 5}, **sampler_kwargs)
  else:
    sampler_kwargs = dict(sampler_kwargs, num_steps=num_steps)
  vocab = None if decode is not None else info.vocab_size
  run = parallel.jit(lambda k: fn(k, eps_fn=eps_fn, gamma_fn=gamma_fn,
                                  shape=(num_images,) + tuple(shape), vocab_size=vocab,
                                  **sampler_kwargs))
  out = run(key)
  if decode is not None:
    out = parallel.jit(decode)(out)
  return np.asarray(jax.device_get(out))


def sample_images(task: tasks.Task, params, *, key, num_images: int, num_steps: int,
                  labels=None, sampler: str = "ancestral", frozen: PyTree = None,
                  **sampler_kwargs) -> np.ndarray:
  """Integer samples [N, H, W, C] from a task's reverse process."""
  fns = task.sampler_fns(params, {} if frozen is None else frozen, labels)
  return draw_samples(fns, sampler=sampler, key=key, num_images=num_images,
                      num_steps=num_steps, info=task.info, **sampler_kwargs)


def summary_line(result: dict, headline: str) -> str:
  """"bpd 1.8123 ± 0.0400 (prior_bpd 0.0001, ...)": the headline value and the others."""
  rest = ", ".join(f"{k} {v:.4f}" for k, v in result.items()
                   if isinstance(v, float) and k not in (headline, headline + "_se"))
  return (f"{headline} {result[headline]:.4f} ± {result[headline + '_se']:.4f}"
          + (f" ({rest})" if rest else ""))
