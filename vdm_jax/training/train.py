"""Training: `train_and_evaluate(config, workdir)`, the loop around the compiled step.

The train state and the optimiser are in `vdm_jax.training.state`, the compiled train / eval /
sampling programs in `vdm_jax.training.steps`; this module runs them: check, resume, train, log,
evaluate, sample, checkpoint, stop on a signal.

What a run directory can rely on:

- every config check, and a dry run of the restore (the new config's train state against the
  checkpoint's tree of shapes), happens before anything in the run directory changes; config.json
  is replaced only once the first checkpoint under the new config is written;
- one trainer at a time: `run_control.RunLock` on `workdir/train.lock` (a flock on a local disk,
  an expiring lease in object storage), taken by process 0 for all processes;
- SIGTERM / SIGINT are caught from the start: before the first step (restoring, compiling)
  there is nothing new to save and the trainer stops at once; after it, every process's request
  travels through the train step (a batch column whose maximum the step returns), so all
  processes of a multi-host run stop after the same step (one or two steps after the signal),
  save that step together and stop. Exit statuses: `run_control.EXIT_PREEMPTED` (SIGTERM) and
  `run_control.EXIT_INTERRUPTED` (SIGINT), returned as "exit_status";
- every exit path waits for the checkpoint being written;
- only process 0 writes the run's bookkeeping (config.json, metrics, events, samples,
  eval.json); every process takes part in the checkpoints (Orbax) and reads its own rows of each
  global batch. All of it goes through `rundir`, so the run directory may be in a bucket.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdm_jax.storage import checkpointing, metrics, rundir
from vdm_jax.training import config_checks, run_control, runs, stored_config
from vdm_jax.datasets import data, pipeline
from vdm_jax.core import parallel
from vdm_jax.training import state as state_lib, steps

from vdm_jax.storage.checkpoint_integrity import describe as integrity_describe
from vdm_jax.training.run_control import EXIT_STATUS

# What a process asks of the others through the train step's "stop" column (the maximum wins).
_STOP_NONE, _STOP_SIGTERM, _STOP_SIGINT, _STOP_LOCK_LOST = 0, 1, 2, 3
_STOP_SIGNAL = {_STOP_SIGTERM: "SIGTERM", _STOP_SIGINT: "SIGINT"}

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
  first_batch: dict        # this process's rows, as numpy


def _prepare(config, info, mesh, workdir: str, stored: dict | None, stop: run_control.StopRequests,
             set_phase: Callable[[str], None]) -> _Prepared | None:
  """Builds the task, checks the restore (dry run), restores or initialises the state and
  compiles the train step; None if a stop was requested meanwhile."""
  set_phase("building the task")
  task, optimizer = runs.training_task(config, info), state_lib.build_optimizer(config)
  init_fn = lambda: state_lib.init_state(task, optimizer.tx, seed=config.seed)
  abstract = state_lib.abstract_state(init_fn, mesh)
  ckpt_dir = rundir.join(workdir, rundir.CHECKPOINTS)
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
    batch = next(train_it)
    if stop.requested:
      ckpt.close()
      return None
    set_phase("compiling the train step")
    logging.info("compiling the train step (a signal now stops at once: nothing new to save)")
    step_fn = steps.jit_train_step(config, task, optimizer, mesh).lower(
        state, _with_stop(batch, _STOP_NONE, mesh)).compile()
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
    rundir.StorageError: the run directory's storage failed (a disk, an unreachable bucket);
      the newest complete checkpoint is kept, and the same call resumes from it.
  """
  try:
    return _train_and_evaluate(config, workdir)
  except rundir.StorageError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # only storage failures are converted
    if not checkpointing.is_storage_failure(e):
      raise
    raise rundir.StorageError(
        f"the storage of the run directory {workdir} failed "
        f"({integrity_describe(e).replace(chr(10), ' ')}); the "
        f"newest complete checkpoint is kept: run the same command again once the storage is "
        f"back") from e


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  config_checks.check_config(config)   # every field, before any side effect
  checkpointing.check_location(rundir.join(workdir, rundir.CHECKPOINTS))
  with contextlib.ExitStack() as stack:
    stop = stack.enter_context(run_control.StopRequests())   # before anything compiles
    stack.enter_context(parallel.cpu_ynn_fusions(config.xla.cpu_ynn_fusion_type))
    d = config.distributed
    parallel.initialize_distributed(d.initialize, coordinator_address=d.coordinator_address,
                                    num_processes=d.num_processes, process_id=d.process_id)
    stop.reclaim()   # JAX's preemption notifier took SIGTERM: every process agrees through the step
    mesh = parallel.make_mesh()
    if jax.process_count() > 1:
      _say(f"process {jax.process_index()} of {jax.process_count()}, {mesh.size} devices "
           f"({jax.local_device_count()} here)")
    config_checks.check_config(config, num_devices=mesh.size)
    is_chief = jax.process_index() == 0
    info = data.get_info(config.data.name, data_dir=config.data.data_dir or None)
    lock = _take_lock(stack, workdir, config, is_chief)
    stored = stored_config.check_workdir_config(config, workdir, write=False)
    if stop.requested:
      return _stopped(stop.requested, None, saved=False)
    prepared = run_control.responsive(
        lambda set_phase: _prepare(config, info, mesh, workdir, stored, stop, set_phase), stop)
    if prepared is None or isinstance(prepared, run_control.Abandoned):
      return _stopped(stop.requested, None, saved=False, abandoned=prepared is not None,
                      phase=getattr(prepared, "phase", None))
    writer = stack.enter_context(metrics.MetricWriter(workdir, enabled=is_chief))
    state, step, code = _loop(config, workdir, info, mesh, prepared, stop, lock, stored, writer,
                              is_chief)
    if code == _STOP_LOCK_LOST:
      raise runs.RunError(f"{workdir!r}: another trainer took over this run's lock (this one "
                          f"stalled for longer than training.lock_expiry_secs="
                          f"{config.training.lock_expiry_secs}); stopped after saving step "
                          f"{step}")
    if code != _STOP_NONE:
      return _stopped(_STOP_SIGNAL[code], step, saved=step > prepared.start)
    stop.__exit__()   # the state is saved: from here on a signal has its usual effect
    return _final(config, workdir, info, mesh, prepared.task, state, step, writer, is_chief)


def _take_lock(stack: contextlib.ExitStack, workdir: str, config, is_chief: bool
               ) -> run_control.RunLock:
  """Process 0 takes the run directory's lock; every process learns whether it did (a
  collective), so that a refused run stops on all hosts with process 0's error."""
  lock = run_control.RunLock(workdir, enabled=is_chief,
                             expiry_secs=config.training.lock_expiry_secs)
  error = None
  try:
    stack.enter_context(lock)
  except runs.RunError as e:
    error = e
  if jax.process_count() > 1:
    refused = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if refused and error is None:
      raise runs.RunError(f"process 0 could not take the lock of {workdir!r} (its error says "
                          f"why); this process stops with it")
  if error is not None:
    raise error
  return lock


def _local_stop(stop: run_control.StopRequests, lock: run_control.RunLock) -> int:
  if lock.lost:
    return _STOP_LOCK_LOST
  return {"SIGTERM": _STOP_SIGTERM, "SIGINT": _STOP_SIGINT}.get(stop.requested, _STOP_NONE)


def _with_stop(local_batch: dict, code: int, mesh) -> dict:
  """This process's rows of the batch, plus the stop column (`steps.STOP_KEY`), as global
  arrays."""
  rows = len(next(iter(local_batch.values())))
  return parallel.shard_batch(
      {**local_batch, steps.STOP_KEY: np.full((rows,), code, np.int32)}, mesh)


def _loop(config, workdir, info, mesh, p: _Prepared, stop: run_control.StopRequests,
          lock: run_control.RunLock, stored, writer, is_chief):
  """Steps from p.start to the last step, or until the processes agree to stop; returns (state,
  step, stop code). Each step carries this process's stop request; the step's output says what
  any process asked, and is read one step later (no stall), so all processes stop after the
  same step. Every exit waits for the checkpoint being written and closes the checkpointer."""
  t = config.training
  bar = metrics.ProgressBar(total=t.num_steps, initial=p.start, enabled=is_chief,
                            log_every=t.log_every)
  config_saved = _ConfigAfterCheckpoint(config, workdir, stored, write=is_chief)
  state, step, local = p.state, p.start, p.first_batch
  pending, tick, tick_step, agreed = None, time.perf_counter(), p.start, _STOP_NONE
  try:
    while step < t.num_steps and agreed == _STOP_NONE:
      local = local if local is not None else next(p.train_it)
      state, out = p.step_fn(state, _with_stop(local, _local_stop(stop, lock), mesh))
      step, local = step + 1, None
      if pending is not None:   # the previous step's metrics: ready by now, no stall
        agreed = _report(pending, writer, bar, t, tick_info=None)
      pending = (step, out)
      if step % t.log_every == 0 or step == t.num_steps:
        agreed = max(agreed, _report(pending, writer, bar, t, tick_info=(tick, tick_step)))
        pending, tick, tick_step = None, time.perf_counter(), step
      if step % t.eval_every == 0 and step < t.num_steps and agreed == _STOP_NONE:
        writer.write_scalars(step, _prefix(steps.evaluate(
            p.task, state.ema_params, config, mesh, frozen=state.frozen), "eval/"))
      if step % t.sample_every == 0 and step < t.num_steps and agreed == _STOP_NONE:
        _write_samples(p.task, state, config, info, workdir, step, is_chief)
      _save(p, config_saved, writer, config, step, state)
    if pending is not None:
      agreed = max(agreed, _report(pending, writer, bar, t, tick_info=None))
    if step > p.start:
      _save(p, config_saved, writer, config, step, state, force=True)
    p.ckpt.wait_until_finished()
  except BaseException:
    _close_quietly(p.ckpt, bar)
    raise
  p.ckpt.close()
  bar.close()
  return state, step, agreed


def _save(p: _Prepared, config_saved, writer, config, step: int, state, *,
          force: bool = False) -> None:
  """Checkpoint `step` if due (or `force`); after one, the metrics and events written so far
  are flushed too (uploaded, for a run directory in object storage)."""
  saved = p.ckpt.save(step, state, metadata=_metadata(config, step), force=force)
  config_saved.after_save(p.ckpt, saved)
  if saved:
    writer.flush()


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
  result = steps.evaluate(task, state.ema_params, config, mesh, frozen=state.frozen)
  writer.write_scalars(step, _prefix(result, "eval/"))
  _write_samples(task, state, config, info, workdir, step, is_chief)
  num_params = sum(int(leaf.size) for leaf in jax.tree.leaves(state.ema_params))
  if is_chief:
    rundir.write_json(rundir.join(workdir, rundir.EVAL_JSON),
                      {"step": step, "num_params": num_params, **result})
    print(f"step {step}: test {steps.summary_line(result, task.headline)} -> {workdir} "
          f"({num_params:,} parameters)", flush=True)
  return result


def _prefix(d: dict, p: str) -> dict:
  return {p + k: v for k, v in d.items() if isinstance(v, (int, float))}


def _metadata(config, step: int) -> dict:
  return {"step": step, "data_position": step, "seed": config.seed}


def _report(pending, writer, bar, t, *, tick_info) -> int:
  """Logs a step's metrics; returns the stop code the processes sent through it."""
  step, out = pending
  host = {k: float(v) for k, v in jax.device_get(out).items()}
  code = int(host.pop(steps.STOP_KEY, _STOP_NONE))
  _host_check(step, host, t.max_nonfinite_steps)
  if tick_info is not None:
    tick, tick_step = tick_info
    elapsed = time.perf_counter() - tick
    host["steps_per_sec"] = (step - tick_step) / max(elapsed, 1e-9)
    host["images_per_sec"] = host["steps_per_sec"] * t.batch_size
    writer.write_scalars(step, {"train/" + k: v for k, v in host.items()})
  bar.update(step, **({"bpd": host["bpd"]} if "bpd" in host else {"loss": host["loss"]}))
  return code


def _write_samples(task, state, config, info, workdir, step, is_chief) -> None:
  if not hasattr(task, "sampler_fns") or task.name == "classifier":
    return
  n = config.sample.num_images
  labels = (jnp.arange(n) % info.num_classes) if getattr(task, "num_classes", 0) else None
  images = steps.sample_images(task, state.ema_params, key=jax.random.PRNGKey(config.seed + 2),
                               num_images=n, num_steps=config.sample.num_steps,
                               labels=labels, frozen=state.frozen, sampler=config.sample.sampler,
                               **_sampler_options(config))
  if is_chief:
    metrics.save_image_grid(rundir.join(workdir, rundir.SAMPLES, f"step_{step:08d}.png"),
                            images, vocab_size=info.vocab_size)


def _sampler_options(config) -> dict:
  if config.sample.sampler == "ddpm":
    return {"variance": config.sample.ddpm_variance}
  return {}
