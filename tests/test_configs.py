"""The paper configs against the official google-research/vdm configs, field by field, and the
config checks of the fields that select the official behaviour.

`OFFICIAL` holds the values of the official configs (configs/cifar10.py, cifar10_aug_paper.py,
imagenet32.py and imagenet64.py of google-research/vdm, commit dc27b98): every field of their
config.model, config.training and config.optimizer, plus the data set and its augmentation.
`FIELD_MAP` says which field of this project's config each one corresponds to (and how a value
translates); `NO_COUNTERPART` lists the official fields with no field here, and why.
"""

import pathlib
import runpy
from typing import Any

import pytest

from vdm_jax.training import config_checks, optim
from vdm_jax.nets import model as model_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]

_COMMON_TRAINING = dict(
    seed=1, num_steps_lr_warmup=100, num_steps_eval=100, steps_per_logging=1000,
    steps_per_eval=10_000, steps_per_save=10_000, profile=False)
_COMMON_OPTIMIZER = dict(
    name="adamw", args=dict(b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01), lr_decay=False,
    ema_rate=0.9999)
_COMMON_MODEL = dict(
    vocab_size=256, sample_softmax=False, antithetic_time_sampling=True,
    with_fourier_features=True, gamma_min=-13.3, gamma_max=5.0, sm_n_timesteps=0)

# Official values; the data entry is the data set plus the augmentation its pipeline applies
# (the official "cifar10_aug" data: random flips and random 90-degree rotations, with the flag
# "augmented" fed to the network's conditioning input; no channel permutations).
OFFICIAL: dict[str, dict[str, dict[str, Any]]] = {
    "cifar10": {  # configs/cifar10.py
        "data": dict(dataset="cifar10", ignore_cache=False, flip=False, rot90=False),
        "model": dict(_COMMON_MODEL, with_attention=False, gamma_type="learnable_scalar",
                      sm_n_embd=128, sm_n_layer=32, sm_pdrop=0.1),
        "training": dict(_COMMON_TRAINING, substeps=1000, num_steps_train=10_000_000,
                         batch_size_train=128, batch_size_eval=128),
        "optimizer": dict(_COMMON_OPTIMIZER, learning_rate=2e-4),
    },
    "cifar10_aug": {  # configs/cifar10_aug_paper.py
        "data": dict(dataset="cifar10_aug", ignore_cache=False, flip=True, rot90=True),
        "model": dict(_COMMON_MODEL, with_attention=True, gamma_type="learnable_nnet",
                      sm_n_embd=256, sm_n_layer=32, sm_pdrop=0.05),
        "training": dict(_COMMON_TRAINING, substeps=10, num_steps_train=100_000_000,
                         batch_size_train=1024, batch_size_eval=1024),
        "optimizer": dict(_COMMON_OPTIMIZER, learning_rate=2e-4),
    },
    "imagenet32": {  # configs/imagenet32.py (evaluated on the "validation" split)
        "data": dict(dataset="imagenet32", ignore_cache=False, flip=False, rot90=False),
        "model": dict(_COMMON_MODEL, with_attention=False, gamma_type="learnable_scalar",
                      sm_n_embd=256, sm_n_layer=32, sm_pdrop=0.1),
        "training": dict(_COMMON_TRAINING, substeps=1000, num_steps_train=10_000_000,
                         batch_size_train=128, batch_size_eval=128),
        "optimizer": dict(_COMMON_OPTIMIZER, learning_rate=2e-4),
    },
    "imagenet64": {  # configs/imagenet64.py
        "data": dict(dataset="imagenet64", ignore_cache=False, flip=False, rot90=False),
        "model": dict(_COMMON_MODEL, with_attention=False, gamma_type="learnable_scalar",
                      sm_n_embd=256, sm_n_layer=64, sm_pdrop=0.1),
        "training": dict(_COMMON_TRAINING, substeps=1000, num_steps_train=10_000_000,
                         batch_size_train=128, batch_size_eval=128),
        "optimizer": dict(_COMMON_OPTIMIZER, learning_rate=2e-4),
    },
}

_SCHEDULE_NAMES = {"learnable_scalar": "learned_linear", "learnable_nnet": "learned_nnet",
                   "fixed": "fixed_linear"}
_DATA_NAMES = {"cifar10": "cifar10", "cifar10_aug": "cifar10",
               "imagenet32": "downsampled_imagenet/32x32",
               "imagenet64": "downsampled_imagenet/64x64"}

# official "section.field" -> (this project's field, official value -> the value expected here).
_same = lambda v: v
FIELD_MAP: dict[str, tuple[str, Any]] = {
    "data.dataset": ("data.name", _DATA_NAMES.__getitem__),
    "data.flip": ("data.flip", _same),
    "data.rot90": ("data.rot90", _same),
    "model.with_fourier_features": ("model.fourier_exponents", lambda on: (6, 7) if on else ()),
    "model.with_attention": ("model.attention_everywhere", _same),
    "model.gamma_type": ("model.schedule", _SCHEDULE_NAMES.__getitem__),
    "model.gamma_min": ("model.gamma_min", _same),
    "model.gamma_max": ("model.gamma_max", _same),
    "model.sm_n_timesteps": ("model.num_steps", _same),
    "model.sm_n_embd": ("model.channels", _same),
    "model.sm_n_layer": ("model.num_blocks", _same),
    "model.sm_pdrop": ("model.dropout", _same),
    "training.seed": ("seed", _same),
    "training.num_steps_lr_warmup": ("optim.warmup_steps", _same),
    "training.num_steps_train": ("training.num_steps", _same),
    "training.batch_size_train": ("training.batch_size", _same),
    "training.batch_size_eval": ("eval.batch_size", _same),
    "training.steps_per_logging": ("training.log_every", _same),
    "training.steps_per_eval": ("training.eval_every", _same),
    "training.steps_per_save": ("training.checkpoint_every", _same),
    "optimizer.args.b1": ("optim.b1", _same),
    "optimizer.args.b2": ("optim.b2", _same),
    "optimizer.args.eps": ("optim.eps", _same),
    "optimizer.args.weight_decay": ("optim.weight_decay", _same),
    "optimizer.learning_rate": ("optim.learning_rate", _same),
    "optimizer.ema_rate": ("optim.ema_decay", _same),
}

NO_COUNTERPART = {
    "data.ignore_cache": "a caching switch of the official pipeline",
    "model.vocab_size": "read from the data set (K = 256 for these 8-bit data sets)",
    "model.sample_softmax": "a sampling switch (False: the decoder's mode), not training",
    "model.antithetic_time_sampling": "always on here (elbo's low-discrepancy time sampling)",
    "training.substeps": "optimiser steps per host call: speed only",
    "training.num_steps_eval": "evaluation here: eval.max_examples (0 = the whole split)",
    "training.profile": "a profiler switch",
    "optimizer.name": "always AdamW here",
    "optimizer.lr_decay": "always False here: linear warm-up, then constant",
}

# Implied by the official code rather than its config files: what `make_optimizer`, the EMA and
# the network must be told to behave as the official code does.
OFFICIAL_IMPLIED = {
    "model.norm_groups": 32,                   # Flax's default GroupNorm() at every width
    "model.conditioning_input": True,          # the scalar concatenated before dense0
    "model.schedule_hidden": 1024,             # NoiseSchedule_NNet n_features
    "optim.weight_decay_rule": "official",     # AdamW mask: every leaf not named "bias"
    "optim.ema_warmup": False,                 # constant EMA rate from the initial weights
    "optim.schedule_lr_multiplier": 1.0,       # one learning rate for every parameter
    "optim.grad_clip_norm": 0.0,               # no gradient_clip_norm in the official configs
}

PAPER_CONFIGS = tuple(OFFICIAL)


def _load(name: str):
  return runpy.run_path(str(ROOT / "configs" / f"{name}.py"))["get_config"]()


def _get(config, dotted: str) -> Any:
  for part in dotted.split("."):
    config = config[part]
  return tuple(config) if isinstance(config, (list, tuple)) else config


def _flat(section: dict[str, Any], prefix: str) -> dict[str, Any]:
  out = {}
  for k, v in section.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _official_flat(name: str) -> dict[str, Any]:
  out = {}
  for section, values in OFFICIAL[name].items():
    out.update(_flat(values, f"{section}."))
  return out


def _expected(name: str) -> dict[str, Any]:
  """This project's field -> the value the official config implies."""
  expected = dict(OFFICIAL_IMPLIED)
  for key, value in _official_flat(name).items():
    if key in FIELD_MAP:
      field, convert = FIELD_MAP[key]
      expected[field] = convert(value)
  return expected


def _differences(config, name: str) -> list[str]:
  return [f"{field}: {_get(config, field)!r} != official {value!r}"
          for field, value in _expected(name).items()
          if _get(config, field) != value or type(_get(config, field)) is not type(value)]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_every_official_field_is_mapped_or_explained(name):
  keys = set(_official_flat(name))
  assert keys == set(FIELD_MAP) | set(NO_COUNTERPART)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_equals_the_official_config(name):
  assert _differences(_load(name), name) == []


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_changing_any_compared_field_is_detected(name):
  """The comparison is not vacuous: each compared field, changed alone, is reported."""
  for field in _expected(name):
    config = _load(name)
    *path, leaf = field.split(".")
    section = config
    for part in path:
      section = section[part]
    old = section[leaf]
    with config.ignore_type():
      if isinstance(old, bool):
        section[leaf] = not old
      elif isinstance(old, (int, float)):
        section[leaf] = old * 2 + 1
      elif isinstance(old, str):
        section[leaf] = old + "_x"
      else:
        section[leaf] = tuple(old) + (9,)
    assert [d for d in _differences(config, name) if d.startswith(field + ":")], field


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_passes_the_checks(name):
  config = _load(name)
  config_checks.check_config(config)
  assert config.model.schedule in model_lib.SCHEDULES


def test_official_values_of_the_new_fields():
  for name in PAPER_CONFIGS:
    c = _load(name)
    assert (c.model.norm_groups, c.model.conditioning_input, c.optim.weight_decay_rule,
            c.optim.ema_warmup, tuple(c.model.fourier_exponents)) == (
                32, True, "official", False, (6, 7)), name
  aug = _load("cifar10_aug")
  assert (aug.data.flip, aug.data.rot90, aug.model.schedule) == (True, True, "learned_nnet")
  assert _load("imagenet64").model.remat   # a memory choice; the same function


def test_base_defaults_of_the_new_fields():
  base = _load("base")
  assert (base.model.norm_groups, base.model.conditioning_input, base.optim.weight_decay_rule,
          base.optim.ema_warmup, base.data.rot90) == (0, False, "kernels", True, False)
  assert base.optim.weight_decay_rule in optim.WEIGHT_DECAY_RULES


def test_derived_cifar10_configs_keep_the_project_optimiser():
  """The VAE and latent stages are not official models: the project's mask and EMA warm-up."""
  for name in ("cifar10_vae", "cifar10_latent"):
    c = _load(name)
    assert (c.optim.weight_decay_rule, c.optim.ema_warmup) == ("kernels", True), name
  latent = _load("cifar10_latent")
  latent.latent.vae_workdir = "runs/vae"
  config_checks.check_config(latent)


# ---- config checks of the new fields (one ConfigError naming the field and its value) ----

@pytest.mark.parametrize("field, value, match", [
    ("model.norm_groups", -1, r"model.norm_groups=-1: expected an int >= 0"),
    ("model.norm_groups", 3, r"model.norm_groups=3: .*divides model.channels=8"),
    ("model.norm_groups", 16, r"model.norm_groups=16: .*divides model.channels=8"),
    ("model.norm_groups", 2.0, r"model.norm_groups=2.0: expected an int"),
    ("model.conditioning_input", 1, r"model.conditioning_input=1: expected True or False"),
    ("optim.weight_decay_rule", "all", r"optim.weight_decay_rule='all': expected one of "
     r"\('kernels', 'official'\)"),
    ("optim.ema_warmup", "yes", r"optim.ema_warmup='yes': expected True or False"),
    ("data.rot90", 1, r"data.rot90=1: expected True or False"),
    ("model.schedule", "learnable_nnet", r"model.schedule='learnable_nnet': expected one of"),
])
def test_config_check_rejects_bad_new_fields(field, value, match):
  config = _load("smoke")      # model.channels = 8
  section, leaf = field.split(".")
  with config.ignore_type():
    config[section][leaf] = value
  with pytest.raises(config_checks.ConfigError, match=match):
    config_checks.check_config(config)


@pytest.mark.parametrize("field, value", [
    ("model.norm_groups", 0), ("model.norm_groups", 1), ("model.norm_groups", 4),
    ("model.norm_groups", 8), ("model.conditioning_input", True),
    ("optim.weight_decay_rule", "official"), ("optim.ema_warmup", False),
    ("data.rot90", True), ("model.schedule", "learned_nnet"),
])
def test_config_check_accepts_good_new_fields(field, value):
  config = _load("smoke")
  section, leaf = field.split(".")
  config[section][leaf] = value
  config_checks.check_config(config)


@pytest.mark.parametrize("name,expected", [
    ("cifar10", {"rot90": False, "augment_flag": True}),
    ("cifar10_aug", {"rot90": True, "augment_flag": True}),
    ("digits", {"rot90": False, "augment_flag": False})])
def test_trainer_feeds_the_augmentation_flag_to_the_conditioning_input(name, expected):
  """The trainer's pipeline options: cifar10_aug rotates and passes the "augmented" flag, which
  the network's conditioning input reads (batch["conditioning"], tasks.VDMTask.loss)."""
  from vdm_jax.training import train
  config = runpy.run_path(str(ROOT / "configs" / f"{name}.py"))["get_config"]()
  assert train.augmentation(config) == expected
