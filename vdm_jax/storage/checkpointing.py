"""Checkpoints of the train state that prove their integrity, with fallback past damaged steps.

This is the only module of vdm_jax that imports orbax. A checkpoint of step s lives in
`directory/s/` with two items:

- `state`: any pytree of jax / numpy arrays (a flax.struct dataclass or a dict; typed PRNG key
  arrays from `jax.random.key` are stored as they are), written with `StandardSave`;
- `metadata`: a JSON-able dict (data-iterator position, config, ...), written with `JsonSave`,
  plus the integrity record under the reserved key "_integrity" (not returned by `restore`;
  its format is in `checkpoint_integrity`).

Safety properties:

- orbax writes each step into `s.orbax-checkpoint-tmp*` and renames it when complete, so a save
  that crashed or is still running is never listed (`all_steps`, `latest_step`) nor restored.
- `save` refuses a state with a NaN / Inf in any floating leaf, so a diverged run cannot
  overwrite good checkpoints with garbage.
- `restore` verifies what it read: the digest of every field restored (so a partial restore is
  verified too) and that every floating leaf is finite. Without a step it tries the newest
  checkpoint first and falls back past a damaged one with a warning naming the step and why.
  Only positive evidence is damage: a digest mismatch, a missing, truncated or undecodable
  file, arrays on disk that differ from the recorded structure, non-finite values. Any other
  error (an I/O error, a permission error) propagates as `CheckpointReadError` and marks
  nothing. A step whose directory disappears while it is read (rotated away by a running
  trainer) is not damage: the steps are listed again and the newest is tried (bounded retries).
- A target whose structure differs from the recorded one (e.g. a changed config) raises
  `CheckpointStructureError` naming the fields; it is a mismatch of the caller, not damage.
- A checkpoint saved without a record (older vdm_jax) restores with one warning that it cannot
  be verified; its floating leaves are still checked to be finite.
- `restore` never deletes anything. The steps it found damaged are re-read at the next `save`
  of the same manager and deleted only if that read confirms the damage (orbax's rotation
  would otherwise keep a damaged step and delete intact older ones).
- `restore(..., partial=True)` reads only the fields of the saved state named in the target
  (e.g. the parameters an evaluation needs, without the optimiser state).

Cost: saving hashes the whole state on host (one device-to-host copy; SHA-256 runs at about
1 GB/s per field, fields in parallel); restoring copies what it read to host once to verify it.

Multi-host: create the manager and call `save` / `restore` on every process (orbax coordinates
the writes); `abstract_state` should carry the global shardings wanted after restore.
"""

from collections.abc import Mapping
import json
import logging
import os
import time
from typing import Any

import orbax.checkpoint as ocp

from vdm_jax.storage import checkpoint_integrity as integrity, rundir
from vdm_jax.storage.checkpoint_integrity import (CheckpointDamagedError, CheckpointReadError,
                                          CheckpointStructureError, NoUsableCheckpointError,
                                          is_storage_failure, non_finite_leaves)

PyTree = Any

__all__ = ["CheckpointManager", "complete_steps", "stored_tree", "check_location",
           "CHECKPOINT_SCHEMES", "CheckpointDamagedError", "CheckpointReadError",
           "CheckpointStructureError", "NoUsableCheckpointError", "is_storage_failure",
           "non_finite_leaves"]

_STATE = "state"
_METADATA = "metadata"
_INTEGRITY = "_integrity"   # reserved key of the metadata item
# A step directory that fails to read is watched this long for its disappearance (a deletion
# by rotation removes the files first, then the directory) before the failure counts as damage.
_VANISH_GRACE_S = 0.5
_MAX_VANISHED = 8   # re-listings after steps disappeared mid-read, per restore
class _Vanished(Exception):
  """The step directory disappeared while it was read (rotated away): not damage."""


# URL schemes Orbax writes checkpoints to besides local paths: it builds TensorStore specs for
# gs:// only (orbax-checkpoint 0.12); an s3:// path reaches TensorStore as a relative local path.
CHECKPOINT_SCHEMES = ("gs",)


def check_location(directory: str | os.PathLike) -> None:
  """Refuses a checkpoint directory Orbax cannot write: a URL other than gs://.

  Raises:
    ValueError: naming the directory and the places that work.
  """
  text = rundir.normalize(directory)
  if rundir.is_remote(text) and text.split("://", 1)[0] not in CHECKPOINT_SCHEMES:
    raise ValueError(
        f"{text!r}: checkpoints can be written to a local folder or gs:// only (Orbax, the "
        f"checkpoint writer, gives TensorStore no other URL); use a local or gs:// --workdir")


def complete_steps(directory: str) -> list[int]:
  """The steps of the complete checkpoints in `directory`, newest first, as orbax finalises
  them (on a local disk it writes into "S.orbax-checkpoint-tmp*" and renames when complete; on
  GCS it writes "S/commit_success.txt" last). No manager is opened: on several processes opening
  one is a collective, this is not."""
  if not rundir.is_dir(directory):
    return []
  return sorted(ocp.utils.checkpoint_steps(rundir.normalize(directory)), reverse=True)


def stored_tree(directory: str, step: int) -> PyTree:
  """The tree of array metadata (`.shape`, `.dtype` per leaf) of the state of checkpoint `step`
  in `directory`, for a restore's dry run: no array is read and no manager opened (no
  collective). Not verified: raises whatever orbax raises for metadata it cannot read, and
  ValueError if there is no complete checkpoint `step`."""
  if step not in complete_steps(directory):
    raise ValueError(f"No checkpoint for step {step} in {directory}.")
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.metadata(rundir.as_path(rundir.join(directory, str(step), _STATE))).tree
  finally:
    handler.close()


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
    check_location(directory)
    self._directory = rundir.normalize(directory)
    self._save_interval_steps = save_interval_steps
    # Steps this process found damaged -> (target, partial) to re-read them with before deleting.
    self._unusable: dict[int, tuple[PyTree, bool]] = {}
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
    """Saves `state`, `metadata` and the state's integrity record as checkpoint `step`.

    Steps that `restore` found damaged are re-read first and deleted if still damaged (so a
    damaged `step` is replaced); one that reads fine now is kept.

    Args:
      step: the training step, >= 0.
      state: a pytree of arrays; every floating leaf must be finite.
      metadata: a JSON-able dict saved beside the state and returned by `restore`.
      force: save even if `step` is not a multiple of `save_interval_steps`.

    Returns:
      True if a save was started; False if `step` is off the interval or already saved.

    Raises:
      ValueError: a floating leaf of `state` is not finite (nothing is written), or
        `metadata` is not JSON-able or uses the reserved key "_integrity", or `step` < 0.
    """
    step = int(step)
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    if not force and step % self._save_interval_steps:
      return False
    metadata = dict(metadata or {})
    if _INTEGRITY in metadata:
      raise ValueError(f"metadata key {_INTEGRITY!r} is reserved for the integrity record.")
    try:
      json.dumps(metadata)
    except (TypeError, ValueError) as e:
      raise ValueError(f"metadata for step {step} is not JSON-serialisable: {e}") from e
    bad = non_finite_leaves(state)
    if bad:
      raise ValueError(
          f"Refusing to save checkpoint at step {step}: non-finite values in {bad}.")
    self._delete_confirmed_damage()
    if step in self._manager.all_steps():
      logging.info("Checkpoint for step %d already exists; not saving again.", step)
      return False
    metadata[_INTEGRITY] = integrity.integrity_record(state, metadata)
    return bool(self._manager.save(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state),
            _METADATA: ocp.args.JsonSave(metadata),
        }),
        force=True,
    ))

  def _delete_confirmed_damage(self) -> None:
    """Re-reads the steps `restore` found damaged; deletes those whose damage is confirmed."""
    if not self._unusable:
      return
    self.wait_until_finished()
    self._manager.reload()
    for step, (target, partial) in sorted(self._unusable.items()):
      if step not in self._manager.all_steps():
        del self._unusable[step]
        continue
      try:
        self._attempt(target, step, partial, quiet=True)
      except _Vanished:
        del self._unusable[step]
      except CheckpointDamagedError as e:
        logging.warning("Deleting checkpoint step %d in %s: re-read before deletion and still "
                        "damaged (%s).", step, self._directory, e.reason)
        self._manager.delete(step)
        del self._unusable[step]
      except Exception as e:  # pylint: disable=broad-except  # unconfirmed: keep it, retry later
        logging.warning("Keeping checkpoint step %d in %s: re-reading it before deletion failed "
                        "without confirming damage (%s).", step, self._directory,
                        integrity.describe(e))
      else:
        logging.warning("Keeping checkpoint step %d in %s: it was reported damaged, but reads "
                        "and verifies now.", step, self._directory)
        del self._unusable[step]

  def _read_state(self, target: PyTree, step: int, partial: bool) -> PyTree:
    if partial:   # only the leaves named in the target are read
      state_args = ocp.args.PyTreeRestore(
          target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)
    else:
      state_args = ocp.args.StandardRestore(target)
    return self._manager.restore(step, args=ocp.args.Composite(**{_STATE: state_args}))[_STATE]

  def _read_verified(self, target: PyTree, step: int, partial: bool
                     ) -> tuple[PyTree, dict, bool]:
    """(state, metadata, whether it had a record to verify); raises on any failure."""
    damaged = lambda reason: CheckpointDamagedError(step, self._directory, reason)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()}))[_METADATA]
    metadata = dict(restored or {})
    record = metadata.pop(_INTEGRITY, None)
    wanted = {name: entry for name, (entry, _) in
              integrity.field_entries(target, with_data=False).items()}
    saved = None if record is None else integrity.saved_fields(record)
    if record is not None and saved is None:
      raise damaged("its integrity record is malformed")
    if saved is not None and record["metadata"] != integrity.metadata_digest(metadata):
      raise damaged("digest mismatch in its metadata")
    if saved is not None:
      differ = sorted(name for name in wanted if name not in saved
                      or saved[name]["structure"] != wanted[name]["structure"])
      extra = [] if partial else sorted(set(saved) - set(wanted))
      if differ or extra:
        raise CheckpointStructureError(step, self._directory, differ + extra)
    try:
      state = self._read_state(target, step, partial)
    except Exception as e:  # pylint: disable=broad-except
      if not integrity.is_structure_error(e):
        raise
      if saved is None:   # nothing recorded to tell damage from a changed target
        raise CheckpointStructureError(step, self._directory, [], f": {integrity.describe(e)}") from e
      raise damaged(f"the arrays on disk differ from the recorded structure ({integrity.describe(e)})"
                    ) from e
    got = integrity.field_entries(state, with_data=True)
    if set(got) != set(wanted):
      raise damaged(f"fields {sorted(set(wanted) ^ set(got))} are missing or extra")
    for name in sorted(got):
      entry = got[name][0]
      if saved is not None and entry["structure"] != saved[name]["structure"]:
        raise damaged(f"field {name!r} was read back with another structure than recorded "
                      f"(dtypes or shapes)")
      if saved is not None and entry["sha256"] != saved[name]["sha256"]:
        raise damaged(f"digest mismatch in field {name!r} (sha256 recorded "
                      f"{saved[name]['sha256'][:12]}..., read {entry['sha256'][:12]}...)")
    bad = [f"{name}/{path}" for name in sorted(got) for path in got[name][1]]
    if bad:
      raise damaged(f"non-finite values in {bad[:8]}" + (" ..." if len(bad) > 8 else ""))
    return state, metadata, saved is not None

  def _vanished(self, step: int) -> bool:
    """Whether step's directory is gone, or goes within the grace period (a rotation)."""
    path = rundir.join(self._directory, str(step))
    deadline = time.monotonic() + _VANISH_GRACE_S
    while rundir.exists(path):
      if time.monotonic() >= deadline:
        return False
      time.sleep(0.02)
    return True

  def _attempt(self, target: PyTree, step: int, partial: bool, *, quiet: bool = False
               ) -> tuple[int, PyTree, dict]:
    """Reads and verifies `step` (warns about a checkpoint without a record unless `quiet`):
    raises _Vanished, CheckpointDamagedError, CheckpointStructureError or CheckpointReadError."""
    try:
      state, metadata, verified = self._read_verified(target, step, partial)
    except CheckpointStructureError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # classified below
      if self._vanished(step):
        raise _Vanished(step) from e
      if isinstance(e, CheckpointDamagedError):
        raise
      reason = integrity.damage_reason(e, self._directory)
      if reason is None:
        raise CheckpointReadError(
            f"Could not read checkpoint step {step} in {self._directory}: {integrity.describe(e)}. This "
            f"does not show damage, so the checkpoint was neither skipped nor marked for "
            f"replacement; fix the cause (storage, permissions) and retry.") from e
      raise CheckpointDamagedError(step, self._directory, reason) from e
    if not verified and not quiet:
      integrity.warn(f"Checkpoint step {step} in {self._directory} has no integrity record (saved by an "
            f"older vdm_jax): it cannot be verified; only checked for non-finite values.")
    return step, state, metadata

  def restore(
      self, abstract_state: PyTree, *, step: int | None = None, partial: bool = False
  ) -> tuple[int, PyTree, dict] | None:
    """Restores and verifies a checkpoint into the structure, dtypes and shardings of
    `abstract_state`.

    Args:
      abstract_state: a pytree like the saved state whose leaves are `jax.ShapeDtypeStruct`s
        (e.g. from `jax.eval_shape`, with `.sharding` set for the wanted placement) or
        concrete arrays (their shardings are used).
      step: the step to restore; None for the newest usable one (falling back past damaged
        steps with a warning naming each and why).
      partial: `abstract_state` is a dict holding some of the saved state's fields (by name,
        e.g. {"step", "ema_params", "frozen"} of a train state); only those are read and
        verified, and the result is such a dict. A manager restores either whole states or
        parts, not both (orbax binds one handler to the item).

    Returns:
      (step, state, metadata), or None if the directory holds no checkpoint at all.

    Raises:
      ValueError: `step` is given but no such checkpoint exists.
      CheckpointDamagedError: `step` is given and that checkpoint is damaged.
      CheckpointStructureError: the target's structure differs from the checkpoint's.
      CheckpointReadError: a read failed without showing damage (nothing was marked).
      NoUsableCheckpointError: step is None, checkpoints exist, and all are damaged.
    """
    self.wait_until_finished()
    self._manager.reload()  # pick up checkpoints written by other processes meanwhile
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise ValueError(f"No checkpoint for step {step} in {self._directory}; found {steps}.")
      try:
        return self._attempt(abstract_state, step, partial)
      except _Vanished:
        raise ValueError(f"Checkpoint step {step} in {self._directory} was deleted while "
                         f"being read.") from None
      except CheckpointDamagedError:
        self._unusable[step] = (abstract_state, partial)
        raise
    return self._restore_newest(abstract_state, partial) if steps else None

  def _restore_newest(self, target: PyTree, partial: bool) -> tuple[int, PyTree, dict]:
    """The newest usable step: past damaged ones (warned, marked), listing the steps again
    after one vanished mid-read (at most _MAX_VANISHED times)."""
    failures, vanished = {}, 0
    while True:
      candidates = [s for s in self.all_steps() if s not in failures]
      if not candidates:
        raise NoUsableCheckpointError(
            f"None of the checkpoints in {self._directory} could be restored; tried:\n  "
            + "\n  ".join(f"step {s}: {reason}" for s, reason in failures.items())
            if failures else f"The checkpoints in {self._directory} disappeared while read.")
      candidate = candidates[-1]
      try:
        return self._attempt(target, candidate, partial)
      except _Vanished:
        vanished += 1
        logging.info("Checkpoint step %d in %s was deleted while being read (rotation); "
                     "trying the newest one again.", candidate, self._directory)
        if vanished > _MAX_VANISHED:
          raise NoUsableCheckpointError(
              f"Checkpoints in {self._directory} were deleted while being read {vanished} "
              f"times during one restore; is something deleting them?") from None
      except CheckpointDamagedError as e:
        failures[candidate] = e.reason
        self._unusable[candidate] = (target, partial)
        integrity.warn(f"Checkpoint step {candidate} in {self._directory} is damaged ({e.reason}); "
              f"trying an older one. It is kept as it is; a later save may replace it after "
              f"re-reading it.")
      self._manager.reload()

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
