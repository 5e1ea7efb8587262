"""Read train states saved by the official VDM trainer (google-research/vdm) through clu.

What clu writes (clu 0.0.12, `clu/checkpoint.py`: `Checkpoint.save`, `Checkpoint.load_state`,
`Checkpoint.restore_dict`, `MultihostCheckpoint.__init__` and
`MultihostCheckpoint.get_latest_checkpoint_to_restore_from`):

- `MultihostCheckpoint(d)` does not write into `d`: each host writes into the sibling directory
  `f"{d}-{host_id}"`. The official trainer passes `d = workdir/checkpoints`, so host 0 writes
  `workdir/checkpoints-0/`; the released model's `.../checkpoint-final/checkpoints-0` is such a
  per-host directory (a directory, not a file prefix).
- In a per-host directory, save number N (from 1, `checkpoint_name="ckpt"`) writes
  `ckpt-N.flax`: the whole train state as `flax.serialization.to_bytes(state)`, i.e. the msgpack
  of its state dict (a flax.struct dataclass becomes a dict of its pytree fields, FrozenDicts
  become dicts, tuples become dicts keyed "0", "1", ..., arrays become msgpack ext records);
  then TensorFlow's `tf.train.CheckpointManager.save()` writes `ckpt-N.index` and
  `ckpt-N.data-00000-of-00001` (only the TensorFlow objects handed to clu, e.g. its save counter;
  no parameters) and rewrites the text file `checkpoint` (a CheckpointState protobuf: the line
  `model_checkpoint_path: "ckpt-N"` names the newest save, `all_model_checkpoint_paths` the kept
  ones, relative to the directory). Older saves beyond `max_to_keep` are deleted, `.flax` included.
- `Checkpoint(dir).restore_dict()` takes the newest save named by `dir/checkpoint` and returns
  `flax.serialization.msgpack_restore` of `ckpt-N.flax` (a nested dict); the TensorFlow files are
  only needed to restore TensorFlow objects (the official trainer restores none from them).

What is read here: only the `.flax` msgpack file, with `flax.serialization.msgpack_restore`, on a
local disk or in object storage (`gs://...`, through `rundir`): no TensorFlow.

The official train state (google-research/vdm `train_state.py`) has the pytree fields `step`,
`params`, `ema_params` and `opt_state`; params and ema_params are the `{"params": {...}}` trees of
`model.init`, with top-level modules such as "score_model" and "gamma".
"""

from collections.abc import Mapping
import os
import posixpath
import re
from typing import Any

from flax import serialization
import numpy as np

from vdm_jax.storage import rundir

__all__ = ["read_official_checkpoint"]

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9.+-]+://")
_STATE_FILE = "checkpoint"  # TensorFlow's CheckpointState text file.
_NUMBERED_FLAX = re.compile(r"^(?P<name>.+)-(?P<number>\d+)\.flax$")
_TF_SIDECAR = re.compile(r"\.(index|data-\d{5}-of-\d{5})$")
_STATE_LINE = re.compile(
    r"^\s*(?P<field>model_checkpoint_path|all_model_checkpoint_paths)\s*:\s*"
    r"(?P<quote>[\"'])(?P<value>(?:(?!(?P=quote))[^\\]|\\.)*)(?P=quote)\s*$", re.M)
_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|(.))", re.S)
_SIMPLE_ESCAPES = {b"n": b"\n", b"t": b"\t", b"r": b"\r", b"a": b"\a", b"b": b"\b",
                   b"f": b"\f", b"v": b"\v"}
_EXPECTED_FILES = ("clu's 'checkpoint' (TensorFlow CheckpointState text file) and "
                   "'<name>-<number>.flax' (the flax train state in msgpack, e.g. 'ckpt-1.flax'), "
                   "beside TensorFlow's '<name>-<number>.index' / '.data-*' files")


class _Files:
  """The few file operations needed, through `rundir`: a local disk or object storage (gs://,
  ...) alike, without TensorFlow."""

  def __init__(self, path: str):
    self._remote = rundir.is_remote(path)

  def join(self, *parts: str) -> str:
    return posixpath.join(*parts) if self._remote else os.path.join(*parts)

  def split(self, path: str) -> tuple[str, str]:
    return posixpath.split(path) if self._remote else os.path.split(path)

  def isabs(self, path: str) -> bool:
    return bool(_SCHEME.match(path)) or (posixpath.isabs(path) if self._remote
                                         else os.path.isabs(path))

  def _here(self, path: str) -> bool:
    """Whether `path` is on the checkpoint's own storage: a state file written in a bucket and
    copied to a local disk names gs:// prefixes, which are then looked up by name here."""
    return rundir.is_remote(path) == self._remote

  def exists(self, path: str) -> bool:
    return self._here(path) and rundir.exists(path)

  def isdir(self, path: str) -> bool:
    return self._here(path) and rundir.is_dir(path)

  def listdir(self, path: str) -> list[str]:
    return rundir.list_names(path)

  def read(self, path: str) -> bytes:
    return rundir.read_bytes(path)


def _unescape(text: str) -> str:
  """Undoes the C-style escapes of a protobuf text-format string."""
  def replace(match: re.Match) -> bytes:
    if match[1]:
      return bytes([int(match[1], 8) & 0xFF])
    if match[2]:
      return bytes([int(match[2], 16)])
    return _SIMPLE_ESCAPES.get(match[3], match[3])
  return _ESCAPE.sub(replace, text.encode("utf-8")).decode("utf-8", errors="surrogateescape")


def _state_file_prefixes(files: _Files, directory: str) -> tuple[str, list[str]] | None:
  """(newest prefix, kept prefixes) named by `directory/checkpoint`, or None without that file.

  Relative prefixes are joined to `directory`, as TensorFlow's get_checkpoint_state does.
  """
  state_file = files.join(directory, _STATE_FILE)
  if not files.exists(state_file) or files.isdir(state_file):
    return None
  text = files.read(state_file).decode("utf-8", errors="replace")
  newest, kept = None, []
  for match in _STATE_LINE.finditer(text):
    value = _unescape(match["value"])
    value = value if files.isabs(value) else files.join(directory, value)
    if match["field"] == "model_checkpoint_path":
      newest = value
    else:
      kept.append(value)
  if not newest:
    raise ValueError(f"{state_file!r} is not a clu/TensorFlow checkpoint state file: it has no "
                     "'model_checkpoint_path: \"...\"' line")
  return newest, kept


def _flax_file_of_prefix(files: _Files, directory: str, prefix: str) -> str | None:
  """`{prefix}.flax`, or the same name inside `directory` when an absolute prefix moved away."""
  for candidate in (prefix + ".flax", files.join(directory, files.split(prefix)[1] + ".flax")):
    if files.exists(candidate):
      return candidate
  return None


def _numbered_flax_files(files: _Files, directory: str) -> dict[int, str]:
  """{N: path} of the `<name>-N.flax` files in `directory`."""
  found = {}
  for name in files.listdir(directory):
    match = _NUMBERED_FLAX.match(name)
    if match:
      found[int(match["number"])] = files.join(directory, name)
  return found


def _host_directories(files: _Files, base: str) -> dict[int, str]:
  """{host id: path} of MultihostCheckpoint's per-host directories `{base}-{host id}`."""
  parent, name = files.split(base)
  parent = parent or os.curdir
  if not name or not files.isdir(parent):
    return {}
  pattern = re.compile(re.escape(name) + r"-(\d+)")
  hosts = {}
  for entry in files.listdir(parent):
    match = pattern.fullmatch(entry)
    if match and files.isdir(files.join(parent, entry)):
      hosts[int(match[1])] = files.join(parent, entry)
  return hosts


def _newest_in_directory(files: _Files, directory: str) -> str | None:
  """The `.flax` file of the newest save in a clu `Checkpoint` directory; None if it has none.

  clu's choice: the save named by `model_checkpoint_path` in `directory/checkpoint`. Without that
  file (e.g. only the .flax files were copied) the highest-numbered `<name>-N.flax` is taken.
  """
  state = _state_file_prefixes(files, directory)
  if state is not None:
    flax_file = _flax_file_of_prefix(files, directory, state[0])
    if flax_file is None:
      raise ValueError(
          f"no checkpoint found in directory {directory!r}: its 'checkpoint' file names "
          f"{state[0]!r}, but {state[0] + '.flax'!r} (where clu writes the train state) is missing")
    return flax_file
  numbered = _numbered_flax_files(files, directory)
  return numbered[max(numbered)] if numbered else None


def _no_checkpoint_error(files: _Files, directory: str) -> ValueError:
  """The error for a directory without checkpoint files, with a hint if it holds host dirs."""
  hosts = [files.join(directory, entry) for entry in files.listdir(directory)
           if re.fullmatch(r".+-\d+", entry) and files.isdir(files.join(directory, entry))]
  hint = ""
  if hosts:
    hint = (f"; it holds what look like per-host directories of a MultihostCheckpoint ({hosts}): "
            "pass one of them, or their common base name without '-<host id>'")
  return ValueError(f"no checkpoint found in directory {directory!r}: expected {_EXPECTED_FILES}"
                    + hint)


def _committed_flax_files(files: _Files, directory: str) -> dict[int, str]:
  """{N: .flax path} of the saves in one per-host directory that TensorFlow committed."""
  numbered = _numbered_flax_files(files, directory)
  state = _state_file_prefixes(files, directory)
  if state is None:
    return numbered
  kept = set(state[1]) | {state[0]}
  committed = {}
  for prefix in kept:
    match = re.search(r"-(\d+)$", prefix)
    flax_file = _flax_file_of_prefix(files, directory, prefix)
    if match and flax_file is not None:
      committed[int(match[1])] = flax_file
  return committed


def _newest_common_to_hosts(files: _Files, base: str, hosts: dict[int, str]) -> str:
  """Like MultihostCheckpoint: the highest save number present on every host; host 0's file."""
  per_host = {host: _committed_flax_files(files, path) for host, path in hosts.items()}
  common = set.intersection(*(set(saves) for saves in per_host.values()))
  if not common:
    raise ValueError(
        f"no checkpoint found for the MultihostCheckpoint directory {base!r}: no save number is "
        f"present in all of its per-host directories {sorted(hosts.values())}; each should "
        f"hold {_EXPECTED_FILES}")
  return per_host[min(hosts)][max(common)]


def _locate(files: _Files, path: str) -> str:
  """The `.flax` file that `path` designates (see `read_official_checkpoint`)."""
  if files.isdir(path):
    flax_file = _newest_in_directory(files, path)
    if flax_file is not None:
      return flax_file
    hosts = _host_directories(files, path)  # A MultihostCheckpoint base that was created empty.
    if hosts:
      return _newest_common_to_hosts(files, path, hosts)
    raise _no_checkpoint_error(files, path)
  if files.exists(path):
    if _TF_SIDECAR.search(path):
      prefix = _TF_SIDECAR.sub("", path)
      if files.exists(prefix + ".flax"):
        return prefix + ".flax"
    return path
  if files.exists(path + ".flax"):
    return path + ".flax"
  hosts = _host_directories(files, path)
  if hosts:
    return _newest_common_to_hosts(files, path, hosts)
  raise ValueError(f"checkpoint path {path!r} does not exist (nor {path + '.flax'!r}, nor "
                   f"MultihostCheckpoint per-host directories {path + '-<host id>'!r})")


def _load_state_dict(files: _Files, flax_file: str) -> dict[str, Any]:
  """The msgpack state dict in a clu `.flax` file."""
  try:
    state = serialization.msgpack_restore(files.read(flax_file))
  except (ValueError, TypeError, KeyError, IndexError) as e:  # msgpack's errors are ValueErrors.
    raise ValueError(f"{flax_file!r} is not a clu/flax checkpoint: it is not a flax msgpack "
                     f"state ({type(e).__name__}: {e})") from e
  if not isinstance(state, dict):
    raise ValueError(f"{flax_file!r} is not a clu/flax checkpoint: it decodes to a "
                     f"{type(state).__name__}, not a train-state dict")
  return state


def _numpy_tree(tree: Any) -> Any:
  """Nested dicts with every leaf copied into a writeable numpy array."""
  if isinstance(tree, Mapping):
    return {key: _numpy_tree(value) for key, value in tree.items()}
  return np.array(tree)


def _model_tree(tree: Any, *, field: str, flax_file: str) -> dict[str, Any]:
  """A params tree as numpy, without the single {"params": ...} level of `model.init`."""
  if not isinstance(tree, Mapping):
    raise ValueError(f"{flax_file!r}: the state's {field!r} is a {type(tree).__name__}, "
                     "not a tree of parameters")
  if set(tree) == {"params"} and isinstance(tree["params"], Mapping):
    tree = tree["params"]
  return _numpy_tree(tree)


def _step(value: Any, *, flax_file: str) -> int:
  step = np.asarray(value)
  if step.ndim != 0 or not np.issubdtype(step.dtype, np.integer):
    raise ValueError(f"{flax_file!r}: the state's 'step' should be an integer scalar, got "
                     f"{step.dtype} of shape {step.shape}")
  return int(step)


def read_official_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads the parameters of a train state saved by the official VDM trainer through clu.

  Only clu's `<name>-<N>.flax` msgpack file is read (see the module docstring for the layout);
  the TensorFlow `.index` / `.data-*` files are not needed.

  Args:
    path: one of

      - a per-host checkpoint directory, as given to `clu.checkpoint.Checkpoint` (e.g. the
        released `.../checkpoint-final/checkpoints-0`): its newest save, as named by its
        `checkpoint` file (or, without that file, the highest-numbered `.flax` file);
      - the directory given to `clu.checkpoint.MultihostCheckpoint` (e.g. `workdir/checkpoints`,
        which itself does not exist): the highest save number present in all of its per-host
        directories `{path}-{host id}`, read from the lowest host id;
      - a checkpoint prefix such as `.../checkpoints-0/ckpt-3` (as returned by clu's `save`), its
        `.flax` file, or one of its TensorFlow `.index` / `.data-*` files.

      Object storage paths (e.g. `gs://...`) are read directly.

  Returns:
    {"params": tree, "ema_params": tree, "step": int}: each tree is the official model's nested
    dict of numpy arrays (top-level keys such as "score_model" and "gamma"; the single
    {"params": ...} level of `model.init` is removed), e.g. "score_model"/"conv_in"/"kernel"
    [3, 3, C_in, C] and "gamma"/"w" [1] for the learned linear schedule.

  Raises:
    ValueError: if the path does not exist, a directory holds no checkpoint, a file is not a
      clu/flax checkpoint, or the state has no "params", "ema_params" or "step".
  """
  path = rundir.normalize(path)
  files = _Files(path)
  flax_file = _locate(files, path)
  state = _load_state_dict(files, flax_file)
  missing = [key for key in ("params", "ema_params", "step") if key not in state]
  if missing:
    raise ValueError(
        f"{flax_file!r} is not an official VDM train state: it has no {missing}; keys found: "
        f"{sorted(map(str, state))} (expected step, params, ema_params, opt_state)")
  return {
      "params": _model_tree(state["params"], field="params", flax_file=flax_file),
      "ema_params": _model_tree(state["ema_params"], field="ema_params", flax_file=flax_file),
      "step": _step(state["step"], flax_file=flax_file),
  }
