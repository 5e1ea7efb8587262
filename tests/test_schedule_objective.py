"""The schedule's interior trained on the variance of the bound's estimate:
`objectives.variance_elbo_terms` against autodiff references on a small case, then through the
model, the trainer's step (scan, bfloat16, a 4-device mesh) and the config checks.

The maths runs in float32 (the bound's terms are computed in float32 whatever the input), hence
the tolerances; each test fails by orders of magnitude when the code it guards is broken.
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from absl.testing import absltest, parameterized

from vdm_jax.training import config_checks
from vdm_jax.datasets import data
from vdm_jax.maths import elbo, objectives
from vdm_jax.nets import model as model_lib
from vdm_jax.core import parallel
from vdm_jax.datasets import pipeline
from vdm_jax.maths import schedules
from vdm_jax.training import state as state_lib, steps, tasks

SK = model_lib.SCHEDULE_KEY

B, SHAPE, VOCAB = 6, (2, 2, 1), 17


def _net(params):
  """A stand-in network conditioned on gamma, nonlinear in z and gamma: eps_fn(z, gamma)."""
  def eps_fn(z, gamma):
    g = jnp.broadcast_to(gamma, (z.shape[0],))[:, None, None, None]
    return (params["a"] * jnp.tanh(z) * jax.nn.sigmoid(g + params["b"])
            + params["c"] * jnp.sin(0.3 * g) * z)
  return eps_fn


NET = {"a": jnp.float32(0.7), "b": jnp.float32(-1.0), "c": jnp.float32(0.2)}


def _monotone(seed=0, hidden=8):
  """A monotone schedule far from linear (the net's weights scaled up) with exact endpoints."""
  params = schedules.init_monotone(jax.random.key(seed), gamma_min=-6.0, gamma_max=4.0,
                                   hidden=hidden)
  net = params["net"]
  params["net"] = {"l1": {"kernel": net["l1"]["kernel"] * 0.3, "bias": net["l1"]["bias"]},
                   "l2": {"kernel": net["l2"]["kernel"] * 300.0,
                          "bias": jnp.linspace(-2.0, 2.0, hidden)},
                   "l3": {"kernel": net["l3"]["kernel"] * 3000.0}}
  return params


def _nnet(seed=1, hidden=8):
  params = schedules.init_nnet(jax.random.key(seed), gamma_min=-6.0, gamma_max=4.0,
                               hidden=hidden)
  params["l2"]["kernel"] = params["l2"]["kernel"] * 300.0
  params["l3"]["kernel"] = params["l3"]["kernel"] * 3000.0
  return params


GAMMA = {"monotone": schedules.monotone_gamma, "nnet": schedules.nnet_gamma,
         "linear": schedules.learned_linear_gamma}
INIT = {"monotone": _monotone, "nnet": _nnet,
        "linear": lambda: schedules.init_learned_linear(gamma_min=-6.0, gamma_max=4.0)}


def _draws(seed=3):
  """Fixed data and draws: x [B, 2, 2, 1], t [B], eps, eps_0."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, VOCAB, size=(B,) + SHAPE).astype(np.int32)
  t = np.sort(rng.uniform(0.02, 0.98, size=B)).astype(np.float32)
  eps, eps_0 = (rng.standard_normal((B,) + SHAPE).astype(np.float32) for _ in range(2))
  return dict(x=x, t=t, eps=eps, eps_0=eps_0)


def _terms(kind, sched, net, draws, *, variance):
  fn = objectives.variance_elbo_terms if variance else elbo.elbo_terms
  gamma_fn = lambda t: GAMMA[kind](t, sched)
  return fn(jax.random.key(0), draws["x"], eps_fn=_net(net), gamma_fn=gamma_fn,
            vocab_size=VOCAB, t=draws["t"], eps=draws["eps"], eps_0=draws["eps_0"])


def _loss(kind, draws, *, variance, weights=None):
  """J(sched, net) = sum_i c_i total_i (c_i = 1/B by default)."""
  c = np.full(B, 1.0 / B, np.float32) if weights is None else weights

  def loss(sched, net):
    return jnp.sum(c * _terms(kind, sched, net, draws, variance=variance).total)
  return loss


def _second_moment(kind, draws, weights=None):
  """sum_i c_i L_i^2 of the diffusion term (plain autodiff: the reference)."""
  c = np.full(B, 1.0 / B, np.float32) if weights is None else weights
  return lambda sched, net: jnp.sum(
      c * _terms(kind, sched, net, draws, variance=False).diffusion ** 2)


def _split_reference(kind, draws, weights=None):
  """The gradient the rule prescribes, by autodiff on two copies of the schedule's parameters:
  gamma(t) = e0 + (e1 - e0) s(t), endpoints e from theta_e, shape s from theta_s; the bound's
  gradient in theta_e plus the gradient of sum_i c_i L_i^2 in theta_s, at theta_e = theta_s."""
  c = np.full(B, 1.0 / B, np.float32) if weights is None else weights
  gamma = GAMMA[kind]

  def terms(theta_e, theta_s, net):
    def gamma_fn(t):
      e0, e1 = gamma(jnp.float32(0.0), theta_e), gamma(jnp.float32(1.0), theta_e)
      s0, s1 = gamma(jnp.float32(0.0), theta_s), gamma(jnp.float32(1.0), theta_s)
      return e0 + (e1 - e0) * (gamma(t, theta_s) - s0) / (s1 - s0)
    return elbo.elbo_terms(jax.random.key(0), draws["x"], eps_fn=_net(net), gamma_fn=gamma_fn,
                           vocab_size=VOCAB, t=draws["t"], eps=draws["eps"],
                           eps_0=draws["eps_0"])

  def reference(sched, net):
    g_e = jax.grad(lambda th: jnp.sum(c * terms(th, sched, net).total))(sched)
    g_s = jax.grad(lambda th: jnp.sum(c * terms(sched, th, net).diffusion ** 2))(sched)
    return jax.tree.map(jnp.add, g_e, g_s)
  return reference


def _close(a, b, rtol=2e-4, atol=1e-6):
  chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


class VarianceGradientTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_values_are_the_bound_s_terms_bit_for_bit(self):
    draws = _draws()
    for kind in ("monotone", "nnet"):
      sched = INIT[kind]()
      ours = self.variant(lambda s, n, k=kind: _terms(k, s, n, draws, variance=True))(sched, NET)
      ref = self.variant(lambda s, n, k=kind: _terms(k, s, n, draws, variance=False))(sched, NET)
      chex.assert_trees_all_equal(ours, ref)

  @chex.variants(with_jit=True, without_jit=True)
  def test_monotone_interior_gets_the_gradient_of_the_second_moment(self):
    """The net (interior) of learned_monotone: grad of (1/B) sum_i L_i^2, not of the bound."""
    draws, sched = _draws(), _monotone()
    grad = self.variant(jax.grad(_loss("monotone", draws, variance=True)))(sched, NET)
    want = jax.grad(_second_moment("monotone", draws))(sched, NET)
    bound = jax.grad(_loss("monotone", draws, variance=False))(sched, NET)
    _close(grad["net"], want["net"])
    # The two gradients differ (else the test could not tell them apart).
    gap = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), want["net"], bound["net"])
    self.assertGreater(max(jax.tree.leaves(gap)), 1e-2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_monotone_endpoints_and_network_get_the_bound_s_gradient(self):
    draws, sched = _draws(), _monotone()
    grads = self.variant(jax.grad(_loss("monotone", draws, variance=True), argnums=(0, 1)))(
        sched, NET)
    bound = jax.grad(_loss("monotone", draws, variance=False), argnums=(0, 1))(sched, NET)
    second = jax.grad(_second_moment("monotone", draws))(sched, NET)
    for name in ("gamma_min", "delta"):
      # float32: the routed path sums the same chain rule in another order (~1e-5 here)
      _close(grads[0][name], bound[0][name], rtol=1e-4, atol=1e-5)
      self.assertGreater(abs(float(second[name] - bound[0][name])), 10.0)   # distinguishable
    _close(grads[1], bound[1], rtol=1e-6, atol=0.0)     # the network: the bound's gradient

  @parameterized.parameters("monotone", "nnet")
  def test_gradient_equals_the_split_reference(self, kind):
    """Any schedule: the endpoints' part of the bound's gradient plus the shape's part of the
    second moment's (for learned_nnet every parameter gets some of each)."""
    draws, sched = _draws(), INIT[kind]()
    grad = jax.jit(jax.grad(_loss(kind, draws, variance=True)))(sched, NET)
    _close(grad, _split_reference(kind, draws)(sched, NET), rtol=5e-4, atol=1e-5)

  def test_any_reduction_of_the_per_example_values(self):
    """Unequal weights c_i (and a nonlinear J): the interior gets grad sum_i c_i L_i^2, i.e. the
    scale read in the backward pass is 2 L_i, whatever the cotangent c_i of example i."""
    draws, sched = _draws(), _monotone()
    weights = np.linspace(0.1, 2.0, B).astype(np.float32)
    grad = jax.grad(_loss("monotone", draws, variance=True, weights=weights))(sched, NET)
    _close(grad["net"], jax.grad(_second_moment("monotone", draws, weights))(sched, NET)["net"])
    log_loss = lambda s, n: jnp.log(_loss("monotone", draws, variance=True)(s, n))
    value = _loss("monotone", draws, variance=False)(sched, NET)
    grad = jax.grad(log_loss)(sched, NET)
    want = jax.grad(_second_moment("monotone", draws))(sched, NET)
    _close(grad["net"], jax.tree.map(lambda g: g / value, want["net"]))

  def test_learned_linear_has_no_interior_the_gradient_is_the_bound_s(self):
    draws, sched = _draws(), INIT["linear"]()
    grad = jax.grad(_loss("linear", draws, variance=True), argnums=(0, 1))(sched, NET)
    _close(grad, jax.grad(_loss("linear", draws, variance=False), argnums=(0, 1))(sched, NET),
           rtol=1e-5)

  def test_interior_gradient_is_unbiased_for_the_variance_gradient(self):
    """Averaged over many draws, the interior's gradient under the bound is ~0 (its mean does
    not depend on the shape), while the variance objective's is not."""
    sched = _monotone()
    rng = np.random.default_rng(7)
    n = 4096
    x = np.repeat(rng.integers(0, VOCAB, size=(1,) + SHAPE).astype(np.int32), n, axis=0)

    def grads(key, variance):
      fn = objectives.variance_elbo_terms if variance else elbo.elbo_terms
      loss = lambda s: jnp.mean(fn(key, x, eps_fn=_net(NET), vocab_size=VOCAB,
                                   gamma_fn=lambda t: schedules.monotone_gamma(t, s)).total)
      return jax.grad(loss)(sched)["net"]["l3"]["kernel"]

    bound = np.asarray(grads(jax.random.key(1), False))
    var = np.asarray(grads(jax.random.key(1), True))
    self.assertLess(np.max(np.abs(bound)), 0.05 * np.max(np.abs(var)))

  def test_bad_schedule_values_arguments(self):
    draws = _draws()
    gamma_fn = lambda t: schedules.monotone_gamma(t, _monotone())
    kw = dict(eps_fn=_net(NET), gamma_fn=gamma_fn, vocab_size=VOCAB)
    with self.assertRaisesRegex(ValueError, "gamma_t and gamma_prime go together"):
      elbo.elbo_terms(jax.random.key(0), draws["x"], t=draws["t"], gamma_t=draws["t"], **kw)
    with self.assertRaisesRegex(ValueError, "gamma_t and gamma_prime go together"):
      elbo.elbo_terms(jax.random.key(0), draws["x"], gamma_t=draws["t"], gamma_prime=draws["t"],
                      **kw)


# ---- through the model, the trainer's step and the config checks ----

INFO = data.static_info("digits")


def _config(smoke_config, **model):
  config = ml_collections.ConfigDict(smoke_config.to_dict())
  config.model.update(dict(dict(schedule="learned_monotone", schedule_objective="variance"),
                           **model))
  config_checks.check_config(config)
  return config


def _batch(size=8):
  return next(pipeline.train_iterator("digits", global_batch_size=size, seed=0))


def _distance(a, b) -> float:
  return float(optax.global_norm(jax.tree.map(jnp.subtract, a, b)))


def _grads(configs, params, batch, key, mesh=None):
  """[the gradient of the task's loss (mean bpd) for each config], sharded over `mesh` as the
  trainer's step; one compiled program for all (they share the forward pass)."""
  losses = [tasks.build_task(config, INFO).loss for config in configs]
  fn = lambda p, b: [jax.grad(lambda q, loss=loss: loss(q, {}, b, key)[0])(p) for loss in losses]
  if mesh is None:
    return jax.jit(fn)(params, batch)
  rep = parallel.replicated(mesh)
  return jax.device_get(parallel.jit(
      fn, in_shardings=(rep, parallel.batch_sharding(mesh)), out_shardings=rep)(
          params, parallel.shard_batch(batch, mesh)))


def test_model_routes_the_gradient_network_and_endpoints_unchanged(smoke_config):
  """VDMTask.loss with schedule_objective "variance": the same loss value; the score network's
  and the endpoints' gradients are the bound's; the interior's is the gradient of
  mean_i L_i^2 / (D ln 2) (L_i the diffusion term in nats, the loss being the mean bpd)."""
  var_config = _config(smoke_config)
  elbo_config = _config(smoke_config, schedule_objective="elbo")
  task = tasks.build_task(var_config, INFO)
  params, _ = jax.jit(task.init)(jax.random.PRNGKey(0))
  params = jax.tree.map(lambda p: p, params)
  params[SK]["net"]["l3"]["kernel"] = params[SK]["net"]["l3"]["kernel"] * 3000.0   # curved
  batch, key = _batch(), jax.random.PRNGKey(5)
  loss_var = task.loss(params, {}, batch, key)[0]
  loss_elbo = tasks.build_task(elbo_config, INFO).loss(params, {}, batch, key)[0]
  assert float(loss_var) == float(loss_elbo)
  g_var, g_elbo = _grads([var_config, elbo_config], params, batch, key)
  chex.assert_trees_all_close(g_var["score_net"], g_elbo["score_net"], rtol=1e-5, atol=1e-7)
  for name in ("gamma_min", "delta"):
    chex.assert_trees_all_close(g_var[SK][name], g_elbo[SK][name], rtol=1e-3, atol=1e-5)
  model = tasks.build_task(elbo_config, INFO).model
  k_diff, k_drop, _ = jax.random.split(key, 3)
  num_dims = int(np.prod(INFO.shape))

  def second_moment(p):
    terms = model.apply({"params": p}, batch["image"], None, None, train=True,
                        rngs={"diffusion": k_diff, "dropout": k_drop})
    return jnp.mean(terms.diffusion ** 2) / (num_dims * np.log(2.0))
  want = jax.jit(jax.grad(second_moment))(params)
  # Compared as whole vectors: at initialisation L ~ 400 nats, and float32 sums of
  # per-example terms 2 L dL/ds that largely cancel round at ~3e-5 here (both sides); the
  # exact comparison is the small case above. The bound's gradient is ~1000x smaller.
  size = float(optax.global_norm(want[SK]["net"]))
  assert _distance(g_var[SK]["net"], want[SK]["net"]) < 0.05 * size
  assert _distance(g_elbo[SK]["net"], want[SK]["net"]) > 0.9 * size


def _init_state(config, mesh):
  """The trainer's initial state (seed 0) of `config`, replicated over `mesh`."""
  task, tx = tasks.build_task(config, INFO), state_lib.build_optimizer(config).tx
  return jax.jit(lambda: state_lib.init_state(task, tx, seed=0),
                 out_shardings=parallel.replicated(mesh))()


def _train(config, num_steps, mesh=None, keep=(), state=None):
  """(task, state after num_steps, last step's output, {s: state after step s for s in keep},
  s = 0 the initial state), from `state` (default: `_init_state`)."""
  mesh = mesh or parallel.make_mesh(1)
  task, tx = tasks.build_task(config, INFO), state_lib.build_optimizer(config).tx
  rep = parallel.replicated(mesh)
  state = _init_state(config, mesh) if state is None else state
  step = parallel.jit(steps.make_train_step(task, tx, ema_decay=0.9),
                      in_shardings=(rep, parallel.batch_sharding(mesh)),
                      out_shardings=(rep, rep))
  it = pipeline.train_iterator("digits", global_batch_size=config.training.batch_size, seed=0)
  kept = {0: jax.device_get(state)} if 0 in keep else {}
  for i in range(num_steps):
    state, out = step(state, parallel.shard_batch(next(it), mesh))
    if i + 1 in keep:
      kept[i + 1] = jax.device_get(state)
  return task, jax.device_get(state), jax.device_get(out), kept


def _check_schedule(task, params):
  """Strictly increasing on a fine grid, finite, with exactly the learned endpoints."""
  gamma = lambda t: task.model.apply({"params": params}, t, method=model_lib.VDM.gamma)
  grid = np.asarray(gamma(jnp.linspace(0.0, 1.0, 2001)))
  assert np.all(np.isfinite(grid)) and np.all(np.diff(grid) > 0), np.diff(grid).min()
  sched = params[SK]
  gmin, gmax = schedules.learned_endpoints(sched)
  assert float(gamma(jnp.float32(0.0))) == float(gmin)
  assert float(gamma(jnp.float32(1.0))) == float(gmax)


def test_training_moves_the_interior_and_keeps_the_schedule_monotone(smoke_config):
  """Adam's first update is lr g / (|g| + eps) per entry: with eps negligible (1e-30), no
  warm-up and no weight decay, every schedule parameter with a nonzero gradient moves by exactly
  lr x the schedule's multiplier in step 1, whatever the float rounding. So: the endpoints move
  by one step, identically under both objectives (both follow the bound's gradient); under the
  variance objective every weight of the interior's last layer moves by one step (the gradient
  of E[L^2] reaches all of them; that it is that gradient is tested above). After 20 steps the
  schedule is still strictly increasing with exact endpoints."""
  trained, first, init = {}, {}, {}
  for objective in ("variance", "elbo"):
    config = _config(smoke_config, schedule_objective=objective)
    config.optim.schedule_lr_multiplier = 30.0
    config.optim.warmup_steps, config.optim.weight_decay, config.optim.eps = 0, 0.0, 1e-30
    task, state, out, kept = _train(config, 20, keep=(0, 1))
    assert float(out["finite"]) == 1.0
    _check_schedule(task, state.params)
    trained[objective], first[objective] = state.params[SK], kept[1].params[SK]
    init[objective] = kept[0].params[SK]
  step = config.optim.learning_rate * config.optim.schedule_lr_multiplier
  moves = lambda a, b: np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  for objective in ("variance", "elbo"):
    for leaf in ("gamma_min", "delta"):
      np.testing.assert_allclose(moves(first[objective][leaf], init[objective][leaf]), step,
                                 rtol=1e-4)
  for leaf in ("gamma_min", "delta"):
    np.testing.assert_allclose(first["variance"][leaf], first["elbo"][leaf], rtol=0, atol=1e-6)
  kernel = lambda params: params["net"]["l3"]["kernel"]
  # float32 parameters of magnitude ~0.01: the move is exact to ~1e-9 absolute.
  np.testing.assert_allclose(moves(kernel(first["variance"]), kernel(init["variance"])), step,
                             atol=1e-6)
  assert np.all(moves(kernel(trained["variance"]), kernel(first["variance"])) > 0)


def test_scan_bfloat16_and_a_four_device_mesh(smoke_config):
  """block_impl "scan" and bfloat16 activations, sharded over 4 devices as the trainer's step:
  the network's gradient is the bound's (as with float32, unrolled), the gradient on 4 devices
  is the one on 1 device (to bfloat16 rounding), and after 3 steps of the trainer's step the
  schedule is strictly increasing with exact endpoints."""
  assert jax.device_count() >= 4
  config = _config(smoke_config, block_impl="scan", dtype="bfloat16", num_blocks=2)
  config.optim.schedule_lr_multiplier = 30.0
  mesh = parallel.make_mesh(4)
  initial = _init_state(config, mesh)   # its parameters are task.init's at PRNGKey(0)
  params = jax.device_get(initial.params)
  batch, key = _batch(), jax.random.PRNGKey(3)
  elbo_config = ml_collections.ConfigDict(config.to_dict())
  elbo_config.model.schedule_objective = "elbo"
  g_var, g_elbo = _grads([config, elbo_config], params, batch, key, mesh)
  chex.assert_trees_all_close(g_var["score_net"], g_elbo["score_net"], rtol=1e-5, atol=1e-7)
  assert float(jnp.max(jnp.abs(g_var[SK]["net"]["l3"]["kernel"]
                               - g_elbo[SK]["net"]["l3"]["kernel"]))) > 0.0
  # 1 device: bfloat16 convolutions round differently with another batch split (~3% on single
  # leaves), so whole vectors are compared.
  g_one, = _grads([config], params, batch, key, parallel.make_mesh(1))
  for part in ("score_net", SK):
    assert _distance(g_one[part], g_var[part]) < 0.02 * float(optax.global_norm(g_var[part]))
  task, state, out, _ = _train(config, 3, mesh, state=initial)
  assert float(out["finite"]) == 1.0
  _check_schedule(task, state.params)


@pytest.mark.parametrize("overrides, match", [
    ({"schedule_objective": "l2"}, r"model.schedule_objective='l2': expected one of"),
    ({"schedule": "learned_linear"}, r"model.schedule_objective='variance': expected 'elbo' "
     r"unless .*\('learned_monotone', 'learned_nnet'\)"),
    ({"schedule": "fixed_linear"}, r"model.schedule_objective='variance'"),
    ({"num_steps": 10}, r"model.schedule_objective='variance'"),
    ({"objective": "weighted", "schedule": "fixed_linear"}, r"model.schedule_objective="),
    ({"task": "latent_vdm"}, r"model.schedule_objective='variance'"),
])
def test_config_refuses_variance_where_it_has_no_meaning(smoke_config, overrides, match):
  config = ml_collections.ConfigDict(smoke_config.to_dict())
  config.model.schedule = "learned_monotone"
  config.model.schedule_objective = "variance"
  for k, v in overrides.items():
    (config if k == "task" else config.model)[k] = v
  with pytest.raises(config_checks.ConfigError, match=match):
    config_checks.check_config(config)


@pytest.mark.parametrize("schedule", ["learned_monotone", "learned_nnet"])
def test_config_and_model_accept_variance_with_a_learned_interior(smoke_config, schedule):
  config = _config(smoke_config, schedule=schedule)
  assert tasks.build_task(config, INFO).model.schedule_objective == "variance"
  with pytest.raises(ValueError, match="schedule_objective 'variance' needs"):
    model_lib.build_model(**dict(_MODEL_ARGS, schedule="learned_linear",
                                 schedule_objective="variance"))


_MODEL_ARGS = dict(vocab_size=17, gamma_min=-7.0, gamma_max=5.0, channels=8, num_blocks=1,
                   fourier_exponents=(6,), attention_everywhere=False, dropout=0.0,
                   num_classes=0, block_impl="unrolled", remat=False, dtype=jnp.float32)


if __name__ == "__main__":
  absltest.main()
