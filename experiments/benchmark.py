"""The benchmark table (docs/performance.md): `vdm_jax.apps.bench` over configs, one fresh process
each.

  python experiments/benchmark.py                        # digits, smoke, cifar10 (batch 8)
  python experiments/benchmark.py --configs cifar10 --repeats 3
  python experiments/benchmark.py --configs cifar10 --set model.dtype=bfloat16 --name cifar10_bf16

Each (config, repeat) runs in its own Python process (so the peak RSS and the compile time are
that config's alone); the reported row is the per-field median over repeats. Writes
experiments/out/benchmark_<name>.json (all repeats and the median), prints the markdown table
and rebuilds experiments/out/benchmark.md from every benchmark_*.json there.

Presets (chosen to fit a 2-core CPU; `--batch`, `--steps` override them): the paper's CIFAR-10
net has a train step of several seconds there, so it runs 3 timed steps at batch 8, evaluates
16 images and times 5 sampling steps, scaled to 1000; its "data" part is skipped (a step of
seconds cannot starve on a pipeline serving thousands of batches per second, and CIFAR-10 is not
prepared on this machine).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

import common
from common import ROOT

PRESETS = {
    "digits": dict(batch_size=64, steps=10, warmup=2, data_steps=20, eval_images=300,
                   eval_batch_size=100, sample_images=64, sample_steps=200),
    "smoke": dict(batch_size=8, steps=20, warmup=3, data_steps=300, eval_images=32, sample_images=8,
                  sample_steps=1000),
    "cifar10": dict(batch_size=8, steps=3, warmup=1, eval_images=16, eval_batch_size=8,
                    sample_images=8, sample_steps=5, parts=("train", "eval", "sample", "roofline")),
}


def median_row(rows: list[dict]) -> dict:
  """Per-field median of numeric fields over repeats (other fields from the first repeat)."""
  out = dict(rows[0])
  for key, value in rows[0].items():
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
      out[key] = (statistics.median_low if isinstance(value, int) else statistics.median)(values)
  out["repeats"] = len(rows)
  return out


def run_one(args) -> None:
  """Child process: one benchmark of one config, JSON to args.child_out."""
  from vdm_jax.apps import bench
  kwargs = dict(PRESETS.get(args.configs[0], {}))
  if args.batch:
    kwargs["batch_size"] = args.batch
  if args.steps:
    kwargs["steps"] = args.steps
  if args.parts:
    kwargs["parts"] = tuple(args.parts)
  result = bench.run_benchmark(common.load_config(args.configs[0], args.set), **kwargs)
  result["name"] = args.name or args.configs[0]
  pathlib.Path(args.child_out).write_text(json.dumps(result, default=str))


def main() -> None:
  p = common.parser(__doc__)
  p.add_argument("--configs", nargs="+", default=["digits", "smoke", "cifar10"])
  p.add_argument("--batch", type=int, default=0)
  p.add_argument("--steps", type=int, default=0)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--parts", nargs="+", default=None)
  p.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
  p.add_argument("--name", default="", help="row name (default: the config name)")
  p.add_argument("--out_dir", default=str(ROOT / "experiments" / "out"))
  p.add_argument("--child_out", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child_out:
    return run_one(args)
  from vdm_jax.apps import bench_report
  out_dir = pathlib.Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  medians = []
  for name in args.configs:
    rows = []
    for r in range(args.repeats):
      tmp = out_dir / f".bench_{name}_{r}.json"
      cmd = [sys.executable, __file__, "--configs", name, "--child_out", str(tmp),
             "--batch", str(args.batch), "--steps", str(args.steps), "--name", args.name,
             "--set", *args.set] + (["--parts", *args.parts] if args.parts else [])
      subprocess.run(cmd, check=True, cwd=ROOT)
      rows.append(json.loads(tmp.read_text()))
      tmp.unlink()
      print(bench_report.format_markdown(rows[-1]), flush=True)
    row = median_row(rows)
    medians.append(row)
    path = bench_report.write_json(out_dir / f"benchmark_{row['name']}.json", [row], repeats=rows,
                                   overrides=args.set)
    print(f"wrote {path}", flush=True)
  print(bench_report.format_markdown(medians))
  every = [json.loads(f.read_text())["results"][0] for f in sorted(out_dir.glob("benchmark_*.json"))]
  (out_dir / "benchmark.md").write_text(bench_report.format_markdown(every) + "\n")
  print(f"wrote {out_dir / 'benchmark.md'} ({len(every)} rows: every benchmark_*.json there)")


if __name__ == "__main__":
  main()
