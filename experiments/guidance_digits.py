"""Guidance on digits: does a classifier agree with the requested label of guided samples?

Two kinds of guidance, each at guidance weights w (default 0, 1, 3):
- classifier-free (Ho & Salimans 2021): the class-conditional run (runs/digits_cond, labels
  dropped with p = 0.1), eps = (1 + w) eps(z, y) - w eps(z, null); w = 0 is the plain
  conditional model.
- classifier (Dhariwal & Nichol 2021): the unconditional run (runs/digits) guided by the
  noise-conditional classifier (runs/digits_classifier), eps = eps(z) - w sigma grad log p(y|z_t);
  w = 0 is the unconditional model (agreement near chance, 0.1), w = 1 the exact conditional
  for a perfect model and classifier.

`--num` samples per row, labels cycling 0..9, ancestral sampler. Each sample is classified by
(a) the noise-conditional classifier at its cleanest level gamma_min, on z = alpha x + sigma eps
of the encoded sample (optimistic for classifier guidance: it judges its own guidance), and
(b) an independent classifier, scikit-learn's LogisticRegression on the pixels of the digits
training split. Agreement = the fraction whose predicted class is the requested label.

Usage:
  python experiments/guidance_digits.py [--cond_workdir runs/digits_cond]
      [--uncond_workdir runs/digits] [--classifier_workdir runs/digits_classifier]
      [--num 200] [--steps 100] [--weights 0,1,3] [--out experiments/out/guidance_digits]

Writes <out>.csv, <out>.png (agreement versus w), <out>_w{w}.png (sample grids: one column per
requested digit), <out>_samples.npz (all samples) and prints a markdown table.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.nets import classifier as classifier_lib
from vdm_jax.datasets import data
from vdm_jax.maths import diffusion, elbo
from vdm_jax.apps import evaluation
from vdm_jax.training import runs
from vdm_jax.training import steps as steps_lib

import common


def noisy_classifier_predict(clf: runs.Run, images: np.ndarray, *, seed: int = 0):
  """Predicted classes [N] of integer images [N, H, W, C] at the classifier's gamma_min."""
  module = clf.task.model
  gamma = jnp.full((len(images),), module.gamma_min, jnp.float32)
  x = elbo.encode(jnp.asarray(images), vocab_size=clf.info.vocab_size)
  z = diffusion.q_sample(x, gamma, jax.random.normal(jax.random.key(seed), x.shape))
  log_p = jax.jit(lambda p, z, g: module.apply(
      {"params": p}, z, g, method=classifier_lib.NoisyClassifierModel.log_probs))(
          clf.params, z, gamma)
  return np.asarray(jnp.argmax(log_p, axis=-1))


def pixel_classifier(name: str):
  """LogisticRegression on the training split's pixels; returns (predict, test accuracy)."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  train_src, test_src = (data.get_source(name, split=s) for s in ("train", "test"))
  flat = lambda a: np.asarray(a, np.float64).reshape(len(a), -1) / 16.0
  model = LogisticRegression(max_iter=5000, C=1.0).fit(flat(train_src.images), train_src.labels)
  predict = lambda images: model.predict(flat(images))
  return predict, float(np.mean(predict(test_src.images) == test_src.labels))


def draw(run, classifier, *, labels, w: float, steps: int, seed: int) -> np.ndarray:
  """Guided ancestral samples [N, H, W, C] towards `labels` (classifier None: free guidance)."""
  use_clf = classifier if (classifier is not None and w > 0) else None
  fns = evaluation.guided_fns(run, labels=jnp.asarray(labels), guidance=float(w),
                              classifier=use_clf)
  return steps_lib.draw_samples(fns, sampler="ancestral", key=jax.random.key(seed),
                                num_images=len(labels), num_steps=steps, info=run.info)


def main(argv=None) -> list[dict]:
  parser = common.parser(__doc__)
  parser.add_argument("--cond_workdir", default="runs/digits_cond")
  parser.add_argument("--uncond_workdir", default="runs/digits")
  parser.add_argument("--classifier_workdir", default="runs/digits_classifier")
  parser.add_argument("--num", type=int, default=200, help="samples per (guidance, w)")
  parser.add_argument("--steps", type=int, default=100, help="ancestral sampling steps")
  parser.add_argument("--weights", default="0,1,3")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="experiments/out/guidance_digits")
  args = parser.parse_args(argv)
  weights = [float(w) for w in args.weights.split(",")]
  clf = common.load_run(args.classifier_workdir)
  pixel_predict, pixel_acc = pixel_classifier(clf.info.name)
  test = data.get_source(clf.info.name, split="test")
  test_images = np.asarray(test.images, np.int32)
  rows = [{"guidance": "none (real test images)", "workdir": "", "w": float("nan"),
           "num": len(test_images),
           "agreement (noisy classifier)": float(np.mean(
               noisy_classifier_predict(clf, test_images) == test.labels)),
           "agreement (pixel logistic regression)": pixel_acc, "seconds": 0.0}]
  kinds = [("classifier-free", args.cond_workdir, None),
           ("classifier", args.uncond_workdir, clf)]
  labels = np.arange(args.num, dtype=np.int32) % clf.info.num_classes
  grids = {}
  for kind, workdir, classifier in kinds:
    run = common.load_run(workdir)
    for w in weights:
      start = time.perf_counter()
      samples = draw(run, classifier, labels=labels, w=w, steps=args.steps, seed=args.seed)
      grids[(kind, w)] = samples
      row = {"guidance": kind, "workdir": workdir, "w": w, "num": args.num,
             "agreement (noisy classifier)": float(np.mean(
                 noisy_classifier_predict(clf, samples) == labels)),
             "agreement (pixel logistic regression)": float(np.mean(
                 pixel_predict(samples) == labels)),
             "seconds": time.perf_counter() - start}
      print(f"  {kind} w={w:g}: {row['agreement (noisy classifier)']:.3f} / "
            f"{row['agreement (pixel logistic regression)']:.3f} ({row['seconds']:.0f} s)",
            flush=True)
      rows.append(row)
  _write(rows, grids, weights, args.out, vocab_size=clf.info.vocab_size)
  return rows


def _se(p: float, n: int) -> float:
  return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def _write(rows, grids, weights, out: str, *, vocab_size: int) -> None:
  common.write_csv(out + ".csv", rows)
  a, b = "agreement (noisy classifier)", "agreement (pixel logistic regression)"
  print("Agreement with the requested label (± binomial standard error).")
  print(common.table(
      ["guidance", "w", "samples", "noise-conditional classifier at gamma_min",
       "pixel logistic regression"],
      [[r["guidance"], "" if math.isnan(r["w"]) else f"{r['w']:g}", r["num"],
        f"{r[a]:.3f} ± {_se(r[a], r['num']):.3f}", f"{r[b]:.3f} ± {_se(r[b], r['num']):.3f}"]
       for r in rows]))
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.8))
  for kind, marker, color in (("classifier-free", "o", "C0"), ("classifier", "s", "C3")):
    rs = [r for r in rows if r["guidance"] == kind]
    for col, ls in ((a, "-"), (b, "--")):
      ax.errorbar([r["w"] for r in rs], [r[col] for r in rs],
                  yerr=[2 * _se(r[col], r["num"]) for r in rs], marker=marker, ls=ls,
                  color=color, capsize=3, label=f"{kind} / {col.split('(')[1][:-1]}")
  ax.axhline(0.1, color="gray", lw=0.8, ls=":", label="chance")
  ax.set_xlabel("guidance weight w")
  ax.set_ylabel("agreement with requested label")
  ax.set_ylim(0, 1.02)
  ax.legend(fontsize=7)
  common.save_figure(fig, out + ".png", close=True)
  np.savez(out + "_samples.npz", **{f"{k}_w{w:g}": v for (k, w), v in grids.items()})
  for w in weights:
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
    for ax, kind in zip(axes, ("classifier-free", "classifier")):
      ax.imshow(_grid(grids[(kind, w)][:100], vocab_size=vocab_size), cmap="gray_r")
      ax.set_title(f"{kind} guidance, w = {w:g}\n(column j: requested digit j)", fontsize=9)
      ax.axis("off")
    common.save_figure(fig, f"{out}_w{w:g}.png", close=True)
  print(f"wrote {out}.csv, {out}.png and {out}_w*.png")


def _grid(samples: np.ndarray, *, vocab_size: int, cols: int = 10) -> np.ndarray:
  """[N, H, W, 1] integers -> one [rows (H+1), cols (W+1)] image in [0, 1]."""
  n, h, w = samples.shape[:3]
  rows = -(-n // cols)
  grid = np.zeros((rows * (h + 1), cols * (w + 1)))
  for i, img in enumerate(samples[..., 0] / (vocab_size - 1)):
    r, c = divmod(i, cols)
    grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = img
  return grid


if __name__ == "__main__":
  main()
