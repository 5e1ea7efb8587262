"""Mixed precision: the bound after a fixed short training, float32 vs bfloat16 activations.

config.model.dtype = "bfloat16" runs the network's convolutions, dense layers and activations in
bfloat16; parameters, optimiser state, the schedule gamma(t), the Fourier features, the loss
terms and eps_hat itself stay float32 (checked here on the built model). For each dtype and seed
this trains the digits config for a fixed number of steps (same data order and same evaluation
draws for both dtypes at a given seed), then evaluates the EMA parameters' bound on the test split
with a fixed evaluation key. The question: is |mean_bf16 - mean_f32| below the run-to-run noise
(the standard deviation over seeds)?

  python experiments/bf16_vs_f32.py [--steps 600] [--seeds 0 1 2] [--config digits]

Writes experiments/out/bf16_vs_f32.csv / .png / .json and prints a markdown summary.
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics
import time
import warnings

import jax
import jax.numpy as jnp

from vdm_jax.apps import bench, bench_report
from vdm_jax.datasets import data, pipeline
from vdm_jax.core import parallel
from vdm_jax.training import state as state_lib
from vdm_jax.training import steps as steps_lib, tasks

import common
from common import ROOT

DTYPES = ("float32", "bfloat16")


def check_precision(task, state, info) -> dict:
  """Parameter / optimiser-state dtypes and the dtypes of eps_hat, gamma and the loss terms."""
  leaves = jax.tree.leaves((state.params, state.opt_state))
  float_dtypes = sorted({str(x.dtype) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)})
  eps_fn, gamma_fn, shape, _ = task.sampler_fns(state.params, state.frozen)
  z = jnp.zeros((2,) + tuple(shape), jnp.float32)
  batch = bench.random_batch(info, 2)
  loss, metrics = task.loss(state.params, state.frozen, batch, jax.random.PRNGKey(0))
  return {"state_float_dtypes": float_dtypes,
          "eps_hat_dtype": str(eps_fn(z, jnp.zeros((2,))).dtype),
          "gamma_dtype": str(gamma_fn(jnp.zeros((2,))).dtype), "loss_dtype": str(loss.dtype),
          "terms_dtypes": sorted({str(v.dtype) for v in metrics.values()})}


def train_once(config, *, steps: int, mesh) -> dict:
  info = data.get_info(config.data.name)
  task, optimizer = tasks.build_task(config, info), state_lib.build_optimizer(config)
  state = jax.jit(lambda: state_lib.init_state(task, optimizer.tx, seed=config.seed),
                  out_shardings=parallel.replicated(mesh))()
  precision = check_precision(task, state, info)
  step = steps_lib.jit_train_step(config, task, optimizer, mesh)
  batches = pipeline.train_iterator(config.data.name, global_batch_size=config.training.batch_size,
                                    seed=config.seed)
  start = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for _ in range(steps):
      state, out = step(state, parallel.shard_batch(next(batches), mesh))
    train_bpd = float(jax.device_get(out["bpd"]))
  seconds = time.perf_counter() - start
  result = steps_lib.evaluate(task, state.ema_params, config, mesh, frozen=state.frozen,
                              seed=0)
  return {"test_bpd": result["bpd"], "test_bpd_se": result["bpd_se"], "train_bpd": train_bpd,
          "train_seconds": seconds, "steps_per_s": steps / seconds, **precision}


def summarise(rows: list[dict]) -> dict:
  by = {d: [r["test_bpd"] for r in rows if r["dtype"] == d] for d in DTYPES}
  mean = {d: statistics.mean(v) for d, v in by.items()}
  std = {d: statistics.stdev(v) if len(v) > 1 else float("nan") for d, v in by.items()}
  pooled = math.sqrt((std["float32"]**2 + std["bfloat16"]**2) / 2)
  diff = mean["bfloat16"] - mean["float32"]
  n = len(by["float32"])
  paired = [b - f for f, b in zip(by["float32"], by["bfloat16"])]
  return {"mean": mean, "std": std, "difference": diff, "run_to_run_std": pooled,
          "difference_se": pooled * math.sqrt(2 / n),
          "paired_differences": paired, "within_noise": abs(diff) < pooled,
          "speed_ratio_bf16_over_f32": statistics.mean(
              r["steps_per_s"] for r in rows if r["dtype"] == "bfloat16") / statistics.mean(
                  r["steps_per_s"] for r in rows if r["dtype"] == "float32")}


def plot(rows: list[dict], summary: dict, path: pathlib.Path) -> None:
  fig, ax = common.pyplot().subplots(figsize=(5, 3.5))
  for i, d in enumerate(DTYPES):
    v = [r["test_bpd"] for r in rows if r["dtype"] == d]
    ax.scatter([i] * len(v), v, alpha=0.7, label=f"{d} (seeds)")
    ax.errorbar([i + 0.15], [summary["mean"][d]], yerr=[summary["std"][d]], fmt="k_", capsize=6)
  ax.set_xticks(range(len(DTYPES)), DTYPES)
  ax.set_xlim(-0.5, len(DTYPES) - 0.5)
  ax.set_ylabel("test bpd (EMA params)")
  ax.set_title(f"bf16 - f32 = {summary['difference']:+.4f} bpd; "
               f"seed std {summary['run_to_run_std']:.4f}", fontsize=9)
  common.save_figure(fig, path)


def main() -> None:
  p = common.parser(__doc__)
  p.add_argument("--config", default="digits")
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--out", default=str(ROOT / "experiments" / "out" / "bf16_vs_f32"))
  args = p.parse_args()
  mesh = parallel.make_mesh()
  rows = []
  for seed in args.seeds:
    for dtype in DTYPES:
      config = common.load_config(args.config)
      config.seed, config.model.dtype = seed, dtype
      rows.append({"dtype": dtype, "seed": seed, **train_once(config, steps=args.steps,
                                                               mesh=mesh)})
      print(json.dumps(rows[-1]), flush=True)
  summary = summarise(rows)
  out = pathlib.Path(args.out)
  common.write_csv(out.with_suffix(".csv"), rows, extrasaction="ignore",
                   fieldnames=["dtype", "seed", "test_bpd", "test_bpd_se", "train_bpd",
                               "steps_per_s"])
  plot(rows, summary, out.with_suffix(".png"))
  bench_report.write_json(out.with_suffix(".json"), rows, summary=summary, config=args.config,
                          steps=args.steps)
  print(common.table([f"{args.config}, {args.steps} steps, seeds {args.seeds}", "test bpd mean",
                      "std over seeds"],
                     [[d, f"{summary['mean'][d]:.4f}", f"{summary['std'][d]:.4f}"]
                      for d in DTYPES]))
  print(f"difference bf16 - f32: {summary['difference']:+.4f} bpd (run-to-run std "
        f"{summary['run_to_run_std']:.4f}; within noise: {summary['within_noise']}); bf16 / f32 "
        f"steps/s: {summary['speed_ratio_bf16_over_f32']:.2f}")
  print(f"wrote {out}.csv / .png / .json")


if __name__ == "__main__":
  main()
