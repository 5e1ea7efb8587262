"""The VDM paper's CIFAR-10 model (Kingma et al. 2021), without data augmentation.

Launch (8 accelerators; TFDS cifar10 prepared first, see the README):
  vdm-jax train --config configs/cifar10.py --workdir runs/cifar10

Expected: test bpd 2.65 after 10M steps at batch 128 (the paper; the released checkpoint
evaluates to 2.637). 32 residual blocks at 32x32, 128 channels, attention in the middle, dropout
0.1, Fourier features 2^6 and 2^7, learned linear schedule from -13.3 / 5.0, AdamW 2e-4, EMA 0.9999:
about 30.6M parameters.
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
  c = _base["get_config"]()
  c.data.name = "cifar10"
  return c
