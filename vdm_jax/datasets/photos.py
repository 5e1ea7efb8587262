"""Photo patches: 32x32 patches of real 8-bit photographs, offline (the paper's regime, K = 256).

The photographs are the lossless PNG files that scikit-image's wheel ships in `skimage/data/`;
they are read from there with Pillow (nothing is downloaded; scikit-image itself is not even
imported). Two registered data sets:

- "photos": RGB [32, 32, 3], K = 256, from astronaut (512x512), chelsea (300x451),
  coffee (400x600), ihc (512x512), motorcycle_left and motorcycle_right (500x741; H x W).
  Test photographs: chelsea and coffee. The motorcycle pair is one stereo scene seen twice, so
  both stay on the training side (a test patch would otherwise have a near-copy in training).
  Train: 4,622 patches (961 + 961 + 1,350 + 1,350); test: 342 (126 + 216).
- "photos_gray": grey [32, 32, 1], K = 256, from brick, camera, coins, grass, gravel, moon, page,
  text. Test photographs: camera and coins. Train: 4,317 patches (961 for each 512x512
  photograph, 230 from page, 243 from text); test: 364 (256 + 108).

The grid: the patch with top-left corner (r, c) is photo[r:r+32, c:c+32] for r = 0, s, 2s, ...
while r + 32 <= H (likewise c along the width), row-major, photographs in the order listed
above; leftover rows and columns at the bottom and right are not used. The test split tiles its
photographs without overlap (s = 32), so its bound covers each used pixel exactly once; the
training split uses s = 16 (overlapping patches: four times as many, shifted by half a patch).
Train and test come from different photographs, so no test pixel is ever trained on.

Labels are 0 (num_classes = 0): a patch's photograph and corner are given by `patches()`, not
by the label. `vdm_jax.datasets.data` registers both names (this module imports no other vdm_jax
module). Each photograph's decoded pixels are checked against a SHA-256 recorded here, so the data
set is the same on every install (a scikit-image release whose files differ is refused with an error
that names the file).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from typing import NamedTuple

import numpy as np

from vdm_jax.storage import rundir

PATCH_SIZE = 32
TRAIN_STRIDE = 16
TEST_STRIDE = 32

# SHA-256 of each photograph's decoded uint8 pixels (C order, [H, W, 3] or [H, W]), as shipped
# in scikit-image 0.26.
PIXEL_SHA256 = {
    "astronaut": "a8c429c18afa7b0fd5673e598d73a21225d94c864a71bbb3885126fdecb41071",
    "chelsea": "416b729128bfb2c3d1eb69bf9b1734a796293abc17939267b2dc94f8a5784031",
    "coffee": "0ce2b51640b9c95f19617f03eabf40c3f0368589cc1ee1190b70966165ac184f",
    "ihc": "c5b3ef509a92f16d4c29be8cf0300fe75d53e13a3ce650159db932caea8dcc1b",
    "motorcycle_left": "ca829467c1d4f427da9c4862ba43829da6ac90afe1f75735e95dba9e3fd9620b",
    "motorcycle_right": "ae44d83f55e66623c7985499fd2f1685a56023e442e66eca89b3457dd46b17af",
    "brick": "664a145c5253f0d66db1a12776785f0ea35a44cc7447ffc933f6d6118dc58643",
    "camera": "5cb24482a53416f99052258be2b1ee38cd31c559a70c8a8b321cba231b332e21",
    "coins": "e080cc03805f1fa70516c3cb84883d4633bda2a1b51841da7c22f3d14c072451",
    "grass": "b18dae4c68bf850a7a7b28a29d1846c76be890665117b57fd125fe29c4d4ede6",
    "gravel": "3d51ad45f789cd8b98534b7af6bce774e499ead45421135afd757358c7230009",
    "moon": "a20362266d5b01021f6f0f54bd603c3137f921b741770420deeb5ea0141716c0",
    "page": "667bfd85aab58052ae90251fae1a265cf8be6d1097b1e61dcfc183b65887a1fe",
    "text": "6705caed21e6281799a52591c27498da5526cace39f2b6af3141b2ff11e2e517",
}


class PatchSet(NamedTuple):
  """A photo-patch data set: which photographs, which of them are test, how many channels.

  Attributes:
    photos: the photographs, in the order their patches are listed.
    test_photos: the photographs of the test split (the others are the training split).
    channels: 3 (RGB) or 1 (grey).
  """
  photos: tuple[str, ...]
  test_photos: tuple[str, ...]
  channels: int


PATCH_SETS = {
    "photos": PatchSet(("astronaut", "chelsea", "coffee", "ihc", "motorcycle_left",
                        "motorcycle_right"), ("chelsea", "coffee"), 3),
    "photos_gray": PatchSet(("brick", "camera", "coins", "grass", "gravel", "moon", "page",
                             "text"), ("camera", "coins"), 1),
}


class Patches(NamedTuple):
  """One split of a photo-patch data set (arrays read-only).

  Attributes:
    images: uint8 [N, 32, 32, C], the patches.
    photo: int32 [N], the index of each patch's photograph in `PatchSet.photos`.
    corner: int32 [N, 2], each patch's top-left (row, column) in its photograph.
  """
  images: np.ndarray
  photo: np.ndarray
  corner: np.ndarray


def photo_path(name: str) -> str:
  """The PNG file of photograph `name` inside the installed scikit-image (not imported)."""
  if name not in PIXEL_SHA256:
    raise ValueError(f"unknown photograph {name!r}; expected one of {sorted(PIXEL_SHA256)}")
  spec = importlib.util.find_spec("skimage")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
        "the photo-patch data sets read the photographs shipped inside scikit-image's wheel, "
        "and scikit-image is not installed: pip install 'scikit-image>=0.26'")
  return os.path.join(list(spec.submodule_search_locations)[0], "data", f"{name}.png")


@functools.lru_cache(maxsize=None)
def read_photo(name: str) -> np.ndarray:
  """Photograph `name` as uint8 [H, W, 3] (RGB) or [H, W] (grey), read-only, pixels verified.

  Raises:
    ValueError: unknown name, or pixels other than the recorded ones (another release's file).
    FileNotFoundError: the installed scikit-image does not ship the file.
  """
  path = photo_path(name)
  if not rundir.exists(path):
    raise FileNotFoundError(f"photograph {name!r}: no file {path} in the installed scikit-image")
  with rundir.read_image(path) as im:
    pixels = np.array(im)
  digest = hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
  if pixels.dtype != np.uint8 or digest != PIXEL_SHA256[name]:
    raise ValueError(
        f"photograph {name!r} ({path}) decodes to other pixels than this data set was defined "
        f"on: dtype {pixels.dtype}, shape {pixels.shape}, sha256 {digest}; expected uint8 with "
        f"sha256 {PIXEL_SHA256[name]} (scikit-image 0.26)")
  pixels.flags.writeable = False
  return pixels


def patch_corners(height: int, width: int, *, size: int, stride: int) -> np.ndarray:
  """Top-left corners of the grid of `size` x `size` patches at `stride`, row-major.

  Rows r = 0, stride, 2 stride, ... with r + size <= height; columns likewise.

  Returns:
    int32 [floor((height - size) / stride + 1) * floor((width - size) / stride + 1), 2]
    of (row, column); empty when the image is smaller than one patch.
  """
  if size < 1 or stride < 1:
    raise ValueError(f"expected size >= 1 and stride >= 1, got size={size}, stride={stride}")
  rows = np.arange(0, height - size + 1, stride)
  cols = np.arange(0, width - size + 1, stride)
  r, c = np.meshgrid(rows, cols, indexing="ij")
  return np.stack([r.ravel(), c.ravel()], axis=-1).astype(np.int32)


def cut_patches(image: np.ndarray, corners: np.ndarray, *, size: int) -> np.ndarray:
  """image[r:r+size, c:c+size] for each corner: [H, W, C] -> [N, size, size, C]."""
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f"expected an image [H, W, C], got shape {image.shape}")
  out = np.empty((len(corners), size, size, image.shape[-1]), image.dtype)
  for i, (r, c) in enumerate(corners):
    out[i] = image[r:r + size, c:c + size]
  return out


@functools.lru_cache(maxsize=None)
def patches(name: str, split: str) -> Patches:
  """The `split` ("train" or "test") of the photo-patch data set `name` (see the module doc)."""
  if name not in PATCH_SETS:
    raise ValueError(f"unknown photo-patch data set {name!r}; expected one of "
                     f"{sorted(PATCH_SETS)}")
  if split not in ("train", "test"):
    raise ValueError(f"unknown split {split!r} for {name!r}; expected 'train' or 'test'")
  spec = PATCH_SETS[name]
  stride = TEST_STRIDE if split == "test" else TRAIN_STRIDE
  images, photo, corner = [], [], []
  for index, photo_name in enumerate(spec.photos):
    if (photo_name in spec.test_photos) != (split == "test"):
      continue
    pixels = read_photo(photo_name)
    pixels = pixels if pixels.ndim == 3 else pixels[..., None]
    corners = patch_corners(*pixels.shape[:2], size=PATCH_SIZE, stride=stride)
    images.append(cut_patches(pixels, corners, size=PATCH_SIZE))
    photo.append(np.full(len(corners), index, np.int32))
    corner.append(corners)
  result = Patches(np.concatenate(images), np.concatenate(photo), np.concatenate(corner))
  for array in result:
    array.flags.writeable = False
  return result
