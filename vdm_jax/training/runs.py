"""Run directories read back: the stored config, and a checkpoint's parameters for evaluation::

  load_config(workdir)  -> the config `vdm-jax train` stored in workdir/config.json
  load_run(workdir)     -> Run: config, task, and the EMA parameters of a checkpoint (restored
                           without the optimiser state, which evaluation never needs)
  load_vae_params(...)  -> the trained VAE a latent VDM is built on (latent.vae_workdir)
  training_task(...)    -> the task a training run of a config optimises

Tasks never read run directories; this module hands them what they need.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, NamedTuple

import ml_collections

from vdm_jax.storage import checkpointing, rundir
from vdm_jax.datasets import data
from vdm_jax.core import parallel
from vdm_jax.training import state as state_lib, stored_config
from vdm_jax.training import tasks

PyTree = Any

# Config fields added after the first release, with the value older runs implicitly used.
_ADDED_FIELDS = (("", "task", "vdm"), ("sample", "ddpm_variance", "beta"),
                 ("model", "objective", "elbo"), ("model", "weighting", "sigmoid"),
                 ("model", "weighting_bias", 0.0), ("sample", "sampler", "ancestral"),
                 ("model", "norm_groups", 0), ("model", "conditioning_input", False),
                 ("data", "rot90", False), ("optim", "weight_decay_rule", "kernels"),
                 ("optim", "ema_warmup", True), ("model", "schedule_objective", "elbo"))
_ADDED_SECTIONS = {"vae": {"channels": 32, "latent_channels": 4, "num_down": 1, "num_blocks": 1},
                   "latent": {"vae_workdir": "", "vae_checkpoint": 0},
                   "xla": {"cpu_ynn_fusion_type": parallel.CPU_YNN_FUSION_TYPE}}


class RunError(ValueError):
  """The run directory cannot be used as asked (no config, no checkpoint, wrong kind of run)."""


class Run(NamedTuple):
  """A trained run, restored: EMA parameters of checkpoint `step`."""
  workdir: str
  config: ml_collections.ConfigDict
  info: data.DatasetInfo
  task: Any
  step: int
  params: PyTree
  frozen: PyTree
  mesh: Any


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config stored by `vdm-jax train` in workdir/config.json."""
  path = rundir.join(workdir, rundir.CONFIG)
  if not rundir.exists(path) or rundir.is_dir(path):
    raise RunError(f"{workdir!r} is not a vdm-jax run directory: {path} does not exist (expected "
                   f"the --workdir of a `vdm-jax train` run)")
  stored = json.loads(rundir.read_text(path))
  config = ml_collections.ConfigDict(stored["config"])
  if (config.get("task", "vdm") in stored_config.NETWORK_TASKS
      and "norm_groups" not in config.get("model", {})):
    raise RunError(stored_config.OLD_NETWORK.format(workdir=workdir))
  for section, fields in _ADDED_SECTIONS.items():
    if section not in config:
      config[section] = ml_collections.ConfigDict(fields)
  for section, field, value in _ADDED_FIELDS:   # runs stored before these fields existed
    target = config[section] if section else config
    if field not in target:
      target[field] = value
  return config


def compiled_as_configured(command: Callable) -> Callable:
  """Decorates a command on a run directory (first argument `workdir`): what it compiles uses
  the run's config.xla.cpu_ynn_fusion_type (`parallel.cpu_ynn_fusions`), as its training did.
  Where config.json cannot be read, the library's default list (the command itself then says
  what is wrong with the run directory)."""
  @functools.wraps(command)
  def wrapped(workdir, *args, **kwargs):
    try:
      value = load_config(workdir).xla.cpu_ynn_fusion_type
    except (RunError, OSError, ValueError, KeyError, AttributeError):
      value = parallel.CPU_YNN_FUSION_TYPE
    with parallel.cpu_ynn_fusions(value):
      return command(workdir, *args, **kwargs)
  return wrapped


def load_run(workdir: str, *, step: int | None = None, eval_batch_size: int | None = None) -> Run:
  """Restores the EMA parameters of checkpoint `step` (None: the newest usable one) of the run
  in `workdir`: only `state.EVAL_FIELDS` are read, never the parameters being trained or the
  optimiser state. What is read is verified (`checkpointing.CheckpointManager.restore`: the
  digests of those fields, finite values); without `step` a damaged checkpoint is skipped with
  a warning, and one deleted by a running trainer's rotation while being read is retried on
  the newest remaining one.

  Raises:
    RunError: no config.json, no checkpoint, no checkpoint `step` (the message lists them),
      checkpoint `step` damaged, every checkpoint damaged, or checkpoints that do not fit the
      run's config.
    checkpointing.CheckpointReadError: a read failed without showing damage (an I/O error).
  """
  config = load_config(workdir)
  if eval_batch_size is not None:
    config.eval.batch_size = int(eval_batch_size)
  info = data.get_info(config.data.name, data_dir=config.data.data_dir or None)
  task, mesh = tasks.build_task(config, info), parallel.make_mesh()
  ckpt_dir = rundir.join(workdir, rundir.CHECKPOINTS)
  if not rundir.is_dir(ckpt_dir):
    raise RunError(f"{workdir!r} holds no checkpoint ({ckpt_dir} does not exist); train first: "
                   f"vdm-jax train --config CONFIG --workdir {workdir}")
  manager = checkpointing.CheckpointManager(ckpt_dir, max_to_keep=None, async_save=False)
  try:
    steps = manager.all_steps()
    if not steps:
      raise RunError(f"{workdir!r} holds no checkpoint (nothing under {ckpt_dir}); train first: "
                     f"vdm-jax train --config CONFIG --workdir {workdir}")
    if step is not None and step not in steps:
      raise RunError(f"{workdir!r} has no checkpoint for step {step}; available steps: {steps}")
    abstract = state_lib.abstract_eval_state(task, seed=config.seed, mesh=mesh)
    try:   # verified: the digests of the fields read, finite values; past damaged steps
      result = manager.restore(abstract, step=step, partial=True)
    except (checkpointing.CheckpointDamagedError, checkpointing.NoUsableCheckpointError,
            checkpointing.CheckpointStructureError) as e:
      raise RunError(f"{workdir!r} cannot be loaded: {e}") from e
    except ValueError as e:   # the requested step was deleted meanwhile
      raise RunError(f"{workdir!r}: {e}") from e
    if result is None:
      raise RunError(f"{workdir!r} holds no checkpoint any more (nothing under {ckpt_dir})")
    step, restored, _ = result
  finally:
    manager.close()
  return Run(workdir, config, info, task, int(step), restored["ema_params"], restored["frozen"],
             mesh)


def load_vae_params(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> PyTree:
  """The EMA parameters of the VAE run in config.latent.vae_workdir (checked to match)."""
  workdir = config.latent.vae_workdir
  if not workdir:
    raise ValueError("task 'latent_vdm' needs latent.vae_workdir: the run directory of a trained "
                     "VAE (vdm-jax train --config configs/digits_vae.py --workdir runs/digits_vae)")
  run = load_run(workdir, step=config.latent.vae_checkpoint or None)
  if run.task.name != "vae" or run.info.name != info.name:
    raise ValueError(f"latent.vae_workdir={workdir!r} is a {run.task.name!r} run on "
                     f"{run.info.name!r}; expected a 'vae' run on {info.name!r}")
  mine, theirs = dict(config.vae), dict(run.config.vae)
  if mine != theirs:
    raise ValueError(f"config.vae {mine} differs from the VAE run's {theirs}")
  return run.params


def training_task(config: ml_collections.ConfigDict, info: data.DatasetInfo):
  """The task a training run of `config` optimises (`tasks.build_task`); a latent VDM gets its
  frozen VAE from the VAE run in latent.vae_workdir."""
  vae_params = load_vae_params(config, info) if config.task == "latent_vdm" else None
  return tasks.build_task(config, info, vae_params=vae_params)
