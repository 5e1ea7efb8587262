"""The head of a stream (`compress_head`): the direct pixel coder's tables, its exact round trip,
its code lengths, and the stream's head: how many images it takes, what it saves, raw heads and
files of format version 4 (no head)."""

import numpy as np
import pytest

from vdm_jax.compression import compress, compress_app, compress_format as fmt
from vdm_jax.compression import compress_head, compress_stream

from test_compress import T, digits  # noqa: F401  (the digits run fixture)


@pytest.mark.parametrize("vocab_size", [2, 17, 256])
def test_tables_are_integer_two_sided_geometric_with_increasing_means(vocab_size):
  weights, means = compress_head.tables(vocab_size)
  assert weights.shape == (compress_head.NUM_TABLES, vocab_size) and weights.dtype == np.int64
  np.testing.assert_array_equal(weights.sum(1), (1 << compress.PRECISION_BITS) - vocab_size)
  assert weights.min() >= 0 and np.all(np.diff(means) >= 0) and means[-1] > means[0]
  if vocab_size > 2:
    k = vocab_size
    # symmetric in the sign of e (s and K - s), non-increasing in |e| (s = 0 holds the remainder)
    np.testing.assert_array_equal(weights[:, 1:(k + 1) // 2], weights[:, k - 1:k // 2:-1])
    assert np.all(np.diff(weights[:, :k // 2 + 1], axis=1) <= 0)
    # the first table is sharp (theta = 1/16), the last nearly flat
    assert weights[0, 0] > 0.8 * weights[0].sum() and weights[-1, k // 2] > 0.5 * weights[-1, 0]


def _round_trip(images, vocab_size):
  """Pushes images with one coder, pops them with a fresh one; returns (decoded, ideal bits,
  stack bits)."""
  shape = images.shape[1:]
  coder = compress_head.HeadCoder(shape, vocab_size)
  parts = [coder.symbols(image) for image in images]
  stack = compress.Stack(np.array([0x9E3779B9], np.uint32))
  start = stack.bits()
  coder.push(stack, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
  pushed = stack.bits() - start
  decoder = compress_head.HeadCoder(shape, vocab_size)
  out = np.stack([decoder.decode_image(stack) for _ in images])
  assert stack.bits() == start and stack.coder.get_compressed()[-1] == 0x9E3779B9
  return out, sum(p[2] for p in parts), pushed


@pytest.mark.parametrize("shape, vocab_size", [((8, 8, 1), 17), ((6, 9, 3), 256), ((5, 7, 2), 4),
                                               ((1, 1, 1), 2)])
def test_round_trip_is_exact_and_the_code_length_is_the_stacks(shape, vocab_size):
  rng = np.random.default_rng(sum(shape) + vocab_size)
  noise = rng.integers(0, vocab_size, (3,) + shape)
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  smooth = (yy[..., None] * 3 + xx[..., None] * 2 + np.arange(shape[2])) % vocab_size
  extremes = np.where(rng.random((2,) + shape) < 0.5, 0, vocab_size - 1)
  images = np.concatenate([noise, smooth[None], extremes]).astype(np.int64)
  out, ideal, pushed = _round_trip(images, vocab_size)
  np.testing.assert_array_equal(out, images)
  assert abs(pushed - ideal) < 64 + 1e-3 * ideal, (pushed, ideal)


def test_the_predictor_codes_smooth_images_in_few_bits_and_noise_near_raw():
  """MED predicts a plane exactly where its gradients along x and y have opposite signs (then
  the above-left value lies between the left and the above one), away from the zero border; the
  adaptive tables then code its zeros in well under a bit each. Uniform noise costs about
  log2 K bits."""
  yy, xx = np.mgrid[:32, :32]
  plane = np.stack([100 + 2 * xx - 3 * yy, 140 + 2 * xx - 3 * yy, 120 + xx - 2 * yy], -1)
  pred, _ = compress_head.predictions(plane, 256)
  np.testing.assert_array_equal(pred[1:, 1:], plane[1:, 1:])
  bits = compress_head.HeadCoder((32, 32, 3), 256).symbols(plane)[2]
  assert bits / plane.size < 0.5, bits / plane.size
  noise = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3))
  coder = compress_head.HeadCoder((32, 32, 3), 256)
  bpd = sum(coder.symbols(image)[2] for image in noise) / noise.size
  assert 8.0 < bpd < 8.5, bpd


def test_counters_are_halved_at_reset():
  coder = compress_head.HeadCoder((16, 16, 1), 17)
  coder.symbols(np.zeros((16, 16, 1), np.int64))
  assert coder.n.max() < compress_head.RESET and coder.n.max() >= compress_head.RESET // 2


def test_the_head_covers_the_first_dip_and_replaces_the_initial_bits(digits):  # noqa: F811
  """On the digits run: the head is the fewest first images whose direct code covers the first
  batch's dip (`first_dip`); the seed bits the file stores (initial bits) fall to a fraction of
  what they are without a head, and so does the file of a few images."""
  model, images = digits["model"], digits["images"][:40].astype(np.int32)
  chain = compress_app.chain(model, compress.CoderSettings(T))
  with_head = compress_stream.encode_images(chain, images, expected_bits=300.0,
                                            raw_fallback=False)
  without = compress_stream.encode_images(chain, images, expected_bits=300.0, raw_fallback=False,
                                          head=False)
  dip = compress_stream.first_dip(chain)
  coder = compress_head.HeadCoder(model.shape, model.vocab_size)
  bits = np.cumsum([coder.symbols(image)[2] for image in images[:with_head.head]])
  assert bits[-1] >= dip and (with_head.head == 1 or bits[-2] < dip), (bits, dip)
  np.testing.assert_allclose(with_head.ideal_coder[:with_head.head], np.diff(bits, prepend=0))
  assert with_head.schedule[0] == 1 and with_head.head + sum(with_head.schedule) == 40
  assert with_head.initial_bits < 0.25 * without.initial_bits, (with_head.initial_bits,
                                                                without.initial_bits)
  assert len(with_head.payload) < len(without.payload)
  assert with_head.head == 0 or without.head == 0


def test_a_head_longer_than_raw_is_stored_raw_and_decodes(digits):  # noqa: F811
  """Uniform noise: the direct code is longer than log2 K bits a value, so the head is stored
  raw (one flag), and the file still decodes."""
  model = digits["model"]
  noise = np.random.default_rng(1).integers(0, 17, (6, 8, 8, 1)).astype(np.uint8)
  blob, stats = compress_app.compress_images(model, noise, compress.CoderSettings(T))
  if stats["coder"] == "stored":     # the whole file stored raw: test the stream directly
    chain = compress_app.chain(model, compress.CoderSettings(T))
    encoded = compress_stream.encode_images(chain, noise.astype(np.int32), expected_bits=300.0)
    assert encoded.head >= 1 and encoded.raw_batches >= 1
    out = compress_stream.decode_images(
        chain, encoded.payload, num_images=6, num_seed_words=encoded.seed_words,
        seed_dropped=encoded.seed_dropped, rho=encoded.rho, head=encoded.head)
  else:
    assert stats["head"] >= 1 and stats["raw_batches"] >= 1
    out, _ = compress_app.decompress_bytes(model, blob)
  np.testing.assert_array_equal(out, noise)


def test_every_image_in_the_head(digits):  # noqa: F811
  """One image: the head takes it (its direct code is below the dip), no bits-back batch."""
  model, image = digits["model"], digits["images"][:1]
  blob, stats = compress_app.compress_images(model, image, compress.CoderSettings(T),
                                             raw_fallback=False)
  assert stats["head"] == 1 and stats["schedule"] == []
  out, header = compress_app.decompress_bytes(model, blob)
  assert header.head == 1
  np.testing.assert_array_equal(out, image)


def test_files_of_format_version_4_still_decode(digits):  # noqa: F811
  """A version 4 file (no head field; written here as version 4 did: no head) decodes; a head
  cannot be written in version 4."""
  model, images = digits["model"], digits["images"][:40]
  chain = compress_app.chain(model, compress.CoderSettings(T))
  blob, _ = compress_app.compress_images(model, images, compress.CoderSettings(T),
                                         raw_fallback=False)
  header, _ = fmt.unpack(blob)
  encoded = compress_stream.encode_images(chain, images.astype(np.int32), head=False,
                                          raw_fallback=False, version=4, expected_bits=300.0)
  assert any(b & (b - 1) for b in encoded.schedule)    # version 4's batches: any size
  old = header._replace(rho=encoded.rho, seed_words=encoded.seed_words,
                        seed_dropped=encoded.seed_dropped, payload_words=len(encoded.payload),
                        head=0, version=4, probe_digest=compress_app.probe_digest(
                            chain, compress_stream.buckets(encoded.schedule)))
  v4 = fmt.pack(old, encoded.payload)
  assert v4[4] == 4 and len(v4) == len(fmt.pack(old._replace(version=5), encoded.payload)) - 1
  out, read = compress_app.decompress_bytes(model, v4)
  assert read.head == 0 and read.version == 4
  np.testing.assert_array_equal(out, images)
  with pytest.raises(ValueError, match="version 4 has no head"):
    fmt.pack(header._replace(version=4), np.zeros(header.payload_words, np.uint32))
  with pytest.raises(ValueError, match="version 4 has no head"):
    compress_stream.encode_images(chain, images.astype(np.int32), version=4)
  with pytest.raises(ValueError, match="head of 41 images in a file of 40"):
    fmt.pack(header._replace(head=41), np.zeros(header.payload_words, np.uint32))


@pytest.mark.parametrize("num_images, rho, head", [(297, 13000, 0), (256, 14000, 4),
                                                   (1000, 65536, 3), (5, 1, 1)])
def test_batches_are_powers_of_two_that_grow_with_the_stack(num_images, rho, head):
  """Version 5: every batch is a power of two (its own compiled bucket: no padding rows), never
  larger than version 4's batch at the same point, and the batches cover the images after the
  head."""
  sizes = compress_stream.schedule(num_images, rho=rho, max_batch=256, head=head)
  assert sizes[0] == 1 and sum(sizes) == num_images - head
  assert all(b & (b - 1) == 0 and b <= 256 for b in sizes)
  assert compress_stream.buckets(sizes) == set(sizes)
  done = head
  for b in sizes:
    assert b <= compress_stream.next_batch(done, num_images, rho=rho, max_batch=256, head=head,
                                           version=4)
    done += b


@pytest.mark.parametrize("num_images", [1, 40])
def test_progress_counts_the_head_as_one_batch_and_keeps_its_total(
    digits, num_images):  # noqa: F811
  """The encoder reports from the first bits-back batch on (it sets the count), the decoder from
  the start; both end at their total, which never changes (a progress bar is made at the first
  report)."""
  model, images = digits["model"], digits["images"][:num_images].astype(np.int32)
  chain = compress_app.chain(model, compress.CoderSettings(T))
  calls = {"encode": [], "decode": []}
  enc = compress_stream.encode_images(chain, images, expected_bits=300.0,
                                      progress=lambda *a: calls["encode"].append(a))
  compress_stream.decode_images(chain, enc.payload, num_images=num_images,
                                num_seed_words=enc.seed_words, seed_dropped=enc.seed_dropped,
                                rho=enc.rho, head=enc.head,
                                progress=lambda *a: calls["decode"].append(a))
  batches = len(enc.schedule) + 1
  assert enc.head >= 1
  for what, reports in calls.items():
    assert {total for _, total in reports} == {batches}, (what, reports)
    assert [done for done, _ in reports] == list(range(batches - len(reports) + 1, batches + 1))
  assert len(calls["decode"]) == batches
