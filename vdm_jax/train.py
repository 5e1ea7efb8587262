"""Training: the train state, jitted step factories over a device mesh, `train_and_evaluate`.

The config is unpacked here (models get typed arguments). Every loss term comes from
`vdm_jax.elbo` through `vdm_jax.model.VDM`. One code path for 1 device, N devices and N hosts:
the step is `jax.jit` with explicit `NamedSharding`s (batch split on "data", state replicated,
state donated).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vdm_jax import checkpointing, data, metrics, model as model_lib, optim, parallel, tasks
from vdm_jax.config_checks import check_config, check_workdir_config

PyTree = Any


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


default_block_impl = lambda: tasks.block_impl(ml_collections.ConfigDict(
    {"model": {"block_impl": "auto"}}))


def build_model(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> model_lib.VDM:
  """The VDM module of a config (task "vdm")."""
  return tasks.build_vdm(config, info)


def build_task(config: ml_collections.ConfigDict, info: data.DatasetInfo, *,
               restoring: bool = False):
  """The task of a config (`tasks.build_task`)."""
  return tasks.build_task(config, info, restoring=restoring)


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optim
  return optim.make_optimizer(
      learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, b1=o.b1, b2=o.b2, eps=o.eps,
      weight_decay=o.weight_decay, grad_clip_norm=o.grad_clip_norm or None,
      schedule_lr_multiplier=o.schedule_lr_multiplier, schedule_key="schedule",
      weight_decay_rule=o.get("weight_decay_rule", "kernels"))


def init_state(task, tx: optax.GradientTransformation, *, seed: int,
               info: data.DatasetInfo | None = None) -> TrainState:
  """A fresh train state (call under jit with replicated out_shardings).

  `task` is a task (`tasks.build_task`) or a bare VDM module (then `info` is needed).
  """
  task = tasks.as_task(task, info=info)
  key = jax.random.PRNGKey(seed)
  params, frozen = task.init(key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=tx.init(params), rng=key, nonfinite_count=jnp.zeros((), jnp.int32),
                    frozen=frozen)


def make_train_step(task, tx: optax.GradientTransformation, *, ema_decay: float,
                    ema_warmup: bool = True, lr_schedule: optax.Schedule | None = None,
                    info: data.DatasetInfo | None = None, p_uncond: float = 0.0) -> Callable:
  """(state, batch) -> (state, metrics): one optimiser step on the task's loss, plus EMA.

  The EMA decay is `optim.ema_decay(step, decay=ema_decay, warmup=ema_warmup)` (warmup=False:
  the official constant rate from the initial weights).

  A non-finite loss or gradient norm leaves the state unchanged (the update is skipped) and sets
  metrics["finite"] = 0, so a non-finite state can never be produced, let alone saved; the host
  decides whether to stop (`max_nonfinite_steps`). `info` and `p_uncond` are only used when
  `task` is a bare VDM module.
  """
  task = tasks.as_task(task, info=info, p_uncond=p_uncond)

  def step_fn(state: TrainState, batch: dict[str, jax.Array]):
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
    return state, out

  return step_fn


def make_eval_step(task, *, num_steps: int, t_samples: int,
                   info: data.DatasetInfo | None = None) -> Callable:
  """(params, frozen, batch, key) -> masked sums of the task's per-example eval values.

  Each example's values are averaged over `t_samples` independent draws (t, eps); returns
  {"sum": {name: scalar}, "sum_sq": scalar (of the headline value), "count": scalar}.
  """
  task = tasks.as_task(task, info=info)

  def eval_fn(params, frozen, batch, key):
    mask = batch["mask"].astype(jnp.float32)
    one = lambda k: task.eval_terms(params, frozen, batch, k, num_steps=num_steps)
    per = jax.tree.map(lambda a: jnp.mean(a, axis=0),
                       jax.lax.map(one, jax.random.split(key, t_samples)))
    return {"sum": {k: jnp.sum(v * mask) for k, v in per.items()},
            "sum_sq": jnp.sum(per[task.headline]**2 * mask), "count": jnp.sum(mask)}

  return eval_fn


def jit_train_step(config: ml_collections.ConfigDict, task, tx: optax.GradientTransformation,
                   mesh) -> Callable:
  """The trainer's compiled step: (state, batch) -> (state, metrics), state replicated and
  donated, batch split over the mesh's "data" axis, the backend's compiler options."""
  rep = parallel.replicated(mesh)
  step = make_train_step(task, tx, ema_decay=config.optim.ema_decay,
                         ema_warmup=config.optim.get("ema_warmup", True),
                         lr_schedule=optim.learning_rate_schedule(
                             learning_rate=config.optim.learning_rate,
                             warmup_steps=config.optim.warmup_steps))
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


def evaluate(task, params, config, info, mesh, *, num_steps: int | None = None,
             t_samples: int | None = None, max_examples: int | None = None,
             split: str | None = None, frozen: PyTree = None, seed: int | None = None
             ) -> dict[str, float]:
  """The task's eval values on a data split with `params`: their means, and the standard error
  of the headline value (e.g. "bpd" and "bpd_se", with the bound's three terms)."""
  task = tasks.as_task(task, info=info)
  frozen = {} if frozen is None else frozen
  split = split or data.default_eval_split(config.data.name)   # None: test, or validation
  num_steps = eval_num_steps(config) if num_steps is None else num_steps
  t_samples = config.eval.t_samples if t_samples is None else t_samples
  max_examples = (config.eval.max_examples or None) if max_examples is None else max_examples
  step = jit_eval_step(task, mesh, num_steps=num_steps, t_samples=t_samples)
  totals, sum_sq, count = None, 0.0, 0.0
  it = data.eval_iterator(config.data.name, split=split, global_batch_size=config.eval.batch_size,
                          data_dir=config.data.data_dir or None, max_examples=max_examples)
  key = jax.random.PRNGKey((config.seed if seed is None else seed) + 1)
  for i, batch in enumerate(it):
    out = jax.device_get(step(params, frozen, parallel.shard_batch(batch, mesh),
                              jax.random.fold_in(key, i)))
    sums = {k: float(v) for k, v in out["sum"].items()}
    totals = sums if totals is None else {k: totals[k] + v for k, v in sums.items()}
    sum_sq += float(out["sum_sq"])
    count += float(out["count"])
  if count == 0:
    raise ValueError(f"the {split!r} split of {config.data.name!r} is empty")
  result = {k: v / count for k, v in totals.items()}
  var = max(sum_sq / count - result[task.headline]**2, 0.0)
  result[task.headline + "_se"] = math.sqrt(var / max(count - 1, 1))
  result.update(num_examples=int(count), num_steps=num_steps, t_samples=t_samples)
  return result


def draw_samples(fns, *, sampler: str, key: jax.Array, num_images: int, num_steps: int,
                 info: data.DatasetInfo, **sampler_kwargs) -> np.ndarray:
  """Integer samples [N, H, W, C] with `sampler` (one compiled loop) from task closures.

  Args:
    fns: (eps_fn, gamma_fn, shape of one sample, decode or None) from `task.sampler_fns`;
      decode maps the final latents to integer data (None: the sampler's discrete decoder).
    num_steps: reverse steps (for "langevin": noise levels, with steps_per_level default 5).
  """
  from vdm_jax import sampling   # pylint: disable=g-import-not-at-top
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


def sample_images(task, params, *, key, info, num_images: int, num_steps: int,
                  labels=None, sampler: str = "ancestral", frozen: PyTree = None,
                  **sampler_kwargs) -> np.ndarray:
  """Integer samples [N, H, W, C] from a task's (or bare VDM's) reverse process."""
  task = tasks.as_task(task, info=info)
  fns = task.sampler_fns(params, {} if frozen is None else frozen, labels)
  return draw_samples(fns, sampler=sampler, key=key, num_images=num_images,
                      num_steps=num_steps, info=info, **sampler_kwargs)


class _Preemption:
  """Turns SIGTERM / SIGINT into a flag the loop checks after each step (main thread only)."""

  def __init__(self):
    self.requested = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:   # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _abstract_state(init_fn, mesh) -> PyTree:
  shapes = jax.eval_shape(init_fn)
  rep = parallel.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)


def _host_check(step: int, out: dict, max_nonfinite: int) -> None:
  if out["finite"] < 1.0 and out["nonfinite_count"] > max_nonfinite:
    raise FloatingPointError(
        f"non-finite loss or gradients at step {step} (loss={out['loss']}, grad_norm="
        f"{out['grad_norm']}); {int(out['nonfinite_count'])} such steps in a row, allowed "
        f"{max_nonfinite}. The state of that step was not applied and not saved.")


def augmentation(config: ml_collections.ConfigDict) -> dict[str, bool]:
  """The training pipeline's extra augmentation options: random 90-degree rotations
  (data.rot90), and the per-image flag "augmented" for a network with the official scalar
  conditioning input (model.conditioning_input; the flag is 0 without augmentation)."""
  return {"rot90": bool(config.data.get("rot90", False)),
          "augment_flag": bool(config.model.get("conditioning_input", False))}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from the newest checkpoint in `workdir`), evaluates and samples.

  Returns:
    The final evaluation metrics (bpd of the EMA parameters on the test split, and its terms).
  """
  if config.distributed.initialize:
    parallel.initialize_distributed(
        coordinator_address=config.distributed.coordinator_address,
        num_processes=config.distributed.num_processes, process_id=config.distributed.process_id)
  mesh = parallel.make_mesh()
  check_config(config, num_devices=mesh.size)   # every bad field at once, before compiling
  is_chief = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  check_workdir_config(config, workdir, write=is_chief)

  info = data.get_info(config.data.name, data_dir=config.data.data_dir or None)
  task, tx = build_task(config, info), build_optimizer(config)
  rep = parallel.replicated(mesh)
  init_fn = lambda: init_state(task, tx, seed=config.seed)
  ckpt = checkpointing.CheckpointManager(
      os.path.join(workdir, "checkpoints"), max_to_keep=config.training.keep_checkpoints,
      save_interval_steps=config.training.checkpoint_every)
  restored = ckpt.restore(_abstract_state(init_fn, mesh))
  if restored is None:
    state = jax.jit(init_fn, out_shardings=rep)()
  else:
    state = restored[1]
    logging.info("resumed from step %d in %s", restored[0], workdir)
  start = int(jax.device_get(state.step))

  step_fn = jit_train_step(config, task, tx, mesh)
  writer = metrics.MetricWriter(workdir, enabled=is_chief)
  bar = metrics.ProgressBar(total=config.training.num_steps, initial=start, enabled=is_chief,
                            log_every=config.training.log_every)
  train_it = data.train_iterator(
      config.data.name, global_batch_size=config.training.batch_size, seed=config.seed,
      start_step=start, flip=config.data.flip, data_dir=config.data.data_dir or None,
      **augmentation(config))
  t = config.training
  pending, tick, tick_step = None, time.perf_counter(), start
  step = start
  with _Preemption() as preempt:
    while step < t.num_steps and preempt.requested is None:
      state, out = step_fn(state, parallel.shard_batch(next(train_it), mesh))
      step += 1
      if pending is not None:   # the previous step's metrics: ready by now, no stall
        _report(pending, writer, bar, t, mesh, tick_info=None)
      pending = (step, out)
      if step % t.log_every == 0 or step == t.num_steps:
        _report(pending, writer, bar, t, mesh, tick_info=(tick, tick_step))
        pending, tick, tick_step = None, time.perf_counter(), step
      if step % t.eval_every == 0 and step < t.num_steps:
        writer.write_scalars(step, _prefix(
            evaluate(task, state.ema_params, config, info, mesh, frozen=state.frozen), "eval/"))
      if step % t.sample_every == 0 and step < t.num_steps:
        _write_samples(task, state, config, info, workdir, step, is_chief)
      ckpt.save(step, state, metadata=_metadata(config, step))
    if pending is not None:
      _report(pending, writer, bar, t, mesh, tick_info=None)
    ckpt.save(step, state, metadata=_metadata(config, step), force=True)
    ckpt.wait_until_finished()
  bar.close()
  if preempt.requested is not None:
    logging.warning("%s received: saved step %d and stopped", preempt.requested, step)
    writer.close()
    ckpt.close()
    return {"preempted_at": step}
  result = evaluate(task, state.ema_params, config, info, mesh, frozen=state.frozen)
  writer.write_scalars(step, _prefix(result, "eval/"))
  _write_samples(task, state, config, info, workdir, step, is_chief)
  if is_chief:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump({"step": step, **result}, f, indent=2)
    print(f"step {step}: test {summary_line(result, task.headline)} -> {workdir}", flush=True)
  writer.close()
  ckpt.close()
  return result


def _prefix(d: dict, p: str) -> dict:
  return {p + k: v for k, v in d.items() if isinstance(v, (int, float))}


def _metadata(config, step: int) -> dict:
  return {"step": step, "data_position": step, "seed": config.seed}


def _report(pending, writer, bar, t, mesh, tick_info) -> None:
  step, out = pending
  host = {k: float(v) for k, v in jax.device_get(out).items()}
  _host_check(step, host, t.max_nonfinite_steps)
  if tick_info is not None:
    tick, tick_step = tick_info
    elapsed = time.perf_counter() - tick
    host["steps_per_sec"] = (step - tick_step) / max(elapsed, 1e-9)
    host["images_per_sec"] = host["steps_per_sec"] * t.batch_size
    writer.write_scalars(step, {"train/" + k: v for k, v in host.items()})
  bar.update(step, **({"bpd": host["bpd"]} if "bpd" in host else {"loss": host["loss"]}))


def _write_samples(task, state, config, info, workdir, step, is_chief) -> None:
  if not hasattr(task, "sampler_fns") or task.name == "classifier":
    return
  n = config.sample.num_images
  labels = (jnp.arange(n) % info.num_classes) if getattr(task, "num_classes", 0) else None
  images = sample_images(task, state.ema_params, key=jax.random.PRNGKey(config.seed + 2),
                         info=info, num_images=n, num_steps=config.sample.num_steps,
                         labels=labels, frozen=state.frozen, sampler=config.sample.sampler,
                         **_sampler_options(config))
  if is_chief:
    path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    metrics.save_image_grid(path, images, vocab_size=info.vocab_size)


def _sampler_options(config) -> dict:
  if config.sample.sampler == "ddpm":
    return {"variance": config.sample.ddpm_variance}
  return {}


def summary_line(result: dict, headline: str) -> str:
  """"bpd 1.8123 ± 0.0400 (prior_bpd 0.0001, ...)": the headline value and the others."""
  rest = ", ".join(f"{k} {v:.4f}" for k, v in result.items()
                   if isinstance(v, float) and k not in (headline, headline + "_se"))
  return (f"{headline} {result[headline]:.4f} ± {result[headline + '_se']:.4f}"
          + (f" ({rest})" if rest else ""))
