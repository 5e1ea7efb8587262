"""The maths of VDMs as pure functions of jax arrays (no Flax, no configs): schedules, the forward
process and its posteriors, every term of the bound, the other objectives, samplers, guidance, the
ODE likelihood, latent diffusion."""
