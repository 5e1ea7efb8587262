"""Training: `train_and_evaluate(config, workdir)`, the loop around the compiled step.

The train state and the optimiser are in `vdm_jax.state`, the compiled train / eval / sampling
programs in `vdm_jax.steps`; this module runs them: check, resume, train, log, evaluate, sample,
checkpoint, stop on a signal.

What a run directory can rely on:
- every config check, and a dry run of the restore (the new config's train state against the
  checkpoint's tree of shapes), happens before anything in the run directory changes; config.json
  is replaced only once the first checkpoint under the new config is written;
- one trainer at a time: an exclusive lock on `workdir/train.lock` (released when the process
  ends, however it ends), so two trainers never write the same checkpoints;
- SIGTERM / SIGINT are caught from the start: before the first step (restoring, compiling)
  there is nothing new to save and the trainer stops at once; after it, the current step ends,
  the state is saved and the trainer stops. Exit statuses: `run_control.EXIT_PREEMPTED` (SIGTERM)
  and `run_control.EXIT_INTERRUPTED` (SIGINT), returned as "exit_status";
- every exit path waits for the checkpoint being written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from vdm_jax import (checkpointing, config_checks, data, metrics, parallel, pipeline, run_control,
                     runs, stored_config)
from vdm_jax import state as state_lib, steps

from vdm_jax.run_control import EXIT_STATUS

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


class _Prepared(NamedTuple):
  """Everything the loop needs, built before the first step."""
  task: Any
  ckpt: checkpointing.CheckpointManager
  state: state_lib.TrainState
  start: int
  step_fn: Callable        # the compiled train step
  train_it: Any
  first_batch: dict


def _prepare(config, info, mesh, workdir: str, stored: dict | None, stop: run_control.StopRequests,
             set_phase: Callable[[str], None]) -> _Prepared | None:
  """Builds the task, checks the restore (dry run), restores or initialises the state and
  compiles the train step; None if a stop was requested meanwhile."""
  set_phase("building the task")
  task, optimizer = runs.training_task(config, info), state_lib.build_optimizer(config)
  init_fn = lambda: state_lib.init_state(task, optimizer.tx, seed=config.seed)
  abstract = state_lib.abstract_state(init_fn, mesh)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  _check_restore(abstract, ckpt_dir, config=config, stored=stored, workdir=workdir)
  if stop.requested:
    return None
  set_phase("restoring")
  ckpt = checkpointing.CheckpointManager(
      ckpt_dir, max_to_keep=config.training.keep_checkpoints,
      save_interval_steps=config.training.checkpoint_every)
  try:
    restored = ckpt.restore(abstract)
    if restored is None:
      state = jax.jit(init_fn, out_shardings=parallel.replicated(mesh))()
    else:
      state = restored[1]
      logging.info("resumed from step %d in %s", restored[0], workdir)
    start = int(jax.device_get(state.step))
    train_it = pipeline.train_iterator(
        config.data.name, global_batch_size=config.training.batch_size, seed=config.seed,
        start_step=start, flip=config.data.flip, data_dir=config.data.data_dir or None,
        **augmentation(config))
    batch = parallel.shard_batch(next(train_it), mesh)
    if stop.requested:
      ckpt.close()
      return None
    set_phase("compiling the train step")
    logging.info("compiling the train step (a signal now stops at once: nothing new to save)")
    step_fn = steps.jit_train_step(config, task, optimizer, mesh).lower(state, batch).compile()
  except BaseException:
    ckpt.close()
    raise
  if stop.requested:   # came during the compilation (the caller may have left already)
    ckpt.close()
    return None
  return _Prepared(task, ckpt, state, start, step_fn, train_it, batch)


def _check_restore(abstract, ckpt_dir: str, *, config, stored: dict | None,
                   workdir: str) -> None:
  """The restore's dry run: the newest checkpoint whose tree can be read must have the key
  paths, shapes and dtypes of `abstract` (`stored_config.check_state_fits`). Nothing is
  written; a checkpoint whose tree cannot be read is left to the restore (and its fallback)."""
  for step in checkpointing.complete_steps(ckpt_dir):   # no manager opened: no collective
    try:
      tree = checkpointing.stored_tree(ckpt_dir, step)
    except Exception as e:  # pylint: disable=broad-except  # the restore will say what is wrong
      logging.warning("could not read the tree of checkpoint %d for the restore's dry run: %s",
                      step, e)
      continue
    stored_config.check_state_fits(stored_config.leaf_table(abstract),
                                   stored_config.leaf_table(tree), step=step,
                                   config=config, stored_config=stored, workdir=workdir)
    return


class _ConfigAfterCheckpoint:
  """Stores config.json once the first checkpoint under this config is written (waiting for
  that one save): until then the run directory keeps describing its checkpoints."""

  def __init__(self, config, workdir: str, stored: dict | None, *, write: bool):
    same = stored is not None and stored.get("config") == json.loads(config.to_json())
    self.config, self.workdir, self.write, self.done = config, workdir, write, same

  def after_save(self, ckpt: checkpointing.CheckpointManager, saved: bool) -> None:
    if saved and not self.done:
      ckpt.wait_until_finished()
      if self.write:
        stored_config.store_config(self.config, self.workdir)
      self.done = True


def _say(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _stopped(sig: str, step: int | None, *, saved: bool, abandoned: bool = False,
             phase: str | None = None) -> dict[str, Any]:
  """The result of a run stopped by signal `sig` (and the line saying so)."""
  status = EXIT_STATUS[sig]
  if saved:
    _say(f"{sig} received: saved step {step} and stopped (exit status {status}); run the same "
         f"command to resume")
  else:
    _say(f"{sig} received before the first step{f' ({phase})' if phase else ''}: nothing new "
         f"to save, stopped (exit status {status})")
  return {"preempted_at": step, "signal": sig, "exit_status": status, "saved": saved,
          "abandoned_compilation": abandoned}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from the newest checkpoint in `workdir`), evaluates and samples.

  Returns:
    The final evaluation metrics (bpd of the EMA parameters on the test split, and its terms);
    for a run stopped by SIGTERM / SIGINT: {"preempted_at": step (None if unknown), "signal",
    "exit_status" (`EXIT_STATUS`), "saved", "abandoned_compilation"} ("abandoned_compilation":
    a compilation was left running in a daemon thread, so the process should end with
    `os._exit`, as `vdm-jax train` does).

  Raises:
    ConfigError: an invalid field (all are listed), a config that differs from the run's, or a
      train state that does not fit the run's checkpoint; nothing in `workdir` was changed.
    RunError: another trainer holds `workdir`.
  """
  config_checks.check_config(config)   # every field, before any side effect
  with contextlib.ExitStack() as stack:
    stop = stack.enter_context(run_control.StopRequests())   # before anything compiles
    stack.enter_context(parallel.cpu_ynn_fusions(config.xla.cpu_ynn_fusion_type))
    if config.distributed.initialize:
      parallel.initialize_distributed(
          coordinator_address=config.distributed.coordinator_address,
          num_processes=config.distributed.num_processes,
          process_id=config.distributed.process_id)
    mesh = parallel.make_mesh()
    config_checks.check_config(config, num_devices=mesh.size)
    is_chief = jax.process_index() == 0
    info = data.get_info(config.data.name, data_dir=config.data.data_dir or None)
    stack.enter_context(run_control.RunLock(workdir, enabled=is_chief))
    stored = stored_config.check_workdir_config(config, workdir, write=False)
    if stop.requested:
      return _stopped(stop.requested, None, saved=False)
    prepared = run_control.responsive(
        lambda set_phase: _prepare(config, info, mesh, workdir, stored, stop, set_phase), stop)
    if prepared is None or isinstance(prepared, run_control.Abandoned):
      return _stopped(stop.requested, None, saved=False, abandoned=prepared is not None,
                      phase=getattr(prepared, "phase", None))
    writer = stack.enter_context(metrics.MetricWriter(workdir, enabled=is_chief))
    state, step = _loop(config, workdir, info, mesh, prepared, stop, stored, writer, is_chief)
    if stop.requested is not None:
      return _stopped(stop.requested, step, saved=step > prepared.start)
    stop.__exit__()   # the state is saved: from here on a signal has its usual effect
    return _final(config, workdir, info, mesh, prepared.task, state, step, writer, is_chief)


def _loop(config, workdir, info, mesh, p: _Prepared, stop: run_control.StopRequests, stored, writer,
          is_chief):
  """Steps from p.start to the last step (or a stop request); returns (state, step). Every exit
  waits for the checkpoint being written and closes the checkpointer."""
  t = config.training
  bar = metrics.ProgressBar(total=t.num_steps, initial=p.start, enabled=is_chief,
                            log_every=t.log_every)
  config_saved = _ConfigAfterCheckpoint(config, workdir, stored, write=is_chief)
  state, step, batch = p.state, p.start, p.first_batch
  pending, tick, tick_step = None, time.perf_counter(), p.start
  try:
    while step < t.num_steps and stop.requested is None:
      batch = batch if batch is not None else parallel.shard_batch(next(p.train_it), mesh)
      state, out = p.step_fn(state, batch)
      step, batch = step + 1, None
      if pending is not None:   # the previous step's metrics: ready by now, no stall
        _report(pending, writer, bar, t, tick_info=None)
      pending = (step, out)
      if step % t.log_every == 0 or step == t.num_steps:
        _report(pending, writer, bar, t, tick_info=(tick, tick_step))
        pending, tick, tick_step = None, time.perf_counter(), step
      if step % t.eval_every == 0 and step < t.num_steps:
        writer.write_scalars(step, _prefix(steps.evaluate(
            p.task, state.ema_params, config, info, mesh, frozen=state.frozen), "eval/"))
      if step % t.sample_every == 0 and step < t.num_steps:
        _write_samples(p.task, state, config, info, workdir, step, is_chief)
      config_saved.after_save(p.ckpt, p.ckpt.save(step, state, metadata=_metadata(config, step)))
    if pending is not None:
      _report(pending, writer, bar, t, tick_info=None)
    if step > p.start:
      config_saved.after_save(p.ckpt, p.ckpt.save(step, state, metadata=_metadata(config, step),
                                                   force=True))
    p.ckpt.wait_until_finished()
  except BaseException:
    _close_quietly(p.ckpt, bar)
    raise
  p.ckpt.close()
  bar.close()
  return state, step


def _close_quietly(ckpt, bar) -> None:
  """On an error: wait for the checkpoint in flight and close the checkpointer, logging (not
  raising) a failure of its own, so that the error being raised stays the one reported."""
  for what, fn in (("finishing the checkpoint in flight", ckpt.close), ("ending the bar", bar.close)):
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("%s failed as well: %s: %s", what, type(e).__name__, e)


def _final(config, workdir, info, mesh, task, state, step, writer, is_chief) -> dict[str, Any]:
  """The final evaluation and samples; eval.json."""
  result = steps.evaluate(task, state.ema_params, config, info, mesh, frozen=state.frozen)
  writer.write_scalars(step, _prefix(result, "eval/"))
  _write_samples(task, state, config, info, workdir, step, is_chief)
  num_params = sum(int(leaf.size) for leaf in jax.tree.leaves(state.ema_params))
  if is_chief:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump({"step": step, "num_params": num_params, **result}, f, indent=2)
    print(f"step {step}: test {steps.summary_line(result, task.headline)} -> {workdir} "
          f"({num_params:,} parameters)", flush=True)
  return result


def _prefix(d: dict, p: str) -> dict:
  return {p + k: v for k, v in d.items() if isinstance(v, (int, float))}


def _metadata(config, step: int) -> dict:
  return {"step": step, "data_position": step, "seed": config.seed}


def _report(pending, writer, bar, t, *, tick_info) -> None:
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
