"""Tests for vdm_jax.classifier: the noise-conditional classifier network and model."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import classifier


def _inputs(batch=2, size=8, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((batch, size, size, channels)), jnp.float32),
          jnp.asarray(rng.uniform(size=batch), jnp.float32))


def test_classifier_network():
  model = classifier.NoisyClassifier(num_classes=4, channels=8, num_blocks=2)
  z, t = _inputs()
  variables = model.init(jax.random.key(0), z, t, train=False)
  rng = np.random.default_rng(1)   # perturbed: the zero-initialised layers hide nothing
  variables = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype),
                           variables)
  zz, tt = jnp.concatenate([z, z]), jnp.concatenate([t, t + 0.5])

  def log_p_and_logits(zz):
    logits = model.apply(variables, zz, tt, train=True)
    return jnp.sum(jax.nn.log_softmax(logits)[:, 1]), logits

  # Guidance needs grad_z log p(y | z_t).
  g, logits = jax.jit(jax.grad(log_p_and_logits, has_aux=True))(zz)
  chex.assert_shape(logits, (4, 4))
  assert logits.dtype == jnp.float32
  assert float(jnp.abs(logits[:2] - logits[2:]).max()) > 1e-3   # depends on t
  chex.assert_shape(g, zz.shape)
  chex.assert_tree_all_finite(g)
  assert float(jnp.abs(g).max()) > 0
  bf16 = classifier.NoisyClassifier(num_classes=4, channels=8, dtype=jnp.bfloat16)
  out = jax.eval_shape(lambda v: bf16.apply(v, z, t, train=False), variables)
  assert out.dtype == jnp.float32
  for field, value in (("num_classes", 1), ("channels", -1), ("num_blocks", 0)):
    with pytest.raises(ValueError, match=field):
      classifier.NoisyClassifier(**{"num_classes": 4, field: value})


def test_label_log_prob_is_the_log_softmax_of_the_label():
  """`label_log_prob` (what classifier guidance differentiates) against a NumPy log-softmax."""
  net = classifier.NoisyClassifier(num_classes=3, channels=8, num_blocks=1)
  model = classifier.NoisyClassifierModel(vocab_size=17, classifier=net, gamma_min=-5.0,
                                          gamma_max=5.0)
  images = np.random.default_rng(0).integers(0, 17, (4, 8, 8, 1)).astype(np.int32)
  labels = jnp.asarray([0, 1, 2, 1])
  gamma = jnp.full((4,), -1.0)
  variables = model.init({"params": jax.random.key(0), "diffusion": jax.random.key(1)}, images,
                         labels, train=False)
  rng = np.random.default_rng(2)
  variables = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype),
                           variables)
  z = jax.random.normal(jax.random.key(4), images.shape)
  logits = np.asarray(model.apply(variables, z, gamma,
                                  method=classifier.NoisyClassifierModel.logits), np.float64)
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = log_softmax[np.arange(4), np.asarray(labels)]
  got = model.apply(variables, z, gamma, labels,
                    method=classifier.NoisyClassifierModel.label_log_prob)
  np.testing.assert_allclose(got, picked, rtol=1e-5, atol=1e-6)
