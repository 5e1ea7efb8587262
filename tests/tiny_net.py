"""A tiny score network for tests whose subject is not the network (the trainer's numbers, the
benchmark harness, composed tasks): it compiles in a fraction of the U-Net's time.

`model.network = NAME` selects it once `registered(NAME)` (a context manager) has put it in
the network registry.
"""

import contextlib

import flax.linen as nn
import jax.numpy as jnp

from vdm_jax.nets import networks


class TinyNet(nn.Module):
  """eps_hat = conv(swish(conv(z) + dense(t) [+ embed(label)])): 3x3 convolutions, `channels`
  hidden channels, reading the time and, for a conditional model, the label (the null label,
  id num_classes, where it is None). `zero_out`: the output convolution starts at zero (a
  network that is 0 at initialisation, as the U-Net's)."""
  num_classes: int = 0
  channels: int = 8
  zero_out: bool = False

  @nn.compact
  def __call__(self, z, t, label=None, conditioning=None, *, train):
    del conditioning, train
    h = nn.Conv(self.channels, (3, 3), name="conv_in")(z)
    h = h + nn.Dense(self.channels, name="time")(jnp.reshape(t, (-1, 1)))[:, None, None, :]
    if self.num_classes:
      ids = jnp.full(z.shape[:1], self.num_classes) if label is None else label
      h = h + nn.Embed(self.num_classes + 1, self.channels, name="label")(ids)[:, None, None, :]
    init = nn.initializers.zeros if self.zero_out else nn.linear.default_kernel_init
    return nn.Conv(z.shape[-1], (3, 3), kernel_init=init, name="conv_out")(nn.swish(h))


@contextlib.contextmanager
def registered(name: str = "test_tiny_net", **options):
  """`model.network = name` builds TinyNet(num_classes=..., **options) inside the block."""
  networks.register_network(
      name, lambda num_classes=0, **unused: TinyNet(num_classes=num_classes, **options))
  try:
    yield name
  finally:
    networks.NETWORKS.unregister(name)
