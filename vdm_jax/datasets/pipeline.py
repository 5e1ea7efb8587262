"""Input pipelines: the trainer's batches of a data set (`vdm_jax.datasets.data`), read with grain.

Batches are dicts of NumPy arrays::

  "image": int32 [B_local, H, W, C], values in [0, vocab_size)
  "label": int32 [B_local] (0 for data sets without labels)
  "mask":  bool  [B_local] (eval only; False on padding rows)
  "conditioning": uint8 [B_local] (training with augment_flag=True only; 1 where the example was
                  flipped or rotated, else 0)

Training order. The training stream is the concatenation of epochs, each a fresh permutation of
the split (grain's `MapDataset.shuffle(...).repeat()`); global batch k holds stream elements
[k B, (k + 1) B). No example is dropped or repeated within an epoch; when B does not divide the
split size the batch at the end of an epoch wraps into the next one. Every batch is therefore a
pure function of (seed, k), `start_step` resumes by random access without reading skipped batches,
and process p of P reads rows [p B/P, (p + 1) B/P) of each global batch, so the processes'
batches concatenate to the single-process one.

Augmentation (training only). The official VDM code trains its augmented CIFAR-10 model
("cifar10_aug", 2.49 bpd) on images that are, independently of each other, mirrored left-right
with probability 1/2 and, with probability 1/2, turned counter-clockwise by k quarter turns with
k drawn uniformly from {1, 2, 3} (the flip first, then the turn); the network also receives a
scalar conditioning input that is 1 when either transformation was applied and 0 otherwise.
Evaluation data is never augmented (conditioning 0: the eval batches here carry no key). Here
`flip`, `rot90` and `augment_flag` switch these on one by one. Every decision is a pure function
of (seed, stream position): the flip reads bit 0 of SplitMix64(flip_key ^ position), the turn
reads SplitMix64(rot_key ^ position) (bit 0: turn or not; the remaining 63 bits mod 3: k - 1),
with flip_key and rot_key two independent 64-bit words drawn from the seed. Resumption is
therefore exact, and enabling one transformation never changes the other's decisions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from vdm_jax.datasets.data import DatasetInfo, Example, get_info, get_source, validate_images

Batch = dict[str, np.ndarray]


# ----------------------------------------------------------------------------------------------
# Batching and augmentation.


def _make_batch(examples: Sequence[Example], *, info: DatasetInfo) -> Batch:
  """Stacks examples into {"image": int32 [B, H, W, C], "label": int32 [B]}, plus "mask": bool [B]
  and "conditioning": uint8 [B] when the examples carry them."""
  for ex in examples:
    if np.shape(ex["image"]) != tuple(info.shape):
      raise ValueError(f"{info.name}: expected an image of shape {tuple(info.shape)}, "
                       f"got {np.shape(ex['image'])}")
  images = validate_images(np.stack([ex["image"] for ex in examples]), info=info)
  batch = {"image": images.astype(np.int32),
           "label": np.asarray([ex["label"] for ex in examples], dtype=np.int32)}
  if "mask" in examples[0]:
    batch["mask"] = np.asarray([ex["mask"] for ex in examples], dtype=bool)
  if "conditioning" in examples[0]:
    batch["conditioning"] = np.asarray([ex["conditioning"] for ex in examples], dtype=np.uint8)
  return batch


def _splitmix64(x: int) -> int:
  """A 64-bit integer hash (Steele et al. 2014), for per-example random bits."""
  mask = (1 << 64) - 1
  x = (x + 0x9E3779B97F4A7C15) & mask
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
  return x ^ (x >> 31)


def _seed_words(seed: int) -> tuple[int, int, int]:
  """Returns (shuffle seed, flip_key, rot_key): a 32-bit and two 64-bit words hashed from `seed`
  (hashed so that seeds s and s + 1 do not share permutations: grain seeds epoch e with seed + e).
  generate_state(n)[:3] does not depend on n, so the flips are those of earlier versions."""
  w = [int(x) for x in np.random.SeedSequence(seed).generate_state(5)]
  return w[0], w[1] << 32 | w[2], w[3] << 32 | w[4]


def _decisions(index: int, *, flip_key: int | None, rot_key: int | None) -> tuple[bool, int]:
  """Returns (flipped, k) for stream position `index`: whether to mirror left-right, and the
  number k in {0, 1, 2, 3} of counter-clockwise quarter turns (0 with probability 1/2, else
  uniform on {1, 2, 3}). A key of None disables that transformation."""
  flipped = flip_key is not None and bool(_splitmix64(flip_key ^ index) & 1)
  k = 0
  if rot_key is not None:
    bits = _splitmix64(rot_key ^ index)
    if bits & 1:
      k = 1 + (bits >> 1) % 3  # 63 bits mod 3: bias below 1e-18
  return flipped, k


def _augment(index: int, example: Example, *, flip_key: int | None, rot_key: int | None,
             augment_flag: bool) -> Example:
  """Mirrors example["image"] [H, W, C] along W, then turns it by k * 90 degrees
  counter-clockwise (np.rot90 over axes (H, W)), as `_decisions` says for stream position
  `index`; with augment_flag, adds "conditioning": uint8 scalar, 1 iff either was applied."""
  flipped, k = _decisions(index, flip_key=flip_key, rot_key=rot_key)
  if flipped or k:
    image = np.asarray(example["image"])
    if flipped:
      image = image[:, ::-1]
    example = dict(example, image=np.rot90(image, k, axes=(0, 1)))
  if augment_flag:
    example = dict(example, conditioning=np.uint8(flipped or k > 0))
  return example


def _process(process_index: int | None, process_count: int | None,
             global_batch_size: int) -> tuple[int, int, int]:
  """Returns (p, P, B/P), defaulting to jax.process_index() / jax.process_count()."""
  if process_index is None and process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  elif process_index is None or process_count is None:
    raise ValueError(f"give both process_index and process_count or neither, got "
                     f"process_index={process_index}, process_count={process_count}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"expected 0 <= process_index < process_count, got "
                     f"process_index={process_index}, process_count={process_count}")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count}")
  return process_index, process_count, global_batch_size // process_count


# ----------------------------------------------------------------------------------------------
# Pipelines.


def make_train_dataset(source: Any, *, info: DatasetInfo, global_batch_size: int, seed: int,
                       start_step: int = 0, flip: bool = False, rot90: bool = False,
                       augment_flag: bool = False, process_index: int | None = None,
                       process_count: int | None = None) -> grain.MapDataset:
  """The infinite training pipeline as a grain MapDataset: element j is this process's batch at
  step start_step + j (see the module docstring for the order, the epoch boundaries and the
  augmentation, which follows the official VDM "cifar10_aug" training data).

  Args:
    source: random-access source of {"image": [H, W, C], "label": int} dicts.
    info: the data set's description (shape and vocab_size are checked on every batch).
    global_batch_size: B, summed over processes.
    seed: non-negative integer; fixes the per-epoch permutations, the flips and the rotations.
    start_step: first step to serve (random access: skipped batches are never read).
    flip: mirror each image left-right (reverse W) with probability 1/2.
    rot90: then, independently, with probability 1/2 turn it counter-clockwise by k * 90 degrees
      (np.rot90 over (H, W)), k uniform on {1, 2, 3}. Needs H == W.
    augment_flag: add "conditioning": 1 for each example that was flipped or rotated (either one
      or both), else 0 (all 0 when flip and rot90 are off). False: no "conditioning" key.
    process_index, process_count: p and P (default: jax.process_index() / process_count()).

  Returns:
    MapDataset of {"image": int32 [B/P, H, W, C], "label": int32 [B/P]}, plus
    "conditioning": uint8 [B/P] when augment_flag.

  Raises:
    ValueError: bad seed, start_step or process arguments, an empty source, or rot90 with
      non-square images (H != W).
  """
  p, num_processes, local_batch = _process(process_index, process_count, global_batch_size)
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"expected a non-negative integer seed, got {seed!r}")
  if start_step < 0:
    raise ValueError(f"expected start_step >= 0, got {start_step}")
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f"{info.name}: the training split is empty")
  if rot90 and info.shape[0] != info.shape[1]:
    raise ValueError(f"{info.name}: rot90 needs square images (H == W), got shape (H, W, C) = "
                     f"{tuple(info.shape)}")
  shuffle_seed, flip_key, rot_key = _seed_words(int(seed))
  ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
  if flip or rot90 or augment_flag:  # map_with_index: the index is the stream position
    ds = ds.map_with_index(functools.partial(
        _augment, flip_key=flip_key if flip else None, rot_key=rot_key if rot90 else None,
        augment_flag=augment_flag))
  ds = ds.batch(local_batch, batch_fn=functools.partial(_make_batch, info=info))
  # Local batches of size B/P: global batch k is local batches kP .. kP + P - 1, in order.
  return ds[start_step * num_processes + p::num_processes]


class _PaddedSource:
  """The first n examples of `source` with mask=True, then zero images with mask=False."""

  def __init__(self, source: Any, *, n: int, length: int, info: DatasetInfo):
    self._source, self._n, self._length = source, n, length
    self._pad = {"image": np.zeros(info.shape, np.uint8), "label": 0, "mask": False}

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> Example:
    if index >= self._n:
      return self._pad
    return dict(self._source[index], mask=True)


def make_eval_dataset(source: Any, *, info: DatasetInfo, global_batch_size: int,
                      process_index: int | None = None, process_count: int | None = None,
                      max_examples: int | None = None) -> grain.MapDataset:
  """One ordered pass over the first min(len(source), max_examples) = n examples.

  The pass is padded to ceil(n / B) global batches with mask=False rows, so every process gets
  the same number of batches and sum(mask) over all processes and batches is exactly n.

  Returns:
    MapDataset of {"image": int32 [B/P, H, W, C], "label": int32 [B/P], "mask": bool [B/P]}.
  """
  p, num_processes, local_batch = _process(process_index, process_count, global_batch_size)
  if max_examples is not None and max_examples < 1:
    raise ValueError(f"expected max_examples >= 1 or None, got {max_examples}")
  n = len(source) if max_examples is None else min(len(source), max_examples)
  if n == 0:
    raise ValueError(f"{info.name}: the evaluation split is empty")
  length = math.ceil(n / global_batch_size) * global_batch_size
  ds = grain.MapDataset.source(_PaddedSource(source, n=n, length=length, info=info))
  ds = ds.batch(local_batch, batch_fn=functools.partial(_make_batch, info=info))
  return ds[p::num_processes]


def _iterate(ds: grain.MapDataset, num_threads: int, prefetch: int) -> Iterator[Batch]:
  """Threaded, ordered prefetching over the batches of `ds`."""
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(options))


def train_iterator(name: str, *, global_batch_size: int, seed: int, start_step: int = 0,
                   flip: bool = False, rot90: bool = False, augment_flag: bool = False,
                   data_dir: str | None = None,
                   process_index: int | None = None, process_count: int | None = None,
                   split: str = "train", num_threads: int = 8,
                   prefetch_buffer_size: int = 16) -> Iterator[Batch]:
  """Infinite iterator over this process's training batches from step `start_step` on.

  Yields:
    {"image": int32 [B/P, H, W, C] in [0, vocab_size), "label": int32 [B/P]}, plus
    "conditioning": uint8 [B/P] when augment_flag; see `make_train_dataset` for the arguments
    (flip, rot90, augment_flag: the official VDM "cifar10_aug" augmentation) and the module
    docstring for the order.
  """
  info = get_info(name, data_dir=data_dir)
  ds = make_train_dataset(
      get_source(name, split=split, data_dir=data_dir), info=info,
      global_batch_size=global_batch_size, seed=seed, start_step=start_step, flip=flip,
      rot90=rot90, augment_flag=augment_flag, process_index=process_index,
      process_count=process_count)
  return _iterate(ds, num_threads, prefetch_buffer_size)


def eval_iterator(name: str, *, split: str = "test", global_batch_size: int,
                  data_dir: str | None = None, process_index: int | None = None,
                  process_count: int | None = None, max_examples: int | None = None,
                  num_threads: int = 8, prefetch_buffer_size: int = 16) -> Iterator[Batch]:
  """One ordered, padded pass over a split (see `make_eval_dataset`).

  Yields:
    {"image": int32 [B/P, H, W, C], "label": int32 [B/P], "mask": bool [B/P]}, for
    ceil(n / B) batches, n = min(split size, max_examples).
  """
  info = get_info(name, data_dir=data_dir)
  ds = make_eval_dataset(
      get_source(name, split=split, data_dir=data_dir), info=info,
      global_batch_size=global_batch_size, process_index=process_index,
      process_count=process_count, max_examples=max_examples)
  return _iterate(ds, num_threads, prefetch_buffer_size)
