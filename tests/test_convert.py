"""vdm_jax.official.convert against the official google-research/vdm code's recorded outputs.

tests/data/official_parity/ holds outputs of the official `model_vdm.py` (commit dc27b98, jax
0.10.2, flax 0.12.8, float32, CPU) on fixed random weights and inputs (see its README.md): two
ScoreUNets and the full official VDM loss with the learned linear and the learned monotone
schedules at T = 0, 10, 1000. Here the official parameter trees are ported with
`convert.from_official` and this library must reproduce those numbers.
"""

import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from vdm_jax.official import convert
from vdm_jax.maths import elbo, schedules
from vdm_jax.nets import model as model_lib

DATA = pathlib.Path(__file__).parent / "data" / "official_parity"
SCORE_FILES = ("scoreunet_4x32", "scoreunet_2x64_attn")
LOSS_FILES = ("vdm_loss_4x32_learned_linear", "vdm_loss_4x32_learned_monotone")


def _load(name):
  d = np.load(DATA / f"{name}.npz")
  params = traverse_util.unflatten_dict(
      {tuple(k.split("/")[1:]): d[k] for k in d.files if k.startswith("param/")})
  return d, params


def _unrolled(config):
  config.model.block_impl = "unrolled"
  return config


@pytest.mark.parametrize("name", SCORE_FILES)
@pytest.mark.parametrize("which", ["zero", "mixed"])
def test_scoreunet_reproduces_official_eps_hat(name, which):
  d, params = _load(name)
  config, ported = convert.from_official(params, json.loads(str(d["official_config"])))
  assert config.model.norm_groups == 32 and config.model.conditioning_input
  out = convert.eps_hat(config, ported, d["z"], d["g_t"], d[f"conditioning_{which}"])
  ref = d[f"eps_hat_{which}"]
  assert float(np.abs(ref - d["z"]).max()) > 0.1       # the reference is a non-trivial function
  np.testing.assert_array_less(np.abs(np.asarray(out) - ref).max(), 1e-5)


def test_scoreunet_with_scanned_blocks():
  d, params = _load("scoreunet_2x64_attn")
  official_config = json.loads(str(d["official_config"]))
  config = convert.project_config(official_config)
  config.model.block_impl = "scan"
  ported = convert.convert_params(params, config)
  assert ported["score_net"]["down"]["ResnetBlock_0"]["conv1"]["kernel"].shape[0] == 2
  out = convert.eps_hat(config, ported, d["z"], d["g_t"], d["conditioning_mixed"])
  np.testing.assert_array_less(np.abs(np.asarray(out) - d["eps_hat_mixed"]).max(), 1e-5)


def test_mixed_conditioning_matters():
  # In the 2x64 reference the conditioning input moves eps_hat by 0.07 (in the 4x32 one by
  # only 1e-6), so reproducing both outputs there shows the input is wired as the official one.
  d, params = _load("scoreunet_2x64_attn")
  assert float(np.abs(d["eps_hat_mixed"] - d["eps_hat_zero"]).max()) > 1e-2
  config, ported = convert.from_official(params, json.loads(str(d["official_config"])))
  zero = convert.eps_hat(config, ported, d["z"], d["g_t"])   # None = the official zeros
  np.testing.assert_array_less(np.abs(np.asarray(zero) - d["eps_hat_zero"]).max(), 1e-5)
  ones = convert.eps_hat(config, ported, d["z"], d["g_t"], np.ones(4, np.float32))
  assert float(np.abs(np.asarray(ones) - d["eps_hat_mixed"])[1::2].max()) < 1e-5


def _official_terms(d, ported, config, num_steps):
  """This library's loss terms with the official draws (eps_0, eps, antithetic t)."""
  module = convert.build(config)
  gamma_fn = lambda t: module.apply({"params": ported}, t, method=model_lib.VDM.gamma)
  eps_fn = lambda z, g: module.apply({"params": ported}, z, g, None, None,
                                     method=model_lib.VDM.eps)
  t = np.asarray(d["t_continuous"], np.float32)
  if num_steps:
    t = np.ceil(t * num_steps) / num_steps        # the official discretisation
  return elbo.elbo_terms(jax.random.PRNGKey(0), d["x"], eps_fn=eps_fn, gamma_fn=gamma_fn,
                         vocab_size=256, num_steps=num_steps, t=t, eps=d["eps"],
                         eps_0=d["eps_0"])


@pytest.mark.parametrize("name", LOSS_FILES)
@pytest.mark.parametrize("num_steps", [0, 10, 1000])
def test_vdm_loss_reproduces_official_terms(name, num_steps):
  d, params = _load(name)
  official_config = json.loads(str(d[f"T{num_steps}_config"]))
  assert official_config["sm_n_timesteps"] == num_steps
  config, ported = convert.from_official(params, official_config)
  assert config.model.num_steps == num_steps
  terms = _official_terms(d, ported, config, num_steps)
  for ours, key in ((terms.prior, "klz"), (terms.reconstruction, "recon"),
                    (terms.diffusion, "diff")):
    ref = d[f"T{num_steps}_loss_{key}"]
    rel = np.abs(np.asarray(ours) - ref) / np.abs(ref)
    assert rel.max() < 1e-4, (key, np.asarray(ours), ref)


def test_official_monotone_schedule_is_ported_exactly():
  d, params = _load("vdm_loss_4x32_learned_monotone")
  config, ported = convert.from_official(params, json.loads(str(d["T0_config"])))
  assert config.model.schedule == "learned_nnet"
  t = np.linspace(0.0, 1.0, 101, dtype=np.float32)
  # The official network in float64 NumPy: b1 + |w1| t + |w3| . (2 sigmoid(|w2| (2t-1) + b2) - 1)
  # / 1024 (model_vdm.NoiseSchedule_NNet with its DenseMonotone layers).
  g = {k: np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(params["gamma"],
                                                                              sep="/").items()}
  h = (2 * t[:, None].astype(np.float64) - 1) @ np.abs(g["l2/kernel"]) + g["l2/bias"]
  ref = (t[:, None] @ np.abs(g["l1/kernel"]) + g["l1/bias"]
         + (2 * (1 / (1 + np.exp(-h)) - 0.5)) @ np.abs(g["l3/kernel"]) / 1024)[:, 0]
  ours = np.asarray(convert.gamma(config, ported, t))
  np.testing.assert_array_less(np.abs(ours - ref).max(), 1e-5)
  # The exact-endpoint variant represents the same function.
  as_monotone = convert.nnet_as_monotone(params["gamma"])
  mono = np.asarray(schedules.monotone_gamma(t, as_monotone))
  np.testing.assert_array_less(np.abs(mono - ref).max(), 1e-5)


def test_official_init_of_the_monotone_schedule_is_linear():
  # The official learnable_nnet starts linear to ~3e-5 (its l2, l3 weights ~ N(0, 0.01^2)).
  d, params = _load("vdm_loss_4x32_learned_monotone")
  t = np.linspace(0.0, 1.0, 101, dtype=np.float32)
  for tree in (params["gamma"], schedules.init_nnet(jax.random.PRNGKey(3))):
    g = np.asarray(schedules.nnet_gamma(t, jax.tree.map(jnp.asarray, tree)))
    assert np.abs(g - (-13.3 + 18.3 * t)).max() < 2e-4
  init = schedules.init_monotone(jax.random.PRNGKey(3))
  g = np.asarray(schedules.monotone_gamma(t, init))
  assert np.abs(g - (-13.3 + 18.3 * t)).max() < 2e-4
  np.testing.assert_allclose([g[0], g[-1]], [-13.3, 5.0], atol=1e-6)   # exact endpoints


def test_learned_linear_schedule_is_ported_exactly():
  d, params = _load("vdm_loss_4x32_learned_linear")
  config, ported = convert.from_official(params, json.loads(str(d["T0_config"])))
  assert config.model.schedule == "learned_linear"
  w, b = float(params["gamma"]["w"][0]), float(params["gamma"]["b"][0])
  t = np.linspace(0, 1, 11, dtype=np.float32)
  np.testing.assert_allclose(convert.gamma(config, ported, t), b + abs(w) * t, atol=1e-5)


def test_scoreunet_only_tree_takes_the_schedule_from_the_config():
  d, params = _load("scoreunet_4x32")
  assert "conv_in" in params                                   # only the ScoreUNet
  config, ported = convert.from_official(params, json.loads(str(d["official_config"])))
  chex.assert_trees_all_close(convert.gamma(config, ported, np.array([0.0, 1.0])),
                              np.array([-13.3, 5.0], np.float32), atol=1e-6)
  # And wrapped as {"params": {"score_model": ...}} (the official init's output).
  _, wrapped = convert.from_official({"params": {"score_model": params}},
                                     json.loads(str(d["official_config"])))
  chex.assert_trees_all_equal(wrapped, ported)


def test_converted_config_is_a_full_trainable_config():
  d, params = _load("vdm_loss_4x32_learned_linear")
  config, _ = convert.from_official(params, json.loads(str(d["T0_config"])))
  assert isinstance(config, ml_collections.ConfigDict)
  from vdm_jax.training.config_checks import check_config
  check_config(config, num_devices=1)
  m = config.model
  assert (m.channels, m.num_blocks, m.dropout, m.fourier_exponents) == (32, 4, 0.1, (6, 7))
  assert config.optim.weight_decay_rule == "official" and not config.optim.ema_warmup


def test_errors_name_the_parameter():
  d, params = _load("scoreunet_4x32")
  official_config = json.loads(str(d["official_config"]))
  bad = jax.tree.map(lambda a: a, params)
  bad["down.block_1"]["conv1"]["kernel"] = np.zeros((3, 3, 32, 31), np.float32)
  with pytest.raises(ValueError, match=r"down\.block_1/conv1/kernel.*shape"):
    convert.from_official(bad, official_config)
  extra = dict(params, **{"down.block_9": params["down.block_0"]})
  with pytest.raises(ValueError, match=r"down\.block_9"):
    convert.from_official(extra, official_config)
  odd = dict(params, mystery={"kernel": np.zeros(3)})
  with pytest.raises(ValueError, match="mystery"):
    convert.from_official(odd, official_config)
  missing = {k: v for k, v in params.items() if k != "up.block_4"}
  with pytest.raises(ValueError, match="lack"):
    convert.from_official(missing, official_config)
  with pytest.raises(ValueError, match="gamma_type 'cosine'"):
    convert.from_official(params, dict(official_config, gamma_type="cosine"))
  with pytest.raises(ValueError, match="sm_n_layer"):
    convert.from_official(params, {k: v for k, v in official_config.items() if k != "sm_n_layer"})
  with pytest.raises(ValueError, match="score_model"):
    convert.from_official({"foo": {}}, official_config)


@pytest.mark.parametrize("name,expected", [("cifar10", 30_578_179), ("cifar10_aug", None)])
def test_paper_configs_build_the_official_network(name, expected):
  """configs/cifar10.py is the official CIFAR-10 ScoreUNet: its parameter count, and every
  parameter of ours is the image of an official name (the inverse of the port's renaming)."""
  import runpy
  config = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "configs" / f"{name}.py"))[
      "get_config"]()
  config.model.block_impl = "unrolled"
  module = convert.build(config)
  shapes = jax.eval_shape(lambda k: module.init({"params": k, "diffusion": k},
                                                jnp.zeros((1, 32, 32, 3), jnp.int32),
                                                train=False)["params"], jax.random.PRNGKey(0))
  net = traverse_util.flatten_dict(shapes["score_net"])
  count = sum(int(np.prod(s.shape)) for s in net.values())
  if expected is not None:
    assert count == expected
  # The official names of a network with the config's sizes, built from the official layout
  # rules (model_vdm.ScoreUNet: dense0/1, conv_in, down.block_i [+ down.attn_i], mid.block_1,
  # mid.attn_1, mid.block_2, up.block_i [+ up.attn_i], GroupNorm_0, conv_out), map onto ours.
  m = config.model
  heads = ["dense0", "dense1", "conv_in", "conv_out", "GroupNorm_0", "mid.block_1", "mid.attn_1",
           "mid.block_2"]
  heads += [f"down.block_{i}" for i in range(m.num_blocks)]
  heads += [f"up.block_{i}" for i in range(m.num_blocks + 1)]
  if m.attention_everywhere:
    heads += [f"down.attn_{i}" for i in range(m.num_blocks)]
    heads += [f"up.attn_{i}" for i in range(m.num_blocks + 1)]
  key = lambda p: p[:2] if p[0].startswith(("down_", "up_")) else p[:1]
  probe = lambda h: (h, "kernel") if "." not in h else (h, "q", "kernel")
  mapped = {key(convert._project_name(probe(h))) for h in heads}   # pylint: disable=protected-access
  assert mapped == {key(p) for p in net}
