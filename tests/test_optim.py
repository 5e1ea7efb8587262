"""Tests for vdm_jax.training.optim: warm-up schedule, weight-decay mask, AdamW chain and EMA."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vdm_jax.training import optim

KEY = "gamma"   # the top-level key of the schedule in these trees (optim takes it as an argument)


def _params():
  """A small Flax-like inner parameter dict: learned schedule + a score net."""
  key = jax.random.key(0)
  k1, k2, k3 = jax.random.split(key, 3)
  return {
      "gamma": {
          "gamma_min": jnp.asarray(-7.0),
          "gamma_max": jnp.asarray(5.0),
          "MonotoneDense_0": {"kernel": jnp.ones((1, 8)), "bias": jnp.zeros((8,))},
      },
      "score_net": {
          "Conv_0": {"kernel": jax.random.normal(k1, (3, 3, 1, 4)), "bias": jnp.ones((4,))},
          "GroupNorm_0": {"scale": jnp.ones((4,)), "bias": jnp.zeros((4,))},
          "Dense_0": {"kernel": jax.random.normal(k2, (4, 4)), "bias": jnp.ones((4,))},
          "embedding": jax.random.normal(k3, (17, 4)),
      },
  }


_EXPECTED_MASK = {
    "gamma": {
        "gamma_min": False,
        "gamma_max": False,
        "MonotoneDense_0": {"kernel": False, "bias": False},
    },
    "score_net": {
        "Conv_0": {"kernel": True, "bias": False},
        "GroupNorm_0": {"scale": False, "bias": False},
        "Dense_0": {"kernel": True, "bias": False},
        "embedding": True,
    },
}


@pytest.mark.parametrize("step, expected", [(0, 0.0), (5, 0.5e-3), (10, 1e-3), (1000, 1e-3)])
def test_learning_rate_schedule_warmup(step, expected):
  schedule = optim.learning_rate_schedule(learning_rate=1e-3, warmup_steps=10)
  np.testing.assert_allclose(schedule(step), expected, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(schedule)(step), expected, rtol=1e-6)


def test_learning_rate_schedule_without_warmup_is_constant():
  schedule = optim.learning_rate_schedule(learning_rate=2e-4, warmup_steps=0)
  for step in (0, 1, 100):
    np.testing.assert_allclose(schedule(step), 2e-4, rtol=1e-6)


def test_learning_rate_schedule_cosine_decay_against_float64():
  peak, warmup, total = 3e-3, 10, 110
  schedule = jax.jit(optim.learning_rate_schedule(
      learning_rate=peak, warmup_steps=warmup, decay="cosine", total_steps=total))
  for step in (0, 5, 10, 35, 60, 85, 109, 110, 500):
    if step < warmup:
      expected = peak * step / warmup
    elif step <= total:
      expected = peak * 0.5 * (1.0 + np.cos(np.pi * (step - warmup) / (total - warmup)))
    else:
      expected = 0.0
    np.testing.assert_allclose(schedule(step), expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kwargs, match", [
    ({"decay": "linear"}, "linear"),
    ({"decay": "cosine", "total_steps": 10}, "total_steps 10 and warmup_steps 10"),
])
def test_learning_rate_schedule_rejects_a_bad_decay(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optim.learning_rate_schedule(learning_rate=1e-3, warmup_steps=10, **kwargs)


@pytest.mark.parametrize("kwargs, name", [
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"b1": 1.0}, "b1"),
    ({"b2": 1.0}, "b2"),
    ({"b2": 0.0}, "b2"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"grad_clip_norm": 0.0}, "grad_clip_norm"),
    ({"schedule_lr_multiplier": 0.0}, "schedule_lr_multiplier"),
])
def test_make_optimizer_rejects_bad_values(kwargs, name):
  full = {"learning_rate": 1e-3, "schedule_key": KEY} | kwargs
  with pytest.raises(ValueError, match=name):
    optim.make_optimizer(**full)


def test_weight_decay_mask_on_inner_dict():
  assert optim.weight_decay_mask(_params(), schedule_key=KEY) == _EXPECTED_MASK


def test_weight_decay_mask_accepts_wrapped_params():
  wrapped = optim.weight_decay_mask({"params": _params()}, schedule_key=KEY)
  assert wrapped == {"params": _EXPECTED_MASK}


def test_weight_decay_mask_on_abstract_params():
  abstract = jax.eval_shape(_params)
  assert optim.weight_decay_mask(abstract, schedule_key=KEY) == _EXPECTED_MASK


def test_schedule_mask_selects_only_schedule_key():
  mask = optim.schedule_mask(_params(), schedule_key=KEY)
  assert all(jax.tree.leaves(mask["gamma"]))
  assert not any(jax.tree.leaves(mask["score_net"]))
  other = optim.schedule_mask(_params(), schedule_key="score_net")
  assert not any(jax.tree.leaves(other["gamma"])) and all(jax.tree.leaves(other["score_net"]))


def test_weight_decay_only_on_masked_leaves():
  """With zero gradients the Adam direction is 0: only decayed leaves move, by -lr * wd * p."""
  lr, wd = 1e-2, 0.1
  params = _params()
  tx = optim.make_optimizer(schedule_key=KEY, learning_rate=lr, warmup_steps=0, weight_decay=wd)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, state, params)
  expected = jax.tree.map(
      lambda p, m: -lr * wd * p if m else jnp.zeros_like(p), params, _EXPECTED_MASK)
  chex.assert_trees_all_close(updates, expected, rtol=1e-6, atol=1e-12)
  moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
  assert moved == _EXPECTED_MASK


@pytest.mark.parametrize("multiplier", [10.0, 0.5])
def test_schedule_lr_multiplier_scales_schedule_updates_exactly(multiplier):
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3) + 0.1 * p, params)
  base = optim.make_optimizer(schedule_key=KEY, learning_rate=1e-3, warmup_steps=0)
  scaled = optim.make_optimizer(
      schedule_key=KEY, learning_rate=1e-3, warmup_steps=0, schedule_lr_multiplier=multiplier)
  u_base, _ = base.update(grads, base.init(params), params)
  u_scaled, _ = jax.jit(scaled.update)(grads, scaled.init(params), params)
  chex.assert_trees_all_close(
      u_scaled["gamma"], jax.tree.map(lambda u: multiplier * u, u_base["gamma"]), rtol=1e-6)
  chex.assert_trees_all_close(u_scaled["score_net"], u_base["score_net"], rtol=1e-6)
  assert jnp.all(u_base["gamma"]["gamma_min"] != 0)


def test_grad_clipping_bounds_global_norm_seen_by_adam():
  params = {"score_net": {"Dense_0": {"kernel": jnp.ones((2, 3))}}}
  grads = {"score_net": {"Dense_0": {"kernel": jnp.full((2, 3), 100.0)}}}
  b1 = 0.9
  clipped = optim.make_optimizer(schedule_key=KEY, learning_rate=1e-3, b1=b1,
                                 grad_clip_norm=1.0)
  _, state = clipped.update(grads, clipped.init(params), params)
  mu = optax.tree_utils.tree_get(state, "mu")
  np.testing.assert_allclose(optax.global_norm(mu), (1 - b1) * 1.0, rtol=1e-5)

  unclipped = optim.make_optimizer(schedule_key=KEY, learning_rate=1e-3, b1=b1)
  _, state = unclipped.update(grads, unclipped.init(params), params)
  mu = optax.tree_utils.tree_get(state, "mu")
  np.testing.assert_allclose(
      optax.global_norm(mu), (1 - b1) * optax.global_norm(grads), rtol=1e-5)


def test_optimizer_runs_under_jit_with_finite_updates():
  params = _params()
  tx = optim.make_optimizer(
      schedule_key=KEY, learning_rate=1e-3, grad_clip_norm=1.0, schedule_lr_multiplier=10.0)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.tree.map(lambda p: 0.01 * p + 1.0, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(3):
    params, state = step(params, state)
  chex.assert_tree_all_finite(params)


@pytest.mark.parametrize("step, expected", [(0, 0.1), (8, 0.5), (10**7, 0.9999)])
def test_ema_decay_warmup(step, expected):
  np.testing.assert_allclose(optim.ema_decay(step, decay=0.9999), expected, rtol=1e-6)
  jitted = jax.jit(lambda s: optim.ema_decay(s, decay=0.9999))
  np.testing.assert_allclose(jitted(jnp.asarray(step)), expected, rtol=1e-6)


def test_ema_decay_without_warmup_and_bad_values():
  np.testing.assert_allclose(optim.ema_decay(0, decay=0.99, warmup=False), 0.99, rtol=1e-7)
  for bad in (-0.1, 1.5):
    with pytest.raises(ValueError, match="decay"):
      optim.ema_decay(0, decay=bad)
    with pytest.raises(ValueError, match="decay"):
      optim.ema_update({"a": jnp.ones(2)}, {"a": jnp.ones(2)}, decay=bad)


def test_ema_update_values_dtype_and_jit():
  ema = {"a": jnp.ones((2,), jnp.float32), "b": {"c": jnp.zeros((3,), jnp.bfloat16)}}
  new = {"a": jnp.full((2,), 3.0), "b": {"c": jnp.full((3,), 2.0)}}
  expected = {"a": jnp.full((2,), 0.75 * 1 + 0.25 * 3), "b": {"c": jnp.full((3,), 0.5)}}

  out = optim.ema_update(ema, new, decay=0.75)
  chex.assert_trees_all_close(out, expected, rtol=1e-6)
  assert out["b"]["c"].dtype == jnp.bfloat16

  @jax.jit
  def traced(ema, new, step):
    return optim.ema_update(ema, new, decay=optim.ema_decay(step, decay=0.75))

  # ema_decay(2) = min(0.75, 3 / 12) = 0.25
  out = traced(ema, new, jnp.asarray(2))
  chex.assert_trees_all_close(
      out, {"a": jnp.full((2,), 0.25 + 0.75 * 3), "b": {"c": jnp.full((3,), 1.5)}}, rtol=1e-6)


# The official VDM mask: every leaf whose name is not "bias" is decayed, the schedule included.
_EXPECTED_OFFICIAL_MASK = {
    "gamma": {
        "gamma_min": True,
        "gamma_max": True,
        "MonotoneDense_0": {"kernel": True, "bias": False},
    },
    "score_net": {
        "Conv_0": {"kernel": True, "bias": False},
        "GroupNorm_0": {"scale": True, "bias": False},
        "Dense_0": {"kernel": True, "bias": False},
        "embedding": True,
    },
}


def _official_nnet_params():
  """The official learned monotone schedule's parameters (l1 + l3(sigmoid(l2))) under the
  trainer's schedule key, beside a score-net residual block."""
  return {
      "schedule": {
          "l1": {"kernel": jnp.full((1, 1), 18.3), "bias": jnp.full((1,), -13.3)},
          "l2": {"kernel": jnp.ones((1, 16)), "bias": jnp.zeros((16,))},
          "l3": {"kernel": jnp.ones((16, 1))},
      },
      "score_net": {
          "block_0": {
              "norm1": {"scale": jnp.ones((8,)), "bias": jnp.zeros((8,))},
              "conv1": {"kernel": jnp.ones((3, 3, 8, 8)), "bias": jnp.zeros((8,))},
          },
      },
  }


def test_official_mask_decays_every_leaf_not_named_bias():
  official = optim.weight_decay_mask(_params(), rule="official", schedule_key=KEY)
  assert official == _EXPECTED_OFFICIAL_MASK
  wrapped = optim.weight_decay_mask({"params": _params()}, rule="official", schedule_key=KEY)
  assert wrapped == {"params": _EXPECTED_OFFICIAL_MASK}
  abstract = jax.eval_shape(_params)
  assert optim.weight_decay_mask(abstract, rule="official", schedule_key=KEY) == (
      _EXPECTED_OFFICIAL_MASK)


def test_official_mask_on_the_official_monotone_schedule():
  mask = optim.weight_decay_mask(
      _official_nnet_params(), schedule_key="schedule", rule="official")
  assert mask == {
      "schedule": {
          "l1": {"kernel": True, "bias": False},
          "l2": {"kernel": True, "bias": False},
          "l3": {"kernel": True},
      },
      "score_net": {
          "block_0": {
              "norm1": {"scale": True, "bias": False},
              "conv1": {"kernel": True, "bias": False},
          },
      },
  }
  # The project's rule on the same tree: nothing in the schedule, no norm scale.
  kernels = optim.weight_decay_mask(_official_nnet_params(), schedule_key="schedule")
  assert not any(jax.tree.leaves(kernels["schedule"]))
  assert kernels["score_net"]["block_0"] == {
      "norm1": {"scale": False, "bias": False}, "conv1": {"kernel": True, "bias": False}}


@pytest.mark.parametrize("call", [
    lambda rule: optim.weight_decay_mask(_params(), rule=rule, schedule_key=KEY),
    lambda rule: optim.make_optimizer(schedule_key=KEY, learning_rate=1e-3,
                                      weight_decay_rule=rule),
])
def test_unknown_weight_decay_rule_is_rejected(call):
  with pytest.raises(ValueError, match=r"'bias_only'.*'kernels', 'official'"):
    call("bias_only")


def test_one_adamw_step_with_the_official_rule_by_hand():
  """Step 0 of Adam with bias correction: mu_hat = g, nu_hat = g^2, so the update is
  -lr * (g / (|g| + eps) + wd * p) where decayed and -lr * g / (|g| + eps) elsewhere."""
  lr, wd, eps = 1e-2, 0.1, 1e-8
  params = {
      "schedule": {"gamma_min": jnp.asarray(-13.3), "gamma_max": jnp.asarray(5.0)},
      "score_net": {"norm": {"scale": jnp.asarray([2.0, -0.5]), "bias": jnp.asarray([1.0, 3.0])},
                    "dense": {"kernel": jnp.asarray([[0.5, -1.5]])}},
  }
  grads = {
      "schedule": {"gamma_min": jnp.asarray(0.2), "gamma_max": jnp.asarray(-0.4)},
      "score_net": {"norm": {"scale": jnp.asarray([0.3, -0.1]), "bias": jnp.asarray([0.5, -2.0])},
                    "dense": {"kernel": jnp.asarray([[1.0, 0.25]])}},
  }
  tx = optim.make_optimizer(learning_rate=lr, warmup_steps=0, eps=eps, weight_decay=wd,
                            schedule_key="schedule", weight_decay_rule="official")
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)

  def by_hand(p, g, decayed):
    p, g = np.asarray(p, np.float64), np.asarray(g, np.float64)
    return p - lr * (g / (np.abs(g) + eps) + (wd * p if decayed else 0.0))

  expected = {
      "schedule": {"gamma_min": by_hand(-13.3, 0.2, True), "gamma_max": by_hand(5.0, -0.4, True)},
      "score_net": {"norm": {"scale": by_hand([2.0, -0.5], [0.3, -0.1], True),
                             "bias": by_hand([1.0, 3.0], [0.5, -2.0], False)},
                    "dense": {"kernel": by_hand([[0.5, -1.5]], [[1.0, 0.25]], True)}},
  }
  chex.assert_trees_all_close(new, expected, rtol=1e-6, atol=1e-7)
  # gamma_min: -13.3 - 0.01 * (1 + 0.1 * -13.3) = -13.2967 (the decay pulls it towards 0).
  np.testing.assert_allclose(new["schedule"]["gamma_min"], -13.2967, rtol=1e-6)
  # The GroupNorm scale 2.0 with gradient 0.3: 2 - 0.01 * (1 + 0.2) = 1.988.
  np.testing.assert_allclose(new["score_net"]["norm"]["scale"][0], 1.988, rtol=1e-6)


def test_ema_update_official_form_by_hand():
  """ema + (1 - rate) * (new - ema) with rate 0.9: 10 + 0.1 * (20 - 10) = 11, -4 + 0.1 * 6 = -3.4;
  a leaf already equal to the new value stays exactly equal, in float32, for any rate."""
  out = optim.ema_update({"w": jnp.asarray([10.0, -4.0])}, {"w": jnp.asarray([20.0, 2.0])},
                         decay=0.9)
  np.testing.assert_allclose(out["w"], [11.0, -3.4], rtol=1e-6)
  # Eagerly (op by op) decay * x + (1 - decay) * x rounds away from x for about 5% of these
  # float32 values at rate 0.7; the official form adds exactly 0.
  x = jax.random.normal(jax.random.key(1), (4096,)) * 3.0
  for rate in (0.9999, 0.999, 0.7):
    fixed = optim.ema_update({"w": x}, {"w": x}, decay=rate)
    np.testing.assert_array_equal(fixed["w"], x)
