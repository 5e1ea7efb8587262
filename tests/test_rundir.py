"""vdm_jax.storage.rundir, the package's only file-system module: the same behaviour on a local disk
and
in a GCS bucket (the emulator on loopback), and nothing else in the package touching files."""

import ast
import json
import os
import pathlib
import time

import numpy as np
import pytest

from vdm_jax.storage import rundir

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vdm_jax"


@pytest.fixture(params=["local", "gs"])
def where(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "run")
  return request.getfixturevalue("gs_dir")


def test_whole_file_writes_read_back_and_list(where):
  assert not rundir.exists(where) and rundir.list_names(where) == []
  rundir.write_json(rundir.join(where, "a.json"), {"x": [1, 2]})
  rundir.write_bytes(rundir.join(where, "sub", "b.bin"), b"\x00\x01")
  rundir.write_text(rundir.join(where, "a.json"), json.dumps({"x": 3}))   # replaced whole
  assert rundir.read_json(rundir.join(where, "a.json")) == {"x": 3}
  assert rundir.read_bytes(rundir.join(where, "sub", "b.bin")) == b"\x00\x01"
  assert rundir.list_names(where) == ["a.json", "sub"]
  assert rundir.is_dir(rundir.join(where, "sub")) and not rundir.is_dir(rundir.join(where, "a.json"))
  assert abs(rundir.mtime(rundir.join(where, "a.json")) - time.time()) < 120
  rundir.remove(rundir.join(where, "a.json"))
  rundir.remove(rundir.join(where, "a.json"))   # missing_ok
  with pytest.raises(FileNotFoundError):
    rundir.remove(rundir.join(where, "a.json"), missing_ok=False)
  rundir.remove_tree(where)
  assert rundir.list_names(where) == [] and not rundir.exists(rundir.join(where, "sub", "b.bin"))


def test_arrays_and_images_round_trip(where):
  images = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
  rundir.write_bytes(rundir.join(where, "x.npz"), rundir.npz_bytes(images=images))
  rundir.write_bytes(rundir.join(where, "x.png"), rundir.png_bytes(images[0]))
  with rundir.read_array(rundir.join(where, "x.npz")) as loaded:
    np.testing.assert_array_equal(loaded["images"], images)
  with rundir.read_image(rundir.join(where, "x.png")) as picture:
    np.testing.assert_array_equal(np.asarray(picture), images[0])


def test_append_file_keeps_every_append_across_reopening(where):
  path = rundir.join(where, "log.jsonl")
  log = rundir.AppendFile(path, flush_secs=3600)
  log.write(b"1\n")
  log.flush(force=False)
  if rundir.is_remote(path):   # not uploaded before flush_secs, unless forced
    assert not rundir.exists(path)
  log.write(b"2\n")
  log.close()
  assert rundir.read_bytes(path) == b"1\n2\n"
  again = rundir.AppendFile(path, flush_secs=0)
  again.write(b"3\n")
  again.flush(force=False)   # flush_secs 0: uploaded at once
  assert rundir.read_bytes(path) == b"1\n2\n3\n"
  again.close()


def test_write_folder_is_all_or_nothing(where, monkeypatch):
  out = rundir.join(where, "out")
  rundir.write_folder(out, {"a.png": b"a", "b.npz": b"b"})
  assert rundir.list_names(out) == ["a.png", "b.npz"]
  with pytest.raises(FileExistsError):
    rundir.check_new(out, folder=True)

  def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")

  if rundir.is_remote(where):   # the second object's upload fails: the first is removed again
    real, calls = rundir.write_bytes, []
    monkeypatch.setattr(rundir, "write_bytes", lambda path, data: (
        calls.append(path), no_space() if len(calls) == 2 else real(path, data)))
  else:   # the rename of the complete temporary folder fails: it is removed
    monkeypatch.setattr(rundir.os, "replace", no_space)
  with pytest.raises(OSError, match="No space"):
    rundir.write_folder(rundir.join(where, "other"), {"a.png": b"a", "b.npz": b"b"})
  monkeypatch.undo()
  assert rundir.list_names(where) == ["out"]


def test_paths_and_new_outputs(tmp_path, gs_dir):
  assert rundir.normalize("~/x") == os.path.expanduser("~/x")
  assert rundir.normalize("file:///tmp/a/") == "/tmp/a"
  assert rundir.normalize(gs_dir + "/") == gs_dir and rundir.is_remote(gs_dir)
  assert rundir.join(gs_dir, "a", "b") == gs_dir + "/a/b"
  assert rundir.parent(gs_dir + "/a") == gs_dir and rundir.name(gs_dir + "/a") == "a"
  taken = tmp_path / "taken"
  taken.write_text("x")
  with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
    rundir.check_writable_folder(str(taken), what="samples")
  with pytest.raises(PermissionError, match="not a writable directory"):
    rundir.check_writable_folder(str(taken / "x"), what="samples")
  assert rundir.check_new(str(tmp_path / "new" / "f.vdmz"), folder=False).endswith("f.vdmz")
  rundir.write_text(gs_dir + "/f", "x")
  with pytest.raises(NotADirectoryError):
    rundir.check_writable_folder(gs_dir + "/f", what="samples")


# Calls that touch the file system; only rundir may make them.
_FORBIDDEN_CALLS = {"open", "os.makedirs", "os.replace", "os.rename", "os.remove", "os.unlink",
                    "os.listdir", "os.scandir", "os.rmdir", "os.mkdir", "os.path.exists",
                    "os.path.isdir", "os.path.isfile", "os.stat", "os.access", "os.fdopen",
                    "np.save", "np.savez", "np.load", "Image.open"}
_FORBIDDEN_MODULES = {"shutil", "glob", "tempfile", "fcntl", "pathlib", "fsspec", "gcsfs",
                      "etils.epath", "etils"}


def _dotted(node: ast.AST) -> str:
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    return f"{_dotted(node.value)}.{node.attr}"
  return ""


def test_only_rundir_touches_the_file_system():
  """Every module but rundir reads and writes through rundir (Orbax and TFDS are handed paths):
  no open(), os file functions, shutil, glob, tempfile, pathlib, fsspec or epath elsewhere."""
  offenders = []
  for path in sorted(PACKAGE.rglob("*.py")):
    if path.relative_to(PACKAGE).as_posix() in ("storage/rundir.py",):
      continue
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.Call) and _dotted(node.func) in _FORBIDDEN_CALLS:
        offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {_dotted(node.func)}()")
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      offenders += [f"{path.relative_to(PACKAGE)}:{node.lineno}: import {n}" for n in names
                    if n in _FORBIDDEN_MODULES or n.split(".")[0] in {"shutil", "glob",
                                                                      "tempfile", "fcntl"}]
  assert not offenders, "\n".join(offenders)
