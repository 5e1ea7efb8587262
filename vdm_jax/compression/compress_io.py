"""The images `vdm-jax compress` reads and `vdm-jax decompress` writes, as integer levels.

- `read_images`: a split of the run's data set ("test"), a .npy / .npz of integer images, or a
  folder of PNGs, checked against the run's shape and levels;
- `png_levels` / `level_pixels`: PNG pixels hold the K levels spread over 0..255,
  v = round(k * 255 / (K - 1)) (v = k for K = 256); a PNG off that scale is refused.

Every file is read through `rundir` (a local disk or a bucket); a bad input is a ValueError
naming it.
"""

from __future__ import annotations

import numpy as np

from vdm_jax.datasets import data
from vdm_jax.storage import rundir


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


def _read_png_folder(folder: str, info: data.DatasetInfo) -> np.ndarray:
  paths = [rundir.join(folder, n) for n in rundir.list_names(folder) if n.endswith(".png")]
  if not paths:
    raise ValueError(f"--input {folder!r} holds no .png files")
  images = []
  for path in paths:
    with rundir.read_image(path) as picture:
      pixels = np.asarray(picture.convert("L" if info.shape[-1] == 1 else "RGB")
                          if picture.mode not in ("L", "RGB") else picture)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    if pixels.shape != tuple(info.shape):
      raise ValueError(f"{path}: a PNG of shape {pixels.shape}; the run's images are "
                       f"{tuple(info.shape)}")
    images.append(png_levels(pixels, info.vocab_size, name=path))
  return np.stack(images)


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


def read_images(source: str, info: data.DatasetInfo, *, data_dir: str | None = None
                ) -> np.ndarray:
  """Integer images [N, H, W, C] from `source`: a split name of the run's data set ("test"), a
  .npy / .npz file, or a folder of PNGs; checked against the run's shape and levels."""
  if source in data.get_dataset(info.name).splits:
    split = data.get_source(info.name, split=source, data_dir=data_dir)
    images = np.stack([np.asarray(split[i]["image"]) for i in range(len(split))])
  elif rundir.is_dir(source):
    images = _read_png_folder(source, info)
  elif source.endswith((".npy", ".npz")) and rundir.exists(source):
    images = _read_array(source)
  else:
    raise ValueError(f"--input {source!r} is neither a split of {info.name!r} "
                     f"({list(data.get_dataset(info.name).splits)}), a .npy / .npz file nor a "
                     f"folder of PNGs")
  try:
    images = data.validate_images(images, info=info)
  except ValueError as e:
    raise ValueError(f"--input {source!r}: {e}") from None
  return images[None] if images.ndim == 3 else images
