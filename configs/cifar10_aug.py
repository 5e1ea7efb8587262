"""The VDM paper's CIFAR-10 model with augmentation (horizontal flips here).

Launch:
  vdm-jax train --config configs/cifar10_aug.py --workdir runs/cifar10_aug

Expected: the paper reports 2.49 test bpd with its augmentation (flips, 90-degree rotations and
colour channel swaps, conditioned on; here only flips, so expect between 2.49 and 2.65).
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
  c = _base["get_config"]()
  c.data.name = "cifar10"
  c.data.flip = True
  return c
