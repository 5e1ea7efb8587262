"""Checkpoints of the train state that prove their integrity, with fallback past damaged steps.

This is the only module of vdm_jax that imports orbax. A checkpoint of step s lives in
`directory/s/` with two items:

- `state`: any pytree of jax / numpy arrays (a flax.struct dataclass or a dict; typed PRNG key
  arrays from `jax.random.key` are stored as they are), written with `StandardSave`;
- `metadata`: a JSON-able dict (data-iterator position, config, ...), written with `JsonSave`,
  plus the integrity record under the reserved key "_integrity" (not returned by `restore`):
  {"format": 1, "algorithm": "sha256", "metadata": HEX, "fields": {FIELD: {"sha256": HEX,
  "structure": HEX, "leaves": N}}} with one entry per top-level field of the state ("params",
  "ema_params", "opt_state", ... of a train state; the keys of a dict). "sha256" hashes, for
  every leaf of the field in the sorted order of its key path: the path, dtype and shape
  (JSON), then the leaf's bytes (little-endian, C order; a PRNG key's key data), each prefixed
  by its length (8 bytes, little-endian); "structure" hashes the same without the bytes;
  "metadata" is the SHA-256 of the rest of the metadata as JSON with sorted keys. It is
  computed on host from the arrays being saved.

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

from collections.abc import Iterator, Mapping
import concurrent.futures
import hashlib
import json
import logging
import os
import time
from typing import Any
import warnings

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

__all__ = ["CheckpointManager", "CheckpointDamagedError", "CheckpointReadError",
           "CheckpointStructureError", "NoUsableCheckpointError", "non_finite_leaves"]

_STATE = "state"
_METADATA = "metadata"
_INTEGRITY = "_integrity"   # reserved key of the metadata item
_FORMAT = 1
# A step directory that fails to read is watched this long for its disappearance (a deletion
# by rotation removes the files first, then the directory) before the failure counts as damage.
_VANISH_GRACE_S = 0.5
_MAX_VANISHED = 8   # re-listings after steps disappeared mid-read, per restore
# tensorstore status codes (the start of its error messages) that show a damaged file, and
# those that show a failure of the storage, not of the checkpoint.
_DAMAGE_CODES = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION")
_TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                    "ABORTED", "CANCELLED", "UNAUTHENTICATED", "INTERNAL", "UNKNOWN")
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)
# Words of tensorstore / zstd / JSON errors about the bytes read (they can come without a code).
_DECODING_SIGNS = ("decod", "decompress", "corrupt", "truncated", "invalid json", "checksum")
_STRUCTURE_SIGNS = ("Structure mismatch", "tree structures do not match",
                    "is not compatible with the stored shape")


class CheckpointDamagedError(ValueError):
  """Checkpoint `step` is positively damaged (`reason` says how)."""

  def __init__(self, step: int, directory: str, reason: str):
    self.step, self.reason = step, reason
    super().__init__(f"Checkpoint step {step} in {directory} is damaged: {reason}")


class CheckpointStructureError(ValueError):
  """The restore target differs from the structure the checkpoint was saved with."""

  def __init__(self, step: int, directory: str, fields: list[str], detail: str = ""):
    self.step, self.fields = step, fields
    named = f" in field(s) {fields}" if fields else ""
    super().__init__(
        f"Checkpoint step {step} in {directory} was saved with another structure than the one "
        f"asked for{named} (shapes, dtypes or tree; a changed config?){detail}")


class CheckpointReadError(OSError):
  """A checkpoint could not be read for a reason that does not show damage (I/O, permission)."""


class NoUsableCheckpointError(RuntimeError):
  """Checkpoints exist, and every one of them is damaged."""


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


def _chain(error: BaseException) -> Iterator[BaseException]:
  """`error` and the exceptions it was raised from or during."""
  seen = set()
  while error is not None and id(error) not in seen and len(seen) < 16:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _describe(error: BaseException, limit: int = 300) -> str:
  text = f"{type(error).__name__}: {error}"
  for cut in (" [tensorstore_spec", " See full TensorStore details"):
    text = text.split(cut)[0]
  return text if len(text) <= limit else text[:limit] + "..."


def _damage_reason(error: BaseException, directory: str) -> str | None:
  """How `error` (raised by a read) shows damage; None if it does not (then it is not damage).
  Words are looked for in the messages without `directory` (a path may contain any word)."""
  chain = list(_chain(error))
  for e in chain:
    if ((isinstance(e, OSError) and not isinstance(e, _MISSING))
        or str(e).startswith(_TRANSIENT_CODES)):
      return None
  for e in reversed(chain):   # the innermost cause names the file and the fault
    text = str(e).replace(directory, "")
    if isinstance(e, CheckpointDamagedError):
      return e.reason
    if isinstance(e, _MISSING):
      return f"missing file ({_describe(e)})"
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
      return f"undecodable metadata ({_describe(e)})"
    if isinstance(e, KeyError) and "not found in the checkpoint" in text:
      return f"missing item ({_describe(e)})"
    if text.startswith(_DAMAGE_CODES) or any(word in text.lower() for word in _DECODING_SIGNS):
      return f"unreadable array data ({_describe(e)})"
  return None


def _is_structure_error(error: BaseException) -> bool:
  return any(sign in str(e) for e in _chain(error) for sign in _STRUCTURE_SIGNS)


def _warn(message: str) -> None:
  logging.warning(message)
  warnings.warn(message, RuntimeWarning, stacklevel=3)


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


# ---- the integrity record: per-field digests, the same for a full and a partial tree ----

def _key_name(entry: Any) -> str:
  """A key-path entry as a name independent of the container (attribute, dict key, index)."""
  for attr in ("name", "key", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _fields(tree: PyTree) -> dict[str, PyTree]:
  """The top-level fields of `tree` by name (a dataclass's attributes, a dict's keys)."""
  top, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is not tree)
  return {"/".join(_key_name(k) for k in path): sub for path, sub in top}


def _dtype_name(dtype: Any) -> str:
  if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):   # PRNG keys: "key<fry>"
    return str(dtype)
  return np.dtype(dtype).name


def _host_array(leaf: Any) -> np.ndarray:
  """The leaf's values on this host, C-contiguous and little-endian (a key's key data)."""
  if isinstance(leaf, jax.Array):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if leaf.is_fully_addressable:
      leaf = jax.device_get(leaf)
    elif leaf.is_fully_replicated:
      leaf = leaf.addressable_data(0)
    else:
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
  data = np.ascontiguousarray(np.asarray(leaf))
  if data.dtype.byteorder == ">":
    data = data.astype(data.dtype.newbyteorder("<"))
  return data


def _update(digest: Any, data: Any) -> None:
  digest.update(len(data).to_bytes(8, "little"))
  digest.update(data)


def _field_entry(sub: PyTree, *, with_data: bool) -> tuple[dict, list[str]]:
  """({"structure", "leaves"[, "sha256"]}, non-finite leaf paths) of one field."""
  content, structure = hashlib.sha256(), hashlib.sha256()
  leaves = sorted((([_key_name(k) for k in path], leaf)
                   for path, leaf in jax.tree_util.tree_leaves_with_path(sub)),
                  key=lambda item: item[0])
  bad = []
  for names, leaf in leaves:
    shape = list(getattr(leaf, "shape", np.shape(leaf)))
    dtype = getattr(leaf, "dtype", None)
    dtype = np.asarray(leaf).dtype if dtype is None else dtype
    header = json.dumps([names, _dtype_name(dtype), shape]).encode()
    _update(content, header)
    _update(structure, header)
    if with_data:
      data = _host_array(leaf)
      _update(content, data.reshape(-1).view(np.uint8))
      if _is_float(data) and not np.all(np.isfinite(data)):
        bad.append("/".join(names))
  entry = {"structure": structure.hexdigest(), "leaves": len(leaves)}
  if with_data:
    entry["sha256"] = content.hexdigest()
  return entry, bad


def _field_entries(tree: PyTree, *, with_data: bool) -> dict[str, tuple[dict, list[str]]]:
  fields = _fields(tree)
  if not with_data or jax.process_count() > 1 or len(fields) < 2:  # no collectives in threads
    return {name: _field_entry(sub, with_data=with_data) for name, sub in fields.items()}
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(fields))) as pool:
    futures = {name: pool.submit(_field_entry, sub, with_data=True)
               for name, sub in fields.items()}
    return {name: future.result() for name, future in futures.items()}


def _metadata_digest(metadata: Mapping[str, Any]) -> str:
  canonical = json.loads(json.dumps(metadata))   # as read back: str keys, lists for tuples
  return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def _integrity_record(state: PyTree, metadata: Mapping[str, Any]) -> dict:
  """The record `save` stores beside `state`: per top-level field, a SHA-256 digest of every
  leaf's path, dtype, shape and bytes, and one of the structure alone; a digest of `metadata`."""
  entries = _field_entries(state, with_data=True)
  return {"format": _FORMAT, "algorithm": "sha256", "metadata": _metadata_digest(metadata),
          "fields": {name: entry for name, (entry, _) in entries.items()}}


def _saved_fields(record: Any) -> dict[str, dict] | None:
  """The record's fields if the record is well formed, else None."""
  if not isinstance(record, dict) or record.get("format") != _FORMAT:
    return None
  fields = record.get("fields")
  if not isinstance(record.get("metadata"), str) or not isinstance(fields, dict) or not all(
      isinstance(e, dict) and isinstance(e.get("sha256"), str)
      and isinstance(e.get("structure"), str) for e in fields.values()):
    return None
  return fields


class _Vanished(Exception):
  """The step directory disappeared while it was read (rotated away): not damage."""


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

  def stored_tree(self, step: int) -> PyTree:
    """The tree of array metadata (`.shape` and `.dtype` per leaf, as orbax recorded them) of
    checkpoint `step`'s state: no array is read. For a restore's dry run (compare it with the
    target before anything in the run directory changes). Not verified: a damaged checkpoint
    may raise whatever orbax raises for metadata it cannot read.

    Raises:
      ValueError: there is no checkpoint `step`.
    """
    self._manager.reload()
    if step not in self.all_steps():
      raise ValueError(f"No checkpoint for step {step} in {self._directory}.")
    handler = ocp.PyTreeCheckpointHandler()
    try:
      return handler.metadata(self._manager.directory / str(step) / _STATE).tree   # an epath
    finally:
      handler.close()

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
    metadata[_INTEGRITY] = _integrity_record(state, metadata)
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
                        "without confirming damage (%s).", step, self._directory, _describe(e))
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
              _field_entries(target, with_data=False).items()}
    saved = None if record is None else _saved_fields(record)
    if record is not None and saved is None:
      raise damaged("its integrity record is malformed")
    if saved is not None and record["metadata"] != _metadata_digest(metadata):
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
      if not _is_structure_error(e):
        raise
      if saved is None:   # nothing recorded to tell damage from a changed target
        raise CheckpointStructureError(step, self._directory, [], f": {_describe(e)}") from e
      raise damaged(f"the arrays on disk differ from the recorded structure ({_describe(e)})"
                    ) from e
    got = _field_entries(state, with_data=True)
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
    path = os.path.join(self._directory, str(step))
    deadline = time.monotonic() + _VANISH_GRACE_S
    while os.path.exists(path):
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
      reason = _damage_reason(e, self._directory)
      if reason is None:
        raise CheckpointReadError(
            f"Could not read checkpoint step {step} in {self._directory}: {_describe(e)}. This "
            f"does not show damage, so the checkpoint was neither skipped nor marked for "
            f"replacement; fix the cause (storage, permissions) and retry.") from e
      raise CheckpointDamagedError(step, self._directory, reason) from e
    if not verified and not quiet:
      _warn(f"Checkpoint step {step} in {self._directory} has no integrity record (saved by an "
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
        _warn(f"Checkpoint step {candidate} in {self._directory} is damaged ({e.reason}); "
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
