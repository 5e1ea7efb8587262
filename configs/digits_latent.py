"""Stage 2 of latent diffusion on digits: a VDM on the 4x4x2 latents of the frozen VAE trained by
configs/digits_vae.py. Its bound composes: the VAE's reconstruction, minus the entropy of
q(y|x), plus the VDM bound on -log p(y), reported in bpd of the data.

Launch:
  vdm-jax train --config configs/digits_vae.py --workdir runs/digits_vae
  vdm-jax train --config configs/digits_latent.py --workdir runs/digits_latent \
      --config.latent.vae_workdir=runs/digits_vae
  vdm-jax sample --workdir runs/digits_latent --sampler ddim --steps 100 --num 64

Expected: a composed test bound a little below the VAE's own (about 1.9 bpd) and above the pixel
VDM's, measured by the trainer's final evaluation or `vdm-jax eval --workdir runs/digits_latent`;
the comparison: python experiments/compare_digits.py (docs/results/index.md).
"""

import pathlib
import runpy

_vae = runpy.run_path(str(pathlib.Path(__file__).with_name("digits_vae.py")))


def get_config():
  c = _vae["get_config"]()
  c.task = "latent_vdm"
  c.latent.vae_workdir = "runs/digits_vae"
  c.model.gamma_min = -10.0
  c.model.gamma_max = 5.0
  c.model.channels = 64
  c.model.num_blocks = 4
  c.model.fourier_exponents = ()     # Fourier features suit 8-bit pixels, not latents
  c.training.num_steps = 3000
  c.training.checkpoint_every = 1000
  c.optim.learning_rate = 1e-3
  c.optim.schedule_lr_multiplier = 10.0
  c.eval.t_samples = 4
  return c
