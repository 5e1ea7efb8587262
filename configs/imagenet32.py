"""VDM on downsampled ImageNet 32x32 (TFDS downsampled_imagenet/32x32, prepared first).

Launch:
  vdm-jax train --config configs/imagenet32.py --workdir runs/imagenet32

Expected: the VDM paper reports 3.72 test bpd (its ImageNet net; this config uses the CIFAR-10
architecture without dropout, batch 512 across the pod).
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
  c = _base["get_config"]()
  c.data.name = "downsampled_imagenet/32x32"
  c.model.dropout = 0.0
  c.training.batch_size = 512
  c.training.num_steps = 2_000_000
  c.eval.max_examples = 10_000
  return c
