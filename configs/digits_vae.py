"""Stage 1 of latent diffusion on digits: a convolutional VAE with a discrete decoder, 8x8x1 ->
a 4x4x2 latent (half the dimensions), trained on its bound (reconstruction + KL) in bpd.

Launch (then configs/digits_latent.py for stage 2):
  vdm-jax train --config configs/digits_vae.py --workdir runs/digits_vae

The VAE bound itself (KL to N(0, I) as the prior) is reported as test bpd; stage 2 replaces that
prior by a VDM on the latents, and its composed bound is the latent model's bpd.

Expected: test bpd about 1.9, measured by the trainer's final evaluation or
`vdm-jax eval --workdir runs/digits_vae`; the comparison with the other digits models:
python experiments/compare_digits.py (docs/results/index.md).
"""

import pathlib
import runpy

_digits = runpy.run_path(str(pathlib.Path(__file__).with_name("digits.py")))


def get_config():
  c = _digits["get_config"]()
  c.task = "vae"
  c.vae.channels = 32
  c.vae.latent_channels = 2
  c.vae.num_down = 1
  c.vae.num_blocks = 1
  c.optim.learning_rate = 2e-3
  c.optim.schedule_lr_multiplier = 1.0
  # configs/digits.py trains its schedule's interior on the bound's variance, which only a
  # continuous-time VDM has: this task keeps the learned-endpoints schedule.
  c.model.schedule = "learned_linear"
  c.model.schedule_objective = "elbo"
  c.training.num_steps = 1500        # it overfits the 1,500 training images after ~1,000
  c.training.checkpoint_every = 500
  c.eval.t_samples = 1
  return c
