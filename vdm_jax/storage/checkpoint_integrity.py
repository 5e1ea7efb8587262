"""What makes a checkpoint trustworthy: its integrity record, and how a failed read is classified.

The record that `checkpointing.CheckpointManager.save` stores under the metadata's reserved
key "_integrity"::

  {"format": 1, "algorithm": "sha256", "metadata": HEX, "fields": {FIELD: {"sha256": HEX,
  "structure": HEX, "leaves": N}}} with one entry per top-level field of the state ("params",
  "ema_params", "opt_state", ... of a train state; the keys of a dict). "sha256" hashes, for
  every leaf of the field in the sorted order of its key path: the path, dtype and shape
  (JSON), then the leaf's bytes (little-endian, C order; a PRNG key's key data), each prefixed
  by its length (8 bytes, little-endian); "structure" hashes the same without the bytes;
  "metadata" is the SHA-256 of the rest of the metadata as JSON with sorted keys. It is
  computed on host from the arrays being saved.

`field_entries` computes the same for a tree read back (a full or a partial one), so a restore
can compare field by field.

A failed read is damage only on positive evidence (`damage_reason`): a missing, truncated or
undecodable file, a tensorstore error code that names a data fault. An I/O or permission error
is not damage (None), and a target of another structure is the caller's mismatch
(`is_structure_error`). This module does not import orbax.
"""

from collections.abc import Iterator, Mapping
import concurrent.futures
import hashlib
import json
import logging
from typing import Any
import warnings

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = ["FORMAT", "CheckpointDamagedError", "CheckpointReadError", "CheckpointStructureError",
           "NoUsableCheckpointError", "damage_reason", "describe", "field_entries", "is_storage_failure",
           "integrity_record", "is_structure_error", "metadata_digest", "non_finite_leaves",
           "saved_fields", "warn"]

FORMAT = 1   # the version of the integrity record

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


def describe(error: BaseException, limit: int = 300) -> str:
  text = f"{type(error).__name__}: {error}"
  for cut in (" [tensorstore_spec", " See full TensorStore details"):
    text = text.split(cut)[0]
  return text if len(text) <= limit else text[:limit] + "..."


def damage_reason(error: BaseException, directory: str) -> str | None:
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
      return f"missing file ({describe(e)})"
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
      return f"undecodable metadata ({describe(e)})"
    if isinstance(e, KeyError) and "not found in the checkpoint" in text:
      return f"missing item ({describe(e)})"
    if text.startswith(_DAMAGE_CODES) or any(word in text.lower() for word in _DECODING_SIGNS):
      return f"unreadable array data ({describe(e)})"
  return None


def is_storage_failure(error: BaseException) -> bool:
  """Whether `error` (from a save, a restore or a write) is the storage failing: an OSError
  anywhere in its chain (a disk error, a refused connection to a bucket), or a tensorstore
  read / write error (as Orbax raises them) with a transient status code (UNAVAILABLE,
  DEADLINE_EXCEEDED, ...). Errors of JAX's own runtime (a collective timing out) are not."""
  for e in _chain(error):
    text = str(e)
    if isinstance(e, OSError) or (
        isinstance(e, ValueError) and text.startswith(("Error writing", "Error reading",
                                                       "Error opening", "Error deleting"))
        and any(code in text for code in _TRANSIENT_CODES)):
      return True
  return False


def is_structure_error(error: BaseException) -> bool:
  return any(sign in str(e) for e in _chain(error) for sign in _STRUCTURE_SIGNS)


def warn(message: str) -> None:
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


def field_entries(tree: PyTree, *, with_data: bool) -> dict[str, tuple[dict, list[str]]]:
  fields = _fields(tree)
  if not with_data or jax.process_count() > 1 or len(fields) < 2:  # no collectives in threads
    return {name: _field_entry(sub, with_data=with_data) for name, sub in fields.items()}
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(fields))) as pool:
    futures = {name: pool.submit(_field_entry, sub, with_data=True)
               for name, sub in fields.items()}
    return {name: future.result() for name, future in futures.items()}


def metadata_digest(metadata: Mapping[str, Any]) -> str:
  canonical = json.loads(json.dumps(metadata))   # as read back: str keys, lists for tuples
  return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def integrity_record(state: PyTree, metadata: Mapping[str, Any]) -> dict:
  """The record `save` stores beside `state`: per top-level field, a SHA-256 digest of every
  leaf's path, dtype, shape and bytes, and one of the structure alone; a digest of `metadata`."""
  entries = field_entries(state, with_data=True)
  return {"format": FORMAT, "algorithm": "sha256", "metadata": metadata_digest(metadata),
          "fields": {name: entry for name, (entry, _) in entries.items()}}


def saved_fields(record: Any) -> dict[str, dict] | None:
  """The record's fields if the record is well formed, else None."""
  if not isinstance(record, dict) or record.get("format") != FORMAT:
    return None
  fields = record.get("fields")
  if not isinstance(record.get("metadata"), str) or not isinstance(fields, dict) or not all(
      isinstance(e, dict) and isinstance(e.get("sha256"), str)
      and isinstance(e.get("structure"), str) for e in fields.values()):
    return None
  return fields
