"""Pixel-space VDM vs DDPM (L_simple) vs latent diffusion on digits: bpd, training and sampling time.

Trains nothing itself; it reads the runs made by (each config's docstring has the details):

  vdm-jax train --config configs/digits.py --workdir runs/digits
  vdm-jax train --config configs/digits_ddpm.py --workdir runs/digits_ddpm
  vdm-jax train --config configs/digits_vae.py --workdir runs/digits_vae
  vdm-jax train --config configs/digits_latent.py --workdir runs/digits_latent
  python experiments/compare_digits.py

For each run: the test bound in bpd (continuous time, and with T = 1000 steps, or the model's own T) from `vdm-jax eval`
machinery, training throughput (median images/s over the logged intervals of metrics.jsonl, as
trained, on a shared machine), and sampling time for `--num` images with `--steps` steps (median
of `--repeats` timed runs after one compile, all measured here in one process so they compare as
ratios). Writes experiments/out/compare_digits.csv and .png and prints a markdown table.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from vdm_jax.apps import evaluation
from vdm_jax.training import steps as steps_lib

import common

RUNS = (("pixel VDM (ELBO, continuous)", "runs/digits", "ancestral"),
        ("DDPM (L_simple, 1000 levels)", "runs/digits_ddpm", "ddpm"),
        ("VAE alone (N(0, I) prior)", "runs/digits_vae", "ancestral"),
        ("latent VDM (on the VAE's 4x4x2 latents)", "runs/digits_latent", "ancestral"))


def _train_speed(workdir: str) -> tuple[float, int]:
  rates, steps = [], 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "train/images_per_sec" in row:
        rates.append(row["train/images_per_sec"])
        steps = max(steps, row["step"])
  return float(np.median(rates)), steps


def _sample_seconds(run, sampler: str, num: int, steps: int, repeats: int) -> float:
  fns = evaluation.guided_fns(run, labels=None, guidance=0.0)
  draw = lambda k: steps_lib.draw_samples(fns, sampler=sampler, key=k, num_images=num,
                                          num_steps=steps, info=run.info)
  draw(jax.random.PRNGKey(0))   # compile
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    draw(jax.random.PRNGKey(i + 1))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main() -> None:
  parser = common.parser(__doc__)
  parser.add_argument("--num", type=int, default=64)
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--t_samples", type=int, default=4)
  parser.add_argument("--out", default="experiments/out")
  args = parser.parse_args()
  rows = []
  for name, workdir, sampler in RUNS:
    if not os.path.isdir(workdir):
      print(f"skipping {name}: {workdir} does not exist (train it first)")
      continue
    run = common.load_run(workdir)
    kw = dict(max_examples=None, t_samples=args.t_samples, frozen=run.frozen)
    cont = steps_lib.evaluate(run.task, run.params, run.config, run.mesh, num_steps=0,
                              **kw)
    steps_t = run.config.model.num_steps or 1000   # DDPM: its own 999 steps (levels 1..1000)
    t1000 = steps_lib.evaluate(run.task, run.params, run.config, run.mesh,
                               num_steps=steps_t, **kw) if run.task.name != "vae" else cont
    speed, steps = _train_speed(workdir)
    rows.append({"model": name, "workdir": workdir, "train_steps": steps,
                 "bpd_continuous": cont["bpd"], "bpd_continuous_se": cont["bpd_se"],
                 "T": steps_t, "bpd_T1000": t1000["bpd"], "bpd_T1000_se": t1000["bpd_se"],
                 "train_images_per_s": speed, "sampler": sampler,
                 "sample_seconds": _sample_seconds(run, sampler, args.num, args.steps,
                                                   args.repeats)})
    print(rows[-1], flush=True)
  common.write_csv(os.path.join(args.out, "compare_digits.csv"), rows)
  _plot(rows, os.path.join(args.out, "compare_digits.png"))
  print()
  print(common.table(
      ["model", "steps", "test bpd (continuous)", "test bpd (T steps)", "train images/s",
       f"{args.num} samples x {args.steps} steps (s)"],
      [[r["model"], r["train_steps"], f"{r['bpd_continuous']:.3f} ± {r['bpd_continuous_se']:.3f}",
        f"{r['bpd_T1000']:.3f} ± {r['bpd_T1000_se']:.3f} (T={r['T']})",
        f"{r['train_images_per_s']:.0f}", f"{r['sample_seconds']:.2f} ({r['sampler']})"]
       for r in rows]))


def _plot(rows, path: str) -> None:
  fig, ax = common.pyplot().subplots(1, 2, figsize=(10, 3.5))
  names = [r["model"].split(" (")[0] for r in rows]
  ax[0].bar(names, [r["bpd_continuous"] for r in rows],
            yerr=[r["bpd_continuous_se"] for r in rows])
  ax[0].set_ylabel("test bpd (continuous-time bound)")
  ax[1].bar(names, [r["sample_seconds"] for r in rows])
  ax[1].set_ylabel("sampling time (s)")
  for a in ax:
    a.tick_params(axis="x", rotation=20)
  common.save_figure(fig, path)


if __name__ == "__main__":
  main()
