"""The trainer's and the evaluation's numbers against values computed another way.

Each test here guards against a deliberate bug that the rest of the suite let through; the
docstrings name it.

- `steps.evaluate` on the digits test split (297 images, eval batches of 100: the last one is
  padded with 3 masked rows), t_samples = 4, with a task whose per-example values are a known
  function of the image: the means and the standard error against float64 NumPy over exactly
  the 297 images (SE = std(ddof=1) / sqrt(n)); and a task whose values are uniform draws from the
  key: the mean over t-samples is a mean of independent draws (Monte-Carlo tolerance).
- The digits config's schedule learning-rate multiplier moves the real model's schedule leaves
  by exactly that factor and leaves the network's updates unchanged.
- One trainer step against a hand-computed EMA of the *post-update* parameters, with and without
  the decay warm-up.
- The label-drop rate of class-conditional training against p_uncond (binomial tolerance).
- A conditional model's evaluated bound is the unconditional one (null label), whatever the
  batch's labels.
"""

import copy
import dataclasses
import math
import pathlib
import runpy

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax.datasets import data
from vdm_jax.nets import model as model_lib
from vdm_jax.core import parallel
from vdm_jax.training import state as state_lib
from vdm_jax.training import steps, tasks

import tiny_net

ROOT = pathlib.Path(__file__).resolve().parents[1]
INFO = data.static_info("digits")


def load_config(name):
  return runpy.run_path(str(ROOT / "configs" / f"{name}.py"))["get_config"]()


def _perturb(tree, seed=1, scale=0.1):
  """Noise on every leaf, so that zero-initialised layers (the output conv) stop hiding the
  network's dependence on its inputs (here: the labels)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + scale * rng.standard_normal(x.shape).astype(x.dtype), tree)


# ----------------------------------------------------------------------------------------------
# Evaluation: golden values over a padded split.


@dataclasses.dataclass(frozen=True)
class _KnownValuesTask:
  """Per-example eval values that are a known function of the image, the same for every key:
  bpd = x . w + c and sq = ||x||^2 with x = image / 16 flattened ([B] each)."""

  name: str = "known_values"
  headline: str = "bpd"
  num_classes: int = 0

  def eval_terms(self, params, frozen, batch, key, *, num_steps):
    del frozen, key, num_steps
    x = batch["image"].reshape(batch["image"].shape[0], -1).astype(jnp.float32) / 16.0
    return {"bpd": x @ params["w"] + params["c"], "sq": jnp.sum(x * x, axis=-1)}


@dataclasses.dataclass(frozen=True)
class _UniformDrawTask:
  """Per-example eval values drawn from the key: bpd ~ Uniform(0, 1), independent per example
  and per key."""

  name: str = "uniform_draw"
  headline: str = "bpd"
  num_classes: int = 0

  def eval_terms(self, params, frozen, batch, key, *, num_steps):
    del params, frozen, num_steps
    return {"bpd": jax.random.uniform(key, batch["image"].shape[:1])}


def _digits_eval_config():
  config = load_config("digits")
  assert config.eval.batch_size == 100 and config.eval.max_examples == 0
  config.eval.t_samples = 4
  return config


@pytest.mark.parametrize("num_devices", [1, 4])
def test_evaluate_golden_values_on_a_padded_split(num_devices):
  """Catches: the padding mask dropped from the eval sums (the 3 padded rows have bpd = c != 0),
  the mean over t-samples replaced by a sum (4x), the standard error without its 1/(n - 1) (or
  with 1/n: 0.17% off at n = 297), a miscounted split."""
  images = data.get_source("digits", split="test").images
  n = len(images)
  assert n == 297 and n % 100 != 0   # the last eval batch is padded
  rng = np.random.default_rng(0)
  w, c = rng.standard_normal(64) * 0.5, 0.5
  params = {"w": jnp.asarray(w, jnp.float32), "c": jnp.float32(c)}
  result = steps.evaluate(_KnownValuesTask(), params, _digits_eval_config(),
                          parallel.make_mesh(num_devices), num_steps=0)

  x = images.reshape(n, -1).astype(np.float64) / 16.0
  bpd = x @ w.astype(np.float32).astype(np.float64) + c
  assert bpd.std() > 0.5   # values spread, so the SE is not lost in float32 rounding
  assert (result["num_examples"], result["t_samples"], result["num_steps"]) == (297, 4, 0)
  np.testing.assert_allclose(result["bpd"], bpd.mean(), rtol=0, atol=2e-6)
  np.testing.assert_allclose(result["sq"], np.mean(np.sum(x * x, -1)), rtol=1e-6)
  np.testing.assert_allclose(result["bpd_se"], bpd.std(ddof=1) / math.sqrt(n), rtol=2e-5)
  assert abs(bpd.std(ddof=0) / bpd.std(ddof=1) - 1) > 10 * 2e-5   # 1/n would be told apart


def test_evaluate_averages_independent_t_samples():
  """Each example's value is the mean of t_samples = 4 independent draws: for U(0, 1) draws the
  split's mean is 1/2 and the standard error sqrt(1 / (12 * 4 * 297)). Tolerances: 5 standard
  errors for the mean; 25% for the SE (the relative spread of an SE estimated from 297 examples
  is ~4%). A sum over t-samples gives 2.0; a single draw (or one key for all four) doubles the
  SE."""
  n, t = 297, 4
  result = steps.evaluate(_UniformDrawTask(), {}, _digits_eval_config(),
                          parallel.make_mesh(1), num_steps=0)
  assert result["num_examples"] == n and result["t_samples"] == t
  se = math.sqrt(1 / (12 * t * n))
  assert abs(result["bpd"] - 0.5) < 5 * se, result
  assert abs(result["bpd_se"] / se - 1) < 0.25, (result["bpd_se"], se)


# ----------------------------------------------------------------------------------------------
# The optimiser of the real digits config.


def test_digits_schedule_updates_are_scaled_by_the_multiplier():
  """configs/digits.py's optimiser on the real model's parameter tree: the schedule leaves'
  update is `schedule_lr_multiplier` (10) times the update without the multiplier, the network's
  is unchanged. Catches the multiplier applied to a key the model does not have (a 10x that
  silently becomes 1x)."""
  config = load_config("digits")
  multiplier = config.optim.schedule_lr_multiplier
  assert multiplier == 10.0
  shapes, _ = jax.eval_shape(tasks.build_task(config, INFO).init, jax.random.PRNGKey(0))
  assert model_lib.SCHEDULE_KEY in shapes and len(jax.tree.leaves(shapes)) > 10
  rng = np.random.default_rng(0)
  fill = lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype)
  params = jax.tree.map(fill, shapes)
  grads = [jax.tree.map(fill, shapes) for _ in range(3)]

  def updates(mult):
    c = copy.deepcopy(config)
    c.optim.schedule_lr_multiplier = mult
    tx = state_lib.build_optimizer(c).tx
    opt_state, out = tx.init(params), []
    for g in grads:   # step 0 of the warm-up has rate 0: look at steps 1 and 2 too
      u, opt_state = tx.update(g, opt_state, params)
      out.append(jax.device_get(u))
    return out

  scaled, plain = updates(multiplier), updates(1.0)
  key = model_lib.SCHEDULE_KEY
  for k in (1, 2):
    sched = jax.tree.leaves(plain[k][key])
    assert sched and min(float(np.abs(u).min()) for u in sched) > 0
    chex.assert_trees_all_close(scaled[k][key], jax.tree.map(lambda u: multiplier * u,
                                                            plain[k][key]), rtol=1e-6)
    rest = lambda tree: {name: sub for name, sub in tree.items() if name != key}
    assert rest(plain[k])
    chex.assert_trees_all_close(rest(scaled[k]), rest(plain[k]), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# One trainer step: the EMA of the new parameters.


@pytest.mark.parametrize("warmup", [True, False])
def test_train_step_ema_of_the_updated_parameters(smoke_config, warmup):
  """ema_new = d * ema_old + (1 - d) * params_new, params_new the parameters *after* the step,
  d = min(decay, (1 + step) / (10 + step)) with the warm-up (0.4 at step 5) or decay without
  (0.9), in float64 from the trainer's compiled step's own input and output. Catches the EMA fed
  the pre-update parameters, and a warm-up flag that does not reach the step. The network is a
  tiny one (tests/tiny_net.py): the EMA rule does not depend on it."""
  config = smoke_config
  config.optim.warmup_steps = 0          # a constant rate: the first Adam step moves by ~lr
  config.optim.learning_rate = 1e-2
  config.optim.ema_decay = 0.9
  config.optim.ema_warmup = warmup
  with tiny_net.registered() as network:
    config.model.network = network
    task, optimizer = tasks.build_task(config, INFO), state_lib.build_optimizer(config)
  mesh = parallel.make_mesh(1)
  state = jax.jit(lambda: state_lib.init_state(task, optimizer.tx, seed=0),
                  out_shardings=parallel.replicated(mesh))()
  step_index = 5
  state = state.replace(step=jnp.asarray(step_index, jnp.int32),
                        ema_params=_perturb(state.params, seed=3, scale=0.05))
  old_params = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(state.params))
  old_ema = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(state.ema_params))
  batch = {"image": data.get_source("digits", split="train").images[:8].astype(np.int32),
           "label": np.zeros((8,), np.int32)}
  step = steps.jit_train_step(config, task, optimizer, mesh)
  new, out = step(state, parallel.shard_batch(batch, mesh))   # `state` is donated
  new = jax.device_get(new)
  assert int(new.step) == step_index + 1 and float(out["finite"]) == 1.0

  d = min(0.9, (1 + step_index) / (10 + step_index)) if warmup else 0.9
  assert d == (0.4 if warmup else 0.9)
  new_params = jax.tree.map(lambda a: np.asarray(a, np.float64), new.params)
  expected = jax.tree.map(lambda e, p: d * e + (1 - d) * p, old_ema, new_params)
  chex.assert_trees_all_close(jax.tree.map(np.asarray, new.ema_params), expected, rtol=0,
                              atol=1e-6)
  # The test tells the pre-update parameters apart, and the other decay.
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new_params),
                                                         jax.tree.leaves(old_params)))
  assert (1 - d) * moved > 100 * 1e-6, moved
  other = 0.9 if warmup else 0.4
  wrong = jax.tree.map(lambda e, p: other * e + (1 - other) * p, old_ema, new_params)
  gap = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(wrong),
                                                       jax.tree.leaves(expected)))
  assert gap > 100 * 1e-6, gap


# ----------------------------------------------------------------------------------------------
# Class-conditional training and evaluation.


def _cond_task(p_uncond):
  """A class-conditional task on the smoke config with a tiny network that reads its labels
  (tests/tiny_net.py): what is tested here is the task's label handling, not the network."""
  config = load_config("smoke")
  config.model.conditional = True
  config.model.p_uncond = p_uncond
  with tiny_net.registered() as network:
    config.model.network = network
    task = tasks.build_task(config, INFO)
  assert task.num_classes == 10
  return config, task


def test_label_drop_rate_is_p_uncond():
  """Over 200,000 labels the fraction replaced by the null label (id 10) is p_uncond = 0.1 of
  configs/digits_cond.py within 5 binomial standard errors (overall and per class), and every
  kept label is unchanged. Catches inverted label dropout (0.9 dropped)."""
  p = load_config("digits_cond").model.p_uncond
  assert p == 0.1
  _, task = _cond_task(p)
  n = 200_000
  labels = np.random.default_rng(0).integers(0, 10, n).astype(np.int32)
  out = np.asarray(jax.jit(task._labels)({"label": jnp.asarray(labels)}, jax.random.PRNGKey(1)))
  dropped = out == 10
  assert abs(dropped.mean() - p) < 5 * math.sqrt(p * (1 - p) / n), dropped.mean()
  np.testing.assert_array_equal(out[~dropped], labels[~dropped])
  for y in range(10):
    m = int((labels == y).sum())
    assert abs(dropped[labels == y].mean() - p) < 5 * math.sqrt(p * (1 - p) / m), y
  for edge, expected in ((0.0, labels), (1.0, np.full(n, 10))):
    got = jax.jit(dataclasses.replace(task, p_uncond=edge)._labels)(
        {"label": jnp.asarray(labels)}, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(np.asarray(got), expected)


def _cond_params(task):
  params, _ = jax.jit(task.init)(jax.random.PRNGKey(0))
  return _perturb(params)


def _batch(n, split="test"):
  source = data.get_source("digits", split=split)
  return {"image": jnp.asarray(source.images[:n], jnp.int32),
          "label": jnp.asarray(source.labels[:n], jnp.int32)}


def test_training_loss_uses_the_dropped_labels():
  """The conditional loss with p_uncond = 1 is the loss with every label null (same key), and
  with p_uncond = 0 it is not (the perturbed network reads its labels)."""
  _, task = _cond_task(1.0)
  params, batch, key = _cond_params(task), _batch(16, "train"), jax.random.PRNGKey(2)
  null_batch = dict(batch, label=jnp.full_like(batch["label"], 10))
  drop = jax.jit(lambda b: task.loss(params, {}, b, key)[0])
  keep_task = dataclasses.replace(task, p_uncond=0.0)
  keep = jax.jit(lambda b: keep_task.loss(params, {}, b, key)[0])
  np.testing.assert_allclose(drop(batch), keep(null_batch), rtol=1e-5)
  assert abs(float(keep(batch)) - float(keep(null_batch))) > 1e-3   # measured 0.39


def test_conditional_eval_reports_the_unconditional_bound():
  """A conditional model's eval terms are those of the null label (label=None), the same for
  the true, permuted or null labels of the batch; the labels do change this network's bound,
  so a bound on -log p(x|y) reported as -log p(x) would be caught."""
  _, task = _cond_task(0.1)
  params, batch, key = _cond_params(task), _batch(32), jax.random.PRNGKey(3)
  eval_terms = jax.jit(lambda b: task.eval_terms(params, {}, b, key, num_steps=0))
  true = eval_terms(batch)
  for labels in (batch["label"][::-1], jnp.full_like(batch["label"], 10),
                 (batch["label"] + 3) % 10):
    chex.assert_trees_all_close(eval_terms(dict(batch, label=labels)), true, rtol=0, atol=0)
  apply = jax.jit(lambda label: tasks.terms_bpd(task.model.apply(
      {"params": params}, batch["image"], label, train=False, num_steps=0,
      rngs={"diffusion": key}), num_dims=64))
  chex.assert_trees_all_close(true, apply(None), rtol=1e-5, atol=1e-5)
  conditional = apply(batch["label"])
  assert float(jnp.max(jnp.abs(conditional["bpd"] - true["bpd"]))) > 1e-3


@dataclasses.dataclass(frozen=True)
class _NullLabels:
  """A task's eval values with every label of the batch replaced by the null label."""

  task: tasks.VDMTask

  def __getattr__(self, name):
    return getattr(self.task, name)

  def eval_terms(self, params, frozen, batch, key, *, num_steps):
    batch = dict(batch, label=jnp.full_like(batch["label"], self.task.num_classes))
    return self.task.eval_terms(params, frozen, batch, key, num_steps=num_steps)


def test_conditional_run_evaluates_like_the_null_label_run():
  """`steps.evaluate` (what `vdm-jax eval` and the trainer report) of a conditional model on 48
  test images equals the same evaluation with the null label fed in."""
  config, task = _cond_task(0.1)
  config.eval.max_examples = 48
  params, mesh = _cond_params(task), parallel.make_mesh(1)
  reported = steps.evaluate(task, params, config, mesh)
  null = steps.evaluate(_NullLabels(task), params, config, mesh)
  assert reported["num_examples"] == 48
  for k, v in null.items():
    np.testing.assert_allclose(reported[k], v, rtol=1e-6, err_msg=k)
