"""Lossless compression with a trained VDM: file sizes against the bound, beside general codecs.

For each T in --steps (default 20, 100, 1000), the run's test split is compressed into one file
with the bits-back coder (`vdm_jax.compression.compress_app.compress_images`, the `vdm-jax compress` code
path), decompressed and checked pixel for pixel. Reported per T:

- bound: the T-step negative ELBO of the same model on the same images (`elbo.elbo_terms`,
  --t_samples draws per image), with its standard error over images;
- file: the whole file in bits per dimension (header, initial bits, everything), the same
  without the initial bits that bits-back coding needs to start its stack (given in bits, total
  and per image), and the stream alone (without the initial bits and the header), with its
  difference to the bound and the standard error of that difference (paired over images: the
  coder's realised code length of each image against that image's bound estimate);
- where the bits go: the consistency form of the bound on the coder's own latents (its
  realisation in this file), the grid (bin masses instead of densities), the coder's 24-bit
  models (constriction's least mass per symbol, escapes), the ANS stream itself, the header;
- compress / decompress images per second (network compiled beforehand).

Beside them, on the same pixels: PNG and WebP lossless (Pillow) of a mosaic of the images
(ceil(sqrt(N)) columns, the K levels as 8-bit values 0..K-1), JPEG-XL lossless of the same mosaic
(the `pillow-jxl-plugin` package, if installed), xz / bz2 / zstd (the `zstandard` package, if
installed) of the raw bytes (one byte per pixel), and log2(K) bits. A codec that is not installed
is listed as such.

Usage:
  python experiments/lossless_compression.py --workdir runs/digits [--steps 20 100 1000]
      [--t_samples 128] [--checkpoint S] [--grid_bits 4] [--window 6]
      [--out experiments/out/lossless_compression]

Writes <out>.md and <out>.json and prints the tables. (Not named compression.py: run as a script,
that name would shadow the `compression` package that jax imports.)
"""

from __future__ import annotations

import bz2
import io
import json
import lzma
import math
import time

import numpy as np
from PIL import Image, features

import jax

from vdm_jax.compression import compress, compress_app, compress_io

import common


def mosaic(images: np.ndarray) -> np.ndarray:
  """[N, H, W, C] -> one [rows * H, cols * W, C] picture, cols = ceil(sqrt(N)), zeros after N."""
  n, h, w, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.zeros((rows * cols, h, w, c), np.uint8)
  grid[:n] = images
  return grid.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def _picture_bytes(picture: np.ndarray, fmt: str, **options) -> int:
  image = Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture)
  buf = io.BytesIO()
  image.save(buf, fmt, **options)
  buf.seek(0)
  back = np.asarray(Image.open(buf).convert("L" if picture.shape[-1] == 1 else "RGB"))
  if not np.array_equal(back.reshape(picture.shape), picture):
    raise AssertionError(f"{fmt} was not lossless")
  return len(buf.getvalue())


def codec_rows(images: np.ndarray, vocab_size: int) -> list[dict]:
  """Sizes of general-purpose lossless codecs on the same pixels (bits per dimension)."""
  dims, raw, picture = images.size, images.astype(np.uint8).tobytes(), mosaic(images)
  rows = []

  def add(name, size_fn, missing=None):
    if missing:
      rows.append({"name": name, "bpd": None, "bytes": None, "note": missing})
      return
    size = size_fn()
    rows.append({"name": name, "bpd": 8 * size / dims, "bytes": size, "note": ""})

  add("PNG, mosaic (Pillow, optimize, level 9)",
      lambda: _picture_bytes(picture, "PNG", optimize=True, compress_level=9))
  add("WebP lossless, mosaic (Pillow, method 6)",
      lambda: _picture_bytes(picture, "WEBP", lossless=True, quality=100, method=6),
      None if features.check("webp") else "not available: Pillow without WebP")
  try:
    import pillow_jxl  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    jxl = None
  except ImportError:
    jxl = "not installed: pip install pillow-jxl-plugin"
  add("JPEG-XL lossless, mosaic (pillow-jxl-plugin, effort 9)",
      lambda: _picture_bytes(picture, "JXL", lossless=True, effort=9), jxl)
  add("xz (lzma preset 9e), raw bytes",
      lambda: len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)))
  add("bz2 (level 9), raw bytes", lambda: len(bz2.compress(raw, 9)))
  try:
    import zstandard  # pylint: disable=g-import-not-at-top
    zstd = None
  except ImportError:
    zstd = "not installed: pip install zstandard"
  add("zstd (level 22), raw bytes",
      lambda: len(zstandard.ZstdCompressor(level=22).compress(raw)), zstd)
  rows.append({"name": f"log2(K) = log2({vocab_size})", "bpd": math.log2(vocab_size),
               "bytes": math.ceil(dims * math.log2(vocab_size) / 8), "note": ""})
  return rows


def coder_row(model: compress_app.Model, images: np.ndarray, steps: int, *, t_samples: int,
              settings: dict) -> dict:
  """Compress, decompress and check the images with T = steps; the bound; the accounting."""
  n, dims = len(images), images.size
  bound_bits = common.per_image_bound(model, images, steps, t_samples=t_samples)
  coder = compress_app.chain(model, compress.CoderSettings(steps, **settings))
  buckets = {1 << k for k in range(int(math.log2(coder.settings.max_batch)) + 1)}
  compress_app.probe_digest(coder, buckets)           # compiles every batch size
  compress_app.expected_bits(model, images, steps)     # compiled before the clock starts
  start = time.perf_counter()
  blob, stats = compress_app.compress_images(model, images, coder.settings)
  encode_s = time.perf_counter() - start
  start = time.perf_counter()
  out, _ = compress_app.decompress_bytes(model, blob)
  decode_s = time.perf_counter() - start
  if not np.array_equal(out, images):
    raise AssertionError(f"T={steps}: the decompressed images differ")
  net, initial = stats["net_bits"], stats["initial_bits"]
  cont, grid, model_bits = (float(np.sum(stats[k])) for k in
                            ("ideal_continuous", "ideal_grid", "ideal_coder"))
  without = stats["file_bits"] - initial
  bound = bound_bits.sum() / dims
  # The stream's bits per image are known per batch only; its realised code length per image
  # (ideal, the tally) carries the per-image noise: the paired SE of stream - bound.
  paired = (stats["ideal_coder"] - bound_bits) * n / dims
  return {
      "T": steps, "bound": bound, "t_samples": t_samples,
      "bound_se": float(np.std(bound_bits, ddof=1) / math.sqrt(n) * n / dims),
      "file_bpd": stats["file_bits"] / dims, "net_file_bpd": without / dims,
      "stream_bpd": net / dims, "vs_bound": without / dims / bound - 1.0,
      "vs_bound_all": stats["file_bits"] / dims / bound - 1.0,
      "vs_bound_stream": net / dims / bound - 1.0,
      "vs_bound_stream_se": float(np.std(paired, ddof=1) / math.sqrt(n)) / bound,
      "initial_bits": initial, "initial_per_image": initial / n,
      "header_bits": stats["header_bits"], "file_bytes": len(blob),
      "realised_bpd": cont / dims,
      "realised_se": float(np.std(stats["ideal_continuous"], ddof=1) / math.sqrt(n)
                           / (dims / n)),
      "grid_bpd": (grid - cont) / dims, "models_bpd": (model_bits - grid) / dims,
      "ans_bpd": (net - model_bits) / dims, "escapes": stats["escapes"],
      "batches": len(stats["schedule"]), "rho": stats["rho"] / 2**16,
      "compress_img_s": n / encode_s, "decompress_img_s": n / decode_s,
      "exact": True, "num_images": n, "dims": dims,
  }


def _f(x, digits=4):
  return "-" if x is None else f"{x:.{digits}f}"


def markdown(rows: list[dict], codecs: list[dict], info: dict) -> str:
  coder = [[f"VDM bits-back (exact: {r['exact']})", r["T"],
            f"{r['bound']:.4f} ± {r['bound_se']:.4f}", f"{r['file_bpd']:.4f}",
            f"{r['net_file_bpd']:.4f}", f"{r['stream_bpd']:.4f}",
            f"{100 * r['vs_bound_all']:+.2f}% / {100 * r['vs_bound']:+.2f}% / "
            f"{100 * r['vs_bound_stream']:+.2f}% ± {100 * r['vs_bound_stream_se']:.2f}%",
            f"{r['initial_bits']} / {r['initial_per_image']:.1f}", f"{r['compress_img_s']:.2f}",
            f"{r['decompress_img_s']:.2f}"] for r in rows]
  general = [[c["name"], "-", "-", _f(c["bpd"]) if c["bpd"] is not None else c["note"]]
             + ["-"] * 6 for c in codecs]
  bits = [[r["T"], f"{r['bound']:.4f}", f"{r['realised_bpd']:.4f} ± {r['realised_se']:.4f}",
           f"{r['grid_bpd']:+.5f}", f"{r['models_bpd']:+.5f}", f"{r['ans_bpd']:+.5f}",
           f"{r['header_bits'] / r['dims']:.4f}", f"{r['initial_bits'] / r['dims']:.4f}",
           r["escapes"], r["batches"], f"{r['rho']:.3f}"] for r in rows]
  return "\n".join([
      f"Run {info['workdir']} (checkpoint {info['step']}), {info['num_images']} test images, "
      f"D = {info['dims_per_image']}, K = {info['vocab_size']}; grid_bits {info['grid_bits']}, "
      f"window {info['window']}, max_batch {info['max_batch']}; {info['backend']}.", "",
      common.table(["method", "T", "bound (bpd)", "file, all included (bpd)",
                    "file without initial bits (bpd)", "stream alone (bpd)",
                    "vs bound: all / without initial / stream",
                    "initial bits: total / per image", "compress (img/s)",
                    "decompress (img/s)"], coder + general), "",
      "Where the bits of each file go (bits per dimension; realised bound: the consistency form "
      "on the coder's own latents, ± its standard error over images):", "",
      common.table(["T", "bound", "realised bound", "grid", "24-bit models", "ANS", "header",
                    "initial", "escapes", "batches", "rho"], bits)]) + "\n"


def main() -> None:
  parser = common.add_run_args(common.parser(__doc__), workdir=None, checkpoint=True)
  parser.add_argument("--steps", type=int, nargs="+", default=[20, 100, 1000])
  parser.add_argument("--t_samples", type=int, default=128)
  parser.add_argument("--grid_bits", type=int, default=4)
  parser.add_argument("--window", type=int, default=6)
  parser.add_argument("--max_batch", type=int, default=256)
  parser.add_argument("--out", default="experiments/out/lossless_compression")
  args = parser.parse_args()
  run = common.load_run(args.workdir, checkpoint=args.checkpoint)
  model = compress_app.run_model(run)
  images = compress_io.read_images("test", run.info, data_dir=run.config.data.data_dir or None)
  settings = {"grid_bits": args.grid_bits, "window": args.window, "max_batch": args.max_batch}
  rows = []
  for steps in args.steps:
    rows.append(coder_row(model, images, steps, t_samples=args.t_samples, settings=settings))
    print(json.dumps(rows[-1]), flush=True)
  info = {"workdir": args.workdir, "step": run.step, "num_images": len(images),
          "dims_per_image": int(images[0].size), "vocab_size": run.info.vocab_size,
          "backend": f"{jax.default_backend()} ({jax.devices()[0].device_kind})", **settings}
  table = markdown(rows, codec_rows(images, run.info.vocab_size), info)
  print(table)
  common.write_text(args.out + ".md", table)
  common.write_json(args.out + ".json", {"info": info, "rows": rows}, indent=2)
  print(f"-> {args.out}.md, {args.out}.json")


if __name__ == "__main__":
  main()
