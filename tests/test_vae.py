"""Tests for vdm_jax.nets.vae: VAE shapes and terms, the frozen "vae" collection of LatentVDM, training
the latent VDM on a small fixed digits set, and sampling latents then decoding them."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vdm_jax.datasets import data
from vdm_jax.maths import latent, sampling
from vdm_jax.nets import model
from vdm_jax.nets import vae as vae_lib

import tiny_net

K = 17


def _digits(n=32):
  return jnp.asarray(data.get_source("digits", split="train").images[:n], jnp.int32)


def _vae(**kw):
  defaults = dict(vocab_size=K, channels=8, latent_channels=2, num_down=1, num_blocks=0)
  return vae_lib.VAE(**dict(defaults, **kw))


def _latent_vdm(vae, num_steps=0):
  """A latent VDM whose score network is 0 at initialisation (a tiny one, its output layer
  zero: tests/tiny_net.py), so that, freshly initialised, it is the N(0, I) prior of the VAE
  (the composition test below)."""
  return vae_lib.LatentVDM(
      vae=vae, schedule=model.NoiseSchedule(kind="learned_linear", gamma_min=-8.0, gamma_max=4.0),
      score_net=tiny_net.TinyNet(zero_out=True), num_steps=num_steps, cond_gamma_min=-8.0,
      cond_gamma_max=4.0)


def _init_vae(vae, images):
  rngs = {"params": jax.random.key(0), "latent": jax.random.key(1)}
  return jax.jit(lambda x: vae.init(rngs, x, train=False)["params"])(images[:1])


@functools.lru_cache(maxsize=None)
def _default_vae_params():
  return _init_vae(_vae(), _digits(1))


@functools.lru_cache(maxsize=None)
def _default_latent_init():
  """Fresh LatentVDM variables (random VAE in "vae") of `_latent_vdm(_vae())`, and with the
  `_default_vae_params()` VAE swapped in through `make_variables`."""
  rngs = {"params": jax.random.key(2), "latent": jax.random.key(3), "diffusion": jax.random.key(4)}
  lvdm = _latent_vdm(_vae())
  variables = jax.jit(lambda x: lvdm.init(rngs, x, train=False))(_digits(1))
  return vae_lib.make_variables(variables["params"], _default_vae_params()), variables


class VAETest(chex.TestCase):

  def test_shapes_terms_and_decode(self):
    images = _digits(4)
    vae = _vae()

    @jax.jit
    def run(variables, x):
      mean, log_var = vae.apply(variables, x, method=vae_lib.VAE.encode)
      return (mean, log_var, vae.apply(variables, mean, method=vae_lib.VAE.decode_logits),
              vae.apply(variables, x, train=True, rngs={"latent": jax.random.key(5)}),
              vae.apply(variables, mean, method=vae_lib.VAE.decode))

    mean, log_var, logits, terms, decoded = run({"params": _default_vae_params()}, images)
    chex.assert_shape([mean, log_var], (4, 4, 4, 2))
    chex.assert_shape(logits, (4, 8, 8, 1, K))
    chex.assert_shape([terms.reconstruction, terms.kl], (4,))
    chex.assert_tree_all_finite(terms)
    # KL(q(y|x) || N(0, I)) in closed form, float64, from the encoder's own outputs.
    m, lv = np.asarray(mean, np.float64), np.asarray(log_var, np.float64)
    kl = 0.5 * np.sum(np.exp(lv) + m**2 - 1.0 - lv, axis=(1, 2, 3))
    chex.assert_trees_all_close(terms.kl, kl, rtol=1e-5)
    chex.assert_trees_all_close(terms.total, terms.reconstruction + terms.kl)
    self.assertEqual(decoded.dtype, jnp.int32)
    chex.assert_shape(decoded, (4, 8, 8, 1))
    self.assertTrue(np.all((np.asarray(decoded) >= 0) & (np.asarray(decoded) < K)))
    chex.assert_trees_all_equal(decoded, jnp.argmax(logits, -1))
    # Extreme encoder outputs: log_var is clipped to LOG_VAR_RANGE, the terms stay finite.
    for bias in (1e3, -1e3):
      params = jax.tree.map(lambda a: a, _default_vae_params())
      conv_out = params["encoder"]["conv_out"]
      conv_out["bias"] = conv_out["bias"].at[2:].set(bias)
      _, log_var, _, terms, _ = run({"params": params}, images)
      limit = vae_lib.LOG_VAR_RANGE[int(bias > 0)]
      chex.assert_trees_all_close(log_var, jnp.full_like(log_var, limit))
      chex.assert_tree_all_finite(terms)

  def test_cifar_like_shapes(self):
    """3 channels, 256 values, two downsamplings (shapes only: traced, not compiled)."""
    vae = _vae(vocab_size=256, data_channels=3, num_down=2, latent_channels=3, num_blocks=1)
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.int32)
    rngs = {"params": jax.random.key(0), "latent": jax.random.key(1)}
    variables = jax.eval_shape(lambda x: vae.init(rngs, x, train=False), images)
    self.assertEqual(vae.latent_shape(images.shape), (2, 8, 8, 3))
    terms, logits, decoded = jax.eval_shape(lambda v, x, y: (
        vae.apply(v, x, train=False, rngs={"latent": jax.random.key(1)}),
        vae.apply(v, y, method=vae_lib.VAE.decode_logits),
        vae.apply(v, y, method=vae_lib.VAE.decode)), variables, images,
        jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32))
    self.assertEqual([t.shape for t in terms], [(2,), (2,)])
    self.assertEqual((logits.shape, logits.dtype), ((2, 32, 32, 3, 256), jnp.float32))
    self.assertEqual((decoded.shape, decoded.dtype), ((2, 32, 32, 3), jnp.int32))

  def test_bad_inputs_raise(self):
    vae = _vae()
    params = _default_vae_params()
    apply = lambda x, **kw: vae.apply({"params": params}, x, train=False,
                                      rngs={"latent": jax.random.key(0)}, **kw)
    with self.assertRaisesRegex(ValueError, "H and W divisible"):
      apply(jnp.zeros((1, 7, 8, 1), jnp.int32))
    with self.assertRaisesRegex(ValueError, r"\[B, H, W, 1\]"):
      apply(jnp.zeros((1, 8, 8, 3), jnp.int32))
    with self.assertRaisesRegex(ValueError, "outside"):
      apply(jnp.full((1, 8, 8, 1), K, jnp.int32))
    with self.assertRaisesRegex(ValueError, "label"):
      apply(_digits(1), label=jnp.zeros((1,), jnp.int32))
    with self.assertRaisesRegex(ValueError, "latent"):
      vae.apply({"params": params}, jnp.zeros((1, 4, 4, 3)), method=vae_lib.VAE.decode_logits)
    with self.assertRaisesRegex(ValueError, "vocab_size"):
      vae_lib.VAE(vocab_size=1)
    with self.assertRaisesRegex(ValueError, "num_down"):
      vae_lib.VAE(vocab_size=K, num_down=-1)


class LatentVDMTest(chex.TestCase):

  def test_vae_lives_in_its_own_collection(self):
    images = _digits(4)
    vae = _vae()
    vae_params = _default_vae_params()
    variables, fresh = _default_latent_init()
    self.assertEqual(set(fresh), {"params", "vae"})
    self.assertEqual(set(fresh["params"]), {"schedule", "score_net"})
    chex.assert_trees_all_equal_structs(vae_lib.vae_params_of(fresh), vae_params)
    self.assertIs(vae_lib.vae_params_of(variables), vae_params)
    rngs = {"latent": jax.random.key(7), "diffusion": jax.random.key(8)}
    lvdm, lvdm10 = _latent_vdm(vae), _latent_vdm(vae, num_steps=10)

    def bounds(key, x):
      k1, k2 = jax.random.split(key)
      r = {"latent": k1, "diffusion": k2}
      return (lvdm.apply(variables, x, train=False, rngs=r).total,
              vae.apply({"params": vae_params}, x, train=False, rngs=r).total)

    @jax.jit
    def run(x):
      return (lvdm.apply(variables, x, method=vae_lib.LatentVDM.encode),
              vae.apply({"params": vae_params}, x, method=vae_lib.VAE.encode),
              vae.apply({"params": vae_params}, x, train=False, rngs=rngs),
              [m.apply(variables, x, train=False, num_steps=n, rngs=rngs)
               for m, n in ((lvdm, None), (lvdm10, None), (lvdm, 10))],
              jax.vmap(bounds, (0, None))(jax.random.split(jax.random.key(0), 32), x))

    encoded, vae_encoded, vae_terms, (terms, terms10, terms_t10), (composed, elbo) = run(images)
    # With the N(0, I) base and the zero-initialised net, the latent VDM is the VAE's prior: the
    # composed bound equals the VAE bound up to Monte Carlo error (and the tiny VDM gap).
    diff = np.asarray(composed - elbo, np.float64)
    se = diff.std(0, ddof=1) / math.sqrt(diff.shape[0])
    np.testing.assert_array_less(np.abs(diff.mean(0)), 4 * se + 0.5)
    # The frozen encoder and decoder are exactly the given VAE's.
    chex.assert_trees_all_close(encoded, vae_encoded)
    chex.assert_trees_all_close(terms.data_reconstruction, vae_terms.reconstruction)
    chex.assert_shape(list(terms), (4,))
    chex.assert_tree_all_finite(terms)
    # num_steps: the module's T, overridable per call; only the latent diffusion term changes.
    chex.assert_trees_all_close(terms10, terms_t10)
    self.assertFalse(np.allclose(terms.latent_diffusion, terms10.latent_diffusion))
    chex.assert_trees_all_close(terms.neg_entropy, terms10.neg_entropy)
    # Gradients reach only "params".
    grads = jax.jit(jax.grad(lambda p: jnp.mean(lvdm.apply(
        {"params": p, "vae": variables["vae"]}, images, train=True,
        rngs=dict(rngs, dropout=jax.random.key(9))).total)))(variables["params"])
    self.assertEqual(set(grads), {"schedule", "score_net"})
    chex.assert_tree_all_finite(grads)
    with self.assertRaisesRegex(ValueError, "'vae' collection"):
      vae_lib.vae_params_of({"params": {}})


@pytest.mark.slow
def test_sample_latents_and_decode():
  """ancestral_sample on latents with the LatentVDM's closures, then decode: int images."""
  vae = _vae()
  lvdm = _latent_vdm(vae)
  variables, _ = _default_latent_init()
  eps_fn = lambda z, g: lvdm.apply(variables, z, g, None, method=vae_lib.LatentVDM.eps)
  gamma_fn = lambda t: lvdm.apply(variables, t, method=vae_lib.LatentVDM.gamma)
  shape = vae.latent_shape((3, 8, 8, 1))

  @jax.jit
  def run(key):
    y = sampling.ancestral_sample(key, eps_fn=eps_fn, gamma_fn=gamma_fn, shape=shape,
                                  num_steps=5)
    return y, lvdm.apply(variables, y, method=vae_lib.LatentVDM.decode)

  y, out = run(jax.random.key(0))
  chex.assert_shape(y, shape)
  chex.assert_tree_all_finite(y)
  assert out.dtype == jnp.int32
  chex.assert_shape(out, (3, 8, 8, 1))
  assert np.all((np.asarray(out) >= 0) & (np.asarray(out) < K))
  g0, g1 = lvdm.apply(variables, method=vae_lib.LatentVDM.endpoints)
  np.testing.assert_allclose([float(g0), float(g1)], [-8.0, 4.0], rtol=1e-6)


def _peaked_vae_params():
  """The default VAE with its encoder output rescaled (means x3, variances ~e^-4): an aggregate
  posterior far from the N(0, I) base, so the latent VDM has something to learn."""
  params = jax.tree.map(lambda a: a, _default_vae_params())   # a copy of the nested dicts
  conv_out = params["encoder"]["conv_out"]
  conv_out["kernel"] = 3.0 * conv_out["kernel"]
  conv_out["bias"] = conv_out["bias"].at[2:].set(-4.0)          # [mean (2), log_var (2)]
  return params


@pytest.mark.slow
def test_training_the_latent_vdm_lowers_the_bound():
  """40 optax steps on 32 fixed digits: the composed bound falls; the VAE is unchanged."""
  images = _digits(32)
  lvdm = _latent_vdm(_vae())
  vae_params = _peaked_vae_params()
  params = _default_latent_init()[0]["params"]
  frozen = vae_lib.frozen_collections(vae_params)
  vae_before = jax.tree.map(np.array, vae_params)
  tx = optax.adam(3e-3)

  def loss(params, key):
    k1, k2, k3 = jax.random.split(key, 3)
    return jnp.mean(lvdm.apply({"params": params, **frozen}, images, train=True,
                               rngs={"latent": k1, "diffusion": k2, "dropout": k3}).total)

  @jax.jit
  def step(params, opt_state, key):
    grads = jax.grad(loss)(params, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  evaluate = jax.jit(lambda p: jax.vmap(lambda k: loss(p, k))(
      jax.random.split(jax.random.key(123), 8)))
  opt_state = tx.init(params)
  before = np.asarray(evaluate(params))
  for i in range(40):
    params, opt_state = step(params, opt_state, jax.random.key(i))
  after = np.asarray(evaluate(params))
  se = math.sqrt((before.var(ddof=1) + after.var(ddof=1)) / 8)
  # Measured: 295.0 -> 276.8 nats (standard error ~1.3).
  assert np.all(np.isfinite(after)) and after.mean() < before.mean() - max(5.0, 4 * se), (
      before.mean(), after.mean(), se)
  chex.assert_trees_all_equal(jax.tree.map(np.array, vae_lib.vae_params_of(
      {"params": params, **frozen})), vae_before)
  # The composed bound still upper-bounds the entropy of the 32-point data set (log 32 nats).
  assert after.mean() > math.log(32)


def test_composed_terms_names():
  """The composed terms' fields, as the trainer logs them."""
  assert latent.ComposedTerms._fields == ("data_reconstruction", "neg_entropy", "latent_prior",
                                         "latent_reconstruction", "latent_diffusion")
  assert vae_lib.ComposedTerms is latent.ComposedTerms and vae_lib.VAETerms is latent.VAETerms
