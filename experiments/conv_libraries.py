"""Why the library compiles with its own XLA:CPU options: the U-Net's convolution, piece by piece.

For the ScoreUNet's 3x3 layers at batch 8 (128 -> 128 channels, and 256 -> 128 in the up blocks
that concatenate a skip) this times the forward convolution, its input gradient and its kernel
gradient, each jitted alone, under XLA's default options and under `parallel.compiler_options()`
(YNNPACK for dots and reductions only), medians of --repeats calls, in one process:

  python experiments/conv_libraries.py [--batch 8] [--repeats 9]

Prints a markdown table (GFLOP/s; 2 B H W 9 C_in C_out FLOPs each) and writes
experiments/out/conv_libraries.json.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import numpy as np
from jax import lax

from vdm_jax.apps import bench_report
from vdm_jax.core import parallel

import common
from common import ROOT


def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


PIECES = {
    "forward": lambda x, w, dy: _conv(x, w),
    "input gradient": lambda x, w, dy: jax.vjp(lambda x_: _conv(x_, w), x)[1](dy)[0],
    "kernel gradient": lambda x, w, dy: jax.vjp(lambda w_: _conv(x, w_), w)[1](dy)[0],
}


def _median_s(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  p = common.parser(__doc__)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--repeats", type=int, default=9)
  p.add_argument("--out", default=str(ROOT / "experiments" / "out" / "conv_libraries.json"))
  args = p.parse_args()
  variants = {"XLA default": None, "library options": parallel.compiler_options()}
  rng = np.random.default_rng(0)
  rows = []
  for c_in, c_out in ((128, 128), (256, 128)):
    x = rng.standard_normal((args.batch, args.size, args.size, c_in)).astype(np.float32)
    w = (0.05 * rng.standard_normal((3, 3, c_in, c_out))).astype(np.float32)
    dy = rng.standard_normal((args.batch, args.size, args.size, c_out)).astype(np.float32)
    flops = 2.0 * args.batch * args.size**2 * 9 * c_in * c_out
    for piece, fn in PIECES.items():
      row = {"c_in": c_in, "c_out": c_out, "piece": piece}
      for name, options in variants.items():
        seconds = _median_s(jax.jit(fn, compiler_options=options), (x, w, dy), args.repeats)
        row[name] = flops / seconds / 1e9
      rows.append(row)
      print(json.dumps(row), flush=True)
  print(common.table(["layer", "piece"] + [f"{v} (GFLOP/s)" for v in variants],
                     [[f"3x3, {r['c_in']} -> {r['c_out']}", r["piece"]]
                      + [f"{r[v]:.0f}" for v in variants] for r in rows]))
  bench_report.write_json(args.out, rows, compiler_options=variants["library options"],
                          batch=args.batch, size=args.size, repeats=args.repeats)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
