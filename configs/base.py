"""Base configuration: every field the trainer reads, with the VDM paper's CIFAR-10 defaults.

Not meant to be launched directly; the per-data-set files override it. Every field can be
overridden on the command line (`--config.optim.learning_rate=1e-3`); a typo is an error, since
the config is locked.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "vdm"   # vdm | classifier (noise-conditional, for guidance) | vae | latent_vdm

  c.data = ml_collections.ConfigDict()
  c.data.name = "cifar10"          # digits | cifar10 | mnist | downsampled_imagenet/32x32 | /64x64
  c.data.data_dir = ""             # TFDS data_dir ("" = TFDS default)
  c.data.flip = False              # random horizontal flips

  c.model = ml_collections.ConfigDict()
  c.model.schedule = "learned_linear"   # fixed_linear | learned_linear | learned_monotone | beta_linear | cosine
  c.model.gamma_min = -13.3
  c.model.gamma_max = 5.0
  c.model.schedule_hidden = 1024
  c.model.channels = 128
  c.model.num_blocks = 32
  c.model.fourier_exponents = (6, 7)
  c.model.attention_everywhere = False
  c.model.dropout = 0.1
  c.model.block_impl = "auto"      # auto (per backend) | unrolled | scan
  c.model.remat = False
  c.model.dtype = "float32"        # float32 | bfloat16 (activations; params and losses stay float32)
  c.model.num_steps = 0            # T of the training loss; 0 = continuous time
  c.model.objective = "elbo"       # elbo | simple (DDPM L_simple, needs num_steps) | weighted
  c.model.weighting = "sigmoid"    # weighted objective: uniform | sigmoid (w of log-SNR)
  c.model.weighting_bias = 0.0
  c.model.conditional = False      # class-conditional network (label embedding with a null label)
  c.model.p_uncond = 0.1           # label-drop probability for classifier-free guidance

  # Latent diffusion: task "vae" trains this VAE; task "latent_vdm" trains a VDM (config.model) on
  # the latents of the VAE run in latent.vae_workdir (frozen; its config.vae must match).
  c.vae = ml_collections.ConfigDict()
  c.vae.channels = 32
  c.vae.latent_channels = 4
  c.vae.num_down = 1               # latent H / 2^num_down x W / 2^num_down
  c.vae.num_blocks = 1
  c.latent = ml_collections.ConfigDict()
  c.latent.vae_workdir = ""
  c.latent.vae_checkpoint = 0      # 0 = the newest

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = 100
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01
  c.optim.grad_clip_norm = 0.0     # 0 = no clipping
  c.optim.schedule_lr_multiplier = 1.0
  c.optim.ema_decay = 0.9999

  c.training = ml_collections.ConfigDict()
  c.training.batch_size = 128      # global batch size
  c.training.num_steps = 10_000_000
  c.training.log_every = 100
  c.training.eval_every = 10_000
  c.training.sample_every = 50_000
  c.training.checkpoint_every = 10_000
  c.training.keep_checkpoints = 3
  c.training.max_nonfinite_steps = 0   # skip up to this many non-finite steps in a row; 0 = stop at once
  c.training.allow_config_change = False

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 128
  c.eval.max_examples = 0          # 0 = the whole test split
  c.eval.num_steps = -1            # T of the evaluated bound; 0 = continuous; -1 = model.num_steps
  c.eval.t_samples = 1             # time samples per image

  c.sample = ml_collections.ConfigDict()
  c.sample.num_steps = 1000
  c.sample.num_images = 64
  c.sample.sampler = "ancestral"   # sample grids written during training
  c.sample.ddpm_variance = "beta"  # sampler "ddpm": sigma_t^2 = beta | posterior

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  return c
