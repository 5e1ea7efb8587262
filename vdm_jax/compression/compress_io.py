"""The images `vdm-jax compress` reads and `vdm-jax decompress` writes, as integer levels.

- `read_source`: a split of the run's data set ("test"), a .npy / .npz of integer images (both
  of the run's shape), one PNG photograph or a folder of them (any height and width of at least
  one patch: their tiles, `compress_tiles`), checked against the run's shape and levels;
  `read_images`: the images of the first two kinds;
- `read_png`: one PNG's levels, refusing what the model cannot code exactly (palette, 16-bit,
  alpha or transparency, the wrong number of channels, a file that is not a PNG);
- `png_levels` / `level_pixels`: PNG pixels hold the K levels spread over 0..255,
  v = round(k * 255 / (K - 1)) (v = k for K = 256); a PNG off that scale is refused.

Every file is read through `rundir` (a local disk or a bucket); a bad input is a ValueError
naming it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from vdm_jax.compression import compress_format, compress_tiles
from vdm_jax.datasets import data
from vdm_jax.storage import rundir

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPES = {0: "greyscale", 2: "RGB", 3: "palette", 4: "greyscale with alpha",
                 6: "RGB with alpha"}


class Source(NamedTuple):
  """What `read_source` read.

  Attributes:
    images: the integer images to code [N, h, w, C] (the model's shape): the input's own
      images, or the photographs' tiles in order.
    pictures: the photographs (name, height, width) whose tiles `images` are; () where the
      images are the input's own.
    dims: the input's dimensions (sum of H W C over the photographs; N h w C otherwise).
  """

  images: np.ndarray
  pictures: tuple[compress_format.Picture, ...]
  dims: int


def png_levels(pixels: np.ndarray, vocab_size: int, *, name: str) -> np.ndarray:
  """PNG values 0..255 -> levels k (exact inverse of `level_pixels`; ValueError off scale)."""
  if vocab_size == 256:
    return pixels
  k = np.rint(pixels.astype(np.float64) * (vocab_size - 1) / 255.0).astype(np.int64)
  off = level_pixels(k, vocab_size) != pixels
  if off.any():
    raise ValueError(f"{name}: pixel value {pixels[off][0]} is not one of the {vocab_size} levels "
                     f"spread over 0..255 (round(k * 255 / {vocab_size - 1})) that PNGs hold")
  return k.astype(np.uint8)


def level_pixels(k: np.ndarray, vocab_size: int) -> np.ndarray:
  """Levels k in [0, K) -> PNG values round(k * 255 / (K - 1)) (k itself for K = 256)."""
  if vocab_size == 256:
    return np.asarray(k, np.uint8)
  return np.rint(np.asarray(k, np.float64) * 255.0 / (vocab_size - 1)).astype(np.uint8)


def _read_array(path: str) -> np.ndarray:
  try:
    loaded = rundir.read_array(path)
  except (OSError, ValueError) as e:
    raise ValueError(f"--input {path!r} cannot be read as a NumPy file ({e})") from e
  if isinstance(loaded, np.ndarray):
    return loaded
  with loaded:
    keys = list(loaded.keys())
    key = next((k for k in ("images", "image", "samples") if k in keys), None)
    if key is None and len(keys) == 1:
      key = keys[0]
    if key is None:
      raise ValueError(f"--input {path!r} holds arrays {keys}; expected one array, or one named "
                       f"'images'")
    return loaded[key]


def read_png(path: str, *, channels: int, vocab_size: int) -> np.ndarray:
  """The levels [H, W, C] of an 8-bit greyscale (C = 1) or RGB (C = 3) PNG without alpha.

  Raises:
    ValueError: naming `path`: unreadable, not a PNG, a palette, alpha or transparency,
      a bit depth other than 8, another number of channels, pixels off the K levels.
  """
  try:
    blob = rundir.read_bytes(path)
  except OSError as e:
    raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from e
  if blob[:8] != PNG_SIGNATURE or len(blob) < 33 or blob[12:16] != b"IHDR":
    raise ValueError(f"{path}: not a PNG file (vdm-jax compress reads PNG photographs)")
  depth, colour = blob[24], blob[25]
  kind = _COLOUR_TYPES.get(colour, f"colour type {colour}")
  if colour == 3:
    raise ValueError(f"{path}: a palette PNG; save it as an 8-bit {_want(channels)} PNG (its "
                     f"palette would not come back)")
  if colour in (4, 6):
    raise ValueError(f"{path}: a PNG with an alpha channel ({kind}); the model codes "
                     f"{_want(channels)} pixels without alpha")
  if depth != 8 or colour not in (0, 2):
    raise ValueError(f"{path}: a {depth}-bit {kind} PNG; the model codes 8-bit "
                     f"{_want(channels)} PNGs")
  if (1 if colour == 0 else 3) != channels:
    raise ValueError(f"{path}: {'a' if colour == 0 else 'an'} {kind} PNG; the model codes "
                     f"{_want(channels)} images ({channels} channel{'s' if channels > 1 else ''})")
  try:
    picture = rundir.image_of_bytes(blob)
  except (OSError, ValueError, SyntaxError) as e:   # PIL: truncated or damaged data
    raise ValueError(f"{path}: cannot be decoded as a PNG ({e})") from e
  if "transparency" in picture.info:
    raise ValueError(f"{path}: a PNG with a transparent colour (tRNS); the model codes "
                     f"{_want(channels)} pixels without transparency")
  pixels = np.asarray(picture)
  pixels = pixels[..., None] if pixels.ndim == 2 else pixels
  return png_levels(pixels, vocab_size, name=path)


def _want(channels: int) -> str:
  return "greyscale" if channels == 1 else "RGB"


def _photographs(paths: list[str], info: data.DatasetInfo) -> Source:
  """The tiles of the PNG photographs at `paths`, named by their file names."""
  patch, pictures, tiles = tuple(info.shape[:2]), [], []
  for path in paths:
    levels = read_png(path, channels=info.shape[-1], vocab_size=info.vocab_size)
    height, width = levels.shape[:2]
    if height < patch[0] or width < patch[1]:
      raise ValueError(f"{path}: a {height}x{width} image is smaller than one patch of the "
                       f"model ({patch[0]}x{patch[1]})")
    name = compress_format.check_picture_name(rundir.name(path))
    pictures.append(compress_format.Picture(name, height, width))
    tiles.append(compress_tiles.tiles_of(levels, patch=patch))
  return Source(np.concatenate(tiles), tuple(pictures),
                sum(p.height * p.width * info.shape[-1] for p in pictures))


def read_source(source: str, info: data.DatasetInfo, *, data_dir: str | None = None) -> Source:
  """What `source` holds for the run's model: a split name of its data set ("test") or a
  .npy / .npz of integer images [N, h, w, C] (the run's shape), one PNG photograph or a folder
  of them (any size of at least one patch), checked against the run's shape and levels."""
  if source not in data.get_dataset(info.name).splits and rundir.is_dir(source):
    paths = [rundir.join(source, n) for n in rundir.list_names(source)
             if n.lower().endswith(".png")]
    if not paths:
      raise ValueError(f"--input {source!r} is a folder without .png files")
    return _photographs(paths, info)
  if source.lower().endswith(".png"):
    return _photographs([source], info)
  images = read_images(source, info, data_dir=data_dir)
  return Source(images, (), int(images.size))


def read_images(source: str, info: data.DatasetInfo, *, data_dir: str | None = None
                ) -> np.ndarray:
  """Integer images [N, H, W, C] of the run's shape from `source`: a split name of the run's
  data set ("test") or a .npy / .npz file; checked against the run's shape and levels."""
  if source in data.get_dataset(info.name).splits:
    split = data.get_source(info.name, split=source, data_dir=data_dir)
    images = np.stack([np.asarray(split[i]["image"]) for i in range(len(split))])
  elif source.endswith((".npy", ".npz")) and rundir.exists(source):
    images = _read_array(source)
  else:
    raise ValueError(f"--input {source!r} is neither a split of {info.name!r} "
                     f"({list(data.get_dataset(info.name).splits)}), a .npy / .npz file, a "
                     f"PNG nor a folder of PNGs")
  try:
    images = data.validate_images(images, info=info)
  except ValueError as e:
    raise ValueError(f"--input {source!r}: {e}") from None
  return images[None] if images.ndim == 3 else images


def photographs_of(images: np.ndarray, header: compress_format.Header
                   ) -> dict[str, np.ndarray]:
  """{name: levels [H, W, C]} of a file's photographs from its decoded tiles [N, h, w, C]."""
  out, at = {}, 0
  for picture in header.pictures:
    count = compress_tiles.tile_count(picture.height, picture.width, patch=header.shape[:2])
    out[picture.name] = compress_tiles.photo_of(images[at:at + count], height=picture.height,
                                                width=picture.width)
    at += count
  return out


def decompressed_files(images: np.ndarray, header: compress_format.Header) -> dict[str, bytes]:
  """The files `vdm-jax decompress` writes for a file's decoded images [N, h, w, C]: each
  photograph as a PNG of its name, or (no photographs) 00000.png ... and images.npz."""
  if header.pictures:
    return {name: rundir.png_bytes(level_pixels(levels, header.vocab_size))
            for name, levels in photographs_of(images, header).items()}
  files = {f"{i:05d}.png": rundir.png_bytes(level_pixels(image, header.vocab_size))
           for i, image in enumerate(images)}
  files["images.npz"] = rundir.npz_bytes(images=images)
  return files
