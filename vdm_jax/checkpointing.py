"""Checkpoints of the train state, with metadata, NaN refusal and fallback past damaged steps.

This is the only module of vdm_jax that imports orbax. A checkpoint of step s lives in
`directory/s/` with two items:

- `state`: any pytree of jax / numpy arrays (a flax.struct dataclass or a dict; typed PRNG key
  arrays from `jax.random.key` are stored as they are), written with `StandardSave`;
- `metadata`: a JSON-able dict (data-iterator position, config, ...), written with `JsonSave`.

Safety properties:

- orbax writes each step into `s.orbax-checkpoint-tmp*` and renames it when complete, so a save
  that crashed or is still running is never listed (`all_steps`, `latest_step`) nor restored;
  a later save of the same step replaces the leftover temporary directory.
- `save` refuses a state with a NaN / Inf in any floating leaf (one host sync on save steps only),
  so a diverged run cannot overwrite good checkpoints with garbage.
- `restore()` without a step tries the newest checkpoint first and falls back to older ones if
  it cannot be read (truncated or deleted files), with a warning for each failure.
- `restore(..., partial=True)` reads only the leaves of a sub-tree of the saved state (e.g. the
  parameters an evaluation needs, without the optimiser state): the other arrays are never read.

Multi-host: create the manager and call `save` / `restore` on every process (orbax coordinates
the writes); `abstract_state` should carry the global shardings wanted after restore.
"""

from collections.abc import Mapping
import json
import logging
import os
from typing import Any
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

__all__ = ["CheckpointManager"]

_STATE = "state"
_METADATA = "metadata"


@jax.jit
def _leaves_finite(leaves: list[jax.Array]) -> list[jax.Array]:
  """One bool scalar per leaf: all entries finite (scalars, hence replicated on every host)."""
  return [jnp.all(jnp.isfinite(leaf)) for leaf in leaves]


def _is_float(leaf: Any) -> bool:
  dtype = getattr(leaf, "dtype", None)
  if dtype is None:
    dtype = np.asarray(leaf).dtype
  return jnp.issubdtype(dtype, jnp.inexact)


def _to_bool(flag: jax.Array) -> bool:
  # A 0-d result is replicated: the first local shard holds the value, also on multi-host.
  return bool(np.asarray(flag.addressable_data(0)))


def _describe(error: Exception, limit: int = 400) -> str:
  text = f"{type(error).__name__}: {error}"
  return text if len(text) <= limit else text[:limit] + "..."


def non_finite_leaves(state: PyTree) -> list[str]:
  """Key paths (as `jax.tree_util.keystr`) of the floating leaves with a NaN or an Inf."""
  floats = [(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state)
            if _is_float(leaf)]
  on_device = [(path, leaf) for path, leaf in floats if isinstance(leaf, jax.Array)]
  on_host = [(path, leaf) for path, leaf in floats if not isinstance(leaf, jax.Array)]
  bad = []
  if on_device:
    flags = _leaves_finite([leaf for _, leaf in on_device])
    bad += [path for (path, _), ok in zip(on_device, flags) if not _to_bool(ok)]
  bad += [path for path, leaf in on_host if not np.all(np.isfinite(leaf))]
  return [jax.tree_util.keystr(path) for path in bad]


class CheckpointManager:
  """Saves and restores (state, metadata) per step in `directory`; a thin wrapper over orbax.

  Example:
    with CheckpointManager(workdir / "checkpoints", max_to_keep=3) as ckpt:
      restored = ckpt.restore(jax.eval_shape(init_state))  # None on a fresh run
      ...
      ckpt.save(step, state, metadata={"data_step": step})
  """

  def __init__(
      self,
      directory: str | os.PathLike,
      *,
      max_to_keep: int | None = 3,
      save_interval_steps: int = 1,
      async_save: bool = True,
  ):
    """Opens (and creates) the checkpoint directory.

    Args:
      directory: where the step directories live.
      max_to_keep: how many of the newest checkpoints to keep (None: keep all).
      save_interval_steps: `save` writes only steps divisible by this, unless forced.
      async_save: write in a background thread; `save` returns once the arrays are copied
        to host memory. Call `wait_until_finished` (or `close`) before reading the files.
    """
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}.")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
    self._directory = os.path.abspath(os.fspath(directory))
    self._save_interval_steps = save_interval_steps
    self._unusable: set[int] = set()  # steps that failed to restore in this process
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=1,  # the interval is applied in `save`, so that `force` is exact
        create=True,
        enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(self._directory, options=options)

  @property
  def directory(self) -> str:
    return self._directory

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints (plus a save of this manager still in flight)."""
    return sorted(int(step) for step in self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(
      self,
      step: int,
      state: PyTree,
      *,
      metadata: Mapping[str, Any] | None = None,
      force: bool = False,
  ) -> bool:
    """Saves `state` and `metadata` as checkpoint `step`.

    Args:
      step: the training step, >= 0.
      state: a pytree of arrays; every floating leaf must be finite.
      metadata: a JSON-able dict saved beside the state and returned by `restore`.
      force: save even if `step` is not a multiple of `save_interval_steps`.

    Returns:
      True if a save was started; False if `step` is off the interval or already saved.

    Raises:
      ValueError: a floating leaf of `state` is not finite (nothing is written), or
        `metadata` is not JSON-able, or `step` is negative.
    """
    step = int(step)
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    if not force and step % self._save_interval_steps:
      return False
    metadata = dict(metadata or {})
    try:
      json.dumps(metadata)
    except (TypeError, ValueError) as e:
      raise ValueError(f"metadata for step {step} is not JSON-serialisable: {e}") from e
    bad = non_finite_leaves(state)
    if bad:
      raise ValueError(
          f"Refusing to save checkpoint at step {step}: non-finite values in {bad}.")
    if step in self._manager.all_steps():
      if step not in self._unusable:
        logging.info("Checkpoint for step %d already exists; not saving again.", step)
        return False
      logging.warning("Replacing the unreadable checkpoint of step %d.", step)
      self._manager.delete(step)
      self._unusable.discard(step)
    return bool(self._manager.save(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state),
            _METADATA: ocp.args.JsonSave(metadata),
        }),
        force=True,
    ))

  def _restore_step(self, abstract_state: PyTree, step: int,
                    partial: bool) -> tuple[int, PyTree, dict]:
    if partial:   # only the leaves named in abstract_state are read
      state_args = ocp.args.PyTreeRestore(
          abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(
              abstract_state), partial_restore=True)
    else:
      state_args = ocp.args.StandardRestore(abstract_state)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{_STATE: state_args, _METADATA: ocp.args.JsonRestore()}))
    return step, restored[_STATE], dict(restored[_METADATA] or {})

  def restore(
      self, abstract_state: PyTree, *, step: int | None = None, partial: bool = False
  ) -> tuple[int, PyTree, dict] | None:
    """Restores a checkpoint into the structure, dtypes and shardings of `abstract_state`.

    Args:
      abstract_state: a pytree like the saved state whose leaves are `jax.ShapeDtypeStruct`s
        (e.g. from `jax.eval_shape`, with `.sharding` set for the wanted placement) or
        concrete arrays (their shardings are used).
      step: the step to restore; None for the newest usable one.
      partial: `abstract_state` is a dict holding some of the saved state's fields (by name,
        e.g. {"step", "ema_params", "frozen"} of a train state); only those are read, and the
        result is such a dict. A manager restores either whole states or parts, not both
        (orbax binds one handler to the item).

    Returns:
      (step, state, metadata), or None if the directory holds no checkpoint at all.

    Raises:
      ValueError: `step` is given but no such checkpoint exists.
      RuntimeError: step is None, checkpoints exist, and none of them can be read.
    """
    self.wait_until_finished()
    self._manager.reload()  # pick up checkpoints written by other processes meanwhile
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise ValueError(f"No checkpoint for step {step} in {self._directory}; found {steps}.")
      return self._restore_step(abstract_state, step, partial)
    if not steps:
      return None
    failures = []
    for candidate in reversed(steps):
      try:
        return self._restore_step(abstract_state, candidate, partial)
      except Exception as e:  # pylint: disable=broad-except  # any damage: try an older one
        message = (f"Checkpoint at step {candidate} in {self._directory} could not be "
                   f"restored ({_describe(e)})"
                   + ("; trying an older one." if candidate != steps[0] else "."))
        logging.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        self._unusable.add(candidate)
        failures.append(f"step {candidate}: {_describe(e)}")
    raise RuntimeError(
        f"None of the checkpoints in {self._directory} could be restored; tried:\n  "
        + "\n  ".join(failures))

  def wait_until_finished(self) -> None:
    """Blocks until an asynchronous save has been written and committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's resources."""
    self._manager.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
