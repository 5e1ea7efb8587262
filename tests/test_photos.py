"""Tests for the photo-patch data sets (vdm_jax.datasets.photos, registered in
vdm_jax.datasets.data)."""

import itertools
import pathlib
import runpy

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vdm_jax.training import config_checks, tasks
from vdm_jax.datasets import data, photos, pipeline
from vdm_jax.maths import sampling

ROOT = pathlib.Path(__file__).resolve().parents[1]
ONE = {"process_index": 0, "process_count": 1}

# The documented counts: (train: stride 16, test: stride 32), per photograph in listed order.
COUNTS = {
    "photos": {"train": 961 + 961 + 1350 + 1350, "test": 126 + 216},
    "photos_gray": {"train": 961 * 4 + 230 + 243, "test": 256 + 108},
}
SHAPES = {"photos": (32, 32, 3), "photos_gray": (32, 32, 1)}


def _pil_pixels(name):
  """A photograph decoded independently of vdm_jax.datasets.photos: [H, W, C] uint8."""
  path = pathlib.Path(photos.photo_path(name))
  with Image.open(path) as im:
    pixels = np.asarray(im.convert("RGB" if im.mode == "RGB" else "L"))
  return pixels if pixels.ndim == 3 else pixels[..., None]


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_info(name):
  assert data.get_info(name) == data.DatasetInfo(name, SHAPES[name], 256, 0, COUNTS[name])


@pytest.mark.parametrize("name", sorted(COUNTS))
@pytest.mark.parametrize("split", ["train", "test"])
def test_source_shapes_dtype_range_labels(name, split):
  source = data.get_source(name, split=split)
  assert len(source) == COUNTS[name][split]
  images = source.images
  chex.assert_shape(images, (COUNTS[name][split], *SHAPES[name]))
  assert images.dtype == np.uint8
  assert not images.flags.writeable
  assert images.min() == 0 and images.max() >= 231   # real 8-bit photographs use the range
  np.testing.assert_array_equal(source.labels, 0)
  data.validate_images(images, info=data.get_info(name))


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_splits_are_disjoint_by_photograph(name):
  spec = photos.PATCH_SETS[name]
  train, test = photos.patches(name, "train"), photos.patches(name, "test")
  train_photos = {spec.photos[i] for i in np.unique(train.photo)}
  test_photos = {spec.photos[i] for i in np.unique(test.photo)}
  assert test_photos == set(spec.test_photos)
  assert train_photos == set(spec.photos) - set(spec.test_photos)
  # No test patch equals a training patch, pixel for pixel.
  train_rows = {bytes(x) for x in train.images.reshape(len(train.images), -1)}
  assert not any(bytes(x) in train_rows for x in test.images.reshape(len(test.images), -1))


def test_rgb_test_photographs_are_fixed():
  assert photos.PATCH_SETS["photos"].test_photos == ("chelsea", "coffee")
  assert photos.PATCH_SETS["photos_gray"].test_photos == ("camera", "coins")


@pytest.mark.parametrize("name", sorted(COUNTS))
@pytest.mark.parametrize("split,stride", [("train", 16), ("test", 32)])
def test_patches_are_the_photographs_pixels_on_the_documented_grid(name, split, stride):
  spec = photos.PATCH_SETS[name]
  split_patches = photos.patches(name, split)
  images = data.get_source(name, split=split).images
  np.testing.assert_array_equal(images, split_patches.images)
  expected_images, expected_corners = [], []
  for index, photo_name in enumerate(spec.photos):
    if (photo_name in spec.test_photos) != (split == "test"):
      continue
    pixels = _pil_pixels(photo_name)
    height, width = pixels.shape[:2]
    for r in range(0, height - 31, stride):      # row-major, top-left first
      for c in range(0, width - 31, stride):
        expected_images.append(pixels[r:r + 32, c:c + 32])
        expected_corners.append((index, r, c))
  np.testing.assert_array_equal(images, np.stack(expected_images))
  got = np.column_stack([split_patches.photo, split_patches.corner])
  np.testing.assert_array_equal(got, np.array(expected_corners))


def test_test_split_tiles_each_photograph_without_overlap():
  test = photos.patches("photos", "test")
  for index in np.unique(test.photo):
    pixels = photos.read_photo(photos.PATCH_SETS["photos"].photos[index])
    covered = np.zeros(pixels.shape[:2], np.int32)
    for r, c in test.corner[test.photo == index]:
      covered[r:r + 32, c:c + 32] += 1
    height, width = (pixels.shape[0] // 32) * 32, (pixels.shape[1] // 32) * 32
    np.testing.assert_array_equal(covered[:height, :width], 1)
    assert covered[height:].sum() == covered[:, width:].sum() == 0


def test_deterministic():
  first = photos.patches("photos", "train").images
  photos.patches.cache_clear()
  photos.read_photo.cache_clear()
  second = photos.patches("photos", "train").images
  assert first is not second
  np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("height,width,stride,expected", [
    (64, 64, 32, [(0, 0), (0, 32), (32, 0), (32, 32)]),
    (63, 40, 16, [(0, 0), (16, 0)]),
    (31, 100, 8, []),
])
def test_patch_corners(height, width, stride, expected):
  corners = photos.patch_corners(height, width, size=32, stride=stride)
  np.testing.assert_array_equal(corners.reshape(-1, 2), np.array(expected).reshape(-1, 2))


def test_errors_name_the_bad_value(monkeypatch):
  with pytest.raises(ValueError, match=r"'lena'.*astronaut"):
    photos.read_photo("lena")
  with pytest.raises(ValueError, match="'validation'"):
    data.get_source("photos", split="validation")
  with pytest.raises(ValueError, match="stride=0"):
    photos.patch_corners(64, 64, size=32, stride=0)
  # A file whose pixels differ from the recorded ones (another release) is refused.
  monkeypatch.setitem(photos.PIXEL_SHA256, "coins", "0" * 64)
  photos.read_photo.cache_clear()
  with pytest.raises(ValueError, match=r"'coins'.*other pixels.*sha256 e080cc03"):
    photos.read_photo("coins")
  photos.read_photo.cache_clear()


def test_missing_scikit_image_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(photos.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ImportError, match=r"pip install 'scikit-image"):
    photos.photo_path("astronaut")


def test_pipeline_and_config():
  train = list(itertools.islice(
      pipeline.train_iterator("photos", global_batch_size=8, seed=0, **ONE), 2))
  for batch in train:
    chex.assert_shape(batch["image"], (8, 32, 32, 3))
  evals = list(pipeline.eval_iterator("photos", global_batch_size=128, **ONE))
  assert sum(int(b["mask"].sum()) for b in evals) == 342
  config = runpy.run_path(str(ROOT / "configs" / "photos.py"))["get_config"]()
  config_checks.check_config(config)
  config.data.name = "photos_gray"   # the same config serves the grey patches (1 channel)
  config_checks.check_config(config)




def test_a_single_channel_model_bounds_and_samples_grey_patches(smoke_config):
  """A tiny model built from photos_gray's info (1 channel, the 256-level decoder): the bound of
  two real patches is finite and positive, and ancestral sampling returns integer
  patches in [0, 256). The RGB model at 32x32, K = 256 is the mock-CIFAR-10 end-to-end test's
  (tests/test_train.py); training, evaluation and sampling runs do not depend on the data set."""
  smoke_config.data.name = "photos_gray"
  task = tasks.build_task(smoke_config, data.get_info("photos_gray"))

  @jax.jit
  def bounds_and_sample(key, images):
    params, frozen = task.init(key)
    batch = {"image": images, "label": jnp.zeros(len(images), jnp.int32)}
    bpd = task.eval_terms(params, frozen, batch, key, num_steps=0)["bpd"]
    eps_fn, gamma_fn, shape, _ = task.sampler_fns(params, frozen)
    sample = sampling.ancestral_sample(key, eps_fn=eps_fn, gamma_fn=gamma_fn, shape=(1, *shape),
                                       num_steps=2, vocab_size=256)
    return bpd, sample

  images = jnp.asarray(photos.patches("photos_gray", "test").images[:2], jnp.int32)
  bpd, sample = bounds_and_sample(jax.random.PRNGKey(0), images)
  chex.assert_shape(bpd, (2,))
  assert np.all(np.isfinite(bpd)) and np.all(np.asarray(bpd) > 0)
  chex.assert_shape(sample, (1, 32, 32, 1))
  assert sample.dtype == jnp.int32 and 0 <= int(sample.min()) and int(sample.max()) < 256
