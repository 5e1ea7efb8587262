"""DDPM on digits: beta 1e-4 -> 0.02 over T = 1000 levels, trained on L_simple, sampled with DDPM's
algorithm (Ho et al. 2020, algorithms 1-2). DDPM is a VDM with T steps and a beta schedule: the
same network, maths and trainer as configs/digits.py, with another objective and sampler.

Launch:
  vdm-jax train --config configs/digits_ddpm.py --workdir runs/digits_ddpm
  vdm-jax sample --workdir runs/digits_ddpm --sampler ddpm --steps 999 --num 64

The reported bpd is always the unweighted bound, evaluated separately from the L_simple
objective, on DDPM's own levels: DDPM's decoder sits at level 1 and its T - 1 = 999 denoising
KL terms join levels 1..1000, so it is a VDM with num_steps = 999 whose gamma(0) and gamma(1) are
DDPM's levels 1 and 1000 (`schedules.BetaLinear`'s default endpoints, exact on the grid:
alpha_bar_n = prod_{i<=n} (1 - beta_i); t = (n - 1) / 999 is level n, within 3e-6 in gamma).
A sharper decoder level below DDPM's level 1 (e.g. gamma_min = -13.3) makes the last KL term's
weight expm1(gamma_1 - gamma_0) ~ 60x larger and the T-step bound's variance explode, which is
why DDPM's own bound puts the decoder at level 1 (docs/results/index.md, "Other digits models").
`--config.sample.ddpm_variance=posterior` picks the posterior variance instead of beta_t.

Expected: a poor and noisy bound (L_simple does not weight the low-noise levels that dominate it;
3-4 bpd here, as DDPM's own CIFAR-10 bound, 3.70, is poor beside VDM's 2.65), measured by the
trainer's final evaluation or `vdm-jax eval --workdir runs/digits_ddpm`; the comparison with the
pixel VDM and latent diffusion: python experiments/compare_digits.py (docs/results/index.md).
"""

import pathlib
import runpy

_digits = runpy.run_path(str(pathlib.Path(__file__).with_name("digits.py")))


def get_config():
  c = _digits["get_config"]()
  c.model.schedule = "beta_linear"
  # DDPM's levels 1 and T = 1000 (beta 1e-4 -> 0.02): schedules.BetaLinear().endpoints, i.e.
  # log((1 - alpha_bar_n) / alpha_bar_n) with alpha_bar_n = prod_{i<=n} (1 - beta_i).
  c.model.gamma_min = -9.21024036697585
  c.model.gamma_max = 10.117673183300669
  c.model.num_steps = 999
  c.model.objective = "simple"
  c.model.schedule_objective = "elbo"   # digits.py's "variance" needs a continuous-time bound
  c.optim.schedule_lr_multiplier = 1.0
  c.eval.num_steps = 999
  c.sample.sampler = "ddpm"
  c.sample.num_steps = 999
  return c
