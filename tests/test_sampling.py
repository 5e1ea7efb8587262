"""Tests of vdm_jax.sampling on cases with a known answer."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import elbo, sampling, schedules

GAMMA_FN = schedules.FixedLinear(gamma_min=-10.0, gamma_max=10.0)
VOCAB = 8
DATA = np.array([[0, 7], [3, 3], [5, 1], [6, 6], [1, 4]], np.int32)   # N = 5 points, D = 2


def _members(samples, data):
  """Boolean [B]: is each sample one of the data points?"""
  return (samples[:, None, :] == data[None, :, :]).all(-1).any(-1)


def test_decode_recovers_bin_centres():
  k = np.arange(VOCAB, dtype=np.int32)[None].repeat(3, 0)
  gamma_0 = GAMMA_FN(0.0)
  alpha_0, _ = schedules.alpha_sigma(gamma_0)
  z_0 = alpha_0 * elbo.encode(k, vocab_size=VOCAB)
  out = sampling.decode(None, z_0, gamma_0=gamma_0, vocab_size=VOCAB)
  assert out.dtype == jnp.int32
  np.testing.assert_array_equal(out, k)
  drawn = sampling.decode(jax.random.key(0), z_0, gamma_0=gamma_0, vocab_size=VOCAB, mode="sample")
  np.testing.assert_array_equal(drawn, k)   # sigma_0 / bin width ~ 0.03: p(k | z_0) ~ one-hot


def test_ancestral_with_oracle_lands_on_data():
  eps_fn = elbo.oracle_eps_fn(DATA, vocab_size=VOCAB)
  n = 2000
  run = jax.jit(lambda key: sampling.ancestral_sample(
      key, eps_fn=eps_fn, gamma_fn=GAMMA_FN, shape=(n, 2), num_steps=100, vocab_size=VOCAB))
  out = np.asarray(run(jax.random.key(1)))
  chex.assert_shape(out, (n, 2))
  assert _members(out, DATA).all()
  freq = (out[:, None, :] == DATA[None]).all(-1).mean(0)
  # uniform 1/5 each; binomial SE = sqrt(0.2 * 0.8 / 2000) = 0.009; allow 5 SE.
  np.testing.assert_allclose(freq, 0.2, atol=0.045)
