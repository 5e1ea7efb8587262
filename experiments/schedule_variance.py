"""Variance of the per-example bound estimate under different schedules with equal endpoints.

The digits VDM's network is conditioned on gamma, not on t, so its denoiser eps_hat(z, gamma) can
be used with any schedule gamma(t) that has the trained model's endpoints (gamma_min, gamma_max).
The continuous-time bound is then the same for every such schedule (VDM paper, section 5.1: the
diffusion loss is 1/2 int_{gamma_min}^{gamma_max} E ||eps - eps_hat(z_gamma, gamma)||^2 dgamma,
invariant to the path between the endpoints), but the variance of its Monte-Carlo estimate is not
(VDM paper, figure 4 / appendix I: learned 0.53, log-SNR-linear 6.35, beta-linear 31.6, cosine
31.1 on CIFAR-10).

Schedules compared, all with the trained run's learned endpoints:
- log-SNR-linear (`schedules.FixedLinear`, the shape the run was trained with),
- beta-linear (`schedules.BetaLinear`) and cosine (`schedules.Cosine`) shapes,
- learned: a monotone network (`schedules.init_monotone` / `monotone_gamma`, endpoints fixed)
  fitted on training images to minimise E[L^2] of the one-sample estimate L (the mean is
  invariant, so this minimises the variance; VDM appendix I.2), with the denoiser frozen.

Each test image gets `--t_samples` independent one-sample estimates (t ~ U(0, 1) i.i.d., no
antithetic sampling); reported: the mean bound (SE over images), and the variance of the
per-example estimate (the within-image variance over (t, eps), averaged over images), in bpd^2.

Usage:
  python experiments/schedule_variance.py [--workdir runs/digits] [--t_samples 64]
      [--fit_steps 300] [--out experiments/out/schedule_variance]

Writes <out>.csv and <out>.png and prints a markdown table.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vdm_jax.maths import elbo, schedules
from vdm_jax.nets import model as model_lib

import common

PAPER = {"learned": 0.53, "log-SNR-linear": 6.35, "beta-linear": 31.6, "cosine": 31.1}


def _bound_fn(run, *, vocab_size: int):
  """(net params, gamma_fn, key, images) -> [B] one-sample bounds in bpd, t i.i.d. per image."""
  module = run.task.model

  def fn(net_params, gamma_fn, key, images):
    eps_fn = lambda z, g: module.apply({"params": net_params}, z, g, None,
                                       method=model_lib.VDM.eps)
    nats = elbo.elbo_terms(key, images, eps_fn=eps_fn, gamma_fn=gamma_fn,
                           vocab_size=vocab_size, antithetic=False).total
    return elbo.bits_per_dim(nats, num_dims=int(np.prod(images.shape[1:])))

  return fn


def fit_learned(run, bound_fn, *, gamma_min: float, gamma_max: float, steps: int,
                batch_size: int, learning_rate: float, hidden: int, seed: int):
  """Monotone schedule parameters minimising E[L^2] on training images (denoiser frozen)."""
  params = schedules.init_monotone(jax.random.key(seed), gamma_min=gamma_min,
                                   gamma_max=gamma_max, hidden=hidden)
  fixed = {k: params[k] for k in ("gamma_min", "delta")}
  net = params["net"]
  tx = optax.adam(learning_rate)
  opt_state = tx.init(net)
  images = common.split_images(run.info.name, split="train")

  def objective(net, key, batch, net_params):
    gamma_fn = lambda t: schedules.monotone_gamma(t, dict(fixed, net=net))
    return jnp.mean(bound_fn(net_params, gamma_fn, key, batch) ** 2)

  @jax.jit
  def step(net, opt_state, key, batch, net_params):
    loss, grads = jax.value_and_grad(objective)(net, key, batch, net_params)
    updates, opt_state = tx.update(grads, opt_state, net)
    return optax.apply_updates(net, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  key, history = jax.random.key(seed + 1), []
  for i in range(steps):
    batch = images[rng.choice(len(images), batch_size, replace=False)]
    net, opt_state, loss = step(net, opt_state, jax.random.fold_in(key, i), batch,
                                run.params)
    history.append(float(loss))
    if (i + 1) % max(steps // 5, 1) == 0:
      print(f"  fit step {i + 1}/{steps}: E[L^2] {np.mean(history[-20:]):.4f} bpd^2", flush=True)
  return dict(fixed, net=net), history


def per_example(bound_fn, net_params, gamma_fn, images, *, t_samples: int, seed: int):
  """[t_samples, N] one-sample estimates (same keys for every schedule)."""
  fn = jax.jit(lambda p, keys: jax.lax.map(lambda k: bound_fn(p, gamma_fn, k, images), keys))
  return np.asarray(fn(net_params, jax.random.split(jax.random.key(seed), t_samples)),
                    np.float64)


def main(argv=None) -> list[dict]:
  parser = common.add_run_args(common.parser(__doc__))
  parser.add_argument("--t_samples", type=int, default=64, help="estimates per test image")
  parser.add_argument("--max_examples", type=int, default=0, help="0 = the whole test split")
  parser.add_argument("--fit_steps", type=int, default=300)
  parser.add_argument("--fit_batch", type=int, default=64)
  parser.add_argument("--fit_lr", type=float, default=3e-2)
  parser.add_argument("--hidden", type=int, default=64, help="monotone network width")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="experiments/out/schedule_variance")
  args = parser.parse_args(argv)

  run = common.load_run(args.workdir)
  gamma_fn = common.denoiser(run)[1]
  gmin, gmax = (float(gamma_fn(jnp.float32(t))) for t in (0.0, 1.0))
  print(f"{args.workdir} step {run.step}: learned endpoints gamma_min {gmin:.3f}, "
        f"gamma_max {gmax:.3f}", flush=True)
  bound_fn = _bound_fn(run, vocab_size=run.info.vocab_size)
  start = time.perf_counter()
  learned, history = fit_learned(run, bound_fn, gamma_min=gmin, gamma_max=gmax,
                                 steps=args.fit_steps, batch_size=args.fit_batch,
                                 learning_rate=args.fit_lr, hidden=args.hidden, seed=args.seed)
  print(f"  fitted in {time.perf_counter() - start:.0f} s", flush=True)
  scheds = {
      "learned": lambda t: schedules.monotone_gamma(t, learned),
      "log-SNR-linear": schedules.FixedLinear(gamma_min=gmin, gamma_max=gmax),
      "beta-linear": schedules.BetaLinear(gamma_min=gmin, gamma_max=gmax),
      "cosine": schedules.Cosine(gamma_min=gmin, gamma_max=gmax),
  }
  images = common.split_images(run.info.name, max_examples=args.max_examples)
  rows = []
  for name, fn in scheds.items():
    est = per_example(bound_fn, run.params, fn, images, t_samples=args.t_samples,
                      seed=args.seed + 7)
    per_image_var = est.var(axis=0, ddof=1)   # [N] within-image variance over (t, eps)
    means = est.mean(axis=0)
    n = len(means)
    print(f"  {name}: bpd {means.mean():.4f}, variance {per_image_var.mean():.4f}", flush=True)
    rows.append({"schedule": name, "gamma_min": gmin, "gamma_max": gmax,
                 "bpd": float(means.mean()), "bpd se": float(means.std(ddof=1) / math.sqrt(n)),
                 "variance": float(per_image_var.mean()),
                 "variance se": float(per_image_var.std(ddof=1) / math.sqrt(n)),
                 "paper variance": PAPER[name], "num_images": n, "t_samples": args.t_samples})
  _write(rows, scheds, history, args.out)
  return rows


def _write(rows, scheds, history, out: str) -> None:
  common.write_csv(out + ".csv", rows)
  print(f"Digits VDM ({rows[0]['num_images']} test images x {rows[0]['t_samples']} one-sample "
        f"estimates), endpoints {rows[0]['gamma_min']:.2f} .. {rows[0]['gamma_max']:.2f}")
  print(common.table(
      ["schedule", "bound (bpd)", "variance of per-example estimate (bpd^2)",
       "VDM paper, CIFAR-10"],
      [[r["schedule"], f"{r['bpd']:.4f} ± {r['bpd se']:.4f}",
        f"{r['variance']:.4f} ± {r['variance se']:.4f}", r["paper variance"]] for r in rows]))
  fig, (ax0, ax1, ax2) = common.pyplot().subplots(1, 3, figsize=(13, 3.8))
  t = jnp.linspace(0.0, 1.0, 201)
  for name, fn in scheds.items():
    ax0.plot(t, fn(t), label=name)
  ax0.set_xlabel("t")
  ax0.set_ylabel("gamma(t) = -log SNR")
  ax0.legend(fontsize=8)
  names = [r["schedule"] for r in rows]
  ax1.bar(names, [r["variance"] for r in rows], yerr=[2 * r["variance se"] for r in rows])
  ax1.set_yscale("log")
  ax1.set_ylabel("variance of one-sample estimate (bpd^2)")
  ax1.tick_params(axis="x", labelsize=8)
  ax2.plot(history, lw=0.5)
  ax2.set_xlabel("fit step")
  ax2.set_ylabel("E[L^2] on a train batch (bpd^2)")
  ax2.set_yscale("log")
  common.save_figure(fig, out + ".png")
  print(f"wrote {out}.csv and {out}.png")


if __name__ == "__main__":
  main()
