"""VDM on downsampled ImageNet 64x64 (TFDS downsampled_imagenet/64x64, prepared first).

Launch:
  vdm-jax train --config configs/imagenet64.py --workdir runs/imagenet64

Expected: the VDM paper reports 3.40 test bpd (with a larger net and 2x2 patch downsampling at
the input; this full-resolution config is its closest analogue here and needs remat).
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
  c = _base["get_config"]()
  c.data.name = "downsampled_imagenet/64x64"
  c.model.dropout = 0.0
  c.model.remat = True
  c.training.batch_size = 512
  c.training.num_steps = 2_000_000
  c.eval.max_examples = 10_000
  return c
