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
  # Random 90-degree rotations (with probability 1/2, by k * 90 degrees, k uniform on {1, 2, 3}),
  # applied after the flip as in the official augmented CIFAR-10 ("cifar10_aug"). With
  # model.conditioning_input the training batch carries the flag "augmented or not" (1 when the
  # image was flipped or rotated), which the network reads; evaluation is never augmented (flag 0).
  c.data.rot90 = False

  c.model = ml_collections.ConfigDict()
  # fixed_linear | learned_linear (the official learnable_scalar) | learned_monotone (monotone net
  # rescaled to exactly the learned endpoints; this project's variant) | learned_nnet (the official
  # learnable_nnet: l1 + l3(sigmoid(l2)), endpoints implicit, not pinned) | beta_linear | cosine
  c.model.schedule = "learned_linear"
  c.model.gamma_min = -13.3
  c.model.gamma_max = 5.0
  c.model.schedule_hidden = 1024   # width of the monotone schedule net (official n_features 1024)
  c.model.channels = 128
  c.model.num_blocks = 32
  c.model.fourier_exponents = (6, 7)
  c.model.attention_everywhere = False
  # GroupNorm groups. 0 = this project's rule: the largest divisor of the width <= 32 that leaves
  # >= 2 channels per group (a one-channel group would erase the per-channel conditioning a
  # residual block adds before its second norm, so narrow test nets keep it). 32 = the official
  # code (Flax's default GroupNorm() at every width). Equal at the paper widths 128 and 256.
  c.model.norm_groups = 0
  # The official network's scalar conditioning input, concatenated to the time embedding before
  # its first dense layer (dense0). The official augmented CIFAR-10 model feeds it the
  # augmentation flag (data.rot90 / data.flip), the other official models feed 0. False here by
  # default (one parameter row fewer; no use without augmentation); True in the paper configs.
  c.model.conditioning_input = False
  c.model.dropout = 0.1
  c.model.block_impl = "auto"      # auto (per backend) | unrolled | scan
  c.model.remat = False
  c.model.dtype = "float32"        # float32 | bfloat16 (activations; params and losses stay float32)
  c.model.num_steps = 0            # T of the training loss; 0 = continuous time
  c.model.objective = "elbo"       # elbo | simple (DDPM L_simple, needs num_steps) | weighted
  c.model.weighting = "sigmoid"    # weighted objective: uniform | sigmoid (w of log-SNR)
  c.model.weighting_bias = 0.0
  # What trains a learned schedule's interior (objective "elbo", continuous time, a schedule with
  # a learned interior: learned_monotone | learned_nnet). "elbo": the bound's gradient (zero for
  # the interior in expectation, noise in practice). "variance": the gradient of E[L^2] of the
  # per-example diffusion loss, which lowers the variance of the bound's estimate (VDM app. I.2),
  # in the same step and backward pass; the endpoints keep the bound's gradient either way.
  c.model.schedule_objective = "elbo"
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
  # "constant" after the warm-up (the official code), or "cosine": decay to 0 at
  # training.num_steps (short runs; resuming with another num_steps reshapes the decay).
  c.optim.lr_decay = "constant"
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01
  c.optim.grad_clip_norm = 0.0     # 0 = no clipping
  c.optim.schedule_lr_multiplier = 1.0
  # Which leaves get weight decay. "kernels" (this project's default): only leaves with ndim >= 2
  # outside the noise schedule, since decaying GroupNorm scales towards 0 and schedule endpoints
  # towards gamma = 0 is a pull on quantities with no natural zero. "official": the official code's
  # AdamW mask, every leaf not named "bias" (GroupNorm scales and schedule parameters included).
  c.optim.weight_decay_rule = "kernels"
  c.optim.ema_decay = 0.9999
  # EMA decay warm-up min(ema_decay, (1 + step) / (10 + step)): True here so that short runs are
  # not evaluated on an average still dominated by the initial weights. The official code (False)
  # keeps a constant rate from the initial weights: ema <- ema + (1 - rate) * (new - ema).
  c.optim.ema_warmup = True

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
  # A run directory in object storage (gs://, s3://) is locked by a lease that process 0
  # refreshes every lock_expiry_secs / 10; a lease older than this (a trainer killed, its VM
  # lost) is taken over by the next trainer. On a local disk the lock is a flock (no expiry).
  c.training.lock_expiry_secs = 300.0

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 128
  # 0 = the whole test split, each image once (the exact test bound). The official code instead
  # averages num_steps_eval = 100 batches of batch_size_eval shuffled test images, read with
  # num_epochs=None (12,800 draws at batch 128 on CIFAR-10's 10,000 images, some twice).
  c.eval.max_examples = 0
  c.eval.num_steps = -1            # T of the evaluated bound; 0 = continuous; -1 = model.num_steps
  c.eval.t_samples = 1             # time samples per image

  c.sample = ml_collections.ConfigDict()
  c.sample.num_steps = 1000
  c.sample.num_images = 64
  c.sample.sampler = "ancestral"   # sample grids written during training
  c.sample.ddpm_variance = "beta"  # sampler "ddpm": sigma_t^2 = beta | posterior

  c.distributed = ml_collections.ConfigDict()
  # "off": one process. "auto": jax.distributed.initialize() finds the coordinator, process
  # count and id itself (TPU pods, SLURM, Open MPI, Kubernetes). "explicit": the three fields below.
  c.distributed.initialize = "off"
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = 1
  c.distributed.process_id = 0

  # XLA:CPU only (GPU/TPU ignore it): the fusion kinds handed to the YNNPACK library, applied to
  # everything the run compiles (training, evaluation, sampling, compression, the benchmark).
  # Dots and reductions here: the paper nets' convolution gradients are 2x faster than with
  # XLA's choice ("default"); the small digits net is faster without reductions (configs/
  # digits.py). The environment variable VDM_JAX_XLA_CPU_YNN_FUSION_TYPE overrides it.
  c.xla = ml_collections.ConfigDict()
  c.xla.cpu_ynn_fusion_type = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
  return c
