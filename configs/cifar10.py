"""The VDM paper's CIFAR-10 model (Kingma et al. 2021), without data augmentation.

Equals, field for field, the official google-research/vdm configs/cifar10.py (tests/test_configs.py
holds the official values and checks every one), with the official optimiser mask, EMA, GroupNorm
groups and scalar conditioning input. Only the evaluation differs: here the whole test split once;
the official code averages 100 batches of 128 shuffled test images (12,800 draws).

Launch (8 accelerators; TFDS cifar10 prepared first, docs/getting_started.md):
  vdm-jax train --config configs/cifar10.py --workdir runs/cifar10

Expected: test bpd 2.65 after 10M steps at batch 128 (the paper; the released checkpoint
evaluates to 2.637). 32 residual blocks at 32x32, 128 channels, attention in the middle, dropout
0.1, Fourier features 2^6 and 2^7, learned linear schedule from -13.3 / 5.0, AdamW 2e-4, EMA 0.9999:
about 30.6M parameters. Measured by the trainer's evaluations, or on any checkpoint:
  vdm-jax eval --workdir runs/cifar10
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
  c = _base["get_config"]()
  c.seed = 1                                  # training.seed
  c.data.name = "cifar10"                     # data.dataset = "cifar10"
  c.data.flip = False                         # (no augmentation)
  c.data.rot90 = False

  c.model.schedule = "learned_linear"         # gamma_type = "learnable_scalar"
  c.model.gamma_min = -13.3
  c.model.gamma_max = 5.0
  c.model.num_steps = 0                       # sm_n_timesteps: continuous time
  c.model.channels = 128                      # sm_n_embd
  c.model.num_blocks = 32                     # sm_n_layer
  c.model.dropout = 0.1                       # sm_pdrop
  c.model.attention_everywhere = False        # with_attention
  c.model.fourier_exponents = (6, 7)          # with_fourier_features: sin/cos(2^n 2 pi z)
  c.model.norm_groups = 32                    # Flax's default GroupNorm()
  c.model.conditioning_input = True           # the scalar input (fed 0 here)

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

  c.training.batch_size = 128                 # batch_size_train
  c.training.num_steps = 10_000_000           # num_steps_train
  c.training.log_every = 1000                 # steps_per_logging
  c.training.eval_every = 10_000              # steps_per_eval
  c.training.checkpoint_every = 10_000        # steps_per_save
  c.eval.batch_size = 128                     # batch_size_eval
  c.eval.max_examples = 0                     # whole test split (official: 100 batches)
  return c
