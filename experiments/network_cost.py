"""What one network evaluation costs the compressor: the ScoreUNet family on 32x32 RGB tiles.

Compressing a photograph at T steps evaluates the network T times on each of its 32x32 tiles
(a 512x512 photograph: 256 tiles, 25,600 evaluations at T = 100). For each network size
(channels x residual blocks, with the middle self-attention of the official ScoreUNet, or
without it: `--variants`), this times the jitted float32 forward pass (random weights, the
"photos" config's Fourier features) at batch sizes --batch (the median of --repeats calls after
one compiling call) and prints the time per tile and the network time alone of 25,600 tile
evaluations at that batch size: a lower bound on compressing a 512x512 photograph at T = 100
here (the coder's own work, the direct coder's head and the portable coder's integer arithmetic
come on top).

Usage:
  python experiments/network_cost.py [--variants 32x4 16x2 16x2-noattn] [--batch 32 256]
      [--repeats 5] [--out experiments/out/network_cost]
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.nets import networks

import common

EVALUATIONS = 256 * 100    # a 512x512 photograph's tiles at T = 100


class _NoMiddleAttention(networks.ScoreUNet):
  """The ScoreUNet without its middle self-attention (not a configurable model: a lower bound)."""

  def _middle(self, h, cond, train):
    g = self.norm_groups
    h = networks.ResnetBlock(self.channels, self.dropout, train, self.dtype, g,
                             name="mid_block1")(h, cond)
    return networks.ResnetBlock(self.channels, self.dropout, train, self.dtype, g,
                                name="mid_block2")(h, cond)


def _variant(text: str) -> tuple[nn.Module, str]:
  size, _, flag = text.partition("-")
  channels, blocks = (int(v) for v in size.split("x"))
  cls = _NoMiddleAttention if flag == "noattn" else networks.ScoreUNet
  net = cls(channels=channels, num_blocks=blocks, dropout=0.0, fourier_exponents=(6, 7))
  return net, f"{channels} ch x {blocks} blocks" + (", no attention" if flag else "")


def main() -> None:
  parser = common.parser(__doc__, paragraph=True)
  parser.add_argument("--variants", nargs="+", default=["32x4", "16x2", "16x2-noattn"])
  parser.add_argument("--batch", type=int, nargs="+", default=[32, 256])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="experiments/out/network_cost")
  args = parser.parse_args()
  rows = []
  for text in args.variants:
    net, name = _variant(text)
    z1 = jnp.zeros((1, 32, 32, 3), jnp.float32)
    params = net.init(jax.random.PRNGKey(0), z1, jnp.zeros(1), train=False)
    count = sum(x.size for x in jax.tree.leaves(params))
    fn = jax.jit(lambda p, z: net.apply(p, z, jnp.full((z.shape[0],), 0.5), train=False))
    for b in args.batch:
      z = jnp.asarray(np.random.default_rng(b).standard_normal((b, 32, 32, 3)), jnp.float32)
      jax.block_until_ready(fn(params, z))
      times = []
      for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(params, z))
        times.append(time.perf_counter() - start)
      per_tile = float(np.median(times)) / b
      rows.append({"network": name, "params": count, "batch": b, "ms_per_tile": 1e3 * per_tile,
                   "s_per_512x512_t100": per_tile * EVALUATIONS})
      print(rows[-1], flush=True)
  text = common.table(
      ["network", "parameters", "batch", "ms per tile", "25,600 tiles (s): 512x512 at T = 100"],
      [[r["network"], f"{r['params']:,}", r["batch"], f"{r['ms_per_tile']:.2f}",
        f"{r['s_per_512x512_t100']:.0f}"] for r in rows])
  print(text)
  common.write_text(args.out + ".md", text + "\n")
  common.write_json(args.out + ".json", rows, indent=2)


if __name__ == "__main__":
  main()
