"""The oracle bound: the VDM bound with the Bayes-optimal denoiser of a finite data set.

For N distinct points of dimension D (uniform distribution), the exact denoiser E[x | z_t] is a
softmax over the points (`vdm_jax.maths.elbo.oracle_eps_fn`), and the bound on a training point
tends to log N nats, i.e. log2(N) / D bits per dimension, when gamma_min is low and gamma_max high
enough. The T-step bound falls as T grows and approaches the continuous-time one (VDM paper, section
4).

Usage:
  python experiments/oracle_bound.py [--samples 1000] [--out experiments/out/oracle_bound]

Writes <out>.csv and <out>.png and prints a markdown table.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np

from vdm_jax.maths import elbo, schedules

import common

CASES = ((16, 8), (32, 16), (64, 16), (256, 16), (64, 64), (1024, 64))
STEPS = (10, 100, 1000, 0)


def distinct_data(num_points: int, dims: int, *, vocab_size: int, seed: int) -> np.ndarray:
  """[N, D] distinct integer points, uniformly drawn."""
  rng = np.random.default_rng(seed)
  data = np.unique(rng.integers(0, vocab_size, size=(2 * num_points, dims)), axis=0)
  return rng.permutation(data)[:num_points].astype(np.int32)


def oracle_bpd(data: np.ndarray, *, vocab_size: int, num_steps: int, num_samples: int,
               seed: int = 0) -> tuple[float, float]:
  """Mean bound over the data set in bpd and its Monte-Carlo standard error."""
  eps_fn = elbo.oracle_eps_fn(data, vocab_size=vocab_size)
  sched = schedules.FixedLinear(gamma_min=-13.3, gamma_max=5.0)
  fn = jax.jit(lambda key: elbo.elbo_terms(key, data, eps_fn=eps_fn, gamma_fn=sched,
                                           vocab_size=vocab_size, num_steps=num_steps).total)
  nats = np.asarray(jax.lax.map(fn, jax.random.split(jax.random.key(seed), num_samples)))
  bpd = np.asarray(elbo.bits_per_dim(nats, num_dims=data.shape[1]), np.float64)
  per_sample = bpd.mean(axis=1)
  return float(per_sample.mean()), float(per_sample.std() / math.sqrt(num_samples))


def main(argv=None) -> list[dict]:
  parser = common.parser(__doc__)
  parser.add_argument("--samples", type=int, default=1000)
  parser.add_argument("--vocab_size", type=int, default=17)
  parser.add_argument("--cases", type=str, default=None, help="e.g. '32x16,64x16' (N x D)")
  parser.add_argument("--out", type=str, default="experiments/out/oracle_bound")
  args = parser.parse_args(argv)
  cases = CASES if args.cases is None else tuple(
      tuple(int(v) for v in c.split("x")) for c in args.cases.split(","))
  rows = []
  for n, d in cases:
    data = distinct_data(n, d, vocab_size=args.vocab_size, seed=n * 1000 + d)
    row = {"N": n, "D": d, "log2(N)/D": math.log2(n) / d}
    start = time.perf_counter()
    for steps in STEPS:
      mean, se = oracle_bpd(data, vocab_size=args.vocab_size, num_steps=steps,
                            num_samples=args.samples)
      name = "continuous" if steps == 0 else f"T={steps}"
      row[name], row[name + " se"] = mean, se
    row["seconds"] = time.perf_counter() - start
    rows.append(row)
  _write(rows, args.out)
  return rows


def _write(rows: list[dict], out: str) -> None:
  common.write_csv(out + ".csv", rows)
  cols = ["log2(N)/D", "T=10", "T=100", "T=1000", "continuous"]
  print(common.table(["N", "D", *cols], [
      [r["N"], r["D"]] + [f"{r[c]:.4f}" + (f" ± {r[c + ' se']:.4f}" if c + " se" in r else "")
                          for c in cols] for r in rows]))
  fig, ax = common.pyplot().subplots(figsize=(5, 4))
  target = [r["log2(N)/D"] for r in rows]
  for c, marker in zip(cols[1:], "v^so"):
    ax.errorbar(target, [r[c] for r in rows], yerr=[2 * r[c + " se"] for r in rows], fmt=marker,
                label=c, alpha=0.8)
  lim = [0, max(max(target), 0.1) * 1.1]
  ax.plot(lim, lim, "k--", lw=1, label="bound = log2(N)/D")
  ax.set_xlabel("log2(N) / D")
  ax.set_ylabel("oracle bound (bpd)")
  ax.set_yscale("symlog", linthresh=0.1)
  ax.legend(fontsize=8)
  common.save_figure(fig, out + ".png")
  print(f"wrote {out}.csv and {out}.png")


if __name__ == "__main__":
  main()
