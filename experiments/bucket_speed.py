"""Training speed with the run directory in a bucket against a local directory.

The same `vdm-jax train` command (default: the digits main job with a checkpoint every 50 steps)
alternately into a local folder and into gs:// on the GCS emulator on loopback
(`vdm_jax.testing.gcs_emulator`, which runs on the same CPU as the trainer: a pessimistic bucket).
Each run is a fresh process; its steps/s is the median of the per-interval rates the trainer logs
(train/steps_per_sec in metrics.jsonl, checkpoint saves included), and its wall clock the whole
command's. Medians over --repeats runs per place; the ratio compares the medians.

  python experiments/bucket_speed.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from vdm_jax.storage import rundir
from vdm_jax.testing import gcs_emulator


def _run(workdir: str, args: argparse.Namespace, env: dict) -> dict:
  cmd = [sys.executable, "-m", "vdm_jax.cli", "train", "--config", args.config, "--workdir",
         workdir, f"--config.training.checkpoint_every={args.checkpoint_every}",
         *[f"--config.{override}" for override in args.set]]
  start = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - start
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  rows = [json.loads(line) for line in rundir.read_text(
      rundir.join(workdir, rundir.METRICS)).splitlines()]
  rates = [r["train/steps_per_sec"] for r in rows if "train/steps_per_sec" in r][1:]  # 1st: compile
  steps = rundir.read_json(rundir.join(workdir, rundir.EVAL_JSON))
  return {"steps_per_sec": statistics.median(rates), "wall_s": wall, "bpd": steps["bpd"],
          "checkpoints": len(rundir.list_names(rundir.join(workdir, rundir.CHECKPOINTS)))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/digits.py")
  parser.add_argument("--checkpoint_every", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. seed=1")
  parser.add_argument("--out", default="experiments/out/bucket_speed")
  args = parser.parse_args()
  emulator = gcs_emulator.Emulator().start()
  results = {"local": [], "gs": []}
  try:
    with emulator.environment(), tempfile.TemporaryDirectory() as tmp:
      env = {**os.environ, **emulator.env}
      for i in range(args.repeats):
        for where in ("local", "gs"):
          workdir = (os.path.join(tmp, f"run{i}") if where == "local"
                     else f"gs://{gcs_emulator.BUCKET}/run{i}")
          results[where].append(_run(workdir, args, env))
          print(where, i, results[where][-1], flush=True)
  finally:
    emulator.stop()
  median = {w: {k: statistics.median(r[k] for r in rs) for k in ("steps_per_sec", "wall_s", "bpd")}
            for w, rs in results.items()}
  ratio = median["gs"]["steps_per_sec"] / median["local"]["steps_per_sec"]
  lines = ["| run directory | runs | steps/s (median) | wall clock (s, median) | test bpd | "
           "gs / local steps/s |", "|---|---|---|---|---|---|"]
  for where, m in median.items():
    lines.append(f"| {where} | {len(results[where])} | {m['steps_per_sec']:.2f} | "
                 f"{m['wall_s']:.1f} | {m['bpd']:.4f} | "
                 f"{ratio:.3f} |" if where == "gs" else
                 f"| {where} | {len(results[where])} | {m['steps_per_sec']:.2f} | "
                 f"{m['wall_s']:.1f} | {m['bpd']:.4f} | 1 |")
  table = "\n".join(lines)
  print(table)
  rundir.write_json(args.out + ".json", {"args": vars(args), "runs": results, "median": median,
                                         "ratio": ratio})
  rundir.write_text(args.out + ".md", table + "\n")


if __name__ == "__main__":
  main()
