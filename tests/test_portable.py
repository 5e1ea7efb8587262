"""The portable coder: the integer network against its NumPy int64 reference bit for bit, its
pieces against exact arithmetic, the exact level tables against the float formulas, files that
decode under every XLA configuration, the integer model's file and digest, stored files."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax.compression import compress, compress_app, compress_format as fmt, compress_portable
from vdm_jax.compression import compress_stream, portable, portable_levels, portable_net as pn
from vdm_jax.compression import portable_quant, portable_store, portable_unet as pu
from vdm_jax.datasets import data
from vdm_jax.maths import diffusion
from vdm_jax.nets import model as model_lib

from conftest import patience

HERE = pathlib.Path(__file__).resolve().parent


def _vdm(*, vocab_size=17, channels=8, attention_everywhere=False, num_classes=0,
         block_impl="unrolled", fourier=(6,)):
  return model_lib.build_model(
      vocab_size=vocab_size, schedule="learned_monotone", gamma_min=-7.0, gamma_max=5.0,
      channels=channels, num_blocks=1, fourier_exponents=fourier,
      attention_everywhere=attention_everywhere, dropout=0.0, num_classes=num_classes,
      block_impl=block_impl, remat=False, dtype=jnp.float32, schedule_hidden=16)


def _params(vdm, shape, seed=0, noise=0.1):
  """Initial parameters plus Gaussian noise (the zero-initialised output layers included), so
  that every layer computes something."""
  params = vdm.init({"params": jax.random.PRNGKey(seed), "diffusion": jax.random.PRNGKey(1)},
                    jnp.zeros((1,) + shape, jnp.int32), train=False)["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [p + noise * jax.random.normal(k, p.shape)
                                   for p, k in zip(leaves, keys)])


def _int_model(vdm, params, shape, images):
  return portable.make(vdm, params, images, shape=shape, meta={"step": 0}, levels=2)


@pytest.fixture(scope="module")
def digits_images():
  split = data.get_source("digits", split="test")
  return np.stack([np.asarray(split[i]["image"]) for i in range(16)])


@pytest.fixture(scope="module")
def tiny(digits_images):
  """A digits VDM with random weights (8 channels, attention in the middle) and its integer
  model."""
  vdm = _vdm()
  params = _params(vdm, (8, 8, 1))
  model = _int_model(vdm, params, (8, 8, 1), digits_images)
  return {"vdm": vdm, "params": params, "model": model,
          "coder": compress_portable.from_bytes(portable.to_bytes(model)),
          "float": compress_app.vdm_model(vdm, params, shape=(8, 8, 1), config={"tiny": 1},
                                          step=0)}


# ----------------------------------------------------------------------------------------------
# The integer pieces.


def test_mul_shift_is_exact_rounding_for_every_int32():
  """floor((x m + 2^(sh-1)) / 2^sh) for x over the whole int32 range, m < 2^15, sh in 0..46,
  wherever the result fits int32: the JAX int32 version (split products) equals exact integer
  arithmetic."""
  rng = np.random.default_rng(0)
  n = 200_000
  x = np.concatenate([rng.integers(-2**31, 2**31, n), [-2**31, 2**31 - 1, -1, 0, 1, 65535]])
  m = np.concatenate([rng.integers(0, 2**15, n), [2**15 - 1] * 6])
  sh = np.concatenate([rng.integers(0, 47, n), [16, 16, 16, 0, 15, 17]])
  exact = np.array([(int(a) * int(b) + ((1 << int(s)) >> 1)) >> int(s)
                    for a, b, s in zip(x, m, sh)], dtype=object)
  fits = np.array([-2**31 <= v < 2**31 for v in exact])
  got = np.asarray(jax.jit(pn._jax_mul_shift)(x.astype(np.int32), m.astype(np.int32),
                                              sh.astype(np.int32)))
  assert fits.sum() > n // 2
  np.testing.assert_array_equal(got[fits].astype(np.int64), exact[fits].astype(np.int64))
  np.testing.assert_array_equal(pn._np_mul_shift(x, m, sh)[fits], exact[fits].astype(np.int64))


@pytest.mark.parametrize("case", ["random", "huge", "constant", "tiny", "one_outlier"])
def test_group_norm_is_exact_and_normalises(case):
  """The integer GroupNorm is the same in JAX (int32) and NumPy (int64) for inputs up to the
  residual limit 2^29 (no overflow anywhere), and c / sqrt(sum c^2) to 2^-9 (its sums are
  taken on at least 9 significant bits, 1/sqrt on 11), except where the groups' spread is a few
  units: the mean is rounded to an integer and 1 is added to the sum of squares (there the
  float GroupNorm's epsilon also dominates), so "tiny" is checked for exactness only."""
  rng = np.random.default_rng(1)
  shape = (3, 4, 4, 8)
  x = {"random": rng.integers(-2**20, 2**20, shape),
       "huge": rng.choice([-pn.RES_LIMIT, pn.RES_LIMIT], shape),
       "constant": np.full(shape, 12345),
       "tiny": rng.integers(-3, 4, shape),
       "one_outlier": np.where(rng.random(shape) < 0.02, 2**29,
                              rng.integers(-2**12, 2**12, shape))}[case]
  got = np.asarray(jax.jit(lambda v: pn.group_norm(pn.JAX, v, 4))(x.astype(np.int32)))
  ref = pn.group_norm(pn.NUMPY, x, 4)
  np.testing.assert_array_equal(got, ref)
  assert np.abs(ref).max() <= 2**pn.Y_FRAC + 2**pn.Y_FRAC // 64
  if case == "tiny":
    return
  g = x.reshape(3, 16, 4, 2).astype(np.float64)
  c = g - g.mean(axis=(1, 3), keepdims=True)
  want = c / np.sqrt((c * c).sum(axis=(1, 3), keepdims=True) + 1e-300) * 2.0**pn.Y_FRAC
  want = np.where((c * c).sum(axis=(1, 3), keepdims=True) == 0, 0, want).reshape(shape)
  assert np.max(np.abs(ref - want)) <= 2.0**-9 * 2.0**pn.Y_FRAC + 1


def test_integer_network_matches_its_numpy_reference_bit_for_bit(tiny):
  """The compiled int32 forward pass equals the int64 reference on inputs across the whole
  range of z (|z| < 32) at every level of a 4-step chain."""
  model = tiny["model"]
  ch = portable.PortableChain(model, compress.CoderSettings(4))
  rng = np.random.default_rng(2)
  for i in range(5):
    z = rng.integers(-(31 << pn.Z_FRAC), 31 << pn.Z_FRAC, (3, 8, 8, 1))
    z[0] = rng.integers(-(1 << pn.Z_FRAC), 1 << pn.Z_FRAC, (8, 8, 1))
    got = np.asarray(pu.unet(pn.JAX, ch.device, model.spec, z, ch.cond[i]))
    np.testing.assert_array_equal(got, pu.unet(pn.NUMPY, model.arrays, model.spec, z, ch.cond[i]))


def _float_eps(vdm, params, z_int, gamma_fixed):
  z = jnp.asarray(z_int / 2.0**pn.Z_FRAC, jnp.float32)
  g = jnp.full((z.shape[0],), gamma_fixed / 2.0**portable_quant.GAMMA_FRAC, jnp.float32)
  label = (jnp.full((z.shape[0],), vdm.score_net.num_classes, jnp.int32)
           if vdm.score_net.num_classes else None)
  return np.asarray(vdm.apply({"params": params}, z, g, label, method=model_lib.VDM.eps))


@pytest.mark.parametrize("variant", ["digits", "attention_everywhere", "class_conditional",
                                     "scan", "rgb_256"])
def test_integer_network_is_the_float_network_quantised(variant, digits_images):
  """For ScoreUNet variants (attention after every block, a class-conditional net coding with
  the null label, scanned blocks, 3 channels and K = 256): the int32 pass equals its int64
  reference, and NN(z) = eps_hat - z is the float network's to 10% (rms, relative to its rms).
  Rounding to int8 adds about 1% relative noise per layer (weights: max / rms ~ 3 over 72-576
  entries, 3 / (127 sqrt 12)); through the 8-12 layers of these 8-channel random nets that is
  2-5% (measured 2.2-5.1%), while a wrong scale, sign or table gives 30% and more."""
  shape, kw = (8, 8, 1), {}
  images = digits_images
  if variant == "attention_everywhere":
    kw = dict(attention_everywhere=True)
  elif variant == "class_conditional":
    kw = dict(num_classes=3)
  elif variant == "scan":
    kw = dict(block_impl="scan")
  elif variant == "rgb_256":
    shape, kw = (4, 4, 3), dict(vocab_size=256, fourier=(6, 7))
    images = np.random.default_rng(0).integers(0, 256, (8,) + shape)
  vdm = _vdm(**kw)
  params = _params(vdm, shape)
  model = _int_model(vdm, params, shape, images)
  ch = portable.PortableChain(model, compress.CoderSettings(2))
  rng = np.random.default_rng(3)
  for i in (0, 1, 2):
    x = 2.0 * (images[:4] + 0.5) / vdm.vocab_size - 1.0
    a, s = ch.tab.alpha[i], ch.tab.sigma[i]
    z = np.rint((a * x + s * rng.standard_normal(x.shape)) * 2.0**pn.Z_FRAC).astype(np.int64)
    got = np.asarray(pu.unet(pn.JAX, ch.device, model.spec, z, ch.cond[i]))
    np.testing.assert_array_equal(got, pu.unet(pn.NUMPY, model.arrays, model.spec, z,
                                               ch.cond[i]))
    nn_int = got / 2.0**pn.EPS_FRAC - z / 2.0**pn.Z_FRAC
    nn_float = _float_eps(vdm, params, z, int(ch.tab.gamma_fixed[i])) - z / 2.0**pn.Z_FRAC
    rel = np.sqrt(np.mean((nn_int - nn_float) ** 2) / np.mean(nn_float ** 2))
    assert rel < 0.1, (variant, i, rel)


# ----------------------------------------------------------------------------------------------
# The exact schedule.


def test_level_constants_are_the_float_formulas_in_exact_arithmetic(tiny):
  """gamma interpolated in the integer table, and every level's constants, against float64
  `diffusion.transition` / `posterior` at the same gammas (to 1e-9 relative: float64 rounding
  of the reference, where it cancels, is the difference); gamma(i / T) against the float
  schedule to 1e-4 (a 1024-interval table of a smooth function)."""
  model, vdm, params = tiny["model"], tiny["vdm"], tiny["params"]
  steps = 7
  gam = portable_levels.gammas(model.arrays["gamma"], steps)
  assert all(int(a) < int(b) for a, b in zip(gam, gam[1:]))
  float_g = np.asarray(vdm.apply({"params": params}, jnp.arange(steps + 1) / steps,
                                 method=model_lib.VDM.gamma), np.float64)
  np.testing.assert_allclose(np.asarray(gam, np.float64) / 2.0**20, float_g, atol=1e-4)
  tab = portable_levels.level_table(gam, gamma_frac=20)
  with jax.enable_x64(True):
    g = jnp.asarray(np.asarray(gam, np.float64) / 2.0**20)
    a_ts, s2_ts = diffusion.transition(gamma_s=g[:-1], gamma_t=g[1:])
    _, p_var = diffusion.posterior(jnp.zeros(steps), jnp.zeros(steps), gamma_s=g[:-1],
                                   gamma_t=g[1:])
    mean, _ = diffusion.posterior(jnp.ones(steps), jnp.zeros(steps), gamma_s=g[:-1],
                                  gamma_t=g[1:])
    x_hat = lambda e: diffusion.x_from_eps(jnp.zeros(steps), e, gamma=g[1:])
    mean_b, _ = diffusion.posterior(jnp.zeros(steps), x_hat(jnp.ones(steps)), gamma_s=g[:-1],
                                    gamma_t=g[1:])
    mean_a_x, _ = diffusion.posterior(jnp.ones(steps), diffusion.x_from_eps(
        jnp.ones(steps), jnp.zeros(steps), gamma=g[1:]), gamma_s=g[:-1], gamma_t=g[1:])
  close = lambda a, b: np.testing.assert_allclose(a, np.asarray(b, np.float64), rtol=1e-9)
  close(tab.coef[1:], a_ts)
  close(tab.q_std[1:], np.sqrt(s2_ts))
  close(tab.p_std[:-1], np.sqrt(p_var))
  close(tab.mean_a[1:], mean_a_x)
  close(tab.mean_b[1:], mean_b)
  assert tab.p_std[-1] == 1.0 and np.all(np.asarray(mean) > 0)


def test_scramble_words_is_the_float_count_away_from_ties():
  for std, delta, n in [(0.3, 2.0**-6, 64), (1.0, 2.0**-5, 6400), (0.001, 2.0**-14, 192)]:
    per_symbol = np.log2(std / delta * np.sqrt(2 * np.pi * np.e))
    assert portable_levels.scramble_words(std, delta, n) == 1 + int(np.ceil(n * per_symbol / 32))


# ----------------------------------------------------------------------------------------------
# Portable files.


def _portable_file(coder, images, steps=3, **kw):
  blob, stats = compress_portable.compress_images(coder, images, compress.CoderSettings(steps),
                                                  config_digest=b"cf", step=0, **kw)
  return blob, stats


def test_a_portable_file_round_trips_and_names_its_integer_model(tiny, digits_images):
  coder = tiny["coder"]
  blob, stats = _portable_file(coder, digits_images[:6], raw_fallback=False)
  header, _ = fmt.unpack(blob)
  assert header.coder == "portable" == stats["coder"]
  assert header.params_digest == bytes.fromhex(coder.digest)[:6]
  out, _ = compress_app.decompress_bytes(coder, blob)
  np.testing.assert_array_equal(out, digits_images[:6])
  assert out.dtype == digits_images.dtype


def test_the_integer_model_file_is_canonical_and_checked(tiny):
  blob = portable.to_bytes(tiny["model"])
  again = portable.from_bytes(blob)
  assert portable.to_bytes(again) == blob
  assert compress_portable.from_bytes(blob).digest == tiny["coder"].digest
  with pytest.raises(ValueError, match="not a vdm-jax integer model"):
    portable.from_bytes(b"PK\x03\x04" + blob[4:])
  with pytest.raises(ValueError, match="damaged"):
    portable.from_bytes(blob[:-1])
  with pytest.raises(ValueError, match="version 9"):
    portable.from_bytes(blob[:4] + b"\x09" + blob[5:])


def test_files_of_another_integer_model_or_environment_are_refused(tiny, digits_images,
                                                                   monkeypatch):
  """A portable file decodes only with the integer model its header names (by digest), in the
  same portable-coder environment (constriction version), where the integer network's probe
  outputs are the encoder's; and a float coder's file is not decoded by an integer model."""
  coder = tiny["coder"]
  blob, _ = _portable_file(coder, digits_images[:3], raw_fallback=False)
  vdm = tiny["vdm"]
  other = compress_portable.from_bytes(portable.to_bytes(_int_model(
      vdm, _params(vdm, (8, 8, 1), seed=5), (8, 8, 1), digits_images)))
  assert other.digest != coder.digest

  def expect(kind, match, model, data_):
    with pytest.raises(fmt.CompressedFileError, match=match) as info:
      compress_app.decompress_bytes(model, data_)
    assert info.value.kind == kind

  expect("model", f"integer model {coder.digest[:12]}; this is {other.digest[:12]}", other, blob)
  expect("model", "written by the portable coder; it decodes with its integer model",
         tiny["float"], blob)
  floated, _ = compress_app.compress_images(tiny["float"], digits_images[:3],
                                            compress.CoderSettings(3), raw_fallback=False)
  expect("model", "written by the float coder", coder, floated)
  monkeypatch.setattr(portable, "environment_digest", lambda: b"zz")
  expect("environment", "another constriction version", coder, blob)
  monkeypatch.undo()
  monkeypatch.setattr(compress_portable, "probe_digest", lambda *a: b"pppp")
  expect("environment", "computes other outputs", coder, blob)
  monkeypatch.undo()
  header, payload = fmt.unpack(blob)
  expect("corrupted", "impossible coder settings", coder,
         fmt.pack(header._replace(num_steps=0), payload))
  expect("stream", "does not decode consistently with its integer model", coder,
         fmt.pack(header._replace(seed_dropped=header.seed_dropped - 1), payload))


def test_a_missing_integer_model_is_remade_or_named(tiny, digits_images, tmp_path):
  """`decompress` finds the integer model in RUN/portable/ by the header's digest; where it is
  missing, one remade from the checkpoint is used only if its digest is the same, else the
  error names the file to copy."""
  coder = tiny["coder"]
  blob, _ = _portable_file(coder, digits_images[:2], raw_fallback=False)
  header, _ = fmt.unpack(blob)
  work = str(tmp_path)
  remade_elsewhere = compress_portable.from_bytes(portable.to_bytes(
      coder.model._replace(meta={"another": "machine"})))
  with pytest.raises(fmt.CompressedFileError, match=f"copy {coder.digest[:12]}.vdmq") as info:
    compress_portable.coder_for_file(work, header, name="f", remake=lambda: remade_elsewhere)
  assert info.value.kind == "missing"
  assert not os.path.exists(portable_store.model_path(work, coder.digest))
  got = compress_portable.coder_for_file(work, header, name="f", remake=lambda: coder)
  assert got.digest == coder.digest
  assert os.path.exists(portable_store.model_path(work, coder.digest))
  assert compress_portable.coder_for_file(work, header, name="f").digest == coder.digest


_FUSIONS = ("default", "LIBRARY_FUSION_TYPE_DOT",
            "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE")


def _worker(args, *, fusion, devices):
  env = dict(os.environ, VDM_JAX_XLA_CPU_YNN_FUSION_TYPE=fusion, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, str(HERE / "portable_worker.py"), *map(str, args)],
                        env=env, capture_output=True, text=True, timeout=patience(600))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_files_decode_exactly_under_every_xla_configuration(tiny, digits_images, tmp_path):
  """Each of the three YNNPACK fusion settings, with 1 and with 4 host devices, in its own
  process: the integer network's outputs have the same digest everywhere (and equal the NumPy
  int64 reference), the files written are the same bytes, and each process decodes its own
  file and those written before it exactly (the same bytes: so every file decodes under every
  configuration)."""
  model_path, images_path = tmp_path / "m.vdmq", tmp_path / "x.npy"
  model_path.write_bytes(portable.to_bytes(tiny["model"]))
  np.save(images_path, digits_images[:5])
  configs = [(f, d) for f in _FUSIONS for d in (1, 4)]
  files, forwards = [], set()
  for n, (fusion, devices) in enumerate(configs):
    files.append(tmp_path / f"{n}.vdmz")
    out = _worker([model_path, images_path, "encode", files[-1], *files[:-1]], fusion=fusion,
                  devices=devices)
    assert out["matches_reference"], (fusion, devices)
    assert out["decoded"] == [True] * len(files), (fusion, devices)
    forwards.add(out["forward"])
  assert len(forwards) == 1
  assert len({f.read_bytes() for f in files}) == 1


# ----------------------------------------------------------------------------------------------
# Never larger than the raw data.

HEADER_ALLOWANCE = 72   # bytes: header (<= 60 with 3-byte counts) and checksum, the ANS head


def _data(kind, digits_images):
  if kind == "noise":
    return np.random.default_rng(7).integers(0, 17, (20, 8, 8, 1)).astype(np.uint8)
  if kind == "constant":
    return np.concatenate([np.zeros((3, 8, 8, 1), np.uint8), np.full((3, 8, 8, 1), 16, np.uint8)])
  split = data.get_source("digits", split="test")
  return np.stack([np.asarray(split[i]["image"]) for i in range(len(split))])


@pytest.mark.parametrize("kind", ["noise", "constant", "test_split"])
@pytest.mark.parametrize("coder", ["portable", "float"])
def test_a_file_is_never_larger_than_the_raw_data_plus_a_fixed_header(tiny, digits_images,
                                                                      kind, coder):
  """ceil(N D log2 K / 8) bytes plus HEADER_ALLOWANCE, whatever the model: these random-weight
  models code digits at more than log2 17 bits per value, so batches and files fall back to
  the stored images; they decode exactly without any model."""
  images = _data(kind, digits_images)
  kw = {"coder": tiny["coder"]} if coder == "portable" else {}
  blob, stats = compress_app.compress_images(
      tiny["float"], images, compress.CoderSettings(2, max_batch=32), **kw)
  raw = math.ceil(images.size * math.log2(17) / 8)
  assert len(blob) <= raw + HEADER_ALLOWANCE, (len(blob), raw)
  header, _ = fmt.unpack(blob)
  assert header.coder == stats["coder"]
  out, _ = compress_app.decompress_bytes(None if header.coder == "stored" else (
      tiny["coder"] if coder == "portable" else tiny["float"]), blob)
  np.testing.assert_array_equal(out, images)
  assert out.dtype == images.dtype


def test_batches_stored_raw_and_coded_mix_in_one_stream(tiny, digits_images, monkeypatch):
  """The per-batch choice: with the raw size made alternately huge and zero, coded and raw
  batches alternate in the stream, each behind its flag, and the stream decodes exactly."""
  choice = iter([0.0, 1e9, 1e9] * 50)     # also read by the accounting of raw batches
  monkeypatch.setattr(compress_stream, "raw_bits", lambda n, k: next(choice))
  ch = compress_portable.chain(tiny["coder"], compress.CoderSettings(2))
  images = digits_images[:12].astype(np.int32)
  enc = compress_stream.encode_images(ch, images, expected_bits=None)
  assert 0 < enc.raw_batches < len(enc.schedule)
  out = compress_stream.decode_images(ch, enc.payload, num_images=12,
                                      num_seed_words=enc.seed_words,
                                      seed_dropped=enc.seed_dropped, rho=enc.rho, head=enc.head)
  np.testing.assert_array_equal(out, images)


@pytest.mark.parametrize("im2col", [False, True])
def test_integer_products_are_exact_beyond_float32s_24_bits(im2col):
  """Sums of int8 products above 2^24 (128 input channels of +-127, 3x3: 18.6 million) are
  exact: the float32 matmuls are chunked so that every partial sum stays below 2^24. Both
  convolution routes (XLA's convolution on CPU; im2col and a matmul, the route on GPU / TPU)
  and the dense and attention products, against exact integers."""
  rng = np.random.default_rng(4)
  a = rng.integers(125, 128, (2, 4, 4, 128)).astype(np.int8)   # odd and even sums
  w = rng.integers(125, 128, (3, 3, 128, 8)).astype(np.int8)
  got = np.asarray(jax.jit(lambda x, y: pn._jax_conv3x3(x, y, im2col=im2col))(a, w))
  want = pn._np_conv3x3(a.astype(np.int64), w.astype(np.int64))
  assert np.abs(want).max() > 2**24 and np.any(want % 2)
  np.testing.assert_array_equal(got, want)
  d = rng.integers(125, 128, (3, 2048)).astype(np.int8)
  e = rng.integers(125, 128, (2048, 5)).astype(np.int8)
  np.testing.assert_array_equal(np.asarray(jax.jit(pn.JAX.dense)(d, e)),
                                d.astype(np.int64) @ e.astype(np.int64))
  q = d.reshape(1, 3, 2048)
  np.testing.assert_array_equal(np.asarray(jax.jit(pn.JAX.qk)(q, q)), pn.NUMPY.qk(q, q))
