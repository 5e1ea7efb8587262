"""The library's XLA compiler options per backend (parallel.compiler_options / parallel.jit)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax.core import parallel

ENV = parallel.CPU_OPTIONS_ENV


def _conv_loss(x, w):
  y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.sum(jnp.tanh(y) * x)


def test_cpu_options_leave_convolutions_to_xla(monkeypatch):
  monkeypatch.delenv(ENV, raising=False)
  options = parallel.compiler_options("cpu")
  assert options == {"xla_cpu_experimental_ynn_fusion_type": parallel.CPU_YNN_FUSION_TYPE}
  assert "CONVOLUTION" not in parallel.CPU_YNN_FUSION_TYPE
  assert parallel.compiler_options("gpu") is None and parallel.compiler_options("tpu") is None


def test_env_override(monkeypatch):
  monkeypatch.setenv(ENV, "default")
  assert parallel.compiler_options("cpu") is None
  monkeypatch.setenv(ENV, "LIBRARY_FUSION_TYPE_REDUCE")
  assert parallel.compiler_options("cpu") == {
      "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def test_bad_env_value_names_it(monkeypatch):
  """XLA:CPU itself checks the value: a rejected one shows the options reach the compiler."""
  if jax.default_backend() != "cpu":
    pytest.skip("the option exists on CPU only")
  monkeypatch.setenv(ENV, "NO_SUCH_FUSION")
  with pytest.raises(ValueError, match="NO_SUCH_FUSION.*LIBRARY_FUSION_TYPE_"):
    parallel.compiler_options()
  with pytest.raises(ValueError, match="NO_SUCH_FUSION"):
    parallel.jit(lambda x: x * 2)


def _np_conv_loss_and_weight_grad(x, w):
  """_conv_loss and its gradient in w, float64 NumPy: y = SAME 3x3 convolution (zero padding),
  L = sum(tanh(y) x), dL/dw[i, j, c, d] = sum_{b, h, v} xpad[b, h + i, v + j, c] dL/dy[b, h, v, d]
  with dL/dy = (1 - tanh(y)^2) x."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  size = x.shape[1]
  xpad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = np.stack([np.stack([xpad[:, i:i + size, j:j + size] for j in range(3)], 3)
                      for i in range(3)], 3)        # [B, H, W, 3 (i), 3 (j), C]
  y = np.einsum("bhwijc,ijcd->bhwd", patches, w)
  dy = (1.0 - np.tanh(y)**2) * x
  return np.sum(np.tanh(y) * x), np.einsum("bhwijc,bhwd->ijcd", patches, dy)


def test_jit_with_options_computes_the_same_gradients(monkeypatch):
  """The options change which library runs the convolutions, not the function: the loss and its
  weight gradient under `parallel.jit` and plain `jax.jit` both match float64 NumPy (float32
  rounding), and the input gradients agree."""
  monkeypatch.delenv(ENV, raising=False)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 16)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 16, 16)) * 0.1, jnp.float32)
  value_and_grad = jax.value_and_grad(_conv_loss, argnums=(0, 1))
  ours = parallel.jit(value_and_grad)(x, w)
  default = jax.jit(value_and_grad)(x, w)
  chex.assert_tree_all_finite(ours)
  loss, grad_w = _np_conv_loss_and_weight_grad(x, w)
  for value, (_, g_w) in (ours, default):
    np.testing.assert_allclose(value, loss, rtol=1e-5)
    np.testing.assert_allclose(g_w, grad_w, rtol=1e-4, atol=1e-4)
  chex.assert_trees_all_close(ours[1][0], default[1][0], rtol=1e-4, atol=1e-4)


def test_a_chosen_fusion_list_applies_within_and_the_environment_wins(monkeypatch):
  monkeypatch.delenv(ENV, raising=False)
  key = "xla_cpu_experimental_ynn_fusion_type"
  with parallel.cpu_ynn_fusions("LIBRARY_FUSION_TYPE_DOT"):
    assert parallel.compiler_options("cpu") == {key: "LIBRARY_FUSION_TYPE_DOT"}
    with parallel.cpu_ynn_fusions("default"):
      assert parallel.compiler_options("cpu") is None
    assert parallel.compiler_options("cpu") == {key: "LIBRARY_FUSION_TYPE_DOT"}
    assert parallel.compiler_options("gpu") is None
    monkeypatch.setenv(ENV, "LIBRARY_FUSION_TYPE_REDUCE")
    assert parallel.compiler_options("cpu") == {key: "LIBRARY_FUSION_TYPE_REDUCE"}
    monkeypatch.delenv(ENV)
  assert parallel.compiler_options("cpu") == {key: parallel.CPU_YNN_FUSION_TYPE}


@pytest.mark.parametrize("value", ["", "dot", "LIBRARY_FUSION_TYPE_DOT, LIBRARY_FUSION_TYPE_REDUCE",
                                   None])
def test_a_chosen_fusion_list_that_is_not_one_is_refused(value):
  assert not parallel.is_cpu_ynn_fusion_type(value)
  with pytest.raises(ValueError, match="xla.cpu_ynn_fusion_type=.*LIBRARY_FUSION_TYPE_"):
    with parallel.cpu_ynn_fusions(value):
      pass
  assert parallel.compiler_options("cpu") != {"xla_cpu_experimental_ynn_fusion_type": value}


def test_a_chosen_fusion_list_xla_rejects_names_it(monkeypatch):
  if jax.default_backend() != "cpu":
    pytest.skip("the option exists on CPU only")
  monkeypatch.delenv(ENV, raising=False)
  with parallel.cpu_ynn_fusions("LIBRARY_FUSION_TYPE_NO_SUCH_KIND"):
    with pytest.raises(ValueError, match="LIBRARY_FUSION_TYPE_NO_SUCH_KIND.*not accepted"):
      parallel.jit(lambda x: x * 2)
