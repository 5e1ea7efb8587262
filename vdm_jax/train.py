"""Training: the train state, jitted step factories over a device mesh, `train_and_evaluate`.

The config is unpacked here (models get typed arguments). Every loss term comes from
`vdm_jax.elbo` through `vdm_jax.model.VDM`. One code path for 1 device, N devices and N hosts:
the step is `jax.jit` with explicit `NamedSharding`s (batch split on "data", state replicated,
state donated).
"""

from __future__ import annotations

import dataclasses
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

from vdm_jax import checkpointing, data, elbo, metrics, model as model_lib, optim, parallel
from vdm_jax.config_checks import check_config, check_workdir_config

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a step changes, replicated over the mesh.

  `rng` is the base key data (uint32 [2]); the step's key is fold_in(rng, step), so the random
  stream is a pure function of (seed, step) and resumption is exact.
  """

  step: jax.Array
  params: PyTree
  ema_params: PyTree
  opt_state: optax.OptState
  rng: jax.Array
  nonfinite_count: jax.Array   # non-finite steps in a row (their updates were skipped)


def default_block_impl() -> str:
  """Scanned blocks on accelerators (compile time), unrolled on CPU (XLA:CPU is slower with the
  convolution weight-gradients inside a scan; see experiments/bench_scan.py)."""
  return "unrolled" if jax.default_backend() == "cpu" else "scan"


def build_model(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> model_lib.VDM:
  m = config.model
  return model_lib.build_model(
      vocab_size=info.vocab_size, schedule=m.schedule, gamma_min=m.gamma_min,
      gamma_max=m.gamma_max, schedule_hidden=m.schedule_hidden, channels=m.channels,
      num_blocks=m.num_blocks, fourier_exponents=tuple(m.fourier_exponents),
      attention_everywhere=m.attention_everywhere, dropout=m.dropout,
      num_classes=info.num_classes if m.conditional else 0,
      block_impl=default_block_impl() if m.block_impl == "auto" else m.block_impl,
      remat=m.remat, dtype=jnp.dtype(m.dtype), num_steps=m.num_steps)


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optim
  return optim.make_optimizer(
      learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, b1=o.b1, b2=o.b2, eps=o.eps,
      weight_decay=o.weight_decay, grad_clip_norm=o.grad_clip_norm or None,
      schedule_lr_multiplier=o.schedule_lr_multiplier, schedule_key="schedule")


def init_state(model: model_lib.VDM, tx: optax.GradientTransformation, *, seed: int,
               info: data.DatasetInfo) -> TrainState:
  """A fresh train state (call under jit with replicated out_shardings)."""
  key = jax.random.PRNGKey(seed)
  k_params, k_diff = jax.random.split(key)
  dummy = jnp.zeros((1,) + tuple(info.shape), jnp.int32)
  params = model.init({"params": k_params, "diffusion": k_diff, "dropout": k_diff}, dummy,
                      train=False)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=tx.init(params), rng=key, nonfinite_count=jnp.zeros((), jnp.int32))


def _terms_bpd(terms: elbo.ELBOTerms, num_dims: int) -> dict[str, jax.Array]:
  return {"bpd": elbo.bits_per_dim(jnp.mean(terms.total), num_dims=num_dims),
          "prior_bpd": elbo.bits_per_dim(jnp.mean(terms.prior), num_dims=num_dims),
          "reconstruction_bpd": elbo.bits_per_dim(jnp.mean(terms.reconstruction),
                                                  num_dims=num_dims),
          "diffusion_bpd": elbo.bits_per_dim(jnp.mean(terms.diffusion), num_dims=num_dims)}


def make_train_step(model: model_lib.VDM, tx: optax.GradientTransformation, *, num_dims: int,
                    ema_decay: float, p_uncond: float = 0.0,
                    lr_schedule: optax.Schedule | None = None) -> Callable:
  """(state, batch) -> (state, metrics): one AdamW step on the bound in bpd, plus EMA.

  A non-finite loss or gradient norm leaves the state unchanged (the update is skipped) and sets
  metrics["finite"] = 0, so a non-finite state can never be produced, let alone saved; the host
  decides whether to stop (`max_nonfinite_steps`).
  """
  num_classes = model.score_net.num_classes

  def step_fn(state: TrainState, batch: dict[str, jax.Array]):
    key = jax.random.fold_in(state.rng, state.step)
    k_diff, k_drop, k_label = jax.random.split(key, 3)
    labels = None
    if num_classes:
      drop = jax.random.bernoulli(k_label, p_uncond, batch["label"].shape)
      labels = jnp.where(drop, num_classes, batch["label"])

    def loss_fn(params):
      terms = model.apply({"params": params}, batch["image"], labels, train=True,
                          rngs={"diffusion": k_diff, "dropout": k_drop})
      out = _terms_bpd(terms, num_dims)
      return out["bpd"], out

    grads, out = jax.grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(out["bpd"]) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optim.ema_update(state.ema_params, params,
                           decay=optim.ema_decay(state.step, decay=ema_decay))
    new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                        nonfinite_count=jnp.zeros((), jnp.int32))
    skipped = state.replace(step=state.step + 1, nonfinite_count=state.nonfinite_count + 1)
    state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, skipped)
    gamma_0, gamma_1 = model.apply({"params": state.params}, method=model_lib.VDM.endpoints)
    out.update(grad_norm=grad_norm, finite=finite.astype(jnp.float32), gamma_0=gamma_0,
               gamma_1=gamma_1, nonfinite_count=state.nonfinite_count)
    if lr_schedule is not None:
      out["learning_rate"] = lr_schedule(state.step - 1)
    return state, out

  return step_fn


def make_eval_step(model: model_lib.VDM, *, num_dims: int, num_steps: int,
                   t_samples: int) -> Callable:
  """(params, batch, key) -> masked sums of the bound and its terms over the batch, in bpd.

  Each image's bound is averaged over `t_samples` independent (t, eps) draws.
  """

  def eval_fn(params, batch, key):
    mask = batch["mask"].astype(jnp.float32)

    def one(k):
      terms = model.apply({"params": params}, batch["image"], None, train=False,
                          num_steps=num_steps, rngs={"diffusion": k})
      return jnp.stack([terms.total, terms.prior, terms.reconstruction, terms.diffusion])

    per = jnp.mean(jax.lax.map(one, jax.random.split(key, t_samples)), axis=0)   # [4, B]
    per = elbo.bits_per_dim(per, num_dims=num_dims)
    return {"sum": jnp.sum(per * mask, axis=1), "sum_sq": jnp.sum(per[0]**2 * mask),
            "count": jnp.sum(mask)}

  return eval_fn


def evaluate(model, params, config, info, mesh, *, num_steps: int | None = None,
             t_samples: int | None = None, max_examples: int | None = None,
             split: str = "test") -> dict[str, float]:
  """The bound on a data split with `params`: bpd mean, its standard error and the three terms."""
  num_steps = config.eval.num_steps if num_steps is None else num_steps
  t_samples = config.eval.t_samples if t_samples is None else t_samples
  max_examples = (config.eval.max_examples or None) if max_examples is None else max_examples
  step = jax.jit(make_eval_step(model, num_dims=int(np.prod(info.shape)), num_steps=num_steps,
                                t_samples=t_samples),
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh),
                               parallel.replicated(mesh)),
                 out_shardings=parallel.replicated(mesh))
  totals, sum_sq, count = np.zeros(4), 0.0, 0.0
  it = data.eval_iterator(config.data.name, split=split, global_batch_size=config.eval.batch_size,
                          data_dir=config.data.data_dir or None, max_examples=max_examples)
  key = jax.random.PRNGKey(config.seed + 1)
  for i, batch in enumerate(it):
    out = jax.device_get(step(params, parallel.shard_batch(batch, mesh), jax.random.fold_in(key, i)))
    totals += np.asarray(out["sum"], np.float64)
    sum_sq += float(out["sum_sq"])
    count += float(out["count"])
  if count == 0:
    raise ValueError(f"the {split!r} split of {config.data.name!r} is empty")
  mean = totals / count
  var = max(sum_sq / count - mean[0]**2, 0.0)
  return {"bpd": float(mean[0]), "bpd_se": math.sqrt(var / max(count - 1, 1)),
          "prior_bpd": float(mean[1]), "reconstruction_bpd": float(mean[2]),
          "diffusion_bpd": float(mean[3]), "num_examples": int(count),
          "num_steps": num_steps, "t_samples": t_samples}


def sample_images(model, params, *, key, info, num_images: int, num_steps: int,
                  labels=None, sampler: str = "ancestral", **sampler_kwargs) -> np.ndarray:
  """Integer samples [N, H, W, C] from the model's reverse process (one compiled loop)."""
  from vdm_jax import sampling   # pylint: disable=g-import-not-at-top
  variables = {"params": params}
  eps_fn = lambda z, g: model.apply(variables, z, g, labels, method=model_lib.VDM.eps)
  gamma_fn = lambda t: model.apply(variables, t, method=model_lib.VDM.gamma)
  fn = sampling.get_sampler(sampler)
  run = jax.jit(lambda k: fn(k, eps_fn=eps_fn, gamma_fn=gamma_fn,
                             shape=(num_images,) + tuple(info.shape), num_steps=num_steps,
                             vocab_size=info.vocab_size, **sampler_kwargs))
  return np.asarray(jax.device_get(run(key)))


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
        f"non-finite loss or gradients at step {step} (bpd={out['bpd']}, grad_norm="
        f"{out['grad_norm']}); {int(out['nonfinite_count'])} such steps in a row, allowed "
        f"{max_nonfinite}. The state of that step was not applied and not saved.")


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
  model, tx = build_model(config, info), build_optimizer(config)
  num_dims = int(np.prod(info.shape))
  rep = parallel.replicated(mesh)
  init_fn = lambda: init_state(model, tx, seed=config.seed, info=info)
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

  step_fn = jax.jit(
      make_train_step(model, tx, num_dims=num_dims, ema_decay=config.optim.ema_decay,
                      p_uncond=config.model.p_uncond,
                      lr_schedule=optim.learning_rate_schedule(
                          learning_rate=config.optim.learning_rate,
                          warmup_steps=config.optim.warmup_steps)),
      in_shardings=(rep, parallel.batch_sharding(mesh)), out_shardings=(rep, rep),
      donate_argnums=0)
  writer = metrics.MetricWriter(workdir, enabled=is_chief)
  bar = metrics.ProgressBar(total=config.training.num_steps, initial=start, enabled=is_chief,
                            log_every=config.training.log_every)
  train_it = data.train_iterator(
      config.data.name, global_batch_size=config.training.batch_size, seed=config.seed,
      start_step=start, flip=config.data.flip, data_dir=config.data.data_dir or None)
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
        writer.write_scalars(step, _prefix(evaluate(model, state.ema_params, config, info, mesh),
                                           "eval/"))
      if step % t.sample_every == 0 and step < t.num_steps:
        _write_samples(model, state, config, info, workdir, step, is_chief)
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
  result = evaluate(model, state.ema_params, config, info, mesh)
  writer.write_scalars(step, _prefix(result, "eval/"))
  _write_samples(model, state, config, info, workdir, step, is_chief)
  if is_chief:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump({"step": step, **result}, f, indent=2)
    print(f"step {step}: test bpd {result['bpd']:.4f} ± {result['bpd_se']:.4f} (prior "
          f"{result['prior_bpd']:.4f}, reconstruction {result['reconstruction_bpd']:.4f}, "
          f"diffusion {result['diffusion_bpd']:.4f}) -> {workdir}", flush=True)
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
  bar.update(step, bpd=host["bpd"])


def _write_samples(model, state, config, info, workdir, step, is_chief) -> None:
  n = config.sample.num_images
  labels = (jnp.arange(n) % info.num_classes) if model.score_net.num_classes else None
  images = sample_images(model, state.ema_params, key=jax.random.PRNGKey(config.seed + 2),
                         info=info, num_images=n, num_steps=config.sample.num_steps, labels=labels)
  if is_chief:
    path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    metrics.save_image_grid(path, images, vocab_size=info.vocab_size)
