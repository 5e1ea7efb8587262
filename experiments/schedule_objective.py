"""Learned schedules on digits, trained four ways: test bpd vs steps and the variance of the bound's
estimate.

Variants (each from the same config, configs/digits.py by default, with its
training.num_steps unless --steps is given; the same seeds):
- fixed_linear: the fixed log-SNR-linear schedule at the config's endpoints;
- learned_linear: learned endpoints, linear in between (the default);
- monotone_elbo: `learned_monotone` with `model.schedule_objective = "elbo"` (every schedule
  parameter follows the bound's gradient; the interior's is zero in expectation);
- monotone_variance: `learned_monotone` with `"variance"`: the endpoints follow the bound, the
  interior the gradient of E[L^2] of the per-example diffusion loss (VDM appendix I.2).

Each run is a `train_and_evaluate` run directory, `<out>/runs/<variant>_seed<S>` (a restart
resumes it), evaluated on the test split every `--eval_every` steps (EMA parameters, the
config's `eval.t_samples`). After training, at the final EMA parameters: each test image gets
`--t_samples` independent one-sample estimates of its bound (continuous time; t, eps and eps_0
drawn afresh each time), in bpd. Reported: their mean, and the variance of the per-example
estimate = the mean over images of the within-image variance across draws (ddof 1), in bpd^2,
(its standard error over images in the per-run JSON), also for the diffusion term alone.
The VDM paper's figure (CIFAR-10): learned 0.53, log-SNR-linear 6.35.

Each finished run writes `<out>/results/<variant>_seed<S>.json`, and is skipped when the script
is run again (delete the file to redo it). The summary (a markdown table: mean ± std over seeds;
`<out>/summary.json`) and the plot (`<out>/schedules.png`: gamma(t) of every run, its shape
(gamma - gamma_0) / (gamma_1 - gamma_0), test bpd vs steps, and the variances) are made from
whatever results exist.

Usage:
  python experiments/schedule_objective.py [--steps N] [--seeds 0 1 2] [--eval_every 500]
      [--t_samples 64] [--variants fixed_linear ...] [--config configs/digits.py]
      [--set model.schedule_hidden=64 ...] [--out experiments/out/schedule_objective]
      [--summary_only]
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.nets import model as model_lib
from vdm_jax.training import train

import common

VARIANTS = {
    "fixed_linear": {"model.schedule": "fixed_linear", "model.schedule_objective": "elbo"},
    "learned_linear": {"model.schedule": "learned_linear", "model.schedule_objective": "elbo"},
    "monotone_elbo": {"model.schedule": "learned_monotone", "model.schedule_objective": "elbo"},
    "monotone_variance": {"model.schedule": "learned_monotone",
                          "model.schedule_objective": "variance"},
}
LABELS = {"fixed_linear": "log-SNR-linear (fixed)", "learned_linear": "learned endpoints",
          "monotone_elbo": "monotone, ELBO gradient",
          "monotone_variance": "monotone, variance gradient"}
PAPER = {"fixed_linear": 6.35, "monotone_variance": 0.53}   # VDM paper, CIFAR-10, bpd^2


def make_config(args, variant: str, seed: int):
  config = common.load_config(args.config, args.set)
  config.update_from_flattened_dict(VARIANTS[variant])
  config.seed = seed
  if args.steps:
    config.training.num_steps = args.steps
  config.training.eval_every = args.eval_every
  config.training.checkpoint_every = args.eval_every
  config.training.log_every = min(config.training.log_every, args.eval_every)
  config.training.sample_every = config.training.num_steps   # one sample grid, at the end
  config.sample.num_steps = min(config.sample.num_steps, 50)
  config.sample.num_images = min(config.sample.num_images, 16)
  return config


def _curve(workdir: str) -> list[dict]:
  """[{step, bpd, bpd_se}] of the test evaluations in metrics.jsonl (the last one per step)."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "eval/bpd" in row:
        rows[row["step"]] = {"step": row["step"], "bpd": row["eval/bpd"],
                             "bpd_se": row.get("eval/bpd_se")}
  return [rows[s] for s in sorted(rows)]


def bound_estimates(run, images: np.ndarray, *, t_samples: int, seed: int,
                    batch_size: int = 100) -> dict[str, np.ndarray]:
  """{"bpd", "diffusion_bpd"}: [t_samples, N] one-sample estimates per test image (continuous
  time). Within a batch the times are antithetic (t_i = u + i / B mod 1), so each image's t is
  uniform and its draws are independent across the t_samples keys."""
  task = run.task
  one = lambda p, f, x, k: {n: v for n, v in task.eval_terms(p, f, {"image": x}, k,
                                                             num_steps=0).items()
                            if n in ("bpd", "diffusion_bpd")}
  fn = jax.jit(lambda p, f, x, keys: jax.lax.map(lambda k: one(p, f, x, k), keys))
  out = {"bpd": [], "diffusion_bpd": []}
  key = jax.random.key(seed)
  for i, start in enumerate(range(0, len(images), batch_size)):
    chunk = jnp.asarray(images[start:start + batch_size])
    keys = jax.random.split(jax.random.fold_in(key, i), t_samples)
    res = jax.device_get(fn(run.params, run.frozen, chunk, keys))
    for name in out:
      out[name].append(np.asarray(res[name], np.float64))
  return {name: np.concatenate(v, axis=1) for name, v in out.items()}


def _within_image_variance(est: np.ndarray) -> tuple[float, float]:
  """Mean over images of the variance across draws (ddof 1), and its SE over images."""
  per_image = est.var(axis=0, ddof=1)
  return float(per_image.mean()), float(per_image.std(ddof=1) / math.sqrt(len(per_image)))


def measure(workdir: str, *, t_samples: int, seed: int) -> dict:
  run = common.load_run(workdir)
  images = common.split_images(run.info.name)
  est = bound_estimates(run, images, t_samples=t_samples, seed=seed)
  variance, variance_se = _within_image_variance(est["bpd"])
  diff_var, diff_var_se = _within_image_variance(est["diffusion_bpd"])
  gamma = lambda t: run.task.model.apply({"params": run.params}, t, method=model_lib.VDM.gamma)
  t = jnp.linspace(0.0, 1.0, 201)
  return {"step": run.step, "num_images": int(images.shape[0]), "t_samples": t_samples,
          "bound_bpd": float(est["bpd"].mean()), "variance": variance, "variance_se": variance_se,
          "diffusion_variance": diff_var, "diffusion_variance_se": diff_var_se,
          "gamma_0": float(gamma(jnp.float32(0.0))), "gamma_1": float(gamma(jnp.float32(1.0))),
          "t": np.asarray(t).tolist(), "gamma": np.asarray(gamma(t), np.float64).tolist()}


def run_one(args, variant: str, seed: int) -> dict:
  path = os.path.join(args.out, "results", f"{variant}_seed{seed}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  workdir = os.path.join(args.out, "runs", f"{variant}_seed{seed}")
  config = make_config(args, variant, seed)
  steps = config.training.num_steps
  print(f"== {variant} seed {seed}: {steps} steps -> {workdir}", flush=True)
  start = time.perf_counter()
  result = train.train_and_evaluate(config, workdir)
  if "exit_status" in result:
    raise SystemExit(result["exit_status"])       # stopped by a signal: rerun to resume
  seconds = time.perf_counter() - start
  out = {"variant": variant, "seed": seed, "steps": steps, "train_seconds": seconds,
         "curve": _curve(workdir), "final_bpd": result["bpd"], "final_bpd_se": result["bpd_se"],
         **measure(workdir, t_samples=args.t_samples, seed=args.measure_seed)}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(out, f, indent=1)
  os.replace(path + ".tmp", path)
  print(f"   {variant} seed {seed}: test bpd {out['final_bpd']:.4f}, variance "
        f"{out['variance']:.3f} bpd^2 ({seconds:.0f} s)", flush=True)
  return out


def _pm(values, fmt: str = "{:.3f}") -> str:
  values = np.asarray(values, np.float64)
  if len(values) == 1:
    return fmt.format(values[0])
  return f"{fmt.format(values.mean())} ± {fmt.format(values.std(ddof=1))}"


def summarise(results: list[dict], out: str) -> list[dict]:
  by_variant: dict[str, list[dict]] = {}
  for r in results:
    by_variant.setdefault(r["variant"], []).append(r)
  steps = sorted({c["step"] for r in results for c in r["curve"]})
  rows, table = [], []
  header = (["schedule", "seeds"] + [f"bpd @ {s}" for s in steps]
            + ["variance (bpd^2)", "diffusion-term variance (bpd^2)", "gamma_0 .. gamma_1",
               "VDM paper, CIFAR-10"])
  for variant in VARIANTS:
    rs = by_variant.get(variant)
    if not rs:
      continue
    curve = {s: [c["bpd"] for r in rs for c in r["curve"] if c["step"] == s] for s in steps}
    row = {"variant": variant, "seeds": [r["seed"] for r in rs],
           "bpd": {s: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
                   for s, v in curve.items() if v},
           "variance": [r["variance"] for r in rs],
           "diffusion_variance": [r["diffusion_variance"] for r in rs],
           "gamma_0": [r["gamma_0"] for r in rs], "gamma_1": [r["gamma_1"] for r in rs]}
    rows.append(row)
    table.append([LABELS[variant], ",".join(str(s) for s in row["seeds"])]
                 + [_pm(curve[s]) if curve[s] else "" for s in steps]
                 + [_pm(row["variance"]), _pm(row["diffusion_variance"]),
                    f"{np.mean(row['gamma_0']):.2f} .. {np.mean(row['gamma_1']):.2f}",
                    str(PAPER.get(variant, ""))])
  print(common.table(header, table))
  common.write_json(os.path.join(out, "summary.json"), rows, indent=1)
  _plot(by_variant, os.path.join(out, "schedules.png"))
  return rows


def _plot(by_variant: dict[str, list[dict]], path: str) -> None:
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
  colours = dict(zip(VARIANTS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for variant, rs in by_variant.items():
    c = colours[variant]
    for i, r in enumerate(rs):
      t, g = np.asarray(r["t"]), np.asarray(r["gamma"])
      label = LABELS[variant] if i == 0 else None
      axes[0].plot(t, g, color=c, lw=1, label=label)
      axes[1].plot(t, (g - g[0]) / (g[-1] - g[0]), color=c, lw=1, label=label)
      steps = [p["step"] for p in r["curve"]]
      axes[2].plot(steps, [p["bpd"] for p in r["curve"]], color=c, lw=1, marker=".",
                   label=label)
    axes[3].bar(variant.replace("_", "\n"), np.mean([r["variance"] for r in rs]),
                yerr=np.std([r["variance"] for r in rs]) if len(rs) > 1 else None, color=c)
  axes[0].set(xlabel="t", ylabel="gamma(t) = -log SNR", title="learned schedules (every run)")
  axes[1].plot([0, 1], [0, 1], "k:", lw=0.8)
  axes[1].set(xlabel="t", ylabel="(gamma - gamma_0) / (gamma_1 - gamma_0)", title="shape")
  axes[2].set(xlabel="training step", ylabel="test bpd (EMA)", title="test bound")
  axes[3].set(ylabel="variance of one-sample estimate (bpd^2)", title="at the final parameters")
  axes[3].set_yscale("log")
  axes[3].tick_params(axis="x", labelsize=8)
  axes[0].legend(fontsize=7)
  common.save_figure(fig, path, close=True)
  print(f"wrote {path}")


def main(argv=None) -> list[dict]:
  parser = common.parser(__doc__)
  parser.add_argument("--config", default="configs/digits.py")
  parser.add_argument("--steps", type=int, default=0,
                      help="training steps of every run (0: the config's training.num_steps)")
  parser.add_argument("--eval_every", type=int, default=500)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--t_samples", type=int, default=64, help="estimates per test image")
  parser.add_argument("--measure_seed", type=int, default=12345)
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="config override for every variant, e.g. model.schedule_hidden=64")
  parser.add_argument("--out", default="experiments/out/schedule_objective")
  parser.add_argument("--summary_only", action="store_true", help="no training: summarise")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  results = []
  for seed in args.seeds:                 # seed-major: a partial run covers every variant
    for variant in args.variants:
      path = os.path.join(args.out, "results", f"{variant}_seed{seed}.json")
      if args.summary_only:
        if os.path.exists(path):
          with open(path) as f:
            results.append(json.load(f))
        continue
      results.append(run_one(args, variant, seed))
  if not results:
    raise SystemExit(f"no results under {args.out}/results")
  return summarise(results, args.out)


if __name__ == "__main__":
  main()
