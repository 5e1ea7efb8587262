"""Optimiser for VDM training: AdamW with warm-up, a weight-decay mask, and an EMA of the weights.

The recipe follows the VDM paper (Kingma et al., 2021, App. B) and its official code: AdamW with
b1 = 0.9, b2 = 0.99, weight decay 0.01, a linear learning-rate warm-up, and an exponential moving
average of the parameters for evaluation. Two weight-decay masks (`WEIGHT_DECAY_RULES`):

- "kernels" (this project's default): only leaves with ndim >= 2 outside the noise schedule;
- "official" (the official code's mask): every leaf whose name is not "bias", so GroupNorm
  scales and the noise-schedule parameters are decayed too.

The EMA is `ema + (1 - decay) * (new - ema)` (the official form); `ema_decay` gives the decay,
optionally with a warm-up (the official code uses a constant rate from the initial weights).
Two additions:

- an optional global-norm gradient clip before Adam;
- a learning-rate multiplier for the noise-schedule parameters (the top-level key
  `schedule_key`, the model's `model.SCHEDULE_KEY`): with one shared learning rate the learned
  endpoints gamma_min / gamma_max move slowly (about 0.3 per minute from gamma_min = -13.3 on
  small runs), and a 10x multiplier lets them settle quickly.

Parameter layout: every function here takes the *inner* Flax parameter dict, i.e.
`variables["params"]`, whose top-level keys are the sub-modules, e.g.
`{"schedule": {...}, "score_net": {...}}`. A tree wrapped once more as `{"params": {...}}` is
accepted too (the single "params" level is skipped when looking for the schedule key). The key
of the schedule is always passed in (`schedule_key`): this module does not know the model.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vdm_jax.core.checks import check_choice

PyTree = Any

# "kernels": ndim >= 2 outside the schedule; "official": every leaf not named "bias".
WEIGHT_DECAY_RULES = ("kernels", "official")

__all__ = [
    "LR_DECAYS",
    "WEIGHT_DECAY_RULES",
    "schedule_mask",
    "ema_decay",
    "ema_update",
    "learning_rate_schedule",
    "make_optimizer",
    "weight_decay_mask",
]


LR_DECAYS = ("constant", "cosine")


def learning_rate_schedule(*, learning_rate: float, warmup_steps: int, decay: str = "constant",
                           total_steps: int = 0) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate` over `warmup_steps` steps, then constant or a
  cosine decay to 0 at `total_steps`.

  constant: lr(step) = learning_rate * min(step / warmup_steps, 1); with `warmup_steps = 0` the
  rate is constant from step 0.
  cosine: the same warm-up, then for warmup_steps <= step <= total_steps
  lr(step) = learning_rate * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps))) /
  2, and 0 after `total_steps` (short runs end on a small rate, where the parameters settle).

  Args:
    learning_rate: peak learning rate, > 0.
    warmup_steps: number of warm-up steps, >= 0.
    decay: "constant" or "cosine".
    total_steps: the step where the cosine reaches 0 (> warmup_steps); unused for "constant".

  Returns:
    An optax schedule: step (int scalar) -> learning rate (float scalar).
  """
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate}.")
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
  check_choice("learning-rate decay", decay, LR_DECAYS)
  if decay == "cosine":
    if not total_steps > warmup_steps:
      raise ValueError(f"a cosine decay needs total_steps > warmup_steps, got total_steps "
                       f"{total_steps} and warmup_steps {warmup_steps}.")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
        decay_steps=total_steps, end_value=0.0)
  if warmup_steps == 0:
    return optax.constant_schedule(learning_rate)
  # linear_schedule clamps at end_value once transition_steps have passed.
  return optax.linear_schedule(
      init_value=0.0, end_value=learning_rate, transition_steps=warmup_steps)


def _key_name(entry: Any) -> Any:
  """The name of one path entry (dict key, attribute name or sequence index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def _ndim(leaf: Any) -> int:
  """Rank of an array-like leaf (arrays, ShapeDtypeStructs, Python scalars)."""
  return len(leaf.shape) if hasattr(leaf, "shape") else jnp.ndim(leaf)


def _is_wrapped(params: PyTree) -> bool:
  return isinstance(params, Mapping) and list(params.keys()) == ["params"]


def schedule_mask(params: PyTree, *, schedule_key: str) -> PyTree:
  """True for every leaf under the top-level key `schedule_key`, False elsewhere.

  Args:
    params: the inner Flax parameter dict (see the module docstring).
    schedule_key: top-level key of the noise-schedule parameters.

  Returns:
    A pytree of Python bools with the structure of `params`.
  """
  wrapped = _is_wrapped(params)

  def label(path, leaf):
    del leaf
    names = [_key_name(entry) for entry in path]
    if wrapped:
      names = names[1:]
    return bool(names) and names[0] == schedule_key

  return jax.tree_util.tree_map_with_path(label, params)


def weight_decay_mask(params: PyTree, *, schedule_key: str, rule: str = "kernels") -> PyTree:
  """Which leaves get weight decay, by one of two rules.

  - rule "kernels": a leaf is decayed iff it has ndim >= 2 (dense / conv kernels, embeddings)
    and it is not under the top-level key `schedule_key` (the noise-schedule parameters, e.g.
    gamma_min / gamma_max or the monotone network of a learned schedule). Biases and LayerNorm /
    GroupNorm scales (ndim <= 1) are never decayed.
  - rule "official": the official VDM code's mask. A leaf is decayed iff its own name (the last
    key of its path) is not "bias": GroupNorm scales, scalar schedule endpoints and the kernels
    of a schedule network are decayed; `schedule_key` plays no part. (The official mask also
    spares leaves named ("layer_norm" | "final_layer_norm", "scale"), which the VDM networks do
    not have.)

  Args:
    params: the inner Flax parameter dict, e.g. `{"schedule": {...}, "score_net": {...}}`
      (a tree wrapped as `{"params": {...}}` is accepted too).
    schedule_key: top-level key of the noise-schedule parameters (rule "kernels" only).
    rule: "kernels" or "official" (`WEIGHT_DECAY_RULES`).

  Returns:
    A pytree of Python bools with the structure of `params`, as `optax.adamw(mask=...)` expects.

  Raises:
    ValueError: `rule` is not one of `WEIGHT_DECAY_RULES`.
  """
  check_choice("weight-decay rule", rule, WEIGHT_DECAY_RULES)
  if rule == "official":
    def label(path, leaf):
      del leaf
      return not (path and _key_name(path[-1]) == "bias")

    return jax.tree_util.tree_map_with_path(label, params)
  in_schedule = schedule_mask(params, schedule_key=schedule_key)
  return jax.tree.map(
      lambda leaf, sched: _ndim(leaf) >= 2 and not sched, params, in_schedule)


def _check_hyperparameters(
    *, b1: float, b2: float, eps: float, weight_decay: float,
    grad_clip_norm: float | None, schedule_lr_multiplier: float) -> None:
  if not 0.0 <= b1 < 1.0:
    raise ValueError(f"b1 must be in [0, 1), got {b1}.")
  if not 0.0 < b2 < 1.0:
    raise ValueError(f"b2 must be in (0, 1), got {b2}.")
  if not eps >= 0.0:
    raise ValueError(f"eps must be >= 0, got {eps}.")
  if not weight_decay >= 0.0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
  if grad_clip_norm is not None and not grad_clip_norm > 0.0:
    raise ValueError(f"grad_clip_norm must be > 0 or None, got {grad_clip_norm}.")
  if not schedule_lr_multiplier > 0.0:
    raise ValueError(f"schedule_lr_multiplier must be > 0, got {schedule_lr_multiplier}.")


def make_optimizer(
    *,
    learning_rate: float | optax.Schedule,
    schedule_key: str,
    warmup_steps: int = 100,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    grad_clip_norm: float | None = None,
    schedule_lr_multiplier: float = 1.0,
    weight_decay_rule: str = "kernels",
) -> optax.GradientTransformation:
  """AdamW with linear warm-up, masked weight decay, optional clipping and a schedule LR factor.

  The chain is: clip_by_global_norm(grad_clip_norm) (if given) -> AdamW (decoupled weight decay,
  Loshchilov & Hutter, 2019, applied where `weight_decay_mask(..., rule=weight_decay_rule)` is
  True) -> scale the updates of the leaves under `schedule_key` by `schedule_lr_multiplier`
  (equivalent to a learning rate of `schedule_lr_multiplier * lr` for those leaves; under the
  "official" rule their decay term is scaled with them).

  With `warmup_steps` = 100, b1 0.9, b2 0.99, eps 1e-8, weight_decay 0.01, no clipping,
  multiplier 1 and rule "official" this is the official VDM optimiser.

  Args:
    learning_rate: peak learning rate after warm-up (VDM CIFAR-10: 2e-4), or a schedule
      step -> rate (e.g. from `learning_rate_schedule`), which is then applied as it is.
    schedule_key: top-level parameter key of the noise schedule (`model.SCHEDULE_KEY`).
    warmup_steps: linear warm-up length in steps (a float `learning_rate` only).
    b1: Adam first-moment decay.
    b2: Adam second-moment decay (VDM: 0.99).
    eps: Adam epsilon.
    weight_decay: decoupled weight-decay coefficient (VDM: 0.01).
    grad_clip_norm: clip the gradients to this global norm first; None for no clipping.
    schedule_lr_multiplier: factor on the updates of the noise-schedule parameters.
    weight_decay_rule: which leaves are decayed: "kernels" or "official" (see
      `weight_decay_mask`).

  Returns:
    An optax GradientTransformation whose init/update take the inner Flax parameter dict.

  Raises:
    ValueError: a hyperparameter is out of range or `weight_decay_rule` is unknown.
  """
  check_choice("weight-decay rule", weight_decay_rule, WEIGHT_DECAY_RULES)
  _check_hyperparameters(
      b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, grad_clip_norm=grad_clip_norm,
      schedule_lr_multiplier=schedule_lr_multiplier)
  schedule = (learning_rate if callable(learning_rate) else
              learning_rate_schedule(learning_rate=learning_rate, warmup_steps=warmup_steps))
  parts = []
  if grad_clip_norm is not None:
    parts.append(optax.clip_by_global_norm(grad_clip_norm))
  parts.append(optax.adamw(
      learning_rate=schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
      mask=lambda p: weight_decay_mask(p, schedule_key=schedule_key, rule=weight_decay_rule)))
  if schedule_lr_multiplier != 1.0:
    parts.append(optax.masked(
        optax.scale(schedule_lr_multiplier),
        lambda p: schedule_mask(p, schedule_key=schedule_key)))
  return optax.chain(*parts)


def ema_decay(step: jax.typing.ArrayLike, *, decay: float, warmup: bool = True) -> jax.Array:
  """EMA decay rate at `step`, with the usual warm-up min(decay, (1 + step) / (10 + step)).

  The warm-up keeps the average from being dominated by the random initialisation early on
  (0.1 at step 0, 0.5 at step 8, -> decay later). The official VDM code has no warm-up: its
  average starts from the initial weights with the constant rate (`warmup=False`).

  Args:
    step: optimiser step (int scalar, may be traced).
    decay: target decay in [0, 1] (VDM: 0.9999).
    warmup: apply the warm-up; if False the result is `decay` for every step.

  Returns:
    A float32 scalar.
  """
  if not 0.0 <= decay <= 1.0:
    raise ValueError(f"decay must be in [0, 1], got {decay}.")
  decay_arr = jnp.asarray(decay, jnp.float32)
  if not warmup:
    return decay_arr
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay_arr, (1.0 + step) / (10.0 + step))


def ema_update(ema_params: PyTree, params: PyTree, *, decay: jax.typing.ArrayLike) -> PyTree:
  """One EMA step: ema <- ema + (1 - decay) * (params - ema), leaf by leaf.

  This is the official VDM form; it equals decay * ema + (1 - decay) * params, and in floating
  point it keeps a leaf that already equals the new value exactly unchanged. Jit-friendly
  (`decay` may be traced, e.g. from `ema_decay`); each result keeps the dtype of the
  corresponding `ema_params` leaf (the arithmetic runs in at least float32).

  Args:
    ema_params: current average, a pytree of arrays.
    params: new parameters, same structure and shapes.
    decay: scalar in [0, 1].

  Returns:
    The updated average, structure of `ema_params`.
  """
  if isinstance(decay, (int, float)) and not 0.0 <= decay <= 1.0:
    raise ValueError(f"decay must be in [0, 1], got {decay}.")
  decay = jnp.asarray(decay, jnp.float32)

  def update(ema, new):
    ema = jnp.asarray(ema)
    compute = jnp.promote_types(ema.dtype, jnp.float32)
    ema_c, new_c = ema.astype(compute), jnp.asarray(new).astype(compute)
    return (ema_c + (1.0 - decay) * (new_c - ema_c)).astype(ema.dtype)

  return jax.tree.map(update, ema_params, params)
