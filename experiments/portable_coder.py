"""The portable coder against the float coder and the bound: file sizes, speed, the integer model.

On a trained run's test split, for each T in --steps (default 100, 1000): the model's T-step
bound (`elbo.elbo_terms`, --t_samples draws per image), then each coder ("float": the float
network, machine-bound; "portable": the integer network of `vdm_jax.compression.portable`, decodes
anywhere) compresses the split into one file (`compress_app.compress_images`, the
`vdm-jax compress` code path), decompresses it and checks it pixel for pixel. Both coders are
compiled for every batch size before the clock starts and run in the same process,
alternately, so that their times share the machine's load; the ratio portable / float is the
number to read. Then the raw fallback: uniform noise and constant images, both coders, against
their raw size and against the model's own code (no batch stored raw); and the stored integer
model's size.

Usage:
  python experiments/portable_coder.py --workdir runs/digits [--steps 100 1000]
      [--t_samples 128] [--num_images N] [--max_batch B] [--no_fallback]
      [--out experiments/out/portable_coder]

Writes <out>.md and <out>.json and prints the tables.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

from vdm_jax.compression import compress, compress_app, compress_io, compress_portable, portable

import common


def _warm(model, coder, settings: compress.CoderSettings) -> float:
  """Compiles every batch bucket of both coders (seconds for the portable one)."""
  buckets = {1 << k for k in range(int(math.log2(settings.max_batch)) + 1)}
  compress_app.probe_digest(compress_app.chain(model, settings), buckets)
  start = time.perf_counter()
  compress_portable.probe_digest(compress_portable.chain(coder, settings), buckets)
  return time.perf_counter() - start


def _run(model, coder, images, settings) -> dict:
  kw = {} if coder is None else {"coder": coder}
  start = time.perf_counter()
  blob, stats = compress_app.compress_images(model, images, settings, **kw)
  encode_s = time.perf_counter() - start
  start = time.perf_counter()
  out, header = compress_app.decompress_bytes(model if coder is None else coder, blob)
  decode_s = time.perf_counter() - start
  if not np.array_equal(out, images):
    raise AssertionError("the decompressed images differ")
  dims = images.size
  return {"coder": header.coder, "file_bytes": len(blob), "file_bpd": 8 * len(blob) / dims,
          "net_file_bpd": (8 * len(blob) - stats["initial_bits"]) / dims,
          "stream_bpd": stats["net_bits"] / dims, "initial_bits": stats["initial_bits"],
          "raw_batches": stats["raw_batches"], "escapes": stats["escapes"],
          "batches": len(stats["schedule"]), "encode_s": encode_s, "decode_s": decode_s,
          "realised_bpd": float(np.sum(stats["ideal_continuous"])) / dims}


def coder_rows(model, coder, images, steps: int, *, t_samples: int, max_batch: int) -> dict:
  settings = compress.CoderSettings(steps, max_batch=max_batch)
  bound = common.per_image_bound(model, images, steps, t_samples=t_samples)
  compile_s = _warm(model, coder, settings)
  compress_app.expected_bits(model, images, steps)
  row = {"T": steps, "bound": float(bound.sum() / images.size),
         "bound_se": float(np.std(bound, ddof=1) / math.sqrt(len(images)) * len(images)
                           / images.size), "portable_compile_s": compile_s}
  row["float"] = _run(model, None, images, settings)
  row["portable"] = _run(model, coder, images, settings)
  row["size_ratio"] = row["portable"]["file_bytes"] / row["float"]["file_bytes"] - 1.0
  for k in ("encode_s", "decode_s"):
    row[f"{k}_ratio"] = row["portable"][k] / row["float"][k]
  return row


def fallback_rows(model, coder, vocab_size: int, shape) -> list[dict]:
  rng = np.random.default_rng(0)
  cases = {"uniform noise, 20 images": rng.integers(0, vocab_size, (20,) + shape),
           "constant 0, 20 images": np.zeros((20,) + shape, np.int64),
           f"constant {vocab_size - 1}, 20 images": np.full((20,) + shape, vocab_size - 1)}
  rows = []
  for name, images in cases.items():
    images = images.astype(np.uint8)
    raw = math.ceil(images.size * math.log2(vocab_size) / 8)
    for label, kw in (("float", {}), ("portable", {"coder": coder})):
      blob, stats = compress_app.compress_images(model, images, compress.CoderSettings(100), **kw)
      alone, _ = compress_app.compress_images(model, images, compress.CoderSettings(100),
                                              raw_fallback=False, **kw)
      rows.append({"data": name, "coder": label, "written_as": stats["coder"],
                   "file_bytes": len(blob), "raw_bytes": raw, "over_raw": len(blob) - raw,
                   "bpd": 8 * len(blob) / images.size, "raw_batches": stats["raw_batches"],
                   "batches": len(stats["schedule"]), "model_code_bytes": len(alone)})
  return rows


def model_rows(coder: compress_portable.Coder) -> dict:
  """The integer model's stored size and what it holds."""
  flat = portable._flatten(coder.model.arrays)   # pylint: disable=protected-access
  weights = sum(a.size for k, a in flat.items() if k.endswith("/w"))
  return {"bytes": len(portable.to_bytes(coder.model)), "int8_weights": int(weights),
          "other_bytes": int(sum(a.nbytes for k, a in flat.items() if not k.endswith("/w"))),
          "arrays": len(flat), "digest": coder.digest[:12]}


def markdown(rows: list[dict], fallback: list[dict], model: dict, info: dict) -> str:
  lines = [f"Run {info['workdir']} (checkpoint {info['step']}), {info['num_images']} test "
           f"images, D = {info['dims']}, K = {info['vocab_size']}; grid_bits 4, window 6, "
           f"max_batch {info['max_batch']}; {info['backend']}, {info['cpu']}.", "",
           "| T | bound (bpd) | coder | file (bpd) | without initial bits (bpd) | stream (bpd) "
           "| file vs float | compress (s) | decompress (s) | portable / float time: "
           "compress, decompress |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    for c in ("float", "portable"):
      x = r[c]
      vs = "-" if c == "float" else f"{100 * r['size_ratio']:+.2f}%"
      ratio = "-" if c == "float" else f"{r['encode_s_ratio']:.2f}x, {r['decode_s_ratio']:.2f}x"
      lines.append(f"| {r['T']} | {r['bound']:.4f} ± {r['bound_se']:.4f} | {c} | "
                   f"{x['file_bpd']:.4f} | {x['net_file_bpd']:.4f} | {x['stream_bpd']:.4f} | "
                   f"{vs} | {x['encode_s']:.1f} | {x['decode_s']:.1f} | {ratio} |")
  lines += ["", "| data | coder | written as | file (bytes) | raw, log2 K bits per value "
            "(bytes) | file - raw (bytes) | batches stored raw | the model's code alone "
            "(bytes) |", "|---|---|---|---|---|---|---|---|"]
  for f in fallback:
    lines.append(f"| {f['data']} | {f['coder']} | {f['written_as']} | {f['file_bytes']} | "
                 f"{f['raw_bytes']} | {f['over_raw']:+d} | {f['raw_batches']} / "
                 f"{f['batches']} | {f['model_code_bytes']} |")
  lines += ["", f"Integer model {model['digest']}: {model['bytes']} bytes "
            f"({model['int8_weights']} int8 weights, {model['other_bytes']} bytes of biases, "
            f"multipliers, shifts, tables and the gamma table; {model['arrays']} arrays)."]
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = common.add_run_args(common.parser(__doc__), workdir=None)
  parser.add_argument("--steps", type=int, nargs="+", default=[100, 1000])
  parser.add_argument("--t_samples", type=int, default=128)
  parser.add_argument("--num_images", type=int, default=None, help="the first N test images")
  parser.add_argument("--max_batch", type=int, default=256)
  parser.add_argument("--no_fallback", action="store_true", help="skip the noise / constant rows")
  parser.add_argument("--out", default="experiments/out/portable_coder")
  args = parser.parse_args()
  run = common.load_run(args.workdir)
  model = compress_app.run_model(run)
  coder = compress_portable.coder_of_run(args.workdir, run, model)
  images = compress_io.read_images("test", run.info, data_dir=run.config.data.data_dir or None)
  images = images[:args.num_images]
  rows = []
  for steps in args.steps:
    rows.append(coder_rows(model, coder, images, steps, t_samples=args.t_samples,
                           max_batch=args.max_batch))
    print(json.dumps(rows[-1]), flush=True)
  fallback = ([] if args.no_fallback
              else fallback_rows(model, coder, run.info.vocab_size, tuple(run.info.shape)))
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
              if line.startswith("model name")), "?") if os.path.exists("/proc/cpuinfo") else "?"
  info = {"workdir": args.workdir, "step": run.step, "num_images": len(images),
          "dims": int(images[0].size), "vocab_size": run.info.vocab_size, "cpu": cpu,
          "max_batch": args.max_batch,
          "backend": f"{jax.default_backend()} ({jax.devices()[0].device_kind})"}
  table = markdown(rows, fallback, model_rows(coder), info)
  print(table)
  common.write_text(args.out + ".md", table)
  common.write_json(args.out + ".json", {"info": info, "rows": rows, "fallback": fallback,
                                         "model": model_rows(coder)}, indent=2)
  print(f"-> {args.out}.md, {args.out}.json")


if __name__ == "__main__":
  main()
