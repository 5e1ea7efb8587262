"""Config validation before any compilation.

`check_config` reports every bad field at once (every field of configs/base.py has a rule).
`pinned` and `flat_config` give the fields a run directory remembers (`stored_config`).
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from vdm_jax.datasets import data
from vdm_jax.nets import model as model_lib, networks
from vdm_jax.maths import objectives, sampling
from vdm_jax.training import optim
from vdm_jax.core import parallel
from vdm_jax.training import tasks
from vdm_jax.core.checks import (int_at_least as _int_at_least, is_bool as _is_bool,
                            is_int as _is_int, is_number as _is_number, number_in as _number_in)

DTYPES = ("float32", "bfloat16")
BLOCK_IMPLS = ("auto", "unrolled", "scan")
# Fields that define what is being trained: a resumed run must agree on them.
PINNED_SECTIONS = ("data", "model", "vae", "latent")
PINNED_FIELDS = ("seed", "task")
# Seeds are folded into 32-bit PRNG keys (with small offsets for eval and sampling).
MAX_SEED = 2**31


class ConfigError(ValueError):
  """One or more config fields are invalid; the message lists each."""


def _rules(c: ml_collections.ConfigDict) -> list[tuple[str, Any, bool, str]]:
  """(field, value, ok, expectation) for every field of configs/base.py (and model.network).

  `checked_fields` lists the fields named here; tests/test_train.py checks that it covers every
  field of configs/base.py, so a new field needs a rule here. Names come from the registries.
  """
  return _data_rules(c) + _model_rules(c) + _run_rules(c)


def _data_rules(c: ml_collections.ConfigDict) -> list[tuple[str, Any, bool, str]]:
  """Rules for the task, the data and the latent model's VAE."""
  known = data.DATASETS.names()
  return [
      ("task", c.task, c.task in tasks.TASKS, f"one of {tasks.TASKS.names()}"),
      ("vae.channels", c.vae.channels, _int_at_least(c.vae.channels, 1), "an integer > 0"),
      ("vae.latent_channels", c.vae.latent_channels, _int_at_least(c.vae.latent_channels, 1),
       "an integer > 0"),
      ("vae.num_down", c.vae.num_down, _int_at_least(c.vae.num_down, 0), "an integer >= 0"),
      ("vae.num_blocks", c.vae.num_blocks, _int_at_least(c.vae.num_blocks, 0),
       "an integer >= 0"),
      ("latent.vae_workdir", c.latent.vae_workdir,
       isinstance(c.latent.vae_workdir, str)
       and (c.task != "latent_vdm" or bool(c.latent.vae_workdir)),
       "the run directory of a trained VAE (task 'latent_vdm')"),
      ("latent.vae_checkpoint", c.latent.vae_checkpoint,
       _int_at_least(c.latent.vae_checkpoint, 0), "an integer >= 0 (0 = the newest)"),
      ("data.name", c.data.name, c.data.name in known, f"one of {known}"),
      ("data.data_dir", c.data.data_dir, isinstance(c.data.data_dir, str),
       "a directory path ('' = the TFDS default)"),
      ("data.flip", c.data.flip, _is_bool(c.data.flip), "True or False"),
      ("data.rot90", c.data.rot90, _is_bool(c.data.rot90), "True or False"),
  ]


def _model_rules(c: ml_collections.ConfigDict) -> list[tuple[str, Any, bool, str]]:
  """Rules for the model: network, schedule, objective."""
  schedule_names = model_lib.SCHEDULES.names()
  fixed = tuple(n for n in schedule_names if not model_lib.get_schedule(n).learned)
  network = c.model.get("network", networks.DEFAULT_NETWORK)
  groups, width = c.model.norm_groups, c.model.channels
  groups_ok = _is_int(groups) and groups >= 0 and (
      groups == 0 or (_is_int(width) and width > 0 and width % groups == 0))
  exponents = c.model.fourier_exponents
  so = c.model.schedule_objective
  interior = tuple(n for n in schedule_names if model_lib.get_schedule(n).learned_interior)
  gamma_ok = _is_number(c.model.gamma_min) and _is_number(c.model.gamma_max)
  return [
      ("model.schedule", c.model.schedule, c.model.schedule in model_lib.SCHEDULES,
       f"one of {schedule_names}"),
      ("model.network", network, network in networks.NETWORKS,
       f"one of {networks.NETWORKS.names()}"),
      ("model.gamma_min", c.model.gamma_min, gamma_ok and c.model.gamma_min < c.model.gamma_max,
       f"a finite number < model.gamma_max={c.model.gamma_max}"),
      ("model.gamma_max", c.model.gamma_max, _is_number(c.model.gamma_max), "a finite number"),
      ("model.schedule_hidden", c.model.schedule_hidden, _int_at_least(c.model.schedule_hidden, 1),
       "an integer > 0"),
      ("model.channels", c.model.channels, _int_at_least(c.model.channels, 1), "an integer > 0"),
      ("model.fourier_exponents", exponents,
       isinstance(exponents, (tuple, list)) and all(_is_int(n) for n in exponents),
       "a tuple of integers n (features sin/cos(2^n 2 pi z); () = none)"),
      ("model.attention_everywhere", c.model.attention_everywhere,
       _is_bool(c.model.attention_everywhere), "True or False"),
      ("model.norm_groups", groups, groups_ok,
       f"an int >= 0 (0 = the project's rule) that divides model.channels={width}"),
      ("model.conditioning_input", c.model.conditioning_input,
       _is_bool(c.model.conditioning_input), "True or False"),
      ("model.num_blocks", c.model.num_blocks, _int_at_least(c.model.num_blocks, 1),
       "an integer > 0"),
      ("model.dropout", c.model.dropout, _number_in(c.model.dropout, 0, 1), "in [0, 1)"),
      ("model.block_impl", c.model.block_impl, c.model.block_impl in BLOCK_IMPLS,
       f"one of {BLOCK_IMPLS}"),
      ("model.remat", c.model.remat, _is_bool(c.model.remat), "True or False"),
      ("model.dtype", c.model.dtype, c.model.dtype in DTYPES, f"one of {DTYPES}"),
      ("model.num_steps", c.model.num_steps, _int_at_least(c.model.num_steps, 0),
       "an integer >= 0 (0 = continuous)"),
      ("model.objective", c.model.objective, c.model.objective in objectives.OBJECTIVES,
       f"one of {objectives.OBJECTIVES}"),
      ("model.weighting", c.model.weighting, c.model.weighting in objectives.WEIGHTINGS,
       f"one of {objectives.WEIGHTINGS}"),
      ("model.weighting_bias", c.model.weighting_bias, _is_number(c.model.weighting_bias),
       "a finite number"),
      ("model.schedule", c.model.schedule,
       c.model.objective == "elbo" or c.model.schedule in fixed,
       f"a fixed schedule {fixed} with objective {c.model.objective!r} "
       "(only the ELBO gives a learned schedule a meaningful gradient)"),
      ("model.num_steps", c.model.num_steps,
       c.model.objective != "simple" or c.model.num_steps >= 1,
       ">= 1 with objective 'simple' (t ~ Uniform{1..T})"),
      ("model.schedule_objective", so, so in objectives.SCHEDULE_OBJECTIVES,
       f"one of {objectives.SCHEDULE_OBJECTIVES}"),
      ("model.schedule_objective", so, so != "variance" or (
          c.task == "vdm" and c.model.objective == "elbo" and c.model.num_steps == 0
          and c.model.schedule in interior), "'elbo' unless task 'vdm', model.objective 'elbo', "
       f"model.num_steps 0 and model.schedule one of {interior} (only the interior of a "
       "continuous-time bound is free to minimise the variance)"),
      ("model.conditional", c.model.conditional, _is_bool(c.model.conditional), "True or False"),
      ("model.p_uncond", c.model.p_uncond, _number_in(c.model.p_uncond, 0, 1), "in [0, 1)"),
  ]


def _run_rules(c: ml_collections.ConfigDict) -> list[tuple[str, Any, bool, str]]:
  """Rules for how it is trained, evaluated and sampled: seed, optim, training, eval, sample,
  distributed, xla."""
  o, t, e, s, d = c.optim, c.training, c.eval, c.sample, c.distributed
  processes_ok = _int_at_least(d.num_processes, 1)
  return [
      ("seed", c.seed, _is_int(c.seed) and 0 <= c.seed < MAX_SEED,
       f"an integer in [0, {MAX_SEED})"),
      ("sample.sampler", s.sampler, s.sampler in sampling.SAMPLERS,
       f"one of {sampling.SAMPLERS.names()}"),
      ("sample.ddpm_variance", s.ddpm_variance, s.ddpm_variance in sampling.DDPM_VARIANCES,
       f"one of {sampling.DDPM_VARIANCES}"),
      ("optim.learning_rate", o.learning_rate, _number_in(o.learning_rate, 0, low_open=True),
       "a finite number > 0"),
      ("optim.warmup_steps", o.warmup_steps, _int_at_least(o.warmup_steps, 0), "an integer >= 0"),
      ("optim.lr_decay", o.lr_decay, o.lr_decay in optim.LR_DECAYS
       and (o.lr_decay != "cosine" or not _int_at_least(t.num_steps, 1)
            or not _int_at_least(o.warmup_steps, 0) or t.num_steps > o.warmup_steps),
       f"one of {optim.LR_DECAYS} (cosine: with training.num_steps > optim.warmup_steps)"),
      ("optim.b1", o.b1, _number_in(o.b1, 0, 1), "in [0, 1)"),
      ("optim.b2", o.b2, _number_in(o.b2, 0, 1), "in [0, 1)"),
      ("optim.eps", o.eps, _number_in(o.eps, 0, low_open=True), "a finite number > 0"),
      ("optim.weight_decay", o.weight_decay, _number_in(o.weight_decay, 0), "a finite number >= 0"),
      ("optim.grad_clip_norm", o.grad_clip_norm, _number_in(o.grad_clip_norm, 0),
       "a finite number >= 0 (0 = no clipping)"),
      ("optim.weight_decay_rule", o.weight_decay_rule,
       o.weight_decay_rule in optim.WEIGHT_DECAY_RULES, f"one of {optim.WEIGHT_DECAY_RULES}"),
      ("optim.ema_decay", o.ema_decay, _number_in(o.ema_decay, 0, 1), "in [0, 1)"),
      ("optim.ema_warmup", o.ema_warmup, _is_bool(o.ema_warmup), "True or False"),
      ("optim.schedule_lr_multiplier", o.schedule_lr_multiplier,
       _number_in(o.schedule_lr_multiplier, 0, low_open=True), "a finite number > 0"),
      ("training.batch_size", t.batch_size, _int_at_least(t.batch_size, 1), "an integer > 0"),
      ("training.num_steps", t.num_steps, _int_at_least(t.num_steps, 1), "an integer > 0"),
      ("training.log_every", t.log_every, _int_at_least(t.log_every, 1), "an integer > 0"),
      ("training.eval_every", t.eval_every, _int_at_least(t.eval_every, 1), "an integer > 0"),
      ("training.sample_every", t.sample_every, _int_at_least(t.sample_every, 1),
       "an integer > 0"),
      ("training.checkpoint_every", t.checkpoint_every, _int_at_least(t.checkpoint_every, 1),
       "an integer > 0"),
      ("training.keep_checkpoints", t.keep_checkpoints, _int_at_least(t.keep_checkpoints, 1),
       "an integer > 0"),
      ("training.max_nonfinite_steps", t.max_nonfinite_steps,
       _int_at_least(t.max_nonfinite_steps, 0), "an integer >= 0 (0 = stop at the first)"),
      ("training.allow_config_change", t.allow_config_change, _is_bool(t.allow_config_change),
       "True or False"),
      ("training.lock_expiry_secs", t.lock_expiry_secs,
       _number_in(t.lock_expiry_secs, 0, low_open=True), "a finite number of seconds > 0"),
      ("eval.batch_size", e.batch_size, _int_at_least(e.batch_size, 1), "an integer > 0"),
      ("eval.max_examples", e.max_examples, _int_at_least(e.max_examples, 0),
       "an integer >= 0 (0 = the whole split)"),
      ("eval.t_samples", e.t_samples, _int_at_least(e.t_samples, 1), "an integer > 0"),
      ("eval.num_steps", e.num_steps, _int_at_least(e.num_steps, -1),
       "an integer >= -1 (0 = continuous time, -1 = the model's own model.num_steps)"),
      ("sample.num_steps", s.num_steps, _int_at_least(s.num_steps, 1), "an integer > 0"),
      ("sample.num_images", s.num_images, _int_at_least(s.num_images, 1), "an integer > 0"),
      ("distributed.initialize", d.initialize, d.initialize in parallel.DISTRIBUTED_MODES,
       " | ".join(repr(m) for m in parallel.DISTRIBUTED_MODES)
       + " ('auto': JAX finds the cluster; 'explicit': the fields below)"),
      ("distributed.coordinator_address", d.coordinator_address,
       isinstance(d.coordinator_address, str), "'host:port' ('' = the cluster's own discovery)"),
      ("distributed.num_processes", d.num_processes, processes_ok, "an integer >= 1"),
      ("distributed.process_id", d.process_id,
       _is_int(d.process_id) and (not processes_ok or 0 <= d.process_id < d.num_processes),
       f"an integer in [0, distributed.num_processes={d.num_processes})"),
      ("xla.cpu_ynn_fusion_type", c.xla.cpu_ynn_fusion_type,
       parallel.is_cpu_ynn_fusion_type(c.xla.cpu_ynn_fusion_type), parallel.FUSION_LIST_EXPECTED),
  ]


def checked_fields(config: ml_collections.ConfigDict) -> set[str]:
  """The config fields that `check_config` has a rule for (dotted names)."""
  return {name for name, _, _, _ in _rules(config)}


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


def flat_config(config: ml_collections.ConfigDict | dict[str, Any]) -> dict[str, Any]:
  """Every field of a config (or of a stored config's dict) by dotted name."""
  d = config if isinstance(config, dict) else json.loads(config.to_json())
  return _flatten(d)
