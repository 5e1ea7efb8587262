"""The file format of `vdm-jax compress`: a small header, the ANS payload, a checksum::

  size     field
  4        magic b"VDMZ"
  1        format version (3)
  1        the coder (an index into `CODERS`): "float" (the float network, bound to the machine
           that wrote the file), "portable" (the integer network: decodes on any machine) or
           "stored" (the images stored raw, log2 K bits each: the model's code was longer)
  14       digests: model config (2 bytes), parameters (6; "portable": the integer model's
           SHA-256, which names its file), environment (2: float, jax / jaxlib / backend /
           constriction; portable, constriction and the integer format), the network's outputs
           on a fixed probe (4) (`DIGEST_SIZES`)
  varints  checkpoint step, T, grid_bits, window, max_batch, K, H, W, C, image type (an index
           into `DTYPES`), N, rho, seed words, seed words not stored, payload words n
           (unsigned LEB128: 7 bits a byte)
  2        the low 16 bits of the CRC-32 of the header so far
  4 n      payload: n uint32 words, little endian
  4        the first 4 bytes of SHA-256 of everything before

Version 2 files (no coder byte, always "float") are still read.

The header fingerprints the model (its config, the checkpoint step, its parameters) and the
numerics that coding depends on (the software environment; the compiled network's outputs on a
fixed probe input), and stores the coder settings, the image shape and type, and the batch
schedule. `unpack` tells apart, with a `CompressedFileError` naming which: another format, a
truncated file, a damaged header or payload; `check_model` another model or another numeric
environment. The header and checksum take 48 bytes for the 297 digits test images (384 bits:
0.020 bits per dimension). A digest this short can collide (2^-16 for the config and environment
digests); they serve to name what differs, the 6-byte parameter and 4-byte probe digests and the
check that decoding ends in the seed it started from guard the images.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import NamedTuple

import numpy as np

MAGIC = b"VDMZ"
VERSION = 3
READS = (2, 3)
CODERS = ("float", "portable", "stored")
DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "uint64")
DIGEST_SIZES = {"config": 2, "params": 6, "environment": 2, "probe": 4}
TRAILER_BYTES = 4
_DIGESTS = sum(DIGEST_SIZES.values())
_NUMBERS = 15    # the varint fields


class CompressedFileError(ValueError):
  """A compressed file that cannot be decoded here; `kind` says why: "format" (not a vdm-jax
  compressed file, or another format version), "truncated", "corrupted", "model" (made with
  another model), "environment" (made in another numeric environment), "missing" (its integer
  model is not in the run directory) or "stream" (the payload does not decode consistently)."""

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
  coder: str = "float"


def digest(*parts: bytes, size: int = 8) -> bytes:
  """The first `size` bytes of SHA-256 of the concatenated parts."""
  h = hashlib.sha256()
  for part in parts:
    h.update(part)
  return h.digest()[:size]


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    byte, value = value & 0x7F, value >> 7
    out.append(byte | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _read_varints(data: bytes, offset: int, count: int) -> tuple[list[int], int] | None:
  """`count` varints from data[offset:], and the offset after them; None if the data ends."""
  values = []
  for _ in range(count):
    value, shift = 0, 0
    while True:
      if offset >= len(data) or shift > 63:
        return None
      byte = data[offset]
      offset += 1
      value |= (byte & 0x7F) << shift
      shift += 7
      if not byte & 0x80:
        break
    values.append(value)
  return values, offset


def _numbers(h: Header) -> list[int]:
  return [h.step, h.num_steps, h.grid_bits, h.window, h.max_batch, h.vocab_size, *h.shape,
          DTYPES.index(h.dtype), h.num_images, h.rho, h.seed_words, h.seed_dropped,
          h.payload_words]


def pack(header: Header, payload: np.ndarray) -> bytes:
  """The file's bytes for `header` and the payload words (uint32)."""
  payload = np.asarray(payload, np.uint32)
  if header.payload_words != len(payload):
    raise ValueError(f"header says {header.payload_words} payload words, got {len(payload)}")
  digests = (header.config_digest, header.params_digest, header.environment_digest,
             header.probe_digest)
  for (name, size), value in zip(DIGEST_SIZES.items(), digests):
    if len(value) != size:
      raise ValueError(f"the {name} digest has {len(value)} bytes; expected {size}")
  if header.coder not in CODERS:
    raise ValueError(f"coder {header.coder!r} is not one of {CODERS}")
  head = (MAGIC + bytes([VERSION, CODERS.index(header.coder)]) + b"".join(digests)
          + b"".join(_varint(v) for v in _numbers(header)))
  body = (head + (zlib.crc32(head) & 0xFFFF).to_bytes(2, "little")
          + payload.astype("<u4").tobytes())
  return body + digest(body, size=TRAILER_BYTES)


def unpack(data: bytes, *, name: str = "the file") -> tuple[Header, np.ndarray]:
  """(header, payload words) of a file's bytes.

  Raises:
    CompressedFileError: kind "format", "truncated" or "corrupted", naming `name`.
  """
  if not data:
    raise CompressedFileError("format", f"{name} is empty, not a vdm-jax compressed file")
  if data[:len(MAGIC)] != MAGIC:
    if len(data) < len(MAGIC) and MAGIC.startswith(data):
      raise CompressedFileError("truncated", f"{name} is truncated: {len(data)} bytes, not even "
                                f"the {len(MAGIC)}-byte signature of a vdm-jax compressed file")
    raise CompressedFileError("format", f"{name} is not a vdm-jax compressed file (it does not "
                              f"start with {MAGIC!r}; it starts with {data[:8]!r})")
  if len(data) > len(MAGIC) and data[len(MAGIC)] not in READS:
    raise CompressedFileError("format", f"{name} is a vdm-jax compressed file of format "
                              f"version {data[len(MAGIC)]}; this vdm-jax reads versions "
                              f"{', '.join(map(str, READS))}")
  version = data[len(MAGIC)] if len(data) > len(MAGIC) else VERSION
  at = len(MAGIC) + 1 + (version >= 3)       # the digests start here
  fixed = at + _DIGESTS
  parsed = _read_varints(data, fixed, _NUMBERS) if len(data) >= fixed else None
  if parsed is None or parsed[1] + 2 > len(data):
    raise CompressedFileError("truncated", f"{name} is truncated: {len(data)} bytes end inside "
                              f"its header")
  numbers, end = parsed
  if int.from_bytes(data[end:end + 2], "little") != zlib.crc32(data[:end]) & 0xFFFF:
    raise CompressedFileError("corrupted", f"{name} is corrupted: its header fails its checksum")
  if numbers[9] >= len(DTYPES):
    raise CompressedFileError("corrupted", f"{name} is corrupted: unknown image type "
                              f"{numbers[9]}")
  coder = "float" if version < 3 else data[len(MAGIC) + 1]
  if coder != "float" and coder >= len(CODERS):
    raise CompressedFileError("corrupted", f"{name} is corrupted: unknown coder {coder}")
  digests = []
  for size in DIGEST_SIZES.values():
    digests.append(bytes(data[at:at + size]))
    at += size
  header = Header(digests[0], numbers[0], digests[1], digests[2], digests[3], *numbers[1:5],
                  numbers[5], tuple(numbers[6:9]), DTYPES[numbers[9]], *numbers[10:],
                  coder=coder if coder == "float" else CODERS[coder])
  expected = end + 2 + 4 * header.payload_words + TRAILER_BYTES
  if len(data) < expected:
    raise CompressedFileError("truncated", f"{name} is truncated: {len(data)} bytes of the "
                              f"{expected} its header announces")
  if len(data) > expected:
    raise CompressedFileError("corrupted", f"{name} is corrupted: {len(data) - expected} bytes "
                              f"follow the end its header announces ({expected} bytes)")
  if digest(data[:-TRAILER_BYTES], size=TRAILER_BYTES) != data[-TRAILER_BYTES:]:
    raise CompressedFileError("corrupted", f"{name} is corrupted: its payload fails its "
                              f"checksum (SHA-256)")
  payload = np.frombuffer(data, "<u4", header.payload_words, end + 2).astype(np.uint32)
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
