"""Integer models in a run directory: RUN/portable/<first 12 hex digits of SHA-256>.vdmq.

The portable coder's reads and writes of a run directory, through `rundir` (a local disk or a
bucket; writes atomic). A model's file name is its digest's prefix, the 6 bytes a compressed
file's header stores; its JSON index says which checkpoint step and parameters it was quantised
from (`portable.IntModel.meta`), which is how `compress` finds the one of the current checkpoint.
"""

from __future__ import annotations

from vdm_jax.storage import rundir

SUBDIR = "portable"
SUFFIX = ".vdmq"
NAME_HEX = 12     # the header's 6-byte digest


def model_path(workdir: str, digest_hex: str) -> str:
  """Where the integer model of this digest lives in the run directory."""
  return rundir.join(workdir, SUBDIR, f"{digest_hex[:NAME_HEX]}{SUFFIX}")


def read_model(workdir: str, digest_hex: str) -> bytes | None:
  """The bytes of the integer model whose digest starts with `digest_hex`, or None."""
  path = model_path(workdir, digest_hex)
  return rundir.read_bytes(path) if rundir.exists(path) else None


def write_model(workdir: str, digest_hex: str, data: bytes) -> str:
  """Stores an integer model under its digest (atomically); returns its path."""
  path = model_path(workdir, digest_hex)
  rundir.write_bytes(path, data)
  return path


def list_models(workdir: str) -> list[bytes]:
  """The bytes of every integer model stored in the run directory (few, small)."""
  folder = rundir.join(workdir, SUBDIR)
  return [rundir.read_bytes(rundir.join(folder, name))
          for name in rundir.list_names(folder) if name.endswith(SUFFIX)]
