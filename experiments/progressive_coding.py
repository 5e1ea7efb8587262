"""Progressive decoding: bits received versus PSNR while a compressed file is decoded from z_1 down
(the VDM paper's progressive-coding figure, at digits scale).

The first --num_images test images are compressed with the run's bits-back coder (T steps) and
decompressed; at every step the decoder holds z_t and the network's reconstruction x_hat(z_t),
rounded to the K levels. Bits received at z_t are counted as the paper's rate: the denoising form
of the bound over the steps decoded so far,
  KL(q(z_1 | x) || p(z_1)) + sum over the steps from 1 down to t of
  KL(q(z_s | z_t, x) || p(z_s | z_t)),
on the decoder's own latents (`elbo.prior_kl`, `elbo.gaussian_kl` of `diffusion.posterior` with x
and with x_hat). The stream the decoder has consumed by then is this plus the bits that z_t itself
holds at grid precision (returned later as bits back); at z_0 it has read the whole bound.
PSNR = 10 log10((K - 1)^2 / MSE) on the levels. Thin lines: images; thick: their mean; the dashed
line: the images' full code length (the bound, where decoding becomes lossless).

Usage:
  python experiments/progressive_coding.py --workdir runs/digits [--num_images 8]
      [--num_steps 1000] [--out experiments/out/progressive_coding]

Writes <out>.png (the curve and the first image's reconstructions) and <out>.json.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from vdm_jax.compression import compress, compress_app, compress_io
from vdm_jax.maths import diffusion, elbo

import common


def psnr(levels: np.ndarray, x_hat: np.ndarray, vocab_size: int) -> np.ndarray:
  """PSNR in dB per image [b] of x_hat (in (-1, 1)) rounded to levels, against integer levels."""
  k_hat = np.clip(np.rint((x_hat + 1.0) * vocab_size / 2.0 - 0.5), 0, vocab_size - 1)
  mse = np.mean((k_hat - levels.astype(np.float64)) ** 2, axis=tuple(range(1, levels.ndim)))
  return 10.0 * np.log10((vocab_size - 1) ** 2 / np.maximum(mse, 1e-10))


def main() -> None:
  parser = common.add_run_args(common.parser(__doc__), workdir=None, checkpoint=True)
  parser.add_argument("--num_images", type=int, default=8)
  parser.add_argument("--num_steps", type=int, default=1000)
  parser.add_argument("--out", default="experiments/out/progressive_coding")
  args = parser.parse_args()
  run = common.load_run(args.workdir, checkpoint=args.checkpoint)
  model = compress_app.run_model(run)
  images = compress_io.read_images("test", run.info)[:args.num_images]
  n, dims, vocab = len(images), int(images[0].size), model.vocab_size
  settings = compress.CoderSettings(args.num_steps)
  # Every batch coded by the model (none stored raw): each image's latents are decoded step by step.
  blob, stats = compress_app.compress_images(model, images, settings, raw_fallback=False)
  coder = compress_app.chain(model, settings)
  gamma = coder.lv.gamma
  x = np.asarray(elbo.encode(images, vocab_size=vocab))
  nats = np.zeros((args.num_steps + 1, n))       # rate after z_i is known, per image
  quality = np.zeros((args.num_steps + 1, n))    # PSNR of x_hat(z_i)
  frames = {}

  def on_step(first, i, z, x_hat):
    b = len(z)
    xs = x[first:first + b]
    q_mean, var = diffusion.posterior(z, xs, gamma_s=gamma[i - 1], gamma_t=gamma[i])
    p_mean, _ = diffusion.posterior(z, x_hat, gamma_s=gamma[i - 1], gamma_t=gamma[i])
    nats[i - 1, first:first + b] = np.asarray(elbo.gaussian_kl(q_mean, var, p_mean, var))
    quality[i, first:first + b] = psnr(images[first:first + b], x_hat, vocab)
    if first == 0:
      frames[i] = x_hat[0]

  out, _ = compress_app.decompress_bytes(model, blob, on_step=on_step)
  assert np.array_equal(out, images)
  prior = np.asarray(elbo.prior_kl(x, gamma_1=jnp.asarray(gamma[-1])))
  # bits received when z_i is known: prior + the KLs of the steps T .. i+1 (z_T: the prior).
  received = (prior[None] + np.concatenate([np.cumsum(nats[::-1], 0)[::-1][1:],
                                            np.zeros((1, n))])) / (dims * math.log(2.0))
  total = stats["ideal_continuous"] / dims
  steps = np.arange(1, args.num_steps + 1)
  fig, (ax, strip) = common.pyplot().subplots(2, 1, figsize=(7, 6.5), gridspec_kw={"height_ratios": [4, 1]})
  for m in range(n):
    ax.plot(received[steps, m], quality[steps, m], lw=0.6, alpha=0.5)
  ax.plot(received[steps].mean(1), quality[steps].mean(1), "k", lw=2, label=f"mean of {n} images")
  ax.axvline(total.mean(), ls="--", c="gray",
             label=f"code length ({total.mean():.2f} bpd): lossless")
  ax.set_xlabel("bits per dimension received (denoising-form rate, from z_1 down)")
  ax.set_ylabel("PSNR of x_hat(z_t) (dB)")
  ax.set_title(f"Progressive decoding, {run.info.name} test images, T = {args.num_steps}")
  ax.legend(loc="lower right")
  ax.grid(alpha=0.3)
  shown = np.unique(np.linspace(1, args.num_steps, 9).astype(int))[::-1]
  tiles = [np.clip(np.rint((frames[i] + 1) * vocab / 2 - 0.5), 0, vocab - 1) for i in shown]
  tiles.append(images[0].astype(np.float64))
  gray = images.shape[-1] == 1
  tiles = [t[..., 0] if gray else t / (vocab - 1) for t in tiles]
  pad = ((1, 1), (1, 1)) if gray else ((1, 1), (1, 1), (0, 0))
  strip.imshow(np.concatenate([np.pad(t, pad) for t in tiles], axis=1), cmap="gray", vmin=0,
               vmax=vocab - 1 if gray else 1)
  strip.set_axis_off()
  strip.set_title("image 0: x_hat at " + ", ".join(f"{received[i, 0]:.2f}" for i in shown)
                  + " bpd; the image", fontsize=8)
  common.save_figure(fig, args.out + ".png", dpi=130)
  common.write_json(args.out + ".json", {"received_bpd": received.tolist(),
                                         "psnr_db": quality.tolist(),
                                         "code_length_bpd": total.tolist(),
                                         "num_steps": args.num_steps})
  curve = received[steps].mean(1)[::-1], quality[steps].mean(1)[::-1]
  print("mean PSNR at 25/50/75% of the mean code length: " + ", ".join(
      f"{np.interp(f * total.mean(), *curve):.1f} dB" for f in (0.25, 0.5, 0.75)))
  print(f"-> {args.out}.png, {args.out}.json")


if __name__ == "__main__":
  main()
