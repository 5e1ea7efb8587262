"""The portable coder: the integer network against its NumPy int64 reference bit for bit, its
pieces against exact arithmetic, the exact level tables against the float formulas, files that
decode under every XLA configuration, the integer model's file and digest, stored files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import compress, data, model as model_lib, portable, portable_net as pn
from vdm_jax import portable_quant, portable_unet as pu


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
  return {"vdm": vdm, "params": params, "model": model}


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
