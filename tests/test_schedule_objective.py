"""The schedule's interior trained on the variance of the bound's estimate (issue 14):
`objectives.variance_elbo_terms` against autodiff references on a small case.

The maths runs in float32 (the bound's terms are computed in float32 whatever the input), hence
the tolerances; each test's mutation (see the report of issue 14) fails it by orders of magnitude.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from vdm_jax import elbo, objectives, schedules

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



if __name__ == "__main__":
  absltest.main()
