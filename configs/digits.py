"""The README's main job: a VDM on scikit-learn's 8x8 digits (17 grey levels), offline, on CPU.

Launch:
  vdm-jax train --config configs/digits.py --workdir runs/digits

Expected: about 3-10 minutes on 2 CPU cores (3,000 steps at 5-15 steps/s, by load); test bpd about
1.8 (measured 1.81 ± 0.04 on 2026-11-23; 1.99 after 1,000 steps, 1.86 after 2,000)
(continuous-time bound, EMA parameters), against the uniform baseline log2(17) = 4.09 bpd.
A 446k-parameter net: 64 channels, 4 residual blocks at 8x8; learned endpoints initialised at
-7 / 5 with a 10x learning rate on them (the CIFAR-10 init -13.3 moves too slowly here).
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
  c = _base["get_config"]()
  c.data.name = "digits"
  c.model.gamma_min = -7.0
  c.model.gamma_max = 5.0
  c.model.channels = 64
  c.model.num_blocks = 4
  c.model.dropout = 0.1
  c.optim.learning_rate = 1e-3
  c.optim.schedule_lr_multiplier = 10.0
  c.optim.ema_decay = 0.999
  c.training.batch_size = 64
  c.training.num_steps = 3000
  c.training.log_every = 100
  c.training.eval_every = 1000
  c.training.sample_every = 3000
  c.training.checkpoint_every = 1000
  c.eval.batch_size = 100
  c.eval.t_samples = 4
  c.sample.num_steps = 200
  c.sample.num_images = 64
  return c
