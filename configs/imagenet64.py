"""VDM on downsampled ImageNet 64x64 (TFDS downsampled_imagenet/64x64, prepared first).

Equals, field for field, the official google-research/vdm configs/imagenet64.py (tests/test_configs.py
holds the official values and checks every one): 256 channels, 64 blocks at full resolution (no
downsampling), attention in the middle, dropout 0.1, learned linear schedule, batch 128, lr 2e-4,
10M steps. The released code has this config but its dataset.py has no "imagenet64" branch; its
other ImageNet config evaluates on the "validation" split, as this data set has no "test" split.
model.remat = True is a memory choice only (activations recomputed in the backward pass; the same
function and gradients). Here at most the first 10,000 validation images are evaluated
(eval.max_examples; the official code draws 100 batches of 128).

Launch:
  vdm-jax train --config configs/imagenet64.py --workdir runs/imagenet64

Expected: the VDM paper reports 3.40 bpd on ImageNet 64x64.
Measured by the trainer's evaluations, or on any checkpoint:
  vdm-jax eval --workdir runs/imagenet64
"""

import pathlib
import runpy

# The official configs share everything but the fields set below (configs/cifar10.py sets each
# official field, with the official name in a comment).
_cifar10 = runpy.run_path(str(pathlib.Path(__file__).with_name("cifar10.py")))


def get_config():
  c = _cifar10["get_config"]()
  c.data.name = "downsampled_imagenet/64x64"  # data.dataset = "imagenet64"
  c.model.channels = 256                      # sm_n_embd
  c.model.num_blocks = 64                     # sm_n_layer
  c.model.remat = True                        # memory only; not an official field
  c.eval.max_examples = 10_000                # official: 100 batches of 128 (12,800 draws)
  return c
