"""Stage 1 of latent diffusion on CIFAR-10: a discrete-decoder VAE, 32x32x3 -> 16x16x4.

Launch (then configs/cifar10_latent.py):
  vdm-jax train --config configs/cifar10_vae.py --workdir runs/cifar10_vae

Expected: not yet measured (it needs an accelerator). Measured by the trainer's evaluations, or
on any checkpoint:
  vdm-jax eval --workdir runs/cifar10_vae
"""

import pathlib
import runpy

_cifar = runpy.run_path(str(pathlib.Path(__file__).with_name("cifar10.py")))


def get_config():
  c = _cifar["get_config"]()
  c.task = "vae"
  c.vae.channels = 128
  c.vae.latent_channels = 4
  c.vae.num_down = 1
  c.vae.num_blocks = 2
  c.optim.learning_rate = 2e-4
  c.optim.schedule_lr_multiplier = 1.0
  # Not an official model: the project's optimiser defaults rather than the official ones that
  # cifar10.py sets (decay kernels only; EMA with warm-up). cifar10_latent.py inherits these.
  c.optim.weight_decay_rule = "kernels"
  c.optim.ema_warmup = True
  c.training.num_steps = 500_000
  return c
