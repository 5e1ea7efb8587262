"""Tests for vdm_jax.nets.classifier: the noise-conditional classifier network and model, and the
classifier task's evaluation against NumPy."""

import pathlib
import runpy

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax.nets import classifier
from vdm_jax.datasets import data
from vdm_jax.core import parallel
from vdm_jax.training import steps, tasks

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
  # The gradient against a central difference along a random direction v: <g, v> is the slope.
  v = jnp.asarray(np.random.default_rng(3).standard_normal(zz.shape), jnp.float32)
  f = jax.jit(lambda zz: log_p_and_logits(zz)[0])
  h = 1e-2
  slope = (float(f(zz + h * v)) - float(f(zz - h * v))) / (2 * h)
  assert abs(float(jnp.vdot(g, v))) > 0.1, float(jnp.vdot(g, v))
  np.testing.assert_allclose(float(jnp.vdot(g, v)), slope, rtol=2e-2)
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


class _ConstantLogits(nn.Module):
  """A classifier that ignores z and t: logits = a, one parameter vector (NoisyClassifier's call
  signature), so every eval value of the classifier task is known in closed form."""
  logits: tuple

  @nn.compact
  def __call__(self, z, t, *, train):
    del t, train
    a = self.param("a", lambda key: jnp.asarray(self.logits, jnp.float32))
    return jnp.broadcast_to(a, (z.shape[0], len(self.logits)))


@pytest.mark.parametrize("num_devices", [1, 4])
def test_classifier_eval_values_against_numpy(num_devices):
  """The classifier task's evaluation (`steps.evaluate`) over the 297 digits test images in
  batches of 100 (3 padded rows, label 0) with t_samples = 3, for a classifier whose prediction
  is always class 0: accuracy = accuracy_clean = the fraction of 0 labels, its standard error
  std(ddof=1) / sqrt(n) of the 0/1 values, nll = the mean of -log softmax(a)[label], in float64
  NumPy. A padded row counted as an example, or the accuracy of the wrong level, is caught."""
  config = runpy.run_path(str(ROOT / "configs" / "digits_classifier.py"))["get_config"]()
  config.eval.t_samples = 3
  info = data.static_info("digits")
  logits = (2.0, 0.5, -1.0, 0.0, 0.3, -0.2, 1.0, 0.1, -0.5, 0.7)
  model = classifier.NoisyClassifierModel(vocab_size=17, classifier=_ConstantLogits(logits),
                                          gamma_min=-8.0, gamma_max=6.0)
  task = tasks.ClassifierTask(model, info, num_classes=10)
  params, _ = task.init(jax.random.key(0))
  result = steps.evaluate(task, params, config, parallel.make_mesh(num_devices))

  labels = data.get_source("digits", split="test").labels
  n = len(labels)
  assert n == 297 and result["num_examples"] == n
  correct = (labels == 0).astype(np.float64)
  a = np.asarray(logits, np.float64)
  log_softmax = a - np.log(np.exp(a).sum())
  np.testing.assert_allclose(result["accuracy"], correct.mean(), rtol=1e-6)
  np.testing.assert_allclose(result["accuracy_clean"], correct.mean(), rtol=1e-6)
  np.testing.assert_allclose(result["accuracy_se"], correct.std(ddof=1) / np.sqrt(n), rtol=1e-5)
  np.testing.assert_allclose(result["nll"], -log_softmax[labels].mean(), rtol=1e-6)
  assert 0.05 < correct.mean() < 0.2   # about a tenth of the digits are zeros
