"""The file format of `vdm-jax compress`: a small binary header, the ANS payload, a checksum.

  offset  size  field
  0       4     magic b"VDMZ"
  4       1     format version (1)
  5       65    header fields (`Header`, little endian: struct `_FIELDS`)
  70      4     CRC-32 of bytes 0..69 (the header)
  74      4 n   payload: n uint32 words, little endian (n = Header.payload_words)
  74+4n   8     the first 8 bytes of SHA-256 of everything before

The header fingerprints the model (a digest of the run's model config, the checkpoint step, a
digest of the parameters) and the numerics that coding depends on (a digest of the software
environment, and a digest of the network's outputs on a fixed probe input with the compiled
functions the coder uses), and stores the coder settings, the image shape and type, and the
batch schedule's parameters. `read_file` tells apart, with a `CompressedFileError` naming which:
another format, a truncated file, a damaged header or payload; `check_model` another model or
another numeric environment. With its checksums the header takes 82 bytes (656 bits: 0.035 bits
per dimension for the 297 digits test images).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import NamedTuple

import numpy as np

MAGIC = b"VDMZ"
VERSION = 1
DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "uint64")
# config digest (4 s), step, params digest (8 s), environment digest (4 s), probe digest (8 s),
# T, grid_bits, window, max_batch, K, H, W, C, dtype, N, rho, seed words, dropped, payload words
_FIELDS = struct.Struct("<4sI8s4s8sIBBHHHHHBIIIII")
_PREFIX = len(MAGIC) + 1
HEADER_BYTES = _PREFIX + _FIELDS.size + 4
TRAILER_BYTES = 8


class CompressedFileError(ValueError):
  """A compressed file that cannot be decoded here; `kind` says why: "format" (not a vdm-jax
  compressed file, or another format version), "truncated", "corrupted", "model" (made with
  another model), "environment" (made in another numeric environment) or "stream" (the payload
  does not decode consistently)."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


class Header(NamedTuple):
  """The header fields (see the module docstring); digests are bytes."""

  config_digest: bytes
  step: int
  params_digest: bytes
  environment_digest: bytes
  probe_digest: bytes
  num_steps: int
  grid_bits: int
  window: int
  max_batch: int
  vocab_size: int
  shape: tuple[int, int, int]
  dtype: str
  num_images: int
  rho: int
  seed_words: int
  seed_dropped: int
  payload_words: int


def digest(*parts: bytes, size: int = 8) -> bytes:
  """The first `size` bytes of SHA-256 of the concatenated parts."""
  h = hashlib.sha256()
  for part in parts:
    h.update(part)
  return h.digest()[:size]


def pack(header: Header, payload: np.ndarray) -> bytes:
  """The file's bytes for `header` and the payload words (uint32)."""
  payload = np.asarray(payload, np.uint32)
  if header.payload_words != len(payload):
    raise ValueError(f"header says {header.payload_words} payload words, got {len(payload)}")
  fields = _FIELDS.pack(
      header.config_digest, header.step, header.params_digest, header.environment_digest,
      header.probe_digest, header.num_steps, header.grid_bits, header.window, header.max_batch,
      header.vocab_size, *header.shape, DTYPES.index(header.dtype), header.num_images,
      header.rho, header.seed_words, header.seed_dropped, header.payload_words)
  head = MAGIC + bytes([VERSION]) + fields
  body = head + struct.pack("<I", zlib.crc32(head)) + payload.astype("<u4").tobytes()
  return body + digest(body)


def unpack(data: bytes, *, name: str = "the file") -> tuple[Header, np.ndarray]:
  """(header, payload words) of a file's bytes.

  Raises:
    CompressedFileError: kind "format", "truncated" or "corrupted", naming `name`.
  """
  if data[:len(MAGIC)] != MAGIC[:len(data)] or len(data) < len(MAGIC):
    if len(data) < len(MAGIC) and MAGIC.startswith(data):
      raise CompressedFileError("truncated", f"{name} is truncated: {len(data)} bytes, not even "
                                f"the {len(MAGIC)}-byte signature of a vdm-jax compressed file")
    raise CompressedFileError("format", f"{name} is not a vdm-jax compressed file (it does not "
                              f"start with {MAGIC!r}; it starts with {data[:8]!r})")
  if len(data) > len(MAGIC) and data[len(MAGIC)] != VERSION:
    raise CompressedFileError("format", f"{name} is a vdm-jax compressed file of format "
                              f"version {data[len(MAGIC)]}; this vdm-jax reads version {VERSION}")
  if len(data) < HEADER_BYTES:
    raise CompressedFileError("truncated", f"{name} is truncated: {len(data)} bytes, shorter "
                              f"than the {HEADER_BYTES}-byte header")
  (crc,) = struct.unpack("<I", data[HEADER_BYTES - 4:HEADER_BYTES])
  if zlib.crc32(data[:HEADER_BYTES - 4]) != crc:
    raise CompressedFileError("corrupted", f"{name} is corrupted: its header fails its checksum")
  f = _FIELDS.unpack(data[_PREFIX:HEADER_BYTES - 4])
  if f[13] >= len(DTYPES):
    raise CompressedFileError("corrupted", f"{name} is corrupted: unknown image type {f[13]}")
  header = Header(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], (f[10], f[11], f[12]),
                  DTYPES[f[13]], f[14], f[15], f[16], f[17], f[18])
  expected = HEADER_BYTES + 4 * header.payload_words + TRAILER_BYTES
  if len(data) < expected:
    raise CompressedFileError("truncated", f"{name} is truncated: {len(data)} bytes of the "
                              f"{expected} its header announces")
  if len(data) > expected:
    raise CompressedFileError("corrupted", f"{name} is corrupted: {len(data) - expected} bytes "
                              f"follow the end its header announces ({expected} bytes)")
  if digest(data[:-TRAILER_BYTES]) != data[-TRAILER_BYTES:]:
    raise CompressedFileError("corrupted", f"{name} is corrupted: its payload fails its "
                              f"checksum (SHA-256)")
  payload = np.frombuffer(data, "<u4", header.payload_words, HEADER_BYTES).astype(np.uint32)
  return header, payload


def check_model(header: Header, expected: Header, *, name: str = "the file") -> None:
  """Raises CompressedFileError (kind "model" or "environment") naming each fingerprint field of
  `header` that differs from `expected` (the decoder's own)."""
  model = [what for what, a, b in (
      ("model config", header.config_digest, expected.config_digest),
      ("checkpoint step", header.step, expected.step),
      ("parameters", header.params_digest, expected.params_digest)) if a != b]
  if model:
    step = (f" (file: step {header.step}, this run: step {expected.step})"
            if header.step != expected.step else "")
    raise CompressedFileError("model", f"{name} was compressed with another model: the "
                              f"{', '.join(model)} differ{'s' if len(model) == 1 else ''}{step}; "
                              f"decompress with the run and --checkpoint it was made with")
  if header.environment_digest != expected.environment_digest:
    raise CompressedFileError("environment", f"{name} was compressed in another software "
                              f"environment (jax / jaxlib / backend / constriction versions "
                              f"differ): bits-back decoding needs the encoder's exact float "
                              f"arithmetic; decompress where it was compressed")
  if header.probe_digest != expected.probe_digest:
    raise CompressedFileError("environment", f"{name} was compressed where the network computes "
                              f"other float bits (another CPU / device type, or other XLA "
                              f"options): bits-back decoding needs the encoder's exact float "
                              f"arithmetic; decompress where it was compressed")
