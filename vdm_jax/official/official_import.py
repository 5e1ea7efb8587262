"""`vdm-jax import-official`: an official google-research/vdm checkpoint as a run directory.

  vdm-jax import-official --checkpoint PATH --config configs/cifar10.py --workdir DIR
  vdm-jax eval --workdir DIR          # the bound of the official EMA parameters
  vdm-jax sample --workdir DIR

The official trainer's clu checkpoint (`official_checkpoint.read_official_checkpoint`) gives the
parameters, the EMA parameters and the step; `convert.convert_params` maps both onto the model of
`config` (which must describe the same network: configs/cifar10.py for the released CIFAR-10
model). The run's config records the block layout it was imported with (`model.block_impl`
"unrolled" or "scan", whichever "auto" resolves to on this backend), so it restores anywhere. The
run directory gets config.json and one checkpoint at the official step, with a fresh optimiser
state: the official Adam moments are not carried over, so continuing training from an import
restarts AdamW's moment estimates (and its learning-rate warm-up counter) from zero.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from vdm_jax.storage import checkpointing, metrics, rundir
from vdm_jax.official import convert, official_checkpoint
from vdm_jax.datasets import data
from vdm_jax.core import parallel
from vdm_jax.training import state as state_lib, tasks
from vdm_jax.training.config_checks import ConfigError, check_config
from vdm_jax.training.stored_config import check_workdir_config


def import_official(checkpoint: str, config: ml_collections.ConfigDict, workdir: str
                    ) -> dict[str, Any]:
  """Writes a run directory in `workdir` holding the official checkpoint at `checkpoint`.

  Args:
    checkpoint: an official checkpoint (per-host directory, MultihostCheckpoint base or
      checkpoint prefix; see `official_checkpoint.read_official_checkpoint`).
    config: this library's config of the same network (e.g. configs/cifar10.py).
    workdir: the new run directory; refused when it already holds checkpoints.

  Returns:
    {"workdir", "step", "num_params"}.

  Raises:
    ValueError: bad config, a task other than "vdm", an existing run, or parameters that do
      not fit the config (naming the first official parameter that does not).
  """
  mesh = parallel.make_mesh()
  check_config(config, num_devices=mesh.size)
  if config.task != "vdm":
    raise ConfigError(f"task: {config.task!r}; official checkpoints are VDMs (task 'vdm')")
  info = data.static_info(config.data.name)
  if info.vocab_size != 256 or info.shape[-1] != 3:
    raise ConfigError(f"data.name: {config.data.name!r} has vocab_size {info.vocab_size} and "
                      f"{info.shape[-1]} channel(s); the official models are 8-bit RGB")
  ckpt_dir = rundir.join(workdir, rundir.CHECKPOINTS)
  if rundir.list_names(ckpt_dir):
    raise ValueError(f"{workdir!r} already holds checkpoints; import into a new --workdir")
  metrics.say("import-official", f"reading {checkpoint}")
  official = official_checkpoint.read_official_checkpoint(checkpoint)
  # The stored layout of the blocks (unrolled / scanned) is fixed now, so that the run restores
  # on any backend ("auto" would pick another layout on an accelerator than on CPU).
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.block_impl = tasks.block_impl(config)
  metrics.say("import-official", f"step {official['step']}: converting the parameters and the "
                                 f"EMA parameters to {config.model.block_impl} blocks")
  params = convert.convert_params(official["params"], config)
  ema_params = convert.convert_params(official["ema_params"], config)

  metrics.say("import-official", "initialising the train state (a fresh optimiser state)")
  task, tx = tasks.build_task(config, info), state_lib.build_optimizer(config).tx
  rep = parallel.replicated(mesh)
  fresh = jax.jit(lambda: state_lib.init_state(task, tx, seed=config.seed), out_shardings=rep)()
  jax.tree.map(_same_shape, fresh.params, params)   # the converted tree is the model's
  state = fresh.replace(params=jax.device_put(params, rep),
                        ema_params=jax.device_put(ema_params, rep),
                        step=jax.device_put(jax.numpy.asarray(official["step"], jax.numpy.int32),
                                            rep))
  metrics.say("import-official", f"writing the run directory {workdir}")
  rundir.make_dirs(workdir)
  check_workdir_config(config, workdir, write=True)
  with checkpointing.CheckpointManager(ckpt_dir, max_to_keep=None, async_save=False) as manager:
    manager.save(official["step"], state, force=True,
                 metadata={"step": official["step"], "data_position": official["step"],
                           "seed": config.seed, "imported_from": os.fspath(checkpoint)})
    manager.wait_until_finished()
  num = sum(x.size for x in jax.tree.leaves(params))
  return {"workdir": workdir, "step": int(official["step"]), "num_params": int(num)}


def _same_shape(a, b) -> None:
  if a.shape != b.shape:
    raise ValueError(f"converted parameter of shape {b.shape} where the model has {a.shape}")
