"""Whole photographs as the model's patches: tiles, their padding, and the way back.

A photograph [H, W, C] of any size (at least one patch) is cut into the model's patch shape
[h, w, C], row-major: tile (i, j) is rows i h .. (i + 1) h and columns j w .. (j + 1) w of the
photograph padded at the bottom and right to

  H' = ceil(H / h) h,   W' = ceil(W / w) w

with level 0 (black). The decoder cuts the padding off again: it needs only H and W, which the
file's header stores.

Why level 0: the padded pixels are coded with the tile (bits-back codes whole tiles), so they
cost bits. A flat region at the lowest level is close to free for the model: it predicts flat
regions well, and level 0's bin of the discrete decoder reaches to minus infinity, so only one
edge, along the border, costs bits. Edge replication (each padded row a copy of the last row,
its detail kept along it) and reflection (the image's own detail mirrored) cost bits in every
padded pixel: on the "photos" model's bound they cost more (docs/compression.md has the
numbers).

- `tile_count` / `tiles_of`: the number of tiles and the tiles [n, h, w, C] of one photograph;
- `photo_of`: the photograph [H, W, C] back from its tiles.
"""

from __future__ import annotations

import math

import numpy as np


def tile_grid(height: int, width: int, *, patch: tuple[int, int]) -> tuple[int, int]:
  """(rows, columns) of tiles of a photograph of height x width in patches of `patch` (h, w)."""
  return math.ceil(height / patch[0]), math.ceil(width / patch[1])


def tile_count(height: int, width: int, *, patch: tuple[int, int]) -> int:
  """How many tiles a photograph of height x width makes in patches of `patch` (h, w)."""
  rows, cols = tile_grid(height, width, patch=patch)
  return rows * cols


def tiles_of(photo: np.ndarray, *, patch: tuple[int, int]) -> np.ndarray:
  """The tiles of a photograph, padded with level 0 to whole patches (module docstring).

  Args:
    photo: [H, W, C], H >= h and W >= w.
    patch: the model's patch size (h, w).

  Returns:
    [rows * cols, h, w, C] of photo's type, row-major.
  """
  photo = np.asarray(photo)
  if photo.ndim != 3:
    raise ValueError(f"a photograph is [H, W, C]; got shape {photo.shape}")
  (h, w), (height, width) = patch, photo.shape[:2]
  if height < h or width < w:
    raise ValueError(f"a photograph of {height}x{width} is smaller than one {h}x{w} patch")
  rows, cols = tile_grid(height, width, patch=patch)
  padded = np.pad(photo, ((0, rows * h - height), (0, cols * w - width), (0, 0)))
  tiles = padded.reshape(rows, h, cols, w, -1).transpose(0, 2, 1, 3, 4)
  return tiles.reshape(rows * cols, h, w, photo.shape[-1])


def photo_of(tiles: np.ndarray, *, height: int, width: int) -> np.ndarray:
  """The inverse of `tiles_of`: tiles [rows * cols, h, w, C] -> the photograph [H, W, C]
  (the padding cut off)."""
  tiles = np.asarray(tiles)
  h, w = tiles.shape[1:3]
  rows, cols = tile_grid(height, width, patch=(h, w))
  if len(tiles) != rows * cols:
    raise ValueError(f"a {height}x{width} photograph is {rows * cols} tiles of {h}x{w}; got "
                     f"{len(tiles)}")
  padded = tiles.reshape(rows, cols, h, w, -1).transpose(0, 2, 1, 3, 4)
  return padded.reshape(rows * h, cols * w, -1)[:height, :width]
