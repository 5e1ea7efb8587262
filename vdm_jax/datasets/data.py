"""Data sets by name: TFDS data sets read with `tfds.data_source`, and an offline default.

Images stay integers k in {0..K-1} (K = `vocab_size`) all the way to the model, which encodes them
to bin centres x = 2(k + 0.5)/K - 1 (VDM paper, Kingma et al. 2021, appendix C): the discrete
decoder needs no dequantization. A data set is a `DatasetInfo` (shape, vocab size, classes,
split sizes) and random-access sources of {"image": [H, W, C], "label": int} per split; the
batching, shuffling and augmentation of the trainer's pipelines are in `vdm_jax.datasets.pipeline`.

Known data sets: "digits" (scikit-learn's bundled 8x8 digits, offline, K = 17), "photos" and
"photos_gray" (32x32 patches of the photographs in scikit-image's wheel, offline, K = 256;
`vdm_jax.datasets.photos`), "cifar10",
"mnist", "downsampled_imagenet/32x32" and "downsampled_imagenet/64x64" (8-bit, K = 256). TFDS data
is read with `tfds.data_source(..., download=False)` (array_record files, images decoded by
Pillow): TensorFlow is never imported, and nothing is ever downloaded here.

Data sets are registered by name (`register_dataset`; configs name them in `data.name`): a new
one is a `DatasetSpec` with a `load(name, split, data_dir)` returning a source (e.g. an
`ArraySource`), and one `register_dataset` line.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import numpy as np

from vdm_jax.datasets import photos
from vdm_jax.core import registry

Example = dict[str, Any]


class DatasetInfo(NamedTuple):
  """Static description of a data set.

  Attributes:
    name: the vdm_jax name, e.g. "cifar10".
    shape: (H, W, C) of one image.
    vocab_size: K, the number of pixel values; images take values in [0, K).
    num_classes: number of labels (0 for data sets without labels).
    num_examples: examples per split, e.g. {"train": 50000, "test": 10000}.
  """
  name: str
  shape: tuple[int, int, int]
  vocab_size: int
  num_classes: int
  num_examples: dict[str, int]


class DatasetNotPreparedError(RuntimeError):
  """A TFDS data set is not prepared (in array_record format) under the data directory."""


class DatasetSpec(NamedTuple):
  """A registered data set.

  Attributes:
    shape: (H, W, C) of one image.
    vocab_size: K; images take values in [0, K).
    num_classes: number of labels (0: none; the label is then 0).
    splits: the split names, e.g. ("train", "test").
    load: (name, split, data_dir) -> a random-access source (`len`, `[i]`) of
      {"image": integer [H, W, C], "label": int} dicts; the default reads TFDS.
    archive: what the TFDS builder downloads (for the "not prepared" hint), or None.
    split_slicing: the splits accept TFDS slicing ("train[:90%]"); set False for a `load` that
      does not.
  """
  shape: tuple[int, int, int]
  vocab_size: int
  num_classes: int
  splits: tuple[str, ...]
  load: Callable[[str, str, str | None], Any] | None = None   # None: `load_tfds`
  archive: str | None = None
  split_slicing: bool = True


DATASETS: registry.Registry[DatasetSpec] = registry.Registry("data set")


def register_dataset(name: str, spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
  """Makes `data.name = name` read `spec`."""
  return DATASETS.register(name, spec, replace=replace)


def get_dataset(name: str) -> DatasetSpec:
  """The data set registered as `name` (ValueError naming the registered ones if none)."""
  return DATASETS.get(name)


DIGITS_NUM_TRAIN = 1500  # of 1797; the split is np.random.default_rng(0).permutation(1797)


def _check_split(name: str, split: str) -> None:
  spec = get_dataset(name)
  base = split.split("[", 1)[0]  # TFDS slicing syntax, e.g. "train[:90%]"
  splits = spec.splits
  if base not in splits or (not spec.split_slicing and base != split):
    raise ValueError(
        f"unknown split {split!r} for data set {name!r}; expected one of {list(splits)}")


# ----------------------------------------------------------------------------------------------
# Random-access sources.


class ArraySource:
  """A grain-compatible random-access source over in-memory arrays.

  Attributes:
    images: integer [N, H, W, C].
    labels: integer [N].
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or labels.shape != images.shape[:1]:
      raise ValueError(f"expected images [N, H, W, C] and labels [N], got shapes "
                       f"{images.shape} and {labels.shape}")
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> Example:
    return {"image": self.images[index], "label": self.labels[index]}

  def __repr__(self) -> str:
    return f"ArraySource(images={self.images.shape}, labels={self.labels.shape})"


class _TfdsSource:
  """Keeps only "image" (uint8 [H, W, C]) and "label" from a `tfds.data_source` split."""

  def __init__(self, source: Sequence[Example], has_label: bool):
    self._source, self._has_label = source, has_label

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Example:
    example = self._source[index]  # one record, decoded by Pillow
    label = example["label"] if self._has_label else 0
    return {"image": np.asarray(example["image"]), "label": label}

  def __repr__(self) -> str:
    return f"_TfdsSource({self._source!r})"


@functools.lru_cache(maxsize=None)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """All 1797 digits: uint8 [1797, 8, 8, 1] in {0..16} and labels int32 [1797] (read-only)."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images = np.rint(digits.images).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  images.flags.writeable = labels.flags.writeable = False
  return images, labels


def _digits_source(name: str, split: str, data_dir: str | None) -> ArraySource:
  del name, data_dir
  images, labels = _digits_arrays()
  order = np.random.default_rng(0).permutation(len(labels))
  idx = order[:DIGITS_NUM_TRAIN] if split == "train" else order[DIGITS_NUM_TRAIN:]
  return ArraySource(images[idx], labels[idx])


def _how_to_prepare(name: str, data_dir: str | None) -> str:
  root = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  archive = get_dataset(name).archive or "the files the TFDS builder downloads"
  return (
      f"Prepare it once, on a machine with TensorFlow (vdm_jax itself never downloads):\n"
      f'  pip install "vdm-jax[tf]"\n'
      f"  tfds build {name} --data_dir {root} --file_format array_record\n"
      f"Without network access, download {archive} elsewhere, copy it (them) into a "
      f"manual directory and add `--manual_dir DIR` (default: {root}/downloads/manual).")


def _open_tfds(name: str, split: str, data_dir: str | None) -> Sequence[Example]:
  """`tfds.data_source(name, split=split, download=False)`, with a clear error when unprepared."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow; lazy)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless diagnosed below)
    try:
      prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
    except Exception:  # pylint: disable=broad-except
      prepared = False
    where = data_dir or os.environ.get("TFDS_DATA_DIR", "the default TFDS data_dir")
    if not prepared:
      raise DatasetNotPreparedError(
          f"data set {name!r} (split {split!r}) is not prepared under {where}.\n"
          f"{_how_to_prepare(name, data_dir)}") from e
    if isinstance(e, NotImplementedError):  # prepared, but as TFRecord: no random access
      raise DatasetNotPreparedError(
          f"data set {name!r} is prepared under {where}, but not in array_record format, "
          f"which random access needs: build it again with the command below (into another "
          f"data_dir, or after deleting the TFRecord copy).\n{_how_to_prepare(name, data_dir)}"
      ) from e
    raise


def load_tfds(name: str, split: str, data_dir: str | None) -> Sequence[Example]:
  """The default `DatasetSpec.load`: the split of the TFDS data set `name` (array_record files,
  images decoded by Pillow), keeping "image" and "label"."""
  return _TfdsSource(_open_tfds(name, split, data_dir),
                     has_label=get_dataset(name).num_classes > 0)


def get_source(name: str, *, split: str, data_dir: str | None = None) -> Any:
  """Returns a random-access source (`len`, `[i]`) of {"image": [H, W, C], "label": int} dicts.

  Raises:
    ValueError: unknown data set or split.
    DatasetNotPreparedError: a TFDS data set that is not prepared under `data_dir`.
  """
  _check_split(name, split)
  return (get_dataset(name).load or load_tfds)(name, split, data_dir)


def static_info(name: str) -> DatasetInfo:
  """The `DatasetInfo` of a known data set without opening it (num_examples left empty): what a
  model needs to be built (shape, vocab_size, num_classes) when the data is not prepared."""
  spec = get_dataset(name)
  return DatasetInfo(name=name, shape=spec.shape, vocab_size=spec.vocab_size,
                     num_classes=spec.num_classes, num_examples={})


def default_eval_split(name: str) -> str:
  """The split a data set is evaluated on: "test" where it has one, else "validation"
  (downsampled ImageNet, as in the VDM paper and the official code)."""
  splits = get_dataset(name).splits
  return "test" if "test" in splits else "validation"


def get_info(name: str, *, data_dir: str | None = None) -> DatasetInfo:
  """Returns the `DatasetInfo` of a known data set (opening each TFDS split to count it)."""
  spec = get_dataset(name)
  counts = {split: len(get_source(name, split=split, data_dir=data_dir)) for split in spec.splits}
  return DatasetInfo(name=name, shape=spec.shape, vocab_size=spec.vocab_size,
                     num_classes=spec.num_classes, num_examples=counts)


def validate_images(images: Any, *, info: DatasetInfo) -> np.ndarray:
  """Checks a batch [B, H, W, C] (or one image [H, W, C]) against `info`; returns it as ndarray.

  Raises:
    ValueError: non-integer dtype, a shape other than info.shape, or a value outside
      [0, info.vocab_size).
  """
  images = np.asarray(images)
  if not np.issubdtype(images.dtype, np.integer):
    raise ValueError(f"{info.name}: expected integer images, got dtype {images.dtype}")
  if images.ndim not in (3, 4) or tuple(images.shape[-3:]) != tuple(info.shape):
    raise ValueError(f"{info.name}: expected images of shape [B, *{tuple(info.shape)}] or "
                     f"{tuple(info.shape)}, got {images.shape}")
  if images.size:
    lo, hi = images.min(), images.max()
    if lo < 0 or hi >= info.vocab_size:
      bad = lo if lo < 0 else hi
      where = tuple(int(i) for i in np.argwhere(images == bad)[0])
      raise ValueError(f"{info.name}: image value {bad} at index {where} is outside "
                       f"[0, {info.vocab_size})")
  return images


register_dataset("digits", DatasetSpec((8, 8, 1), 17, 10, ("train", "test"), load=_digits_source,
                                       split_slicing=False))
register_dataset("cifar10", DatasetSpec((32, 32, 3), 256, 10, ("train", "test"),
                                        archive="cifar-10-binary.tar.gz"))
register_dataset("mnist", DatasetSpec((28, 28, 1), 256, 10, ("train", "test")))
register_dataset("downsampled_imagenet/32x32", DatasetSpec(
    (32, 32, 3), 256, 0, ("train", "validation"), archive="train_32x32.tar and valid_32x32.tar"))
register_dataset("downsampled_imagenet/64x64", DatasetSpec(
    (64, 64, 3), 256, 0, ("train", "validation"), archive="train_64x64.tar and valid_64x64.tar"))


def _photos_source(name: str, split: str, data_dir: str | None) -> ArraySource:
  del data_dir  # read from the installed scikit-image
  images = photos.patches(name, split).images
  return ArraySource(images, np.zeros(len(images), np.int32))


for _name, _patch_set in photos.PATCH_SETS.items():
  register_dataset(_name, DatasetSpec((photos.PATCH_SIZE, photos.PATCH_SIZE, _patch_set.channels),
                                      256, 0, ("train", "test"), load=_photos_source,
                                      split_slicing=False))
