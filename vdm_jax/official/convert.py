"""Official google-research/vdm models in this library: configs, parameters and the network.

The official code (Kingma et al. 2021; github.com/google-research/vdm, `model_vdm.py`) stores a
VDM as one Flax tree {"score_model": ScoreUNet parameters, "gamma": schedule parameters} and
describes it by a `VDMConfig` (vocab_size, gamma_type, gamma_min, gamma_max, sm_n_embd,
sm_n_layer, sm_pdrop, with_attention, with_fourier_features, sm_n_timesteps, ...). This module
maps both onto this library:

  config, params = from_official(official_params, official_config)
  eps = eps_hat(config, params, z, gamma, conditioning)      # the official ScoreUNet's output

`config` is a full config of this library (configs/cifar10.py with the official model fields), so
`vdm-jax train / eval / sample` accept it; `params` is this library's VDM parameter tree
{"schedule": ..., "score_net": ...} for it. The mapping is a renaming (official module names to
this library's) plus, for scanned blocks, a stacking; no value changes except the learned linear
schedule's (w, b) [1] -> (delta, gamma_min) scalars. tests/test_convert.py reproduces the official
code's eps_hat and loss terms from its recorded outputs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from jax.typing import ArrayLike

from vdm_jax.datasets import data
from vdm_jax.nets import model as model_lib
from vdm_jax.training import tasks

PyTree = Any

# official gamma_type -> this library's model.schedule
SCHEDULE_OF_GAMMA_TYPE = {"learnable_scalar": "learned_linear", "learnable_nnet": "learned_nnet",
                          "fixed": "fixed_linear"}
_REQUIRED_FIELDS = ("vocab_size", "gamma_type", "gamma_min", "gamma_max", "sm_n_embd",
                    "sm_n_layer", "sm_pdrop", "with_attention", "with_fourier_features")
_BLOCK_NAMES = {"GroupNorm_0": "norm1", "GroupNorm_1": "norm2", "nin_shortcut": "shortcut"}
_ATTN_NAMES = {"GroupNorm_0": "norm"}
_PAPER_CONFIG = "cifar10"   # where fields not given come from: a config shipped in vdm_jax.configs


def _flat(tree: Mapping) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(_plain(tree))


def _plain(tree: Any) -> Any:
  """Nested Mappings (dicts, FrozenDicts) as plain dicts; leaves untouched."""
  if isinstance(tree, Mapping):
    return {str(k): _plain(v) for k, v in tree.items()}
  return tree


def _unwrap(tree: Mapping) -> Mapping:
  """Drops a single {"params": ...} level (the official `model.init` output)."""
  return tree["params"] if isinstance(tree, Mapping) and list(tree.keys()) == ["params"] else tree


def project_config(official_config: Mapping[str, Any], *,
                   base: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
  """This library's config for an official `VDMConfig` (given as a dict of its fields).

  Starts from `base` (default: configs/cifar10.py, the paper's training and evaluation
  settings with the official optimiser, EMA and network options) and sets the model fields:
  gamma_type -> model.schedule, gamma_min / gamma_max, sm_n_embd -> channels, sm_n_layer ->
  num_blocks, sm_pdrop -> dropout, with_attention -> attention_everywhere,
  with_fourier_features -> fourier_exponents (6, 7) or (), sm_n_timesteps -> num_steps; and the
  official network's options norm_groups = 32, conditioning_input = True. Two official fields
  have no config field here: sample_softmax (this library's samplers decode z_0 by argmax, the
  official False; `sampling.decode(..., mode="sample")` draws instead) and
  antithetic_time_sampling (always antithetic here, as in every official config).

  Raises:
    ValueError: a missing field, an unknown gamma_type, or a vocab_size other than 256 (the
      official decoder hard-codes 8-bit, 3-channel data).
  """
  missing = [f for f in _REQUIRED_FIELDS if f not in official_config]
  if missing:
    raise ValueError(f"official config lacks the VDMConfig field(s) {missing}; got the fields "
                     f"{sorted(official_config)}")
  oc = dict(official_config)
  if oc["gamma_type"] not in SCHEDULE_OF_GAMMA_TYPE:
    raise ValueError(f"official gamma_type {oc['gamma_type']!r} is unknown; expected one of "
                     f"{tuple(SCHEDULE_OF_GAMMA_TYPE)}")
  if int(oc["vocab_size"]) != 256:
    raise ValueError(f"official vocab_size {oc['vocab_size']!r}: the official code models 8-bit "
                     "RGB data only (vocab_size 256)")
  if base is None:
    from vdm_jax import configs  # pylint: disable=import-outside-toplevel
    base = configs.get(_PAPER_CONFIG)
  config = ml_collections.ConfigDict(base.to_dict())
  m = config.model
  m.schedule = SCHEDULE_OF_GAMMA_TYPE[oc["gamma_type"]]
  m.gamma_min, m.gamma_max = float(oc["gamma_min"]), float(oc["gamma_max"])
  m.channels, m.num_blocks = int(oc["sm_n_embd"]), int(oc["sm_n_layer"])
  m.dropout = float(oc["sm_pdrop"])
  m.attention_everywhere = bool(oc["with_attention"])
  m.fourier_exponents = (6, 7) if oc["with_fourier_features"] else ()
  m.num_steps = int(oc.get("sm_n_timesteps", 0))
  m.norm_groups, m.conditioning_input = 32, True
  m.conditional = False
  return config


def build(config: ml_collections.ConfigDict) -> model_lib.VDM:
  """The VDM module of a config from `project_config` (no prepared data set needed)."""
  return tasks.build_vdm(config, data.static_info(config.data.name))


def _project_name(path: tuple[str, ...]) -> tuple[str, ...]:
  """Official ScoreUNet parameter path -> this library's (unrolled layout); ValueError if none."""
  head, rest = path[0], path[1:]
  if head in ("dense0", "dense1"):
    return ("cond", head) + rest
  if head in ("conv_in", "conv_out"):
    return path
  if head == "GroupNorm_0":
    return ("norm_out",) + rest
  fixed = {"mid.block_1": ("mid_block1", _BLOCK_NAMES), "mid.block_2": ("mid_block2", _BLOCK_NAMES),
           "mid.attn_1": ("mid_attn", _ATTN_NAMES)}
  if head in fixed and rest:
    name, names = fixed[head]
    return (name, names.get(rest[0], rest[0])) + rest[1:]
  match = re.fullmatch(r"(down|up)\.(block|attn)_(\d+)", head)
  if match and rest:
    stack, kind, i = match.groups()
    names = _BLOCK_NAMES if kind == "block" else _ATTN_NAMES
    sub = "ResnetBlock_0" if kind == "block" else "AttentionBlock_0"
    return (f"{stack}_{i}", sub, names.get(rest[0], rest[0])) + rest[1:]
  raise ValueError(f"official parameter {'/'.join(path)!r} has no counterpart in this "
                   "library's ScoreUNet")


def _stack_blocks(flat: dict[tuple[str, ...], Any], num_blocks: int) -> dict:
  """Unrolled layout (down_i, up_i) -> the scanned layout (down, up with a leading block axis)."""
  out, groups = {}, {}
  for path, leaf in flat.items():
    match = re.fullmatch(r"(down|up)_(\d+)", path[0])
    if match:
      groups.setdefault((match.group(1),) + path[1:], {})[int(match.group(2))] = leaf
    else:
      out[path] = leaf
  for path, by_index in groups.items():
    n = num_blocks if path[0] == "down" else num_blocks + 1
    out[path] = np.stack([np.asarray(by_index[i]) for i in range(n)])
  return out


def _score_params(official: Mapping, expected: dict[tuple[str, ...], Any], *,
                  scan: bool, num_blocks: int) -> dict[tuple[str, ...], Any]:
  """Official ScoreUNet tree -> this library's flat score_net tree, checked against `expected`."""
  flat, origin = {}, {}
  for path, leaf in _flat(official).items():
    new = _project_name(path)
    flat[new], origin[new] = np.asarray(leaf, np.float32), "/".join(path)
  if scan:
    flat = _stack_blocks(flat, num_blocks)
    origin = {p: "/".join(p) for p in flat}
  for path, leaf in flat.items():
    if path not in expected:
      raise ValueError(f"official parameter {origin.get(path, '/'.join(path))!r} does not fit: "
                       f"this library's ScoreUNet has no {'/'.join(path)!r} for this config "
                       "(compare sm_n_layer / with_attention with the config)")
    if tuple(leaf.shape) != tuple(expected[path].shape):
      raise ValueError(f"official parameter {origin.get(path, '/'.join(path))!r} has shape "
                       f"{tuple(leaf.shape)}; this library's {'/'.join(path)!r} expects "
                       f"{tuple(expected[path].shape)} (compare sm_n_embd / "
                       "with_fourier_features with the config)")
  absent = [p for p in expected if p not in flat]
  if absent:
    raise ValueError(f"official ScoreUNet parameters lack {'/'.join(absent[0])!r} (this "
                     f"library's name) and {len(absent) - 1} more; the tree does not match the "
                     "config (sm_n_layer / with_attention?)")
  return flat


def _schedule_params(official: Optional[Mapping], schedule: str,
                     expected: dict[tuple[str, ...], Any]) -> dict[tuple[str, ...], Any]:
  """Official "gamma" tree -> this library's flat schedule tree (None: the config's init)."""
  if official is None:
    return {}
  flat = {k: np.asarray(v, np.float32) for k, v in _flat(official).items()}
  if schedule == "learned_linear":
    if set(flat) != {("w",), ("b",)}:
      raise ValueError(f"official learnable_scalar schedule expects parameters 'w' and 'b', "
                       f"got {sorted('/'.join(p) for p in flat)}")
    return {("gamma_min",): flat[("b",)].reshape(()), ("delta",): flat[("w",)].reshape(())}
  if schedule == "learned_nnet":
    for path, leaf in flat.items():
      if path not in expected:
        raise ValueError(f"official schedule parameter 'gamma/{'/'.join(path)}' does not fit "
                         "the learnable_nnet schedule (expected l1, l2, l3)")
      if leaf.shape != tuple(expected[path].shape):
        raise ValueError(f"official schedule parameter 'gamma/{'/'.join(path)}' has shape "
                         f"{leaf.shape}; expected {tuple(expected[path].shape)} "
                         "(schedule_hidden?)")
    absent = [p for p in expected if p not in flat]
    if absent:
      raise ValueError(f"official learnable_nnet schedule lacks 'gamma/{'/'.join(absent[0])}'")
    return flat
  if flat:
    raise ValueError(f"official schedule parameters {sorted('/'.join(p) for p in flat)} given "
                     f"for the fixed schedule {schedule!r}, which has none")
  return {}


def _shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  return tuple(data.static_info(config.data.name).shape)


def convert_params(official_params: Mapping, config: ml_collections.ConfigDict, *,
                   seed: int = 0) -> PyTree:
  """An official parameter tree as this library's VDM parameters for `config`.

  Args:
    official_params: {"score_model": ..., "gamma": ...} (optionally wrapped in {"params": ...}),
      or {"score_model": ...} alone, or only the ScoreUNet's parameters (top-level "conv_in",
      "dense0", ...). A missing schedule takes the config's initial values.
    config: from `project_config` (block layout from `tasks.block_impl`: scanned blocks get
      stacked parameters).
    seed: initialises whatever the official tree does not give (only the schedule).

  Returns:
    {"schedule": ..., "score_net": ...} of float32 jax arrays.

  Raises:
    ValueError: naming the first official parameter that does not fit.
  """
  tree = _plain(_unwrap(official_params))
  if "score_model" in tree:
    extra = sorted(set(tree) - {"score_model", "gamma"})
    if extra:
      raise ValueError(f"official parameter tree has unexpected top-level entries {extra}; "
                       "expected 'score_model' and 'gamma'")
    score, gamma = tree["score_model"], tree.get("gamma")
  elif "conv_in" in tree:
    score, gamma = tree, None
  else:
    raise ValueError("not an official VDM parameter tree: expected top-level 'score_model' (and "
                     f"'gamma') or the ScoreUNet's 'conv_in', got {sorted(tree)}")
  module = build(config)
  init = lambda key: module.init({"params": key, "diffusion": key},
                                 jnp.zeros((1,) + _shape(config), jnp.int32),
                                 train=False)["params"]
  key = jax.random.PRNGKey(seed)
  # The network's tree is checked by shape only (nothing initialised); of the initial values
  # only the schedule's are used, so only they are computed.
  expected = _flat(dict(jax.eval_shape(init, key),
                        schedule=jax.jit(lambda k: init(k)["schedule"])(key)))
  exp_score = {p[1:]: v for p, v in expected.items() if p[0] == "score_net"}
  exp_sched = {p[1:]: v for p, v in expected.items() if p[0] == "schedule"}
  scan = tasks.block_impl(config) == "scan"
  out = {("score_net",) + p: v for p, v in _score_params(
      score, exp_score, scan=scan, num_blocks=int(config.model.num_blocks)).items()}
  sched = _schedule_params(gamma, config.model.schedule, exp_sched)
  for path, leaf in exp_sched.items():
    out[("schedule",) + path] = sched.get(path, leaf)
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), traverse_util.unflatten_dict(out))


def from_official(official_params: Mapping, official_config: Mapping[str, Any], *,
                  base: Optional[ml_collections.ConfigDict] = None
                  ) -> tuple[ml_collections.ConfigDict, PyTree]:
  """(config, params) of this library for an official model (`project_config` +
  `convert_params`): `config` is accepted by `vdm-jax train / eval / sample`, `params` is the
  VDM parameter tree for it (EMA parameters convert the same way)."""
  config = project_config(official_config, base=base)
  return config, convert_params(official_params, config)


def eps_hat(config: ml_collections.ConfigDict, params: PyTree, z: ArrayLike, gamma: ArrayLike,
            conditioning: Optional[ArrayLike] = None) -> jax.Array:
  """The network's eps_hat (deterministic, no dropout), as the official `ScoreUNet(z, g_t, ...)`.

  Args:
    config, params: from `from_official` (or any VDM config of this library and its params).
    z: latents [B, H, W, C].
    gamma: log-SNR values gamma_t [B] (the network normalises them with the config's
      gamma_min / gamma_max, as the official code does).
    conditioning: [B] the official scalar conditioning input; None = 0.

  Returns:
    eps_hat [B, H, W, C] float32.
  """
  module = build(config)
  return module.apply({"params": params}, jnp.asarray(z, jnp.float32),
                      jnp.asarray(gamma, jnp.float32), None, conditioning,
                      method=model_lib.VDM.eps)


def gamma(config: ml_collections.ConfigDict, params: PyTree, t: ArrayLike) -> jax.Array:
  """The schedule gamma(t) of a converted model; shape of `t`."""
  return build(config).apply({"params": params}, jnp.asarray(t, jnp.float32),
                             method=model_lib.VDM.gamma)


def nnet_as_monotone(official_gamma: Mapping) -> PyTree:
  """An official `learnable_nnet` schedule {"l1", "l2", "l3"} as this library's
  "learned_monotone" parameters (exact endpoints as parameters): gamma_min = f(0),
  delta = f(1) - f(0), net = the official tree. The same function to float32 rounding."""
  from vdm_jax.maths import schedules
  net = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), _plain(official_gamma))
  f0, f1 = schedules.nnet_gamma(0.0, net), schedules.nnet_gamma(1.0, net)
  return {"gamma_min": f0, "delta": f1 - f0, "net": net}
