"""Tests for vdm_jax.datasets.pipeline: order, resumption, sharding, eval padding, augmentation."""

import itertools

import chex
import numpy as np
import pytest

from vdm_jax.datasets import data, pipeline

ONE = {"process_index": 0, "process_count": 1}


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _digits_train(**kwargs):
  kwargs = {"global_batch_size": 16, "seed": 0, **ONE, **kwargs}
  return pipeline.train_iterator("digits", **kwargs)


def _index_source(n):
  """Image i is the constant i: the batches show which examples they hold."""
  images = np.broadcast_to(np.arange(n, dtype=np.int32)[:, None, None, None], (n, 1, 1, 1))
  info = data.DatasetInfo("index", (1, 1, 1), n, 0, {"train": n})
  return data.ArraySource(images, np.zeros(n, np.int32)), info


def _rows(batches):
  return np.concatenate([b["image"][:, 0, 0, 0] for b in batches])


# ----------------------------------------------------------------------------------------------
# Shapes and ranges.


def test_train_batch_shapes_dtypes_and_ranges():
  for batch in _take(_digits_train(), 5):
    assert set(batch) == {"image", "label"}
    chex.assert_shape(batch["image"], (16, 8, 8, 1))
    chex.assert_shape(batch["label"], (16,))
    assert batch["image"].dtype == np.int32 and batch["label"].dtype == np.int32
    assert batch["image"].min() >= 0 and batch["image"].max() < 17
    assert batch["label"].min() >= 0 and batch["label"].max() < 10
  assert max(b["image"].max() for b in _take(_digits_train(), 5)) == 16


# ----------------------------------------------------------------------------------------------
# Order: determinism, resumption, epochs.


def test_same_seed_same_batches_different_seed_different():
  first, again = _take(_digits_train(seed=3), 4), _take(_digits_train(seed=3), 4)
  other = _take(_digits_train(seed=4), 4)
  chex.assert_trees_all_equal(first, again)
  assert not np.array_equal(first[0]["image"], other[0]["image"])


@pytest.mark.parametrize("k", [1, 7, 200])  # 200 * 16 examples: past the first epoch of 1500
def test_start_step_resumes_at_step_k(k):
  fresh = _take(_digits_train(flip=True), k + 3)[k:]
  resumed = _take(_digits_train(flip=True, start_step=k), 3)
  chex.assert_trees_all_equal(resumed, fresh)


def test_epochs_are_fresh_permutations_and_batches_wrap():
  source, info = _index_source(10)
  ds = pipeline.make_train_dataset(source, info=info, global_batch_size=4, seed=0, **ONE)
  stream = _rows([ds[k] for k in range(15)])  # 60 elements = 6 epochs of 10
  epochs = stream.reshape(6, 10)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(10))
  assert len({tuple(e) for e in epochs}) == 6
  # Batch 2 holds the last 2 examples of epoch 0 and the first 2 of epoch 1.
  np.testing.assert_array_equal(ds[2]["image"][:, 0, 0, 0], stream[8:12])


def test_bad_train_arguments():
  source, info = _index_source(10)
  with pytest.raises(ValueError, match="seed"):
    pipeline.make_train_dataset(source, info=info, global_batch_size=4, seed=-1, **ONE)
  with pytest.raises(ValueError, match="start_step"):
    pipeline.make_train_dataset(source, info=info, global_batch_size=4, seed=0, start_step=-1,
                                **ONE)
  with pytest.raises(ValueError, match="process_count"):
    pipeline.make_train_dataset(source, info=info, global_batch_size=4, seed=0, process_index=0)


# ----------------------------------------------------------------------------------------------
# Per-process sharding.


@pytest.mark.parametrize("num_processes", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(num_processes):
  kwargs = {"global_batch_size": 8, "seed": 5, "flip": True, "rot90": True, "augment_flag": True,
            "start_step": 180}
  global_batches = _take(_digits_train(**kwargs), 10)  # crosses the epoch boundary at step 187
  local = [_take(_digits_train(**kwargs, process_index=p, process_count=num_processes), 10)
           for p in range(num_processes)]
  for step, batch in enumerate(global_batches):
    assert set(batch) == {"image", "label", "conditioning"}
    for key in batch:
      parts = [local[p][step][key] for p in range(num_processes)]
      chex.assert_shape(parts, [(8 // num_processes,) + batch[key].shape[1:]] * num_processes)
      np.testing.assert_array_equal(np.concatenate(parts), batch[key])


def test_global_batch_not_divisible_by_process_count():
  with pytest.raises(ValueError, match=r"global_batch_size=10.*process_count=4"):
    _digits_train(global_batch_size=10, process_index=1, process_count=4)
  with pytest.raises(ValueError, match=r"process_index=4"):
    _digits_train(global_batch_size=8, process_index=4, process_count=4)


# ----------------------------------------------------------------------------------------------
# Evaluation: one ordered, padded pass.


@pytest.mark.parametrize("num_processes,max_examples", [(1, None), (2, None), (4, 50)])
def test_eval_covers_the_split_exactly_once(num_processes, max_examples):
  src = data.get_source("digits", split="test")
  n = 297 if max_examples is None else max_examples
  expected = np.stack([src[i]["image"] for i in range(n)])
  per_process = [list(pipeline.eval_iterator(
      "digits", global_batch_size=64, process_index=p, process_count=num_processes,
      max_examples=max_examples)) for p in range(num_processes)]
  assert all(len(batches) == -(-n // 64) for batches in per_process)
  images, masks = [], []
  for step in range(len(per_process[0])):
    for p in range(num_processes):
      batch = per_process[p][step]
      chex.assert_shape(batch["image"], (64 // num_processes, 8, 8, 1))
      assert batch["mask"].dtype == bool
      images.append(batch["image"])
      masks.append(batch["mask"])
  images, masks = np.concatenate(images), np.concatenate(masks)
  assert masks.sum() == n and masks[:n].all() and not masks[n:].any()
  np.testing.assert_array_equal(images[:n], expected)
  assert not images[n:].any()


def test_eval_max_examples_must_be_positive():
  with pytest.raises(ValueError, match="max_examples"):
    pipeline.eval_iterator("digits", global_batch_size=8, max_examples=0, **ONE)


# ----------------------------------------------------------------------------------------------
# Flips.


def test_flips_are_deterministic_and_flip_about_half():
  kwargs = {"global_batch_size": 64, "seed": 9}
  plain = np.concatenate([b["image"] for b in _take(_digits_train(**kwargs), 8)])
  flipped = np.concatenate([b["image"] for b in _take(_digits_train(flip=True, **kwargs), 8)])
  again = np.concatenate([b["image"] for b in _take(_digits_train(flip=True, **kwargs), 8)])
  np.testing.assert_array_equal(flipped, again)
  mirrored = plain[:, :, ::-1]
  same = (flipped == plain).all(axis=(1, 2, 3))
  was_mirrored = (flipped == mirrored).all(axis=(1, 2, 3))
  assert (same | was_mirrored).all()
  asymmetric = ~(plain == mirrored).all(axis=(1, 2, 3))
  fraction = was_mirrored[asymmetric].mean()
  assert 0.4 < fraction < 0.6, fraction


# ----------------------------------------------------------------------------------------------
# The official VDM "cifar10_aug" augmentation: flip, then k quarter turns, and the flag.

N_AUG, B_AUG = 4000, 100  # stream positions drawn in the statistical tests, batch size
SE_HALF = np.sqrt(0.25 / N_AUG)  # Monte-Carlo standard error of a rate of 1/2 (0.0079)
SE_QUARTER = np.sqrt(0.25 * 0.75 / N_AUG)  # ... of a rate of 1/4 (0.0068)
CHI2_2DF_P001 = 13.82  # chi-square, 2 degrees of freedom: P(stat > 13.82) = 0.001


def _dihedral_source(n=1000):
  """Image i (4x4x1) is i * 16 + arange(16): its smallest value names the example, and its 8
  flips / quarter turns all differ, so each output shows exactly how it was transformed."""
  images = (np.arange(n)[:, None] * 16 + np.arange(16)).reshape(n, 4, 4, 1).astype(np.int32)
  info = data.DatasetInfo("dihedral", (4, 4, 1), 16 * n, 0, {"train": n})
  return data.ArraySource(images, np.zeros(n, np.int32)), info


def _stream(seed=0, num=N_AUG, **kwargs):
  """The first `num` training examples (stream positions 0..num-1) of the dihedral source, as
  {key: [num, ...]}, and their untransformed originals [num, 4, 4, 1]."""
  source, info = _dihedral_source()
  ds = pipeline.make_train_dataset(source, info=info, global_batch_size=B_AUG, seed=seed, **ONE,
                                   **kwargs)
  batches = [ds[k] for k in range(num // B_AUG)]
  stream = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
  return stream, source.images[stream["image"].min(axis=(1, 2, 3)) // 16]


def _candidate(originals, flipped, k):
  """np.rot90(np.flip(x, W) if flipped else x, k) over the batch [N, H, W, C]."""
  return np.rot90(np.flip(originals, axis=2) if flipped else originals, k, axes=(1, 2))


def _transforms(stream, originals):
  """(flipped bool [N], k int [N]): the unique (f, k) with image == rot90(flip^f(x), k)."""
  matches = np.stack([(_candidate(originals, f, k) == stream["image"]).all(axis=(1, 2, 3))
                      for f in (False, True) for k in range(4)], axis=1)  # [N, 8]
  assert (matches.sum(axis=1) == 1).all(), "an output is not a flip / quarter turn of its source"
  which = matches.argmax(axis=1)
  return which >= 4, which % 4


@pytest.mark.parametrize("seed", [0, 1])
def test_augmentation_rates_and_independence(seed):
  """Tolerance: 4 Monte-Carlo standard errors for each rate over N_AUG = 4000 draws (each
  deterministic given the seed; a correct sampler fails one check with probability < 1e-4)."""
  flipped, k = _transforms(*_stream(seed=seed, flip=True, rot90=True))
  rotated = k > 0
  assert abs(flipped.mean() - 0.5) < 4 * SE_HALF, flipped.mean()
  assert abs(rotated.mean() - 0.5) < 4 * SE_HALF, rotated.mean()
  assert abs((flipped & rotated).mean() - 0.25) < 4 * SE_QUARTER, (flipped & rotated).mean()
  counts = np.bincount(k[rotated], minlength=4)[1:]  # k = 1, 2, 3 among the rotated
  n_rot = counts.sum()
  se_third = np.sqrt((1 / 3) * (2 / 3) / n_rot)
  assert (np.abs(counts / n_rot - 1 / 3) < 4 * se_third).all(), counts
  chi2 = ((counts - n_rot / 3) ** 2 / (n_rot / 3)).sum()
  assert chi2 < CHI2_2DF_P001, (chi2, counts)


def test_augmented_images_are_exact_flips_then_turns():
  both, originals = _stream(flip=True, rot90=True)
  flip_only, originals_f = _stream(flip=True)
  rot_only, originals_r = _stream(rot90=True)
  np.testing.assert_array_equal(originals_f, originals)  # same order whatever the augmentation
  np.testing.assert_array_equal(originals_r, originals)
  flipped, k_none = _transforms(flip_only, originals)
  not_flipped, k = _transforms(rot_only, originals)
  assert not k_none.any() and not not_flipped.any()
  # With both on, each example gets the flip of the flip-only run, then the turn of the
  # rot90-only run (in that order): np.rot90(np.flip(x, W), k), exactly.
  for f in (False, True):
    for turns in range(4):
      rows = (flipped == f) & (k == turns)
      np.testing.assert_array_equal(both["image"][rows], _candidate(originals[rows], f, turns))
  # The turn is counter-clockwise by k, k from the documented hash of (seed, stream position).
  _, flip_key, rot_key = pipeline._seed_words(0)
  decided = [pipeline._decisions(j, flip_key=flip_key, rot_key=rot_key) for j in range(N_AUG)]
  np.testing.assert_array_equal(flipped, [f for f, _ in decided])
  np.testing.assert_array_equal(k, [turns for _, turns in decided])
  assert np.rot90(np.array([[0, 1], [2, 3]])).tolist() == [[1, 3], [0, 2]]  # np: counter-clockwise


@pytest.mark.parametrize("flip,rot90", [(False, False), (True, False), (False, True),
                                        (True, True)])
def test_conditioning_is_flipped_or_rotated(flip, rot90):
  stream, originals = _stream(num=1000, flip=flip, rot90=rot90, augment_flag=True)
  flipped, k = _transforms(stream, originals)
  assert stream["conditioning"].dtype == np.uint8
  chex.assert_shape(stream["conditioning"], (1000,))
  np.testing.assert_array_equal(stream["conditioning"], (flipped | (k > 0)).astype(np.uint8))
  assert stream["conditioning"].any() == (flip or rot90)


def test_flip_decisions_are_those_of_earlier_versions():
  # Bits of stream positions 0..31 as the flip-only pipeline drew them before rot90 existed.
  golden = {0: "10001110110001110000010101100111", 7: "10110101100000000011010011101110"}
  for seed, bits in golden.items():
    flipped, _ = _transforms(*_stream(seed=seed, num=B_AUG, flip=True))
    assert "".join(str(int(f)) for f in flipped[:32]) == bits


def test_augmentation_is_deterministic_per_seed():
  kwargs = {"global_batch_size": 64, "flip": True, "rot90": True, "augment_flag": True}
  first = _take(_digits_train(seed=3, **kwargs), 4)
  again = _take(_digits_train(seed=3, **kwargs), 4)
  other = _take(_digits_train(seed=4, **kwargs), 4)
  chex.assert_trees_all_equal(first, again)
  assert not np.array_equal(first[0]["conditioning"], other[0]["conditioning"])


@pytest.mark.parametrize("k", [1, 7, 200])  # 200 * 16 examples: past the first epoch of 1500
def test_augmented_start_step_resumes_at_step_k(k):
  kwargs = {"flip": True, "rot90": True, "augment_flag": True}
  fresh = _take(_digits_train(**kwargs), k + 3)[k:]
  resumed = _take(_digits_train(start_step=k, **kwargs), 3)
  assert all(set(b) == {"image", "label", "conditioning"} for b in resumed)
  chex.assert_trees_all_equal(resumed, fresh)


def test_rot90_needs_square_images():
  source = data.ArraySource(np.zeros((10, 2, 3, 1), np.int32), np.zeros(10, np.int32))
  info = data.DatasetInfo("wide", (2, 3, 1), 2, 0, {"train": 10})
  with pytest.raises(ValueError, match=r"wide: rot90 needs square images.*\(2, 3, 1\)"):
    pipeline.make_train_dataset(source, info=info, global_batch_size=4, seed=0, rot90=True, **ONE)
  pipeline.make_train_dataset(source, info=info, global_batch_size=4, seed=0, flip=True, **ONE)[0]


@pytest.mark.parametrize("flip,rot90", [(False, False), (True, True)])
def test_augment_flag_false_keeps_the_batch_keys(flip, rot90):
  (batch,) = _take(_digits_train(flip=flip, rot90=rot90), 1)
  assert set(batch) == {"image", "label"}
  (batch,) = _take(_digits_train(flip=flip, rot90=rot90, augment_flag=True), 1)
  assert set(batch) == {"image", "label", "conditioning"}
  (batch,) = _take(pipeline.eval_iterator("digits", global_batch_size=16, **ONE), 1)
  assert set(batch) == {"image", "label", "mask"}  # evaluation is never augmented


# ----------------------------------------------------------------------------------------------
# Checks.


def test_pipeline_checks_every_batch():
  _, info = _index_source(10)
  images = np.zeros((10, 1, 1, 1), np.int32)
  images[7] = 10  # == vocab_size
  source = data.ArraySource(images, np.zeros(10, np.int32))
  ds = pipeline.make_eval_dataset(source, info=info, global_batch_size=4, **ONE)
  ds[0]  # rows 0..3 are fine
  with pytest.raises(ValueError, match="value 10"):
    ds[1]
  wrong_shape = data.ArraySource(np.zeros((10, 2, 1, 1), np.int32), np.zeros(10, np.int32))
  with pytest.raises(ValueError, match=r"shape \(1, 1, 1\), got \(2, 1, 1\)"):
    pipeline.make_eval_dataset(wrong_shape, info=info, global_batch_size=4, **ONE)[0]
  floats = data.ArraySource(np.zeros((10, 1, 1, 1), np.float32), np.zeros(10, np.int32))
  it = pipeline._iterate(pipeline.make_train_dataset(
      floats, info=info, global_batch_size=4, seed=0, **ONE), num_threads=2, prefetch=2)
  with pytest.raises(ValueError, match="dtype float32"):
    next(it)


def test_empty_split_is_an_error():
  _, info = _index_source(10)
  empty = data.ArraySource(np.zeros((0, 1, 1, 1), np.int32), np.zeros(0, np.int32))
  with pytest.raises(ValueError, match="empty"):
    pipeline.make_train_dataset(empty, info=info, global_batch_size=4, seed=0, **ONE)
  with pytest.raises(ValueError, match="empty"):
    pipeline.make_eval_dataset(empty, info=info, global_batch_size=4, **ONE)


