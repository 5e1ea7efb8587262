"""The file system of vdm_jax: run directories, and every file a command reads or writes, on a
local disk or in object storage (`gs://` through gcsfs, `s3://` through s3fs, anything fsspec
opens: the paths etils.epath, and so Orbax, reaches).

Nothing else in the package opens, lists, renames or deletes a file. Orbax (checkpoints) and
TFDS / grain (prepared data) are handed path strings and do their own I/O.

A run directory (`workdir`)::

  config.json     the config of the run's checkpoints (`stored_config`)
  checkpoints/    Orbax steps, each with its integrity record (`checkpointing`)
  metrics.jsonl   one JSON object per logged step (`metrics.MetricWriter`)
  tb/             TensorBoard event files (`metrics.MetricWriter`)
  samples/        the trainer's sample grids, `vdm-jax sample` outputs
  eval/           `vdm-jax eval` results; eval.json: the trainer's final evaluation
  train.lock      the one-trainer lock (`run_lock`): a file on a local disk, a folder of claims
                  in object storage

Writes are whole files and atomic: on a local disk a temporary file in the same folder renamed
over the target; in object storage one upload (an object appears complete or not at all).
`AppendFile` keeps a growing file (metrics, events): appended on a local disk; in object storage,
where objects cannot be appended to, rewritten whole from memory at most every `flush_secs` and
at every `flush()` / `close()`.

Object storage is read without fsspec's listings cache (in the whole process, Orbax's and TFDS's
etils.epath included), so a listing or an existence check sees what another process wrote a
moment ago (GCS and S3 are strongly consistent; the lock and checkpoint discovery rely on it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import io
import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from typing import Any, Iterator

from etils import epath
import fsspec
import numpy as np
from PIL import Image

PathLike = str | os.PathLike
Path = epath.Path

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TB = "tb"
SAMPLES = "samples"
EVAL = "eval"
EVAL_JSON = "eval.json"
LOCK = "train.lock"


class StorageError(OSError):
  """The storage of a run directory (a disk, a bucket) failed while a command used it."""


def is_remote(path: PathLike) -> bool:
  """Whether `path` is a URL of a file system other than the local one (gs://, s3://, ...)."""
  text = os.fspath(path)
  return "://" in text and not text.startswith("file://")


def normalize(path: PathLike) -> str:
  """`path` as the string this module and Orbax use: local paths absolute (`~` expanded),
  URLs as given (without a trailing slash)."""
  text = os.fspath(path)
  if is_remote(text):
    return text.rstrip("/")
  if text.startswith("file://"):
    text = text[len("file://"):]
  return os.path.abspath(os.path.expanduser(text))


def as_path(path: PathLike) -> epath.Path:
  """`path` (normalised) as an `etils.epath.Path`, the path object Orbax takes."""
  return epath.Path(normalize(path))


def join(path: PathLike, *parts: str) -> str:
  """`path` / parts, for local paths and URLs alike."""
  base = normalize(path)
  return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def parent(path: PathLike) -> str:
  base = normalize(path)
  return posixpath.dirname(base) if is_remote(base) else os.path.dirname(base)


def name(path: PathLike) -> str:
  return posixpath.basename(normalize(path))


# Object storage is listed afresh every time, by this module and by every fsspec client of this
# process (etils.epath, hence Orbax and TFDS, included): a cached listing would hide a checkpoint
# or a lock claim that another process wrote a moment ago.
for _protocol in ("gs", "gcs", "s3", "s3a"):
  fsspec.config.conf.setdefault(_protocol, {})["use_listings_cache"] = False


@functools.cache
def _filesystem(protocol: str):
  return fsspec.filesystem(protocol, use_listings_cache=False, skip_instance_cache=True)


def reset_filesystems() -> None:
  """Forgets the object-storage clients made so far (the next access makes new ones, reading
  the environment again: e.g. another STORAGE_EMULATOR_HOST)."""
  _filesystem.cache_clear()


def _fs(path: str):
  """(fsspec file system, path within it) of a URL."""
  protocol = path.split("://", 1)[0]
  try:
    fs = _filesystem(protocol)
  except (ImportError, ValueError) as e:
    raise OSError(f"cannot open {path!r}: no file system for {protocol}:// ({e}); for gs:// "
                  f"install gcsfs, for s3:// s3fs") from e
  return fs, fs._strip_protocol(path)  # pylint: disable=protected-access  # fsspec's own parser


# --- reading ---------------------------------------------------------------------------------


def exists(path: PathLike) -> bool:
  path = normalize(path)
  if not is_remote(path):
    return os.path.exists(path)
  fs, p = _fs(path)
  return fs.exists(p)


def is_dir(path: PathLike) -> bool:
  """A local directory, or a URL prefix holding at least one object."""
  path = normalize(path)
  if not is_remote(path):
    return os.path.isdir(path)
  fs, p = _fs(path)
  return fs.isdir(p)


def list_names(path: PathLike) -> list[str]:
  """The names (not paths) in folder `path`, sorted; [] if there is no such folder."""
  path = normalize(path)
  if not is_remote(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
  fs, p = _fs(path)
  try:
    entries = fs.ls(p, detail=False)
  except FileNotFoundError:
    return []
  return sorted({posixpath.basename(e.rstrip("/")) for e in entries} - {""})


def mtime(path: PathLike) -> float:
  """Modification time of `path` in seconds since the epoch, from the storage's clock (the
  server's, for object storage)."""
  path = normalize(path)
  if not is_remote(path):
    return os.stat(path).st_mtime
  fs, p = _fs(path)
  info = fs.info(p)
  for key in ("mtime", "updated", "LastModified", "last_modified", "modified"):
    value = info.get(key)
    if hasattr(value, "timestamp"):
      return value.timestamp()
    if isinstance(value, (int, float)):
      return float(value)
    if isinstance(value, str):
      import datetime  # pylint: disable=import-outside-toplevel
      return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
  raise OSError(f"the storage of {path!r} reports no modification time ({sorted(info)})")


def read_bytes(path: PathLike) -> bytes:
  path = normalize(path)
  if not is_remote(path):
    with open(path, "rb") as f:
      return f.read()
  fs, p = _fs(path)
  return fs.cat_file(p)


def read_text(path: PathLike) -> str:
  return read_bytes(path).decode("utf-8")


def read_json(path: PathLike) -> Any:
  return json.loads(read_text(path))


def read_array(path: PathLike) -> Any:
  """`np.load` of a .npy / .npz file (no pickles); an .npz is an `NpzFile` over bytes in
  memory."""
  return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)


def read_image(path: PathLike) -> Image.Image:
  """A PIL image read whole into memory (so the file is not kept open)."""
  return image_of_bytes(read_bytes(path))


def image_of_bytes(data: bytes) -> Image.Image:
  """The PIL image a file's bytes hold, decoded whole (PIL's OSError where they hold none)."""
  picture = Image.open(io.BytesIO(data))
  picture.load()
  return picture


# --- writing ---------------------------------------------------------------------------------


def make_dirs(path: PathLike) -> None:
  """Creates folder `path` and its parents on a local disk (object storage has no folders)."""
  path = normalize(path)
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically (see module docstring); creates local parent folders."""
  path = normalize(path)
  if is_remote(path):
    fs, p = _fs(path)
    fs.pipe_file(p, bytes(data))
    return
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text(path: PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, *, indent: int | None = 2) -> None:
  write_text(path, json.dumps(obj, indent=indent))


def png_bytes(pixels: np.ndarray) -> bytes:
  """uint8 pixels [H, W, 1] / [H, W] (grayscale) or [H, W, 3] (RGB) as PNG bytes."""
  pixels = np.asarray(pixels, np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1
                  else pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def npz_bytes(**arrays: Any) -> bytes:
  """`np.savez` of `arrays` as bytes."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def remove(path: PathLike, *, missing_ok: bool = True) -> None:
  """Removes file `path`; FileNotFoundError if it is missing, unless `missing_ok`. (S3 deletes a
  missing object without an error, so there the check is a separate look-up.)"""
  path = normalize(path)
  try:
    if not is_remote(path):
      os.remove(path)
    else:
      fs, p = _fs(path)
      if not missing_ok and not fs.exists(p):
        raise FileNotFoundError(errno.ENOENT, "no such file", path)
      fs.rm_file(p)
  except FileNotFoundError:
    if not missing_ok:
      raise


def remove_tree(path: PathLike) -> None:
  """Removes folder `path` and everything in it (nothing if it does not exist)."""
  path = normalize(path)
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  fs, p = _fs(path)
  with contextlib.suppress(FileNotFoundError):
    fs.rm(p, recursive=True)


def check_writable_folder(path: PathLike, *, what: str) -> str:
  """`path` normalised, if it can become a folder to write `what` into; OSError naming the
  problem otherwise. Local: a folder, or creatable under a writable existing folder. Object
  storage: not a file (permissions show at the first write)."""
  path = normalize(path)
  if is_remote(path):
    fs, p = _fs(path)
    if fs.isfile(p):
      raise OSError(errno.ENOTDIR, f"{path!r} exists and is not a directory (for {what})")
    return path
  if os.path.exists(path) and not os.path.isdir(path):
    raise OSError(errno.ENOTDIR, f"{path!r} exists and is not a directory (for {what})")
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
    raise OSError(errno.EACCES, f"cannot write {what} to {path!r}: {probe!r} is not a writable "
                  f"directory")
  return path


def check_new(path: PathLike, *, folder: bool) -> str:
  """`path` normalised if nothing is there (for a folder: or an empty folder) and it can be
  written; OSError naming the problem otherwise."""
  path = normalize(path)
  if exists(path) and not (folder and is_dir(path) and not list_names(path)):
    raise OSError(errno.EEXIST, f"{path!r} exists")
  if not is_remote(path):
    check_writable_folder(os.path.dirname(path), what=name(path))
  return path


def write_folder(path: PathLike, files: dict[str, bytes]) -> str:
  """Writes `files` ({name: bytes}) as the new folder `path` (absent or empty), all or nothing:
  on a local disk a temporary folder renamed into place; in object storage one object after
  another, those written removed again if one fails."""
  path = normalize(path)
  if is_remote(path):
    written = []
    try:
      for file_name, data in files.items():
        write_bytes(join(path, file_name), data)
        written.append(file_name)
    except BaseException:
      for file_name in written:
        with contextlib.suppress(OSError):
          remove(join(path, file_name))
      raise
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
  try:
    for file_name, data in files.items():
      with open(os.path.join(tmp, file_name), "wb") as f:
        f.write(data)
    if os.path.isdir(path):
      os.rmdir(path)   # empty (the caller checked with check_new)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


class AppendFile:
  """A file that grows by appends: metrics.jsonl, a TensorBoard event file.

  Local: opened for appending; `flush()` hands the appended bytes to the OS. Object storage:
  the content (what was there when opened, then the appends) is kept in memory and uploaded
  whole when `flush(force=False)` finds `flush_secs` passed since the last upload, and at every
  `flush()` / `close()` (an object cannot be appended to; each upload replaces it atomically, so
  a reader always sees a complete prefix of the appends).
  """

  def __init__(self, path: PathLike, *, flush_secs: float = 10.0):
    self.path, self.flush_secs = normalize(path), float(flush_secs)
    self._remote = is_remote(self.path)
    self._file = None
    self._content = bytearray()
    self._dirty, self._uploaded = False, time.monotonic()
    if self._remote:
      if exists(self.path):
        self._content += read_bytes(self.path)
    else:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      self._file = open(self.path, "ab")   # pylint: disable=consider-using-with

  def write(self, data: bytes) -> None:
    if self._remote:
      self._content += data
      self._dirty = True
    elif self._file is None:
      raise ValueError(f"write to the closed {self.path}")
    else:
      self._file.write(data)

  def flush(self, *, force: bool = True) -> None:
    """Local: flushes Python's buffer. Object storage: uploads the content if anything was
    appended since the last upload and (`force` or `flush_secs` passed)."""
    if not self._remote:
      if self._file is not None:
        self._file.flush()
      return
    if self._dirty and (force or time.monotonic() - self._uploaded >= self.flush_secs):
      write_bytes(self.path, bytes(self._content))
      self._dirty, self._uploaded = False, time.monotonic()

  def close(self) -> None:
    """Flushes and closes; idempotent."""
    try:
      self.flush()
    finally:
      f, self._file = self._file, None
      if f is not None:
        f.close()


@contextlib.contextmanager
def local_flock(path: PathLike, *, holder: str) -> Iterator[str | None]:
  """An exclusive, non-blocking `flock` on the local file `path`, held within the context, the
  file holding `holder`. Yields None when taken, or the text of the file (its holder) when
  another process holds it. The kernel releases the lock when the process ends, however it
  ends. OSError if the file cannot be created or flock is not supported there."""
  path = normalize(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a+", encoding="utf-8") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
        raise
      f.seek(0)
      yield f.read().strip() or "holder unknown"
      return
    try:
      f.seek(0)
      f.truncate()
      f.write(holder + "\n")
      f.flush()
      yield None
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def unique_name(prefix: str, suffix: str = "") -> str:
  """A name no other process picks: prefix + a random 128-bit hex + suffix."""
  return f"{prefix}{uuid.uuid4().hex}{suffix}"
