"""Time the README's main job and record its bpd curve, one fresh run directory per seed.

Runs `vdm-jax train --config configs/digits.py --workdir OUT/seedS --config.seed=S` as the
README does (a new process each: import, data, compilation, training, evaluations, samples,
checkpoints all counted; install excluded), and prints a markdown table: wall-clock time, the
test bpd at every evaluation of the run (continuous-time bound, EMA parameters), the parameter
count, and the CPU it ran on.

  python experiments/main_job.py --seeds 0 1 2 --out /tmp/main_job

Measure on a quiet machine: other processes on the same cores lengthen the wall-clock time.
There is no emulating a slower CPU here: XLA's `--xla_cpu_max_isa` caps only the code XLA
generates itself, not the YNNPACK kernels its dots and reductions run in (capped at SSE4.2 the
digits train step slowed by 3% on an AVX-512 Xeon), so a time is a time on the CPU named.
"""

import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

import common
from common import ROOT


def cpu_name() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def run_seed(seed: int, out: pathlib.Path, *, extra: list[str], env: dict) -> dict:
  workdir = out / f"seed{seed}"
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, "-m", "vdm_jax.cli", "train", "--config", str(ROOT / "configs/digits.py"),
         "--workdir", str(workdir), f"--config.seed={seed}", *extra]
  start = time.monotonic()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out)
  wall = time.monotonic() - start
  if proc.returncode != 0:
    raise SystemExit(f"seed {seed} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  curve = {r["step"]: r["eval/bpd"] for r in rows if "eval/bpd" in r}
  final = json.loads((workdir / "eval.json").read_text())
  curve[final["step"]] = final["bpd"]
  params = final["num_params"]
  return {"seed": seed, "wall_s": wall, "curve": curve, "bpd": final["bpd"],
          "bpd_se": final["bpd_se"], "params": params}


def main() -> None:
  parser = common.parser(__doc__, paragraph=True)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--out", default="/tmp/vdm_main_job")
  args, overrides = parser.parse_known_args()   # the rest: --config.a.b=v flags for the run
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ)
  results = [run_seed(s, out, extra=overrides, env=env) for s in args.seeds]
  steps = sorted({s for r in results for s in r["curve"]})
  isa = ("AVX-512" if "avx512f" in cpu_flags() else "AVX2" if "avx2" in cpu_flags()
         else "neither AVX2 nor AVX-512")
  print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, {isa}; "
        f"parameters: {results[0]['params']}")
  print(common.table(["seed", "wall (s)"] + [f"bpd @ {s}" for s in steps],
                     [[r["seed"], f"{r['wall_s']:.0f}"]
                      + [f"{r['curve'].get(s, float('nan')):.3f}" for s in steps]
                      for r in results]))
  common.write_json(out / "main_job.json", results, indent=1)


if __name__ == "__main__":
  main()
