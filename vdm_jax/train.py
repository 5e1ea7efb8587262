"""Training: `train_and_evaluate(config, workdir)`, the loop around the compiled step.

The train state and the optimiser are in `vdm_jax.state`, the compiled train / eval / sampling
programs in `vdm_jax.steps`; this module runs them: resume, train, log, evaluate, sample,
checkpoint, stop on preemption.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections

from vdm_jax import checkpointing, data, metrics, parallel, pipeline, runs, state as state_lib
from vdm_jax import steps
from vdm_jax.config_checks import check_config, check_workdir_config


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
  task, optimizer = runs.training_task(config, info), state_lib.build_optimizer(config)
  rep = parallel.replicated(mesh)
  init_fn = lambda: state_lib.init_state(task, optimizer.tx, seed=config.seed)
  ckpt = checkpointing.CheckpointManager(
      os.path.join(workdir, "checkpoints"), max_to_keep=config.training.keep_checkpoints,
      save_interval_steps=config.training.checkpoint_every)
  restored = ckpt.restore(state_lib.abstract_state(init_fn, mesh))
  if restored is None:
    state = jax.jit(init_fn, out_shardings=rep)()
  else:
    state = restored[1]
    logging.info("resumed from step %d in %s", restored[0], workdir)
  start = int(jax.device_get(state.step))

  step_fn = steps.jit_train_step(config, task, optimizer, mesh)
  writer = metrics.MetricWriter(workdir, enabled=is_chief)
  bar = metrics.ProgressBar(total=config.training.num_steps, initial=start, enabled=is_chief,
                            log_every=config.training.log_every)
  train_it = pipeline.train_iterator(
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
        writer.write_scalars(step, _prefix(steps.evaluate(
            task, state.ema_params, config, info, mesh, frozen=state.frozen), "eval/"))
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
  result = steps.evaluate(task, state.ema_params, config, info, mesh, frozen=state.frozen)
  writer.write_scalars(step, _prefix(result, "eval/"))
  _write_samples(task, state, config, info, workdir, step, is_chief)
  if is_chief:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump({"step": step, **result}, f, indent=2)
    print(f"step {step}: test {steps.summary_line(result, task.headline)} -> {workdir}",
          flush=True)
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
  images = steps.sample_images(task, state.ema_params, key=jax.random.PRNGKey(config.seed + 2),
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
