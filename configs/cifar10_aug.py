"""The VDM paper's CIFAR-10 model with data augmentation (Kingma et al. 2021: 2.49 bpd).

Equals, field for field, the official google-research/vdm configs/cifar10_aug_paper.py (the paper
version; the released cifar10_aug.py is a smaller variant: no attention, batch 768, lr 1e-4):
256 channels, 32 blocks, attention in every block, the official learnable_nnet schedule, dropout
0.05, batch 1024, lr 2e-4, 100M steps. Augmentation as the official "cifar10_aug" data: random
horizontal flips, then random 90-degree rotations, each with probability 1/2; the network's scalar
conditioning input gets 1 for an augmented image, 0 otherwise (and 0 at evaluation, which is never
augmented). The official channel permutations ("cifar10_aug_with_channel") are not used by this
config. tests/test_configs.py holds the official values and checks every one. Evaluation here:
the whole test split once (official: 100 batches of 1024 shuffled test images).

Launch (a pod: batch 1024):
  vdm-jax train --config configs/cifar10_aug.py --workdir runs/cifar10_aug

Expected: test bpd 2.49 (the paper's augmented CIFAR-10 result).
Measured by the trainer's evaluations, or on any checkpoint:
  vdm-jax eval --workdir runs/cifar10_aug
"""

import pathlib
import runpy

# The official configs share everything but the fields set below (configs/cifar10.py sets each
# official field, with the official name in a comment).
_cifar10 = runpy.run_path(str(pathlib.Path(__file__).with_name("cifar10.py")))


def get_config():
  c = _cifar10["get_config"]()
  c.data.flip = True                          # data.dataset = "cifar10_aug": flips,
  c.data.rot90 = True                         # 90-degree rotations, the flag as conditioning
  c.model.schedule = "learned_nnet"           # gamma_type = "learnable_nnet"
  c.model.schedule_hidden = 1024              # NoiseSchedule_NNet n_features
  c.model.channels = 256                      # sm_n_embd
  c.model.dropout = 0.05                      # sm_pdrop
  c.model.attention_everywhere = True         # with_attention
  c.training.batch_size = 1024                # batch_size_train
  c.training.num_steps = 100_000_000          # num_steps_train
  c.eval.batch_size = 1024                    # batch_size_eval
  return c
