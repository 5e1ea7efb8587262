"""Compile time and step time of the VDM ScoreUNet: unrolled vs nn.scan blocks, with and without
remat.

For each (num_blocks, block_impl, remat) it builds parallel.jit(jax.grad(loss)) (the library's
XLA options; VDM_JAX_XLA_CPU_YNN_FUSION_TYPE=default for XLA's own) with
loss = mean(eps_hat^2) (train=True, so dropout runs), times `.lower()` and `.compile()`, then runs
one warm-up step and reports the median of the timed steps (each ended by block_until_ready).
Parameters are random normals of the shapes from jax.eval_shape (no init compile).

Run (the paper's width, 32x32x3, batch 2: fits 2 CPU cores):

  python experiments/bench_scan.py                      # full grid: num_blocks 8 and 32
  python experiments/bench_scan.py --num_blocks 8 --out /tmp/b.json

It prints a markdown table and writes the rows as JSON to --out
(default experiments/out/bench_scan.json).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.nets import networks
from vdm_jax.core import parallel

import common


def _random_params(model: networks.ScoreUNet, z: jax.Array, t: jax.Array) -> dict:
  shapes = jax.eval_shape(lambda z, t: model.init(jax.random.key(0), z, t, train=False), z, t)
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype), shapes)


def _temp_bytes(compiled) -> int | None:
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    return None


def bench_one(*, num_blocks: int, block_impl: str, remat: bool, channels: int, size: int,
              in_channels: int, batch: int, steps: int) -> dict:
  """Times compile and train-step of grad(mean(eps_hat^2)) for one configuration."""
  model = networks.ScoreUNet(channels=channels, num_blocks=num_blocks, block_impl=block_impl,
                             remat=remat)
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.standard_normal((batch, size, size, in_channels)), jnp.float32)
  t = jnp.asarray(rng.uniform(size=batch), jnp.float32)
  variables = _random_params(model, z, t)

  def loss(v, z, t, key):
    eps_hat = model.apply(v, z, t, train=True, rngs={"dropout": key})
    return jnp.mean(eps_hat ** 2)

  step = parallel.jit(jax.grad(loss))
  key = jax.random.key(0)
  t0 = time.perf_counter()
  lowered = step.lower(variables, z, t, key)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  jax.block_until_ready(compiled(variables, z, t, key))   # warm-up
  times = []
  for i in range(steps):
    s = time.perf_counter()
    jax.block_until_ready(compiled(variables, z, t, jax.random.fold_in(key, i)))
    times.append(time.perf_counter() - s)
  return dict(num_blocks=num_blocks, block_impl=block_impl, remat=remat,
              params=sum(math.prod(x.shape) for x in jax.tree.leaves(variables)),
              lower_s=round(t1 - t0, 3), compile_s=round(t2 - t1, 3),
              step_s=round(statistics.median(times), 4), temp_mib=(
                  None if (b := _temp_bytes(compiled)) is None else round(b / 2**20, 1)))


def markdown(rows: list[dict]) -> str:
  return common.table(
      ["num_blocks", "block_impl", "remat", "params", "lower (s)", "compile (s)", "step (s)",
       "temp (MiB)"],
      [[r["num_blocks"], r["block_impl"], r["remat"], f"{r['params']:,}", f"{r['lower_s']:.2f}",
        f"{r['compile_s']:.2f}", f"{r['step_s']:.3f}", r["temp_mib"]] for r in rows])


def main() -> None:
  p = common.parser(__doc__)
  p.add_argument("--num_blocks", type=int, nargs="+", default=[8, 32])
  p.add_argument("--block_impl", nargs="+", default=list(networks.BLOCK_IMPLS),
                 choices=networks.BLOCK_IMPLS)
  p.add_argument("--remat", type=int, nargs="+", default=[0, 1], choices=[0, 1])
  p.add_argument("--channels", type=int, default=128)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--in_channels", type=int, default=3)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--out", default="experiments/out/bench_scan.json")
  args = p.parse_args()

  rows = []
  for n, impl, remat in itertools.product(args.num_blocks, args.block_impl, args.remat):
    row = bench_one(num_blocks=n, block_impl=impl, remat=bool(remat), channels=args.channels,
                    size=args.size, in_channels=args.in_channels, batch=args.batch,
                    steps=args.steps)
    print(json.dumps(row), flush=True)
    rows.append(row)
  device = jax.devices()[0]
  meta = dict(jax=jax.__version__, backend=device.platform, device=device.device_kind,
              cpu_count=os.cpu_count(), machine=platform.machine(), channels=args.channels,
              input=[args.batch, args.size, args.size, args.in_channels], steps=args.steps,
              compiler_options=parallel.compiler_options())
  print(markdown(rows))
  out = pathlib.Path(args.out)
  common.write_json(out, dict(meta=meta, rows=rows), indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
