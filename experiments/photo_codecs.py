"""Whole photographs through `vdm-jax compress` beside PNG, WebP and JPEG-XL: bits per dimension.

For each held-out photograph of the "photos" data set (chelsea 300x451, coffee 400x600; read as
the data set reads them) and for the test patches as a set (the 342 32x32 tiles of the test
split, `--input test`, beside one mosaic image of the same patches, 18 x 19 of them), the file
size in bits per dimension (bits / (H W 3)) of:

- vdm-jax: the file `vdm-jax compress` writes (everything: header, photograph entries, the
  initial bits), made by the code path of the command (`compress_io` tiles the photograph,
  padded with level 0; `compress_app.compress_images`), decompressed and checked pixel for
  pixel; its compress and decompress times per megapixel (each batch size compiled before the clock
  starts; the compile time reported apart);
- the model's T-step bound on the same tiles (`elbo.elbo_terms`, --t_samples draws per tile),
  counted per original pixel dimension (the padding's bits included);
- vdm-jax's direct coder alone (`compress_head`, the stream head's LOCO-I style pixel coder) on
  the same tiles, every tile coded without latents;
- PNG (Pillow, optimize=True), WebP lossless (Pillow, lossless=True, method=6, quality=100),
  JPEG-XL lossless at effort 7 and 9 (`imagecodecs.jpegxl_encode`; `pip install
  vdm-jax[experiments]`), each decoded again and checked.

Usage:
  python experiments/photo_codecs.py --workdir runs/photos [--steps 100] [--coder portable]
      [--photos chelsea coffee] [--no_test_set] [--codecs_only | --bound_only] [--t_samples 8]
      [--out experiments/out/photo_codecs]
  python experiments/photo_codecs.py --workdir runs/photos --padding_study   # edge vs reflect vs 0

Rows are printed (JSON) as they are measured and <out>.json is rewritten after each, so a long
run leaves what it measured; <out>.md holds the table at the end.
"""

from __future__ import annotations

import io
import json
import math
import os
import time

import jax
import numpy as np
from PIL import Image

from vdm_jax.compression import compress, compress_app, compress_format as fmt, compress_io
from vdm_jax.compression import compress_head, compress_portable, compress_tiles
from vdm_jax.datasets import photos

import common

MOSAIC = (18, 19)   # rows x columns of test patches in the mosaic: 342 = 18 * 19


def codec_bits(pixels: np.ndarray) -> dict:
  """{codec: file bits} of an RGB photograph [H, W, 3] uint8, each decoded and checked."""
  import imagecodecs   # pylint: disable=g-import-not-at-top  (the optional extra)
  out = {}
  for name, fmt_name, options in (("PNG", "PNG", {"optimize": True}),
                                  ("WebP lossless", "WEBP",
                                   {"lossless": True, "method": 6, "quality": 100})):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt_name, **options)
    if not np.array_equal(np.asarray(Image.open(io.BytesIO(buffer.getvalue()))), pixels):
      raise AssertionError(f"{name} is not lossless here")
    out[name] = 8 * len(buffer.getvalue())
  for effort in (7, 9):
    blob = imagecodecs.jpegxl_encode(pixels, lossless=True, effort=effort)
    if not np.array_equal(imagecodecs.jpegxl_decode(blob), pixels):
      raise AssertionError("JPEG-XL is not lossless here")
    out[f"JPEG-XL e{effort}"] = 8 * len(blob)
  return out


def direct_bits(tiles: np.ndarray, vocab_size: int) -> float:
  """Bits of the tiles through the stream head's direct coder alone (`compress_head`: every tile
  coded without latents, its counters carried from tile to tile), as if the head took them all."""
  coder = compress_head.HeadCoder(tiles.shape[1:], vocab_size)
  return float(sum(coder.symbols(tile)[2] for tile in tiles))


def padding_bits(model, pixels: np.ndarray, steps: int, *, t_samples: int) -> dict:
  """{padding: the T-step bound in bits of the tiles the padding touches} for edge replication,
  reflection and level 0 (zeros, what `compress_tiles` does); the same draws (t, eps) for each,
  so the differences are the padding's."""
  patch = tuple(model.shape[:2])
  height, width = pixels.shape[:2]
  rows, cols = compress_tiles.tile_grid(height, width, patch=patch)
  pad = ((0, rows * patch[0] - height), (0, cols * patch[1] - width), (0, 0))
  grid = np.zeros((rows, cols), bool)
  grid[-1, :] |= pad[0][1] > 0
  grid[:, -1] |= pad[1][1] > 0
  out = {}
  for mode in ("edge", "reflect", "constant"):
    padded = np.pad(pixels, pad, mode=mode)
    tiles = compress_tiles.tiles_of(padded, patch=patch)[grid.reshape(-1)]
    out[mode] = float(common.per_image_bound(model, tiles, steps, t_samples=t_samples).sum())
  out["tiles"] = int(grid.sum())
  return out


def _warm(model, integer, settings: compress.CoderSettings) -> float:
  """Compiles every batch size's programs of the coder (seconds)."""
  buckets = {1 << k for k in range(int(math.log2(settings.max_batch)) + 1)}
  start = time.perf_counter()
  if integer is None:
    compress_app.probe_digest(compress_app.chain(model, settings), buckets)
  else:
    compress_portable.probe_digest(compress_portable.chain(integer, settings), buckets)
  return time.perf_counter() - start


def vdm_row(model, integer, tiles: np.ndarray, pictures: tuple, dims: int, steps: int,
            max_batch: int, check) -> dict:
  """The file of `vdm-jax compress` for tiles (of `pictures`, or a set): size and times."""
  settings = compress.CoderSettings(steps, max_batch=max_batch)
  compile_s = _warm(model, integer, settings)
  kw = {} if integer is None else {"coder": integer}
  start = time.perf_counter()
  blob, stats = compress_app.compress_images(model, tiles, settings, pictures=pictures, **kw)
  encode_s = time.perf_counter() - start
  start = time.perf_counter()
  out, header = compress_app.decompress_bytes(model if integer is None else integer, blob)
  decode_s = time.perf_counter() - start
  check(out, header)
  return {"coder": header.coder, "file_bits": 8 * len(blob), "initial_bits": stats["initial_bits"],
          "header_bits": stats["header_bits"], "raw_batches": stats["raw_batches"],
          "batches": len(stats["schedule"]), "compile_s": compile_s, "encode_s": encode_s,
          "decode_s": decode_s, "bpd": 8 * len(blob) / dims,
          "realised_bpd": float(np.sum(stats["ideal_continuous"])) / dims}


def photo_row(name, pixels, model, integer, args, save) -> dict:
  patch = tuple(model.shape[:2])
  tiles = compress_tiles.tiles_of(pixels, patch=patch)
  height, width = pixels.shape[:2]
  dims = pixels.size
  row = {"input": name, "height": height, "width": width, "tiles": len(tiles), "dims": dims,
         "padded_dims": int(tiles.size)}
  row["codecs_bits"] = dict(codec_bits(pixels), direct=direct_bits(tiles, model.vocab_size))
  if args.codecs_only:
    return row
  for steps in args.steps:
    pictures = (fmt.Picture(f"{name}.png", height, width),)

    def check(out, header):
      back = compress_io.photographs_of(out, header)[f"{name}.png"]
      if not np.array_equal(back, pixels):
        raise AssertionError(f"{name}: the decompressed photograph differs")

    bound = float(common.per_image_bound(model, tiles, steps, t_samples=args.t_samples).sum())
    row[f"bound_T{steps}"] = {"bound_bpd": bound / dims, "bound_padded_bpd": bound / tiles.size}
    save(row)   # the bound now: the coder takes long
    if args.bound_only:
      continue
    row[f"T{steps}"] = dict(vdm_row(model, integer, tiles, pictures, dims, steps,
                                    args.max_batch, check), **row[f"bound_T{steps}"],
                            megapixels=height * width / 1e6)
  return row


def test_set_row(images, model, integer, args, save) -> dict:
  rows, cols = MOSAIC
  mosaic = compress_tiles.photo_of(images, height=rows * images.shape[1],
                                   width=cols * images.shape[2])
  row = {"input": f"test patches ({len(images)})", "height": mosaic.shape[0],
         "width": mosaic.shape[1], "tiles": len(images), "dims": int(images.size),
         "padded_dims": int(images.size),
         "codecs_bits": dict(codec_bits(mosaic), direct=direct_bits(images, model.vocab_size))}
  if args.codecs_only:
    return row

  def check(out, header):
    if not np.array_equal(out, images):
      raise AssertionError("the decompressed test patches differ")

  for steps in args.steps:
    bound = float(common.per_image_bound(model, images, steps, t_samples=args.t_samples).sum())
    row[f"bound_T{steps}"] = {"bound_bpd": bound / images.size,
                              "bound_padded_bpd": bound / images.size}
    save(row)
    if args.bound_only:
      continue
    row[f"T{steps}"] = dict(vdm_row(model, integer, images, (), int(images.size), steps,
                                    args.max_batch, check), **row[f"bound_T{steps}"],
                            megapixels=len(images) * images.shape[1] * images.shape[2] / 1e6)
  return row


def markdown(rows: list[dict], info: dict) -> str:
  codecs = ["direct", "PNG", "WebP lossless", "JPEG-XL e7", "JPEG-XL e9"]
  lines = [f"Run {info['workdir']} (checkpoint {info['step']}), the {info['coder']} coder, "
           f"grid_bits 4, window 6, max_batch {info['max_batch']}; bound: {info['t_samples']} "
           f"draws per tile; {info['backend']}, {info['cpu']}.", "",
           "| input | H x W | T | vdm-jax file (bpd) | T-step bound (bpd) | file / bound | "
           + " | ".join(f"{'vdm-jax direct coder, tiles' if c == 'direct' else c} (bpd)"
                        for c in codecs)
           + " | best codec / vdm-jax | compress (s/MP) | decompress (s/MP) |",
           "|---|---|---|---|---|---|" + "---|" * len(codecs) + "---|---|---|"]
  for r in rows:
    codec_bpd = {c: r["codecs_bits"][c] / r["dims"] for c in codecs}
    best = min(codec_bpd.values())
    steps_keys = [k for k in r if k.startswith("T") and k[1:].isdigit()] or [None]
    bounds = {k[len("bound_T"):]: v for k, v in r.items() if k.startswith("bound_T")}
    for key in steps_keys:
      v = r.get(key) if key else None
      partial = next(iter(bounds.items()), None)   # --bound_only: the bound, no file
      vdm = (f"| {key[1:]} | {v['bpd']:.4f} | {v['bound_bpd']:.4f} | "
             f"{v['bpd'] / v['bound_bpd']:.4f} |" if v else
             f"| {partial[0]} | - | {partial[1]['bound_bpd']:.4f} | - |" if partial
             else "| - | - | - | - |")
      speed = (f" {best / v['bpd']:.3f} | {v['encode_s'] / v['megapixels']:.0f} | "
               f"{v['decode_s'] / v['megapixels']:.0f} |" if v else " - | - | - |")
      lines.append(f"| {r['input']} | {r['height']} x {r['width']} {vdm} "
                   + " | ".join(f"{codec_bpd[c]:.4f}" for c in codecs) + " |" + speed)
  return "\n".join(lines) + "\n"


def padding_study(args) -> None:
  """Prints and writes <out>_padding.json: per test photograph and T, the border tiles' bound
  under each padding, and its cost per dimension of the photograph beside edge replication."""
  run = common.load_run(args.workdir)
  model = compress_app.run_model(run)
  rows = []
  for name in args.photos:
    pixels = photos.read_photo(name)
    for steps in args.steps:
      bits = padding_bits(model, pixels, steps, t_samples=args.t_samples)
      rows.append({"input": name, "T": steps, "border_tiles": bits.pop("tiles"),
                   "bits": bits, "vs_edge_bpd": {m: (b - bits["edge"]) / pixels.size
                                                 for m, b in bits.items()}})
      print(json.dumps(rows[-1]), flush=True)
  common.write_json(args.out + "_padding.json", {"rows": rows}, indent=2)


def main() -> None:
  parser = common.add_run_args(common.parser(__doc__), workdir=None)
  parser.add_argument("--steps", type=int, nargs="+", default=[100])
  parser.add_argument("--coder", choices=compress_app.CODERS, default="portable")
  parser.add_argument("--photos", nargs="*", default=list(photos.PATCH_SETS["photos"].test_photos))
  parser.add_argument("--no_test_set", action="store_true", help="skip the test patches' rows")
  parser.add_argument("--codecs_only", action="store_true", help="only the other codecs")
  parser.add_argument("--bound_only", action="store_true", help="the codecs and the bound")
  parser.add_argument("--t_samples", type=int, default=8)
  parser.add_argument("--max_batch", type=int, default=256)
  parser.add_argument("--padding_study", action="store_true",
                      help="only the bound of the border tiles under three paddings")
  parser.add_argument("--out", default="experiments/out/photo_codecs")
  args = parser.parse_args()
  if args.padding_study:
    return padding_study(args)
  run = common.load_run(args.workdir)
  model = compress_app.run_model(run)
  integer = (None if args.coder == "float" or args.codecs_only or args.bound_only
             else compress_portable.coder_of_run(args.workdir, run, model))
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
              if line.startswith("model name")), "?") if os.path.exists("/proc/cpuinfo") else "?"
  info = {"workdir": args.workdir, "step": run.step, "coder": args.coder, "cpu": cpu,
          "max_batch": args.max_batch, "t_samples": args.t_samples, "steps": args.steps,
          "backend": f"{jax.default_backend()} ({jax.devices()[0].device_kind})"}
  rows = []

  def save(row, final=False):
    """Writes <out>.json with the rows so far and `row` as it stands (partial unless final)."""
    if final:
      rows.append(row)
      print(json.dumps(row), flush=True)
    common.write_json(args.out + ".json", {"info": info, "rows": rows + ([] if final else [row])},
                      indent=2)

  for name in args.photos:
    save(photo_row(name, photos.read_photo(name), model, integer, args, save), final=True)
  if not args.no_test_set:
    images = compress_io.read_images("test", run.info, data_dir=run.config.data.data_dir or None)
    save(test_set_row(images, model, integer, args, save), final=True)
  table = markdown(rows, info)
  print(table)
  common.write_text(args.out + ".md", table)
  print(f"-> {args.out}.md, {args.out}.json")


if __name__ == "__main__":
  main()
