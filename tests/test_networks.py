"""Tests for vdm_jax.nets.networks: the VDM score U-Net, its blocks, and the registry of networks.

Compilation dominates the run time on CPU, so: tiny nets, one cached jitted init / apply per
configuration, scanned parameters built by stacking the unrolled ones (no second init), parameter
perturbations in NumPy, shape-only checks through jax.eval_shape, and XLA's backend optimisation
switched off for these test-only jits (it halves compile time; numerics stay float32).
"""

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax.training import config_checks, tasks
from vdm_jax.datasets import data
from vdm_jax.nets import networks

_TINY = dict(channels=16, num_blocks=2)
_LABELLED = dict(**_TINY, num_classes=3)
_FAST = {"xla_backend_optimization_level": 0}


def _jit(fn, **kwargs):
  return jax.jit(fn, compiler_options=_FAST, **kwargs)


def _inputs(in_channels=3, batch=2, size=8, seed=0):
  rng = np.random.default_rng(seed)
  z = jnp.asarray(rng.standard_normal((batch, size, size, in_channels)), jnp.float32)
  t = jnp.asarray(rng.uniform(size=batch), jnp.float32)
  return z, t


@functools.lru_cache(maxsize=None)
def _model(**kwargs):
  """A ScoreUNet and its jitted apply (cached: each jit is compiled once per configuration)."""
  model = networks.ScoreUNet(**kwargs)
  return model, _jit(model.apply, static_argnames="train")


@functools.lru_cache(maxsize=None)
def _init(**kwargs):
  model, _ = _model(**kwargs)
  return _jit(functools.partial(model.init, train=False))(jax.random.key(0), *_inputs())


def _perturb(variables, seed=1, scale=0.1):
  """Adds noise to every parameter so that zero-initialised layers stop hiding the function."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + scale * rng.standard_normal(x.shape).astype(x.dtype),
                      variables)


@functools.lru_cache(maxsize=None)
def _variables(**kwargs):
  """Perturbed variables; "scan" layouts are the stacked unrolled ones (same function)."""
  unrolled = {k: v for k, v in kwargs.items() if k not in ("block_impl", "remat")}
  variables = _perturb(_init(**unrolled))
  if kwargs.get("block_impl") == "scan":
    variables = {"params": _stack_to_scan(variables["params"], kwargs["num_blocks"])}
  return variables


def _stack_to_scan(params, num_blocks):
  """Unrolled layout (down_i, up_i) -> scanned layout (down, up with a leading block axis)."""
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  out = {k: v for k, v in params.items() if not k.startswith(("down_", "up_"))}
  out["down"] = stack([params[f"down_{i}"] for i in range(num_blocks)])
  out["up"] = stack([params[f"up_{i}"] for i in range(num_blocks + 1)])
  return out


def _apply(kwargs, variables, z, t, label=None, *, train=False, seed=0, conditioning=None):
  _, apply = _model(**kwargs)
  return apply(variables, z, t, label, conditioning, train=train,
               rngs={"dropout": jax.random.key(seed)})


def _init_shapes(in_channels=3, **kwargs):
  model, _ = _model(**kwargs)
  fn = lambda z, t: model.init(jax.random.key(0), z, t, train=False)
  return jax.eval_shape(fn, *_inputs(in_channels))


def test_output_skip_at_init():
  z, t = _inputs()
  out = _apply(_TINY, _init(**_TINY), z, t, train=True)
  chex.assert_shape(out, z.shape)
  assert out.dtype == jnp.float32
  # The output conv is zero-initialised and the official output skip adds z: eps_hat = z
  # exactly at init, whatever the input.
  np.testing.assert_array_equal(np.asarray(out), np.asarray(z))


def test_output_skip_adds_z():
  # With trained (perturbed) weights eps_hat(z) - z is the conv output, which does not change
  # when z moves by a tiny amount; so eps_hat must move by that amount (the + z path).
  variables = _variables(**_TINY)
  z, t = _inputs()
  dz = 1e-3 * jnp.ones_like(z)
  a, b = _apply(_TINY, variables, z, t), _apply(_TINY, variables, z + dz, t)
  # Zeroing the output conv leaves exactly z.
  zeroed = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if "conv_out" in jax.tree_util.keystr(path) else x,
      variables)
  np.testing.assert_array_equal(np.asarray(_apply(_TINY, zeroed, z, t)), np.asarray(z))
  assert float(jnp.abs(b - a).mean()) > 0.5e-3


@pytest.mark.parametrize("norm_groups,expected", [(0, 8), (16, 16), (4, 4)])
def test_norm_groups(norm_groups, expected):
  model = networks.ScoreUNet(channels=16, num_blocks=1, norm_groups=norm_groups)
  z, t = _inputs()
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), z, t)
  assert shapes["params"]["norm_out"]["scale"].shape == (16,)
  assert networks.group_count(16, norm_groups) == expected
  with pytest.raises(ValueError, match="norm_groups=3 does not divide"):
    networks.group_count(16, 3)
  with pytest.raises(ValueError, match="norm_groups"):
    networks.ScoreUNet(channels=16, norm_groups=5)


def test_norm_groups_change_the_function():
  # 16 channels: the project's rule gives 8 groups, the official 32 is impossible; 16 groups
  # (one channel each) must give another function than 8 groups with the same weights.
  z, t = _inputs()
  a = _apply(_TINY, _variables(**_TINY), z, t)
  b = _apply(dict(_TINY, norm_groups=16), _variables(**_TINY), z, t)
  assert float(jnp.abs(a - b).max()) > 1e-3


def test_conditioning_input():
  kw = dict(_TINY, conditioning_input=True)
  variables = _variables(**kw)
  assert variables["params"]["cond"]["dense0"]["kernel"].shape == (16 + 1, 64)
  z, t = _inputs()
  _, apply = _model(**kw)
  run = lambda c: apply(variables, z, t, None, c, train=False)
  zero = apply(variables, z, t, train=False)   # None is read as 0
  chex.assert_trees_all_close(run(jnp.zeros(2)), zero, atol=0)
  assert float(jnp.abs(run(jnp.ones(2)) - zero).max()) > 1e-3
  with pytest.raises(ValueError, match="conditioning_input"):
    _apply(_TINY, _variables(**_TINY), z, t, None, conditioning=jnp.ones(2))


@pytest.mark.parametrize("in_channels", [1, 3, 5])
@pytest.mark.parametrize("block_impl", networks.BLOCK_IMPLS)
def test_output_shapes(in_channels, block_impl):
  model = networks.ScoreUNet(**_LABELLED, block_impl=block_impl)
  z, t = _inputs(in_channels)

  def fn(z, t):
    variables = model.init(jax.random.key(0), z, t, train=False)
    return variables, model.apply(variables, z, t, jnp.array([0, 1]), train=False)

  variables, out = jax.eval_shape(fn, z, t)   # traces the real code, allocates nothing
  assert (out.shape, out.dtype) == (z.shape, jnp.float32)
  assert variables["params"]["conv_out"]["kernel"].shape == (3, 3, 16, in_channels)


def test_paper_cifar10_param_count():
  z = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  counts = {}
  for impl in networks.BLOCK_IMPLS:
    model = networks.ScoreUNet(channels=128, num_blocks=32, fourier_exponents=(6, 7),
                               attention_everywhere=False, dropout=0.1, block_impl=impl,
                               conditioning_input=True, norm_groups=32)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), z, t)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
    counts[impl] = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert counts["scan"] == counts["unrolled"]
  # The official network's count (google-research/vdm ScoreUNet, its CIFAR-10 config).
  assert counts["unrolled"] == 30_578_179
  # VDM paper: 30.6M; without the scalar conditioning input dense0 has 512 weights fewer.
  plain = networks.ScoreUNet(channels=128, num_blocks=32)
  shapes = jax.eval_shape(functools.partial(plain.init, train=False), jax.random.key(0), z, t)
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == 30_577_667


@pytest.mark.parametrize("attention_everywhere", [False, True])
def test_scan_computes_the_same_function_as_unrolled(attention_everywhere):
  kw = dict(**_TINY, attention_everywhere=attention_everywhere)
  scan_kw = dict(**kw, block_impl="scan")
  stacked = _variables(**scan_kw)
  # The stacked unrolled parameters are exactly the scanned module's own layout.
  chex.assert_trees_all_equal_shapes_and_dtypes(stacked, _init_shapes(**scan_kw))
  z, t = _inputs()
  expected = _apply(kw, _variables(**kw), z, t)
  assert float(jnp.abs(expected).mean()) > 1e-2   # a non-trivial function
  chex.assert_trees_all_close(_apply(scan_kw, stacked, z, t), expected, rtol=1e-4, atol=1e-4)
  chex.assert_trees_all_close(_apply(dict(**scan_kw, remat=True), stacked, z, t), expected,
                              rtol=1e-4, atol=1e-4)


def _grads(kwargs, label=None, train=False):
  model, _ = _model(**kwargs)
  z, t = _inputs()

  def loss(v):
    out = model.apply(v, z, t, label, train=train, rngs={"dropout": jax.random.key(0)})
    return jnp.mean(out ** 2)

  return _jit(jax.grad(loss))(_variables(**kwargs))


@pytest.mark.parametrize("block_impl", networks.BLOCK_IMPLS)
def test_remat_is_applied_to_the_blocks(block_impl):
  z, t = _inputs()
  for remat, expected in ((False, 0), (True, 5 if block_impl == "unrolled" else 2)):
    kw = dict(**_TINY, block_impl=block_impl, remat=remat)
    model, _ = _model(**kw)
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, z, t, train=False))(_init_shapes(**kw))
    assert str(jaxpr).count("remat") == expected   # 2 down + 3 up blocks, or 2 scans


def test_remat_same_params_and_gradients():
  chex.assert_trees_all_equal_shapes_and_dtypes(_init_shapes(**_TINY, remat=True),
                                                _init_shapes(**_TINY))
  g = _grads(_TINY)
  chex.assert_tree_all_finite(g)
  chex.assert_trees_all_close(_grads(dict(**_TINY, remat=True)), g, rtol=1e-4, atol=1e-6)


def test_gradients_finite_and_reach_every_scanned_block():
  g = _grads(dict(**_LABELLED, block_impl="scan"), jnp.array([0, 2]), train=True)
  chex.assert_tree_all_finite(g)
  for name in ("down", "up"):
    for path, leaf in jax.tree_util.tree_leaves_with_path(g["params"][name]):
      per_block = jnp.abs(leaf).reshape(leaf.shape[0], -1).max(axis=1)
      assert bool(jnp.all(per_block > 0)), (name, path, per_block)


def test_label_conditioning_and_null_label():
  variables = _variables(**_LABELLED)
  z, t = _inputs()
  null = _apply(_LABELLED, variables, z, t, None)
  outs = _apply(_LABELLED, variables, jnp.concatenate([z] * 3), jnp.concatenate([t] * 3),
                jnp.array([3, 3, 0, 0, 1, 1]))
  null_id, class0, class1 = jnp.split(outs, 3)
  chex.assert_trees_all_close(null_id, null, atol=1e-5)   # id num_classes is the null label
  assert float(jnp.abs(class0 - null).max()) > 1e-3
  assert float(jnp.abs(class0 - class1).max()) > 1e-3


def test_label_out_of_range():
  model, _ = _model(**_LABELLED)
  variables = _variables(**_LABELLED)
  z, t = _inputs()
  # Concrete labels are checked (outside jit; the check runs before any heavy op).
  for bad in ([0, 4], [-1, 0]):
    with pytest.raises(ValueError, match="labels must be in"):
      model.apply(variables, z, t, jnp.array(bad), train=False)
  with pytest.raises(ValueError, match="label must be an int array"):
    model.apply(variables, z, t, jnp.array([0.0, 1.0]), train=False)
  # Under jit they cannot be: the example with a bad label gets NaN (loud, not a wrapped id).
  out = _apply(_LABELLED, variables, jnp.concatenate([z, z]), jnp.concatenate([t, t]),
               jnp.array([-1, 1, 2, 4]))
  finite = jnp.all(jnp.isfinite(out), axis=(1, 2, 3))
  assert finite.tolist() == [False, True, True, False]
  assert bool(jnp.all(jnp.isnan(out[0])))


@pytest.mark.parametrize("block_impl", networks.BLOCK_IMPLS)
def test_dropout_only_when_train(block_impl):
  kw = dict(**_TINY, block_impl=block_impl)
  variables = _variables(**kw)
  z, t = _inputs()
  eval_a = _apply(kw, variables, z, t, seed=1)
  chex.assert_trees_all_close(_apply(kw, variables, z, t, seed=2), eval_a)
  train_a = _apply(kw, variables, z, t, train=True, seed=1)
  train_b = _apply(kw, variables, z, t, train=True, seed=2)
  assert float(jnp.abs(train_a - train_b).max()) > 1e-3
  assert float(jnp.abs(train_a - eval_a).max()) > 1e-3
  # Evaluation needs no dropout rng; training does.
  model, _ = _model(**kw)
  jax.eval_shape(lambda v: model.apply(v, z, t, train=False), variables)
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(lambda v: model.apply(v, z, t, train=True), variables)


@pytest.mark.parametrize("block_impl", networks.BLOCK_IMPLS)
def test_bfloat16_compute(block_impl):
  kw = dict(**_TINY, block_impl=block_impl)
  bf16_kw = dict(**kw, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(_init_shapes(**bf16_kw)))
  variables = _variables(**kw)
  z, t = _inputs()
  out = _apply(bf16_kw, variables, z, t)
  assert out.dtype == jnp.float32
  chex.assert_tree_all_finite(out)
  ref = _apply(kw, variables, z, t)
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert 0.0 < rel < 0.1, rel   # bfloat16 really was used, and it is still the same function


def test_time_conditioning():
  variables = _variables(**_TINY)
  z, _ = _inputs()
  out = _apply(_TINY, variables, jnp.concatenate([z, z]), jnp.array([0.2, 0.2, 0.7, 0.7]))
  assert float(jnp.abs(out[:2] - out[2:]).max()) > 1e-3
  model, _ = _model(**_TINY)   # a scalar t is broadcast over the batch
  out = jax.eval_shape(lambda v: model.apply(v, z, jnp.float32(0.2), train=False), variables)
  assert out.shape == z.shape


@pytest.mark.parametrize("field, value", [
    ("block_impl", "loop"), ("channels", 0), ("num_blocks", 0), ("dropout", 1.0),
    ("num_classes", -1), ("fourier_exponents", (6.5,)), ("dtype", jnp.int32)])
def test_bad_fields_raise(field, value):
  with pytest.raises(ValueError, match=field):
    networks.ScoreUNet(**{field: value})


def test_bad_inputs_raise():
  model, _ = _model(**_TINY)
  variables = _init_shapes(**_TINY)
  z, t = _inputs()
  with pytest.raises(ValueError, match="z must be"):
    jax.eval_shape(lambda v: model.apply(v, z[0], t, train=False), variables)
  with pytest.raises(ValueError, match="t must be"):
    jax.eval_shape(lambda v: model.apply(v, z, jnp.zeros((3,)), train=False), variables)
  with pytest.raises(ValueError, match="unconditional"):
    jax.eval_shape(lambda v: model.apply(v, z, t, jnp.array([0, 1]), train=False), variables)


def test_timestep_embedding_matches_numpy():
  t = np.array([0.0, 0.25, 1.0], np.float32)
  dim = 8
  freqs = np.exp(-np.log(10000.0) / (dim // 2 - 1) * np.arange(dim // 2))
  angles = 1000.0 * t[:, None].astype(np.float64) * freqs
  ref = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  chex.assert_trees_all_close(networks.timestep_embedding(t, dim), ref, atol=2e-4)
  chex.assert_shape(networks.timestep_embedding(t, 7), (3, 7))


def test_fourier_features_match_numpy():
  z = np.random.default_rng(0).uniform(-1, 1, (1, 2, 2, 3)).astype(np.float32)
  out = np.asarray(networks.fourier_features(z, exponents=(1, 2)))
  chex.assert_shape(out, (1, 2, 2, 12))
  zz = z.astype(np.float64)
  # The official convention sin/cos(2^n 2 pi z), in the official order: sines then cosines,
  # each channel's exponents together.
  targets = [fn(2.0**n * 2 * np.pi * zz[..., c]) for fn in (np.sin, np.cos) for c in range(3)
             for n in (1, 2)]
  chex.assert_trees_all_close(out, np.stack(targets, axis=-1), atol=1e-5)


def test_attention_block_matches_numpy():
  x = np.random.default_rng(0).standard_normal((2, 3, 2, 4)).astype(np.float32)
  block = networks.AttentionBlock()
  params = _perturb(block.init(jax.random.key(0), x), scale=0.5)["params"]
  out = block.apply({"params": params}, x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = x.astype(np.float64).reshape(2, 6, 2, 2)   # GroupNorm: 2 groups of 2 channels
  h = (h - h.mean(axis=(1, 3), keepdims=True)) / np.sqrt(h.var(axis=(1, 3), keepdims=True) + 1e-6)
  h = h.reshape(2, 6, 4) * p["norm"]["scale"] + p["norm"]["bias"]
  q, k, v = (h @ p[n]["kernel"] + p[n]["bias"] for n in ("q", "k", "v"))
  logits = np.einsum("bqc,bkc->bqk", q, k) / 2.0
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)   # softmax over the 6 key positions
  ref = (w @ v) @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]
  chex.assert_trees_all_close(out, x + ref.reshape(x.shape), atol=1e-4)


def test_num_groups():
  # Largest divisor <= 32 with at least 2 channels per group (32 for the official widths).
  assert [networks.num_groups(c) for c in (1, 2, 3, 16, 48, 64, 128, 256, 96, 60)] == [
      1, 1, 1, 8, 24, 32, 32, 32, 32, 30]


class _ScaledInput(nn.Module):
  """A toy score network: eps_hat = (1 + w t) z, one parameter w (ScoreUNet's call signature)."""

  @nn.compact
  def __call__(self, z, t, label=None, conditioning=None, *, train):
    del label, conditioning, train
    w = self.param("w", nn.initializers.constant(0.5), ())
    return (1.0 + w * t[:, None, None, None]) * z


def _scaled_input(**kwargs):   # ScoreUNet's keyword arguments, none of them used
  del kwargs
  return _ScaledInput()


def test_a_registered_network_is_usable_through_the_config(registered, smoke_config):
  registered(networks.NETWORKS, networks.register_network, "test_scaled_input", _scaled_input)
  smoke_config.model.network = "test_scaled_input"
  config_checks.check_config(smoke_config)
  task = tasks.build_task(smoke_config, data.static_info("digits"))
  params, _ = task.init(jax.random.PRNGKey(0))
  assert jax.tree.map(np.shape, params["score_net"]) == {"w": ()}
  eps_fn, _, shape, _ = task.sampler_fns(params, {})
  z = jnp.ones((2,) + tuple(shape))
  gamma = jnp.full((2,), smoke_config.model.gamma_max)   # t_cond = 1
  np.testing.assert_allclose(eps_fn(z, gamma), 1.5 * z, rtol=1e-6)


def test_an_unknown_network_names_the_registered_ones(smoke_config):
  smoke_config.model.network = "unet3d"
  with pytest.raises(config_checks.ConfigError,
                     match=r"model.network='unet3d': expected one of \('score_unet',\)"):
    config_checks.check_config(smoke_config)
  with pytest.raises(ValueError, match=r"unknown network 'unet3d'; expected one of"):
    tasks.build_task(smoke_config, data.static_info("digits"))


def test_the_default_network_is_the_score_unet(smoke_config):
  assert "network" not in smoke_config.model   # configs need not name it
  task = tasks.build_task(smoke_config, data.static_info("digits"))
  assert isinstance(task.model.score_net, networks.ScoreUNet)
  assert networks.get_network(networks.DEFAULT_NETWORK) is networks.ScoreUNet
