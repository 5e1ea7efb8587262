"""Config validation before any compilation, and the run directory's memory of its config.

`check_config` reports every bad field at once. `check_workdir_config` stores the config in the
run directory and refuses to resume it with a different model or data config (listing the fields
that differ) unless `training.allow_config_change` is set.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from vdm_jax import data, model as model_lib, networks, objectives, optim, sampling, tasks

DTYPES = ("float32", "bfloat16")
BLOCK_IMPLS = ("auto", "unrolled", "scan")
# Fields that define what is being trained: a resumed run must agree on them.
PINNED_SECTIONS = ("data", "model", "vae", "latent")
PINNED_FIELDS = ("seed", "task")


# Tasks whose score network changed in vdm_jax 0.2 (the official network: Fourier features
# sin/cos(2^n 2 pi z), output skip eps_hat = NN(z) + z); their runs from 0.1 are refused.
NETWORK_TASKS = ("vdm", "latent_vdm")
OLD_NETWORK = ("{workdir} was trained by vdm_jax 0.1, whose score network computes another "
               "function than this version's (0.2 made it the official VDM network: Fourier "
               "features sin/cos(2^n 2 pi z) and the output skip eps_hat = NN(z) + z), so its "
               "parameters cannot be used here; retrain it, or use vdm_jax 0.1 for this run")


class ConfigError(ValueError):
  """One or more config fields are invalid; the message lists each."""


def _is_bool(value: Any) -> bool:
  return isinstance(value, bool)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _rules(c: ml_collections.ConfigDict) -> list[tuple[str, Any, bool, str]]:
  """(field, value, ok, expectation) for every checked field (names: the registries')."""
  known = data.DATASETS.names()
  schedule_names = model_lib.SCHEDULES.names()
  fixed = tuple(n for n in schedule_names if not model_lib.get_schedule(n).learned)
  network = c.model.get("network", networks.DEFAULT_NETWORK)
  groups, width = c.model.norm_groups, c.model.channels
  groups_ok = _is_int(groups) and groups >= 0 and (
      groups == 0 or (_is_int(width) and width > 0 and width % groups == 0))
  return [
      ("task", c.task, c.task in tasks.TASKS, f"one of {tasks.TASKS}"),
      ("vae.channels", c.vae.channels, c.vae.channels > 0, "> 0"),
      ("vae.latent_channels", c.vae.latent_channels, c.vae.latent_channels > 0, "> 0"),
      ("vae.num_down", c.vae.num_down, c.vae.num_down >= 0, ">= 0"),
      ("vae.num_blocks", c.vae.num_blocks, c.vae.num_blocks >= 0, ">= 0"),
      ("latent.vae_workdir", c.latent.vae_workdir,
       c.task != "latent_vdm" or bool(c.latent.vae_workdir),
       "the run directory of a trained VAE (task 'latent_vdm')"),
      ("data.name", c.data.name, c.data.name in known, f"one of {known}"),
      ("model.schedule", c.model.schedule, c.model.schedule in model_lib.SCHEDULES,
       f"one of {schedule_names}"),
      ("model.network", network, network in networks.NETWORKS,
       f"one of {networks.NETWORKS.names()}"),
      ("model.gamma_min", c.model.gamma_min, c.model.gamma_min < c.model.gamma_max,
       f"< model.gamma_max={c.model.gamma_max}"),
      ("model.channels", c.model.channels, c.model.channels > 0, "> 0"),
      ("model.norm_groups", groups, groups_ok,
       f"an int >= 0 (0 = the project's rule) that divides model.channels={width}"),
      ("model.conditioning_input", c.model.conditioning_input,
       _is_bool(c.model.conditioning_input), "True or False"),
      ("data.flip", c.data.flip, _is_bool(c.data.flip), "True or False"),
      ("data.rot90", c.data.rot90, _is_bool(c.data.rot90), "True or False"),
      ("model.num_blocks", c.model.num_blocks, c.model.num_blocks > 0, "> 0"),
      ("model.dropout", c.model.dropout, 0 <= c.model.dropout < 1, "in [0, 1)"),
      ("model.block_impl", c.model.block_impl, c.model.block_impl in BLOCK_IMPLS,
       f"one of {BLOCK_IMPLS}"),
      ("model.dtype", c.model.dtype, c.model.dtype in DTYPES, f"one of {DTYPES}"),
      ("model.num_steps", c.model.num_steps, c.model.num_steps >= 0, ">= 0 (0 = continuous)"),
      ("model.objective", c.model.objective, c.model.objective in objectives.OBJECTIVES,
       f"one of {objectives.OBJECTIVES}"),
      ("model.weighting", c.model.weighting, c.model.weighting in objectives.WEIGHTINGS,
       f"one of {objectives.WEIGHTINGS}"),
      ("model.schedule", c.model.schedule,
       c.model.objective == "elbo" or c.model.schedule in fixed,
       f"a fixed schedule {fixed} with objective {c.model.objective!r} "
       "(only the ELBO gives a learned schedule a meaningful gradient)"),
      ("model.num_steps", c.model.num_steps,
       c.model.objective != "simple" or c.model.num_steps >= 1,
       ">= 1 with objective 'simple' (t ~ Uniform{1..T})"),
      ("sample.sampler", c.sample.sampler, c.sample.sampler in sampling.SAMPLERS,
       f"one of {sampling.SAMPLERS.names()}"),
      ("sample.ddpm_variance", c.sample.ddpm_variance,
       c.sample.ddpm_variance in sampling.DDPM_VARIANCES, f"one of {sampling.DDPM_VARIANCES}"),
      ("model.p_uncond", c.model.p_uncond, 0 <= c.model.p_uncond < 1, "in [0, 1)"),
      ("optim.learning_rate", c.optim.learning_rate, c.optim.learning_rate > 0, "> 0"),
      ("optim.warmup_steps", c.optim.warmup_steps, c.optim.warmup_steps >= 0, ">= 0"),
      ("optim.weight_decay", c.optim.weight_decay, c.optim.weight_decay >= 0, ">= 0"),
      ("optim.weight_decay_rule", c.optim.weight_decay_rule,
       c.optim.weight_decay_rule in optim.WEIGHT_DECAY_RULES,
       f"one of {optim.WEIGHT_DECAY_RULES}"),
      ("optim.ema_decay", c.optim.ema_decay, 0 <= c.optim.ema_decay < 1, "in [0, 1)"),
      ("optim.ema_warmup", c.optim.ema_warmup, _is_bool(c.optim.ema_warmup), "True or False"),
      ("optim.schedule_lr_multiplier", c.optim.schedule_lr_multiplier,
       c.optim.schedule_lr_multiplier > 0, "> 0"),
      ("training.batch_size", c.training.batch_size, c.training.batch_size > 0, "> 0"),
      ("training.num_steps", c.training.num_steps, c.training.num_steps > 0, "> 0"),
      ("training.log_every", c.training.log_every, c.training.log_every > 0, "> 0"),
      ("training.eval_every", c.training.eval_every, c.training.eval_every > 0, "> 0"),
      ("training.sample_every", c.training.sample_every, c.training.sample_every > 0, "> 0"),
      ("training.checkpoint_every", c.training.checkpoint_every,
       c.training.checkpoint_every > 0, "> 0"),
      ("training.keep_checkpoints", c.training.keep_checkpoints,
       c.training.keep_checkpoints > 0, "> 0"),
      ("eval.batch_size", c.eval.batch_size, c.eval.batch_size > 0, "> 0"),
      ("eval.t_samples", c.eval.t_samples, c.eval.t_samples > 0, "> 0"),
      ("eval.num_steps", c.eval.num_steps, c.eval.num_steps >= -1,
       ">= -1 (0 = continuous time, -1 = the model's own model.num_steps)"),
      ("sample.num_steps", c.sample.num_steps, c.sample.num_steps > 0, "> 0"),
      ("sample.num_images", c.sample.num_images, c.sample.num_images > 0, "> 0"),
  ]


def check_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> None:
  """Raises ConfigError listing every invalid field (value and expectation), or returns.

  Args:
    config: the full training config.
    num_devices: when given, the batch sizes must be divisible by it.
  """
  errors = [f"{name}={value!r}: expected {expect}"
            for name, value, ok, expect in _rules(config) if not ok]
  if num_devices:
    for name, value in (("training.batch_size", config.training.batch_size),
                        ("eval.batch_size", config.eval.batch_size)):
      if value > 0 and value % num_devices:
        errors.append(f"{name}={value}: expected a multiple of the {num_devices} devices")
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def pinned(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The flattened fields a resumed run must keep."""
  d = json.loads(config.to_json())
  out = {k: d.get(k) for k in PINNED_FIELDS}
  for section in PINNED_SECTIONS:
    out.update(_flatten(d.get(section, {}), f"{section}."))
  return out


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str, *,
                         write: bool = True) -> None:
  """Compares `config` with the one stored in `workdir/config.json`, then stores it.

  Raises:
    ConfigError: the stored run used different model/data fields (each listed with both values),
      and `training.allow_config_change` is False.
  """
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    old, new = stored.get("pinned", {}), pinned(config)
    if old.get("task", "vdm") in NETWORK_TASKS and "model.norm_groups" not in old:
      raise ConfigError(OLD_NETWORK.format(workdir=workdir))
    diff = [f"{k}: {old.get(k, '<missing>')!r} -> {new.get(k, '<missing>')!r}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff and not config.training.allow_config_change:
      raise ConfigError(
          f"{workdir} holds a run with a different config; differing fields:\n  "
          + "\n  ".join(diff)
          + "\nUse another --workdir, or pass --config.training.allow_config_change=True.")
  if write:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"pinned": pinned(config), "config": json.loads(config.to_json())}, f, indent=2)
    os.replace(tmp, path)
