"""Stage 2 of latent diffusion on CIFAR-10: the VDM paper's network on the 16x16x4 latents of
the frozen VAE from configs/cifar10_vae.py; the composed bound is reported in bpd of the data.

Launch:
  vdm-jax train --config configs/cifar10_latent.py --workdir runs/cifar10_latent \
      --config.latent.vae_workdir=runs/cifar10_vae

Expected: not yet measured (it needs an accelerator). Measured by the trainer's evaluations, or
on any checkpoint:
  vdm-jax eval --workdir runs/cifar10_latent
"""

import pathlib
import runpy

_vae = runpy.run_path(str(pathlib.Path(__file__).with_name("cifar10_vae.py")))


def get_config():
  c = _vae["get_config"]()
  c.task = "latent_vdm"
  c.latent.vae_workdir = "runs/cifar10_vae"
  c.model.gamma_min = -10.0
  c.model.fourier_exponents = ()
  c.model.gamma_max = 5.0
  c.training.num_steps = 10_000_000
  return c
