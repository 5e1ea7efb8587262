"""A subprocess of tests/test_portable.py: the portable coder under one XLA configuration.

  python portable_worker.py MODEL.vdmq IMAGES.npy encode OUT.vdmz [FILE...]
      -> writes the portable file of the images (T = 3), then decodes FILE... and OUT.vdmz;
         prints {"forward": digest of the integer network's outputs on fixed inputs (several
         batch sizes, every level), "matches_reference": whether they equal the NumPy int64
         reference's, "decoded": [true where a file decodes to the images, ...]}

The parent sets VDM_JAX_XLA_CPU_YNN_FUSION_TYPE and XLA_FLAGS (device count) per process.
"""

import hashlib
import json
import sys

import numpy as np

from vdm_jax.compression import compress, compress_app, compress_portable, portable_net as pn
from vdm_jax.compression import portable_unet as pu

STEPS = 3


def main(model_path: str, images_path: str, mode: str, *files: str) -> None:
  with open(model_path, "rb") as f:
    coder = compress_portable.from_bytes(f.read())
  images = np.load(images_path)
  out = {}
  if mode == "encode":
    ch = compress_portable.chain(coder, compress.CoderSettings(STEPS))
    h = hashlib.sha256()
    for b in (1, 3, 8):
      j = np.random.default_rng(b).integers(-(1 << 16), 1 << 16, b * ch.dims)
      for i in range(STEPS + 1):
        h.update(ch.eps(ch.z_input(j, i, b), i).astype("<i8").tobytes())
    out["forward"] = h.hexdigest()
    z = np.random.default_rng(0).integers(-(1 << 22), 1 << 22, (4,) + ch.model.shape)
    out["matches_reference"] = bool(np.array_equal(
        np.asarray(pu.unet(pn.JAX, ch.device, ch.spec, z, ch.cond[1])),
        pu.unet(pn.NUMPY, coder.model.arrays, ch.spec, z, ch.cond[1])))
    blob, _ = compress_portable.compress_images(coder, images, compress.CoderSettings(STEPS),
                                                config_digest=b"cf", step=0,
                                                raw_fallback=False)
    with open(files[0], "wb") as f:
      f.write(blob)
    decoded = []
    for path in files[1:] + files[:1]:
      with open(path, "rb") as f:
        got, _ = compress_app.decompress_bytes(coder, f.read(), name=path)
      decoded.append(bool(np.array_equal(got, images)))
    out["decoded"] = decoded
  print(json.dumps(out))


if __name__ == "__main__":
  main(*sys.argv[1:])
