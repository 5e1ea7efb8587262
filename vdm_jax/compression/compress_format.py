"""The file format of `vdm-jax compress`: a small header, the ANS payload, a checksum::

  size     field
  4        magic b"VDMZ"
  1        format version (5)
  1        the coder (an index into `CODERS`): "float" (the float network, bound to the machine
           that wrote the file), "portable" (the integer network: decodes on any machine) or
           "stored" (the images stored raw, log2 K bits each: the model's code was longer)
  14       digests: model config (2 bytes), parameters (6; "portable": the integer model's
           SHA-256, which names its file), environment (2: float, jax / jaxlib / backend /
           constriction; portable, constriction and the integer format), the network's outputs
           on a fixed probe (4) (`DIGEST_SIZES`)
  varints  checkpoint step, T, grid_bits, window, max_batch, K, H, W, C, image type (an index
           into `DTYPES`), N, rho, seed words, seed words not stored, payload words n, the
           head (how many of the N images are coded directly: `compress_head`) (unsigned
           LEB128: 7 bits a byte)
  varints  P, the number of photographs (0: the N images are the images themselves, each of the
           model's shape); then for each photograph its height, width and the length of its
           name, then the name (UTF-8, a file name without folders): the images are the
           photographs' tiles, in order (`compress_tiles`; the decoder cuts the padding off)
  2        the low 16 bits of the CRC-32 of the header so far
  4 n      payload: n uint32 words, little endian
  4        the first 4 bytes of SHA-256 of everything before

Version 5 added the head and batches whose sizes are powers of two
(`compress_stream.schedule`); version 4 files (no head field: no head; batches padded to powers
of two) are read as well. Version 4 added the photographs (P and their sizes and names). Files
of versions 2 (no coder byte) and 3 (no photographs) are refused with an error that names their
version.

The header fingerprints the model (its config, the checkpoint step, its parameters) and the
numerics that coding depends on (the software environment; the compiled network's outputs on a
fixed probe input), and stores the coder settings, the image shape and type, and the batch
schedule. `unpack` tells apart, with a `CompressedFileError` naming which: another format, a
truncated file, a damaged header or payload; `check_model` another model or another numeric
environment. The header and checksum take 50 bytes for the 297 digits test images (400 bits:
0.021 bits per dimension). A digest this short can collide (2^-16 for the config and environment
digests); they serve to name what differs, the 6-byte parameter and 4-byte probe digests and the
check that decoding ends in the seed it started from guard the images.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import NamedTuple

import numpy as np

from vdm_jax.compression import compress_tiles

MAGIC = b"VDMZ"
VERSION = 5
READS = (4, 5)
OLD = {2: "before the portable coder", 3: "before whole photographs"}   # versions not read
CODERS = ("float", "portable", "stored")
DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "uint64")
DIGEST_SIZES = {"config": 2, "params": 6, "environment": 2, "probe": 4}
TRAILER_BYTES = 4
_DIGESTS = sum(DIGEST_SIZES.values())
_NUMBERS = {4: 15, 5: 16}    # the varint fields of each version read


class CompressedFileError(ValueError):
  """A compressed file that cannot be decoded here; `kind` says why: "format" (not a vdm-jax
  compressed file, or another format version), "truncated", "corrupted", "model" (made with
  another model), "environment" (made in another numeric environment), "missing" (its integer
  model is not in the run directory) or "stream" (the payload does not decode consistently)."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


class Picture(NamedTuple):
  """A photograph of a file: its file name and size in pixels (its tiles are in the payload)."""

  name: str
  height: int
  width: int


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
  pictures: tuple[Picture, ...] = ()
  head: int = 0
  version: int = VERSION


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


def _numbers(h: Header, version: int) -> list[int]:
  numbers = [h.step, h.num_steps, h.grid_bits, h.window, h.max_batch, h.vocab_size, *h.shape,
             DTYPES.index(h.dtype), h.num_images, h.rho, h.seed_words, h.seed_dropped,
             h.payload_words, h.head]
  if version == 4 and h.head:
    raise ValueError(f"format version 4 has no head; the header has a head of {h.head}")
  return numbers[:_NUMBERS[version]]


def check_picture_name(name: str) -> str:
  """`name` if it can be a photograph's name in a file: a file name (no folder), not "." or
  "..", no control characters, at most 255 bytes in UTF-8; else ValueError."""
  if (not name or name in (".", "..") or any(c in name for c in "/\\") or
      any(ord(c) < 32 or ord(c) == 127 for c in name) or len(name.encode("utf-8")) > 255):
    raise ValueError(f"{name!r} cannot be the file name of a decompressed photograph")
  return name


def _pack_pictures(header: Header) -> bytes:
  if header.pictures:
    tiles = sum(compress_tiles.tile_count(p.height, p.width, patch=header.shape[:2])
                for p in header.pictures)
    if tiles != header.num_images:
      raise ValueError(f"the photographs make {tiles} tiles; the header says {header.num_images}")
    if len({p.name for p in header.pictures}) != len(header.pictures):
      raise ValueError("two photographs have the same name")
  out = [_varint(len(header.pictures))]
  for p in header.pictures:
    name = check_picture_name(p.name).encode("utf-8")
    out += [_varint(p.height), _varint(p.width), _varint(len(name)), name]
  return b"".join(out)


def _read_pictures(data: bytes, offset: int, *, shape: tuple[int, ...], num_images: int,
                   name: str) -> tuple[tuple[Picture, ...], int] | None:
  """The photographs' entries from data[offset:] and the offset after them; None if the data
  end inside them. Raises CompressedFileError ("corrupted") for impossible entries (read before
  the header's checksum is checked: a damaged count must not run past the end)."""
  parsed = _read_varints(data, offset, 1)
  if parsed is None:
    return None
  (count,), offset = parsed
  pictures, tiles = [], 0
  if count and min(shape[:2]) < 1:
    raise CompressedFileError("corrupted", f"{name} is corrupted: photographs of images of "
                              f"shape {shape}")
  for _ in range(count):
    parsed = _read_varints(data, offset, 3)
    if parsed is None:
      return None
    (height, width, size), offset = parsed
    if offset + size > len(data):
      return None
    try:
      picture_name = check_picture_name(data[offset:offset + size].decode("utf-8"))
    except ValueError:
      picture_name = None
    offset += size
    if picture_name is None or height < shape[0] or width < shape[1] or tiles > num_images:
      raise CompressedFileError("corrupted", f"{name} is corrupted: an impossible photograph "
                                f"entry in its header")
    tiles += compress_tiles.tile_count(height, width, patch=shape[:2])
    pictures.append(Picture(picture_name, height, width))
  if count and (tiles != num_images or len({p.name for p in pictures}) != count):
    raise CompressedFileError("corrupted", f"{name} is corrupted: its photographs make {tiles} "
                              f"tiles, its header says {num_images} images")
  return tuple(pictures), offset


def pack(header: Header, payload: np.ndarray) -> bytes:
  """The file's bytes for `header` and the payload words (uint32), in the header's format
  version (one of `READS`; an older one only to test that it is still read)."""
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
  version = header.version
  if version not in READS:
    raise ValueError(f"format version {version} is not one of {READS}")
  if header.head > header.num_images:
    raise ValueError(f"a head of {header.head} images in a file of {header.num_images}")
  head = (MAGIC + bytes([version, CODERS.index(header.coder)]) + b"".join(digests)
          + b"".join(_varint(v) for v in _numbers(header, version)) + _pack_pictures(header))
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
    version = data[len(MAGIC)]
    when = f" (written by vdm-jax {OLD[version]})" if version in OLD else ""
    raise CompressedFileError("format", f"{name} is a vdm-jax compressed file of format "
                              f"version {version}{when}; this vdm-jax reads version "
                              f"{', '.join(map(str, READS))}: decompress it with the vdm-jax "
                              f"release that wrote it")
  at = len(MAGIC) + 2       # the digests start here
  fixed = at + _DIGESTS
  version = data[len(MAGIC)] if len(data) > len(MAGIC) else VERSION
  parsed = _read_varints(data, fixed, _NUMBERS[version]) if len(data) >= fixed else None
  if parsed is not None:
    numbers = parsed[0]
    parsed = _read_pictures(data, parsed[1], shape=tuple(numbers[6:9]),
                            num_images=numbers[10], name=name)
  if parsed is None or parsed[1] + 2 > len(data):
    raise CompressedFileError("truncated", f"{name} is truncated: {len(data)} bytes end inside "
                              f"its header")
  pictures, end = parsed
  if int.from_bytes(data[end:end + 2], "little") != zlib.crc32(data[:end]) & 0xFFFF:
    raise CompressedFileError("corrupted", f"{name} is corrupted: its header fails its checksum")
  numbers += [0] * (_NUMBERS[VERSION] - len(numbers))     # version 4: no head
  if numbers[9] >= len(DTYPES) or numbers[15] > numbers[10]:
    raise CompressedFileError("corrupted", f"{name} is corrupted: unknown image type "
                              f"{numbers[9]} or a head of {numbers[15]} of {numbers[10]} "
                              f"images")
  coder = data[len(MAGIC) + 1]
  if coder >= len(CODERS):
    raise CompressedFileError("corrupted", f"{name} is corrupted: unknown coder {coder}")
  digests = []
  for size in DIGEST_SIZES.values():
    digests.append(bytes(data[at:at + size]))
    at += size
  header = Header(digests[0], numbers[0], digests[1], digests[2], digests[3], *numbers[1:5],
                  numbers[5], tuple(numbers[6:9]), DTYPES[numbers[9]], *numbers[10:15],
                  coder=CODERS[coder], pictures=pictures, head=numbers[15], version=version)
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
