"""What the stream's head saves: the same images compressed with and without it.

The head (`vdm_jax.compression.compress_head`) codes a stream's first images directly, so that
the chain's first batch pops their bits instead of seed bits (the initial bits). For a run's
test split (the first --num_images images, or a photograph's tiles with --photo NAME), each
--coder compresses the images twice with `compress_stream.encode_images` (the code path of
`vdm-jax compress`, the raw fallback on), with the head and without, and decodes the one with
the head to check it. Printed and written (<out>.md, <out>.json): the payload in bits per
dimension, the initial bits, the head's size and what its direct code cost against the model's
bound on the same images (one-sample T-step bound, --t_samples draws), and the times.

Usage:
  python experiments/stream_head.py --workdir runs/digits [--steps 100] [--num_images N]
      [--photo chelsea] [--coder float portable] [--out experiments/out/stream_head]
"""

from __future__ import annotations

import time

import numpy as np

from vdm_jax.compression import compress, compress_app, compress_io, compress_portable
from vdm_jax.compression import compress_stream, compress_tiles
from vdm_jax.datasets import photos

import common


def main() -> None:
  parser = common.parser(__doc__, paragraph=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--num_images", type=int, default=None)
  parser.add_argument("--photo", default=None, help="a photograph of the photos data set")
  parser.add_argument("--coder", nargs="+", default=["float", "portable"])
  parser.add_argument("--t_samples", type=int, default=16)
  parser.add_argument("--out", default="experiments/out/stream_head")
  args = parser.parse_args()
  run = common.load_run(args.workdir)
  model = compress_app.run_model(run)
  if args.photo:
    images = compress_tiles.tiles_of(photos.read_photo(args.photo), patch=model.shape[:2])
    what = f"{args.photo}'s {len(images)} tiles"
  else:
    images = compress_io.read_images("test", run.info,
                                     data_dir=run.config.data.data_dir or None)
    what = f"the test split's first {min(len(images), args.num_images or len(images))} images"
  images = np.asarray(images[:args.num_images], np.int32)
  dims = images.size
  settings = compress.CoderSettings(args.steps)
  bound = common.per_image_bound(model, images, args.steps, t_samples=args.t_samples)
  rows = []
  for name in args.coder:
    if name == "float":
      chain = compress_app.chain(model, settings)
    else:
      chain = compress_portable.chain(
          compress_portable.coder_of_run(args.workdir, run, model), settings)
    out = {}
    for head in (True, False):
      start = time.perf_counter()
      enc = compress_stream.encode_images(chain, images, expected_bits=float(bound.mean()),
                                          head=head)
      out[head] = (enc, time.perf_counter() - start)
    enc = out[True][0]
    start = time.perf_counter()
    decoded = compress_stream.decode_images(
        chain, enc.payload, num_images=len(images), num_seed_words=enc.seed_words,
        seed_dropped=enc.seed_dropped, rho=enc.rho, head=enc.head)
    decode_s = time.perf_counter() - start
    if not np.array_equal(decoded, images):
      raise SystemExit(f"{name}: the stream with the head does not decode to the images")
    h = enc.head
    for head, (e, seconds) in out.items():
      rows.append({
          "coder": name, "head": e.head, "payload_bpd": 32 * len(e.payload) / dims,
          "initial_bits": e.initial_bits, "stream_bpd": e.net_bits / dims,
          "head_direct_bpd": float(np.sum(e.ideal_coder[:e.head]) / (e.head * images[0].size))
                             if e.head else None,
          "head_bound_bpd": float(bound[:h].sum() / (h * images[0].size)) if h else None,
          "encode_s": seconds, "decode_s": decode_s if head else None})
      print(rows[-1], flush=True)
  info = {"workdir": args.workdir, "step": run.step, "steps": args.steps, "images": what,
          "dims": dims, "bound_bpd": float(bound.sum() / dims), "t_samples": args.t_samples}
  table = common.table(
      ["coder", "head (images)", "payload (bpd)", "initial bits", "stream (bpd)",
       "head: direct code (bpd)", "head: bound (bpd)", "encode (s)"],
      [[r["coder"], r["head"], f"{r['payload_bpd']:.4f}", r["initial_bits"],
        f"{r['stream_bpd']:.4f}", "-" if r["head_direct_bpd"] is None
        else f"{r['head_direct_bpd']:.3f}", "-" if r["head_bound_bpd"] is None or not r["head"]
        else f"{r['head_bound_bpd']:.3f}", f"{r['encode_s']:.1f}"] for r in rows])
  text = (f"{what}, T = {args.steps}, checkpoint {run.step}; bound {info['bound_bpd']:.4f} bpd "
          f"({args.t_samples} draws)\n\n{table}\n")
  print(text)
  common.write_text(args.out + ".md", text)
  common.write_json(args.out + ".json", {"info": info, "rows": rows}, indent=2)


if __name__ == "__main__":
  main()
