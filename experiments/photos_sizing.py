"""Train-step timings of candidate photo-patch nets (configs/photos.py with overrides), one process.

  python experiments/photos_sizing.py --grid 32x4x32 64x2x32 64x4x32

Each item is CHANNELSxBLOCKSxBATCH; prints parameters, the median train step (ms), images/s and
the steps a 30-minute budget buys. Runs `vdm_jax.apps.bench.run_benchmark(parts=("train",))`, the
same compiled step as the trainer (`vdm-jax bench --config configs/photos.py` also times evaluation,
sampling and the roofline).
"""

from __future__ import annotations

import argparse
import pathlib
import runpy

from vdm_jax.apps import bench

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--grid", nargs="+", default=["32x4x32", "64x2x32", "64x4x32"])
  parser.add_argument("--steps", type=int, default=7)
  parser.add_argument("--config", default=str(ROOT / "configs" / "photos.py"))
  args = parser.parse_args()
  for item in args.grid:
    channels, blocks, batch = (int(v) for v in item.split("x"))
    config = runpy.run_path(args.config)["get_config"]()
    config.model.channels, config.model.num_blocks = channels, blocks
    result = bench.run_benchmark(config, batch_size=batch, steps=args.steps, warmup=2,
                                 parts=("train",))
    step_s = result["step_s"]
    print(f"{item}: {result['params']:,} params, {1000 * step_s:.0f} ms/step, "
          f"{result['train_images_per_s']:.0f} images/s, {1800 / step_s:.0f} steps in 30 min, "
          f"compile {result.get('compile_s', float('nan')):.1f} s", flush=True)


if __name__ == "__main__":
  main()
