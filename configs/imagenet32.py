"""VDM on downsampled ImageNet 32x32 (TFDS downsampled_imagenet/32x32, prepared first).

Equals, field for field, the official google-research/vdm configs/imagenet32.py (tests/test_configs.py
holds the official values and checks every one): 256 channels, 32 blocks, attention in the middle,
dropout 0.1, learned linear schedule, batch 128, lr 2e-4, 10M steps. The official code evaluates
on the "validation" split (100 batches of 128 shuffled images); the data set has no "test" split,
and the split evaluated here is chosen by the trainer / `vdm-jax eval --split validation`. Here at
most the first 10,000 validation images are evaluated (eval.max_examples), about the official
12,800 draws.

Launch:
  vdm-jax train --config configs/imagenet32.py --workdir runs/imagenet32

Expected: the VDM paper reports 3.72 bpd on ImageNet 32x32.
Measured by the trainer's evaluations, or on any checkpoint:
  vdm-jax eval --workdir runs/imagenet32
"""

import pathlib
import runpy

# The official configs share everything but the fields set below (configs/cifar10.py sets each
# official field, with the official name in a comment).
_cifar10 = runpy.run_path(str(pathlib.Path(__file__).with_name("cifar10.py")))


def get_config():
  c = _cifar10["get_config"]()
  c.data.name = "downsampled_imagenet/32x32"  # data.dataset = "imagenet32"
  c.model.channels = 256                      # sm_n_embd
  c.eval.max_examples = 10_000                # official: 100 batches of 128 (12,800 draws)
  return c
