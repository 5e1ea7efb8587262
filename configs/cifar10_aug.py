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
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
  c = _base["get_config"]()
  c.seed = 1                                  # training.seed
  c.data.name = "cifar10"                     # data.dataset = "cifar10_aug"
  c.data.flip = True
  c.data.rot90 = True

  c.model.schedule = "learned_nnet"           # gamma_type = "learnable_nnet"
  c.model.schedule_hidden = 1024              # NoiseSchedule_NNet n_features
  c.model.gamma_min = -13.3
  c.model.gamma_max = 5.0
  c.model.num_steps = 0                       # sm_n_timesteps: continuous time
  c.model.channels = 256                      # sm_n_embd
  c.model.num_blocks = 32                     # sm_n_layer
  c.model.dropout = 0.05                      # sm_pdrop
  c.model.attention_everywhere = True         # with_attention
  c.model.fourier_exponents = (6, 7)          # with_fourier_features: sin/cos(2^n 2 pi z)
  c.model.norm_groups = 32                    # Flax's default GroupNorm()
  c.model.conditioning_input = True           # the augmentation flag

  c.optim.learning_rate = 2e-4                # optimizer.learning_rate (lr_decay = False)
  c.optim.warmup_steps = 100                  # num_steps_lr_warmup
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01
  c.optim.weight_decay_rule = "official"      # every leaf not named "bias"
  c.optim.grad_clip_norm = 0.0                # no gradient_clip_norm
  c.optim.schedule_lr_multiplier = 1.0
  c.optim.ema_decay = 0.9999                  # ema_rate
  c.optim.ema_warmup = False                  # constant rate from the initial weights

  c.training.batch_size = 1024                # batch_size_train
  c.training.num_steps = 100_000_000          # num_steps_train
  c.training.log_every = 1000                 # steps_per_logging
  c.training.eval_every = 10_000              # steps_per_eval
  c.training.checkpoint_every = 10_000        # steps_per_save
  c.eval.batch_size = 1024                    # batch_size_eval
  c.eval.max_examples = 0                     # whole test split (official: 100 batches)
  return c
