"""bpd versus the number of steps T (the VDM paper's T table, at digits scale).

Two columns of bounds, for T = 10, 100, 250, 500, 1000 and continuous time (T = 0 here):

- oracle: the Bayes-optimal denoiser of a finite data set (`vdm_jax.maths.elbo.oracle_eps_fn`), the
  first N training digits as the data set, the bound evaluated on those same N points, with the
  fixed log-SNR-linear schedule (-13.3, 5): it approaches log2(N) / D bpd as T grows.
- model: the digits VDM (runs/digits, trained in continuous time) evaluated with the T-step bound
  on the test split. The VDM paper trains one model per T; here one continuous-time model is
  evaluated at every T (optionally a second run trained with T = 10: --model_t10_workdir).

The same random numbers (keys) are used for every T, so the differences bpd(T) - bpd(continuous)
are paired; their standard errors are over test images (model) or over Monte-Carlo repeats
(oracle).

Usage:
  python experiments/bpd_vs_t.py [--workdir runs/digits] [--t_samples 32] [--oracle_n 64,1024]
      [--model_t10_workdir runs/digits_t10] [--out experiments/out/bpd_vs_t]

Writes <out>.csv and <out>.png and prints a markdown table.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np

from vdm_jax.maths import elbo, schedules

import common

STEPS = (10, 100, 250, 500, 1000, 0)
# VDM paper, CIFAR-10 test bpd, one model trained and evaluated per T; continuous-time model.
PAPER = {10: 4.31, 100: 2.84, 250: 2.73, 500: 2.68, 1000: 2.67, 0: 2.65}


def _name(steps: int) -> str:
  return "continuous" if steps == 0 else f"T={steps}"


def per_example_bpd(images: np.ndarray, *, eps_fn, gamma_fn, vocab_size: int, num_steps: int,
                    t_samples: int, seed: int) -> np.ndarray:
  """[t_samples, N] one-sample bound estimates in bpd (same keys for every num_steps)."""
  dims = int(np.prod(images.shape[1:]))
  fn = jax.jit(lambda key: elbo.bits_per_dim(elbo.elbo_terms(
      key, images, eps_fn=eps_fn, gamma_fn=gamma_fn, vocab_size=vocab_size,
      num_steps=num_steps).total, num_dims=dims))
  keys = jax.random.split(jax.random.key(seed), t_samples)
  return np.asarray(jax.lax.map(fn, keys), np.float64)


def _paired_stats(est: dict[int, np.ndarray], axis: int) -> dict[str, float]:
  """Means, SEs and paired differences to continuous time; est[T] is [t_samples, N]."""
  out = {}
  reduce_other = 1 - axis   # average over the other axis first
  base = est[0].mean(axis=reduce_other)
  for steps, e in est.items():
    v = e.mean(axis=reduce_other)
    n = v.shape[0]
    out[_name(steps)] = float(v.mean())
    out[_name(steps) + " se"] = float(v.std(ddof=1) / math.sqrt(n))
    d = v - base
    out[_name(steps) + " gap"] = float(d.mean())
    out[_name(steps) + " gap se"] = float(d.std(ddof=1) / math.sqrt(n))
  return out


def oracle_row(n: int, *, vocab_size: int, t_samples: int, seed: int) -> dict:
  """Oracle bound on the first n distinct training digits (SE over Monte-Carlo repeats)."""
  images = common.split_images("digits", split="train")
  flat = images.reshape(len(images), -1)
  _, first = np.unique(flat, axis=0, return_index=True)
  points = images[np.sort(first)[:n]]
  if len(points) < n:
    raise ValueError(f"--oracle_n {n} exceeds the {len(points)} distinct training digits")
  eps_fn = elbo.oracle_eps_fn(points, vocab_size=vocab_size)
  sched = schedules.FixedLinear(gamma_min=-13.3, gamma_max=5.0)
  est = {s: per_example_bpd(points, eps_fn=eps_fn, gamma_fn=sched, vocab_size=vocab_size,
                            num_steps=s, t_samples=t_samples, seed=seed) for s in STEPS}
  dims = int(np.prod(points.shape[1:]))
  return {"denoiser": f"oracle, N={n} train digits (on them)", "N": n,
          "log2(N)/D": math.log2(n) / dims, **_paired_stats(est, axis=0)}


def model_row(workdir: str, *, t_samples: int, seed: int, max_examples: int | None) -> dict:
  """The run's bound on the test split at every T (SE over test images)."""
  run = common.load_run(workdir)
  eps_fn, gamma_fn = common.denoiser(run)
  images = common.split_images(run.info.name, max_examples=max_examples)
  est = {s: per_example_bpd(images, eps_fn=eps_fn, gamma_fn=gamma_fn,
                            vocab_size=run.info.vocab_size, num_steps=s, t_samples=t_samples,
                            seed=seed) for s in STEPS}
  trained = run.config.model.num_steps
  g0, g1 = (float(gamma_fn(np.float32(t))) for t in (0.0, 1.0))
  return {"denoiser": f"{workdir} (trained {_name(trained)}, step {run.step}, "
                      f"gamma {g0:.2f}..{g1:.2f})", "N": len(images),
          "log2(N)/D": float("nan"), **_paired_stats(est, axis=1)}


def main(argv=None) -> list[dict]:
  parser = common.add_run_args(common.parser(__doc__))
  parser.add_argument("--model_t10_workdir", default=None,
                      help="optional run trained with --config.model.num_steps=10 "
                      "--config.model.schedule_objective=elbo")
  parser.add_argument("--t_samples", type=int, default=32, help="(t, eps) draws per image")
  parser.add_argument("--oracle_n", default="64,1024", help="comma-separated data set sizes")
  parser.add_argument("--oracle_samples", type=int, default=200, help="Monte-Carlo repeats")
  parser.add_argument("--max_examples", type=int, default=0, help="0 = the whole test split")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="experiments/out/bpd_vs_t")
  args = parser.parse_args(argv)
  rows = []
  for n in (int(v) for v in args.oracle_n.split(",") if v):
    start = time.perf_counter()
    rows.append(dict(oracle_row(n, vocab_size=17, t_samples=args.oracle_samples,
                                seed=args.seed), seconds=time.perf_counter() - start))
  for workdir in filter(None, (args.workdir, args.model_t10_workdir)):
    start = time.perf_counter()
    rows.append(dict(model_row(workdir, t_samples=args.t_samples, seed=args.seed,
                               max_examples=args.max_examples or None),
                     seconds=time.perf_counter() - start))
  _write(rows, args.out)
  return rows


def _write(rows: list[dict], out: str) -> None:
  paper = {"denoiser": "VDM paper, CIFAR-10 (one model per T)", "N": float("nan"),
           "log2(N)/D": float("nan"), **{_name(s): v for s, v in PAPER.items()},
           **{_name(s) + " gap": v - PAPER[0] for s, v in PAPER.items()}}
  common.write_csv(out + ".csv", rows + [paper], fieldnames=list(rows[0]), restval="")
  cols = [_name(s) for s in STEPS]
  table = []
  for r in rows + [paper]:
    target = "" if math.isnan(r["log2(N)/D"]) else f"{r['log2(N)/D']:.4f}"
    cells = [f"{r[c]:.3f}" + (f" ± {r[c + ' se']:.3f}" if c + " se" in r else "") for c in cols]
    table.append([r["denoiser"], target, *cells])
    gaps = [f"{r[c + ' gap']:+.3f}" + (f" ± {r[c + ' gap se']:.3f}" if c + " gap se" in r
                                       else "") for c in cols[:-1]]
    table.append(["&nbsp;&nbsp;gap to continuous", "", *gaps, "0"])
  print("Bound in bpd (± standard error); below each, the paired gap bpd(T) - bpd(continuous).")
  print(common.table(["denoiser", "log2(N)/D", *cols], table))
  fig, (ax0, ax1) = common.pyplot().subplots(1, 2, figsize=(10, 4))
  xs = [s for s in STEPS if s]
  for r in rows + [paper]:
    gaps = [r[_name(s) + " gap"] for s in xs]
    err = [2 * r.get(_name(s) + " gap se", 0.0) for s in xs]
    ax0.errorbar(xs, gaps, yerr=err, marker="o", capsize=3,
                 label=r["denoiser"].split(", gamma")[0])
    ax1.errorbar(xs, [r[_name(s)] for s in xs], yerr=[2 * r.get(_name(s) + " se", 0.0)
                                                      for s in xs], marker="o", capsize=3)
    ax1.axhline(r["continuous"], ls=":", color=ax1.lines[-1].get_color())
  ax0.set_xscale("log")
  positive = all(r[_name(s) + " gap"] > 0 for r in rows for s in xs)
  if positive:
    ax0.set_yscale("log")
  else:
    ax0.set_yscale("symlog", linthresh=1e-3)
  ax0.set_xlabel("T")
  ax0.set_ylabel("bpd(T) - bpd(continuous)")
  ax0.legend(fontsize=7)
  ax1.set_xscale("log")
  ax1.set_xlabel("T (dotted: continuous time)")
  ax1.set_ylabel("bound (bpd)")
  common.save_figure(fig, out + ".png")
  print(f"wrote {out}.csv and {out}.png")


if __name__ == "__main__":
  main()
