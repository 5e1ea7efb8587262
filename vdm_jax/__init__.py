"""vdm_jax: Variational Diffusion Models in JAX/Flax.

The maths lives in pure modules that import only jax: `schedules` (gamma(t) = -log SNR(t)),
`diffusion` (the forward process, posteriors and the eps / x0 / score / v conversions) and `elbo`
(every term of the variational bound). Networks, the trainer and the samplers build on them.
"""

__version__ = "0.1.0"
