"""vdm_jax: Variational Diffusion Models in JAX/Flax.

The subpackages are the layers, lowest first (each imports only the layers below it)::

  core         registries, validators, devices and the compiled programs' XLA options
  maths        schedules, the forward process, every term of the bound, objectives, samplers,
               guidance, the ODE likelihood, latent diffusion: pure functions of jax arrays
  storage      run directories on a local disk or in a bucket (`storage.rundir`, the only module
               that touches files), checkpoints and their integrity, metric writers
  nets         the official ScoreUNet, the VDM module, a classifier, a VAE
  datasets     data sets by name (digits, photo patches, TFDS) and grain pipelines
  training     tasks, config rules, train state, optimiser, compiled steps, the trainer loop,
               run control, runs read back
  official     the official google-research/vdm models and checkpoints
  compression  the bits-back lossless compressor
  apps         `vdm-jax eval` / `sample`, the benchmark, `vdm-jax launch`
  cli          `vdm-jax`: flag parsing and dispatch

The configs ship as `vdm_jax.configs`; test helpers (a GCS emulator) as `vdm_jax.testing`.
"""

__version__ = "0.1.0"
