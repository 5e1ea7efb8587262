"""A VDM on 32x32 RGB patches of real photographs (K = 256), offline, on two CPU cores.

The paper's regime on real pixels: 8-bit RGB, the discrete decoder over 256 levels, the paper's
network family (the official ScoreUNet with Fourier features 2^6, 2^7, attention in the middle)
and its learned linear schedule from -13.3 / 5.0, scaled down to train on 2 CPU cores. Data: the
"photos" data set (vdm_jax/datasets/photos.py: 4,622 training patches of astronaut, ihc and the
motorcycle pair; 342 test tiles of chelsea and coffee).

Launch:
  vdm-jax train --config configs/photos.py --workdir runs/photos
Measure (the bound at the end of training is also in runs/photos/eval.json):
  vdm-jax eval --workdir runs/photos                    # continuous-time bound, 4 t per image
  vdm-jax eval --workdir runs/photos --num_steps 1000   # the T = 1000 bound

Expected: test bpd 3.483 +- 0.035 (mean and standard error over seeds 0, 1, 2: 3.553, 3.447,
3.448; continuous time, EMA parameters, the 342 test patches) against the uniform baseline of
8 bpd; seed 0's T = 1000 bound 3.573. 337,029 parameters. 2,000 steps took 64-75 min per seed on
this project's 2-core machine while other jobs held its cores (load average 2-13);
docs/results/photos.md has the seeds, the sizing measurements and their commands.

The net: 32 channels, 4 residual blocks at 32x32, no dropout; batch 16; AdamW at a peak learning
rate 3e-3 after 100 warm-up steps, cosine-decayed to 0 at the last step, with a 10x learning
rate on the schedule's endpoints; EMA 0.999 with warm-up. The same config trains on the grey
patches with --config.data.name=photos_gray (the network reads the channel count from the data).
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
  c = _base["get_config"]()
  c.data.name = "photos"
  c.model.schedule = "learned_linear"
  c.model.gamma_min = -13.3
  c.model.gamma_max = 5.0
  c.model.channels = 32
  c.model.num_blocks = 4
  c.model.dropout = 0.0
  c.optim.learning_rate = 3e-3
  c.optim.lr_decay = "cosine"
  c.optim.schedule_lr_multiplier = 10.0
  c.optim.ema_decay = 0.999
  c.training.batch_size = 16
  c.training.num_steps = 2000
  c.training.log_every = 100
  c.training.eval_every = 500
  c.training.sample_every = 2000
  c.training.checkpoint_every = 500
  c.eval.batch_size = 114
  c.eval.t_samples = 4
  c.sample.num_steps = 100
  c.sample.num_images = 16
  return c
