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
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
  c = _base["get_config"]()
  c.seed = 1                                  # training.seed
  c.data.name = "downsampled_imagenet/64x64"  # data.dataset = "imagenet64"
  c.data.flip = False                         # (no augmentation)
  c.data.rot90 = False

  c.model.schedule = "learned_linear"         # gamma_type = "learnable_scalar"
  c.model.gamma_min = -13.3
  c.model.gamma_max = 5.0
  c.model.num_steps = 0                       # sm_n_timesteps: continuous time
  c.model.channels = 256                      # sm_n_embd
  c.model.num_blocks = 64                     # sm_n_layer
  c.model.dropout = 0.1                       # sm_pdrop
  c.model.attention_everywhere = False        # with_attention
  c.model.fourier_exponents = (6, 7)          # with_fourier_features: sin/cos(2^n 2 pi z)
  c.model.norm_groups = 32                    # Flax's default GroupNorm()
  c.model.conditioning_input = True           # the scalar input (fed 0 here)
  c.model.remat = True                        # memory only; not an official field

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
  c.eval.max_examples = 10_000                # official: 100 batches of 128 (12,800 draws)
  return c
