"""Integer models in a run directory: RUN/portable/<first 12 hex digits of SHA-256>.vdmq.

The only reads and writes of the portable coder (paths through `etils.epath`, so a run directory
may be a bucket). A model's file name is its digest's prefix, the 6 bytes a compressed file's
header stores; its JSON index says which checkpoint step and parameters it was quantised from
(`portable.IntModel.meta`), which is how `compress` finds the one of the current checkpoint.
"""

from __future__ import annotations

from etils import epath

SUBDIR = "portable"
SUFFIX = ".vdmq"
NAME_HEX = 12     # the header's 6-byte digest


def model_path(workdir: str, digest_hex: str) -> epath.Path:
  """Where the integer model of this digest lives in the run directory."""
  return epath.Path(workdir) / SUBDIR / f"{digest_hex[:NAME_HEX]}{SUFFIX}"


def read_model(workdir: str, digest_hex: str) -> bytes | None:
  """The bytes of the integer model whose digest starts with `digest_hex`, or None."""
  path = model_path(workdir, digest_hex)
  return path.read_bytes() if path.exists() else None


def write_model(workdir: str, digest_hex: str, data: bytes) -> epath.Path:
  """Stores an integer model under its digest (written to a temporary name, then renamed)."""
  path = model_path(workdir, digest_hex)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_bytes(data)
  tmp.rename(path)
  return path


def list_models(workdir: str) -> list[bytes]:
  """The bytes of every integer model stored in the run directory (few, small)."""
  folder = epath.Path(workdir) / SUBDIR
  if not folder.exists():
    return []
  return [p.read_bytes() for p in sorted(folder.glob(f"*{SUFFIX}"))]
