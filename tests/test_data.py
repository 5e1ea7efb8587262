"""Tests for vdm_jax.datasets.data: digits offline, TFDS through mock_data, validation, the
registry."""

import itertools
import os
import socket
import subprocess
import sys

import chex
import numpy as np
import pytest

from vdm_jax.training import config_checks
from vdm_jax.datasets import data, pipeline

ONE = {"process_index": 0, "process_count": 1}


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


# ----------------------------------------------------------------------------------------------
# Digits: info and split.


def test_digits_info():
  info = data.get_info("digits")
  assert info == data.DatasetInfo("digits", (8, 8, 1), 17, 10, {"train": 1500, "test": 297})


def test_digits_split_is_the_fixed_permutation():
  from sklearn.datasets import load_digits
  digits = load_digits()
  order = np.random.default_rng(0).permutation(1797)
  for split, idx in [("train", order[:1500]), ("test", order[1500:])]:
    src = data.get_source("digits", split=split)
    images = np.stack([src[i]["image"] for i in range(len(src))])
    labels = np.array([src[i]["label"] for i in range(len(src))])
    np.testing.assert_array_equal(images[..., 0], digits.images[idx])
    np.testing.assert_array_equal(labels, digits.target[idx])


# ----------------------------------------------------------------------------------------------
# Validation and errors.


@pytest.mark.parametrize("images,match", [
    (np.zeros((2, 8, 8, 1), np.float32), "dtype float32"),
    (np.zeros((2, 8, 8, 3), np.int32), r"got \(2, 8, 8, 3\)"),
    (np.zeros((8, 8), np.int32), r"got \(8, 8\)"),
    (np.full((2, 8, 8, 1), 17, np.int32), r"value 17 at index \(0, 0, 0, 0\)"),
    (np.pad(np.full((1, 8, 8, 1), 3), ((1, 0), (0, 0), (0, 0), (0, 0)), constant_values=-1),
     "value -1"),
])
def test_validate_images_rejects(images, match):
  with pytest.raises(ValueError, match=match):
    data.validate_images(images, info=data.get_info("digits"))


def test_validate_images_accepts_batch_and_single_image():
  info = data.get_info("digits")
  data.validate_images(np.full((3, 8, 8, 1), 16, np.uint8), info=info)
  data.validate_images(np.zeros((8, 8, 1), np.int64), info=info)


def test_unknown_name_or_split():
  with pytest.raises(ValueError, match=r"'svhn'.*digits.*cifar10.*downsampled_imagenet/64x64"):
    data.get_info("svhn")
  with pytest.raises(ValueError, match=r"'validation'.*\['train', 'test'\]"):
    data.get_source("digits", split="validation")
  with pytest.raises(ValueError, match="'train'"):
    data.get_source("downsampled_imagenet/32x32", split="test")


def _squares(name, split, data_dir):
  """Twelve 4x4 images with values in {0..4}: eight for training, four for testing."""
  del name, data_dir
  images = (np.arange(12 * 16) % 5).reshape(12, 4, 4, 1).astype(np.uint8)
  part = slice(0, 8) if split == "train" else slice(8, 12)
  return data.ArraySource(images[part], (np.arange(12) % 2)[part])


def test_a_registered_data_set_is_usable_by_name(registered, smoke_config):
  registered(data.DATASETS, data.register_dataset, "test_squares", data.DatasetSpec(
      (4, 4, 1), 5, 2, ("train", "test"), load=_squares, split_slicing=False))
  assert data.get_info("test_squares") == data.DatasetInfo(
      "test_squares", (4, 4, 1), 5, 2, {"train": 8, "test": 4})
  (batch,) = _take(pipeline.train_iterator("test_squares", global_batch_size=4, seed=0, **ONE), 1)
  chex.assert_shape(batch["image"], (4, 4, 4, 1))
  evals = list(pipeline.eval_iterator("test_squares", global_batch_size=4, **ONE))
  assert sum(int(b["mask"].sum()) for b in evals) == 4
  smoke_config.data.name = "test_squares"
  config_checks.check_config(smoke_config)
  with pytest.raises(ValueError, match=r"unknown split 'train\[:4\]'"):
    data.get_source("test_squares", split="train[:4]")


def test_import_is_light():
  code = ("import sys; import vdm_jax.datasets.data as d; d.get_info('digits'); "
          "assert 'tensorflow_datasets' not in sys.modules and 'tensorflow' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})


# ----------------------------------------------------------------------------------------------
# TFDS (mocked: no files, no network, no TensorFlow).


@pytest.fixture
def no_network(monkeypatch):
  """Refuses connections, and fails the test afterwards if any was attempted (even if the code
  under test caught the error)."""
  attempts = []

  def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError(f"network access attempted in a test: {args}")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)
  yield
  assert not attempts, attempts


@pytest.mark.parametrize("name,shape,num_classes,eval_split", [
    ("cifar10", (32, 32, 3), 10, "test"),
    ("mnist", (28, 28, 1), 10, "test"),
    ("downsampled_imagenet/32x32", (32, 32, 3), 0, "validation"),
])
def test_tfds_through_mock_data(no_network, name, shape, num_classes, eval_split):
  tfds = pytest.importorskip("tensorflow_datasets")
  as_data_source_fn = None
  if name.startswith("downsampled_imagenet"):  # its features leave the image size open, so the
    # generated mock images have random sizes: serve 32x32 ones instead (no "label" feature).
    def as_data_source_fn(builder, split, **kwargs):
      del builder, split, kwargs
      rng = np.random.default_rng(0)
      return [{"image": rng.integers(0, 256, shape, np.uint8)} for _ in range(21)]
  with tfds.testing.mock_data(num_examples=21, policy=tfds.testing.MockPolicy.USE_CODE,
                              as_data_source_fn=as_data_source_fn):
    info = data.get_info(name)
    assert info.shape == shape and info.vocab_size == 256 and info.num_classes == num_classes
    assert set(info.num_examples.values()) == {21}
    train = _take(pipeline.train_iterator(name, global_batch_size=8, seed=0, flip=True, **ONE), 3)
    evals = list(pipeline.eval_iterator(name, split=eval_split, global_batch_size=8, **ONE))
  for batch in train + evals:
    chex.assert_shape(batch["image"], (8, *shape))
    assert batch["image"].dtype == np.int32 and 0 <= batch["image"].min()
    assert batch["image"].max() < 256
    assert 0 <= batch["label"].min() and batch["label"].max() < max(num_classes, 1)
  assert len(evals) == 3 and sum(b["mask"].sum() for b in evals) == 21
  assert "tensorflow" not in sys.modules


def test_tfds_images_of_the_wrong_size_are_rejected(no_network):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    iterator = pipeline.train_iterator("downsampled_imagenet/32x32", global_batch_size=4, seed=0,
                                       **ONE)
    with pytest.raises(ValueError, match=r"expected an image of shape \(32, 32, 3\), got"):
      next(iterator)


def test_unprepared_tfds_data_set_is_a_clear_error(no_network, tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  original, downloads = tfds.data_source, []

  def data_source_without_download(*args, **kwargs):
    downloads.append(kwargs.get("download", True))
    if downloads[-1] is not False:  # fail fast rather than retry downloads for minutes
      raise OSError("a download was requested")
    return original(*args, **kwargs)

  monkeypatch.setattr(tfds, "data_source", data_source_without_download)
  with pytest.raises(data.DatasetNotPreparedError) as excinfo:
    pipeline.train_iterator("cifar10", global_batch_size=8, seed=0, data_dir=str(tmp_path), **ONE)
  message = str(excinfo.value)
  for needle in ['pip install "vdm-jax[tf]"', f"tfds build cifar10 --data_dir {tmp_path}",
                 "--file_format array_record", "cifar-10-binary.tar.gz", "--manual_dir"]:
    assert needle in message, (needle, message)
  assert downloads == [False] and not any(tmp_path.rglob("*.tar.gz"))


def test_tfds_errors_are_diagnosed(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")

  class PreparedBuilder:
    def is_prepared(self):
      return True

  def tfrecord_only(*args, **kwargs):
    raise NotImplementedError("Random access data source for file format TFRECORD")

  monkeypatch.setattr(tfds, "builder", lambda *args, **kwargs: PreparedBuilder())
  monkeypatch.setattr(tfds, "data_source", tfrecord_only)
  with pytest.raises(data.DatasetNotPreparedError, match="not in array_record format"):
    data.get_source("mnist", split="train", data_dir="/nowhere")

  def other_failure(*args, **kwargs):
    raise KeyError("something else")

  monkeypatch.setattr(tfds, "data_source", other_failure)
  with pytest.raises(KeyError, match="something else"):  # not hidden behind a wrong diagnosis
    data.get_source("mnist", split="train", data_dir="/nowhere")
