"""DDPM on digits: beta 1e-4 -> 0.02 over T = 1000 steps, trained on L_simple, sampled with DDPM's
algorithm (Ho et al. 2020, algorithms 1-2). DDPM is a VDM with T steps and a beta schedule: the
same network, maths and trainer as configs/digits.py, with another objective and sampler.

Launch:
  vdm-jax train --config configs/digits_ddpm.py --workdir runs/digits_ddpm
  vdm-jax sample --workdir runs/digits_ddpm --sampler ddpm --steps 1000 --num 64

The reported bpd is always the unweighted bound (here with T = 1000, the model's own grid),
evaluated separately from the L_simple objective. The beta-linear schedule is
`schedules.BetaLinear` (exact on DDPM's grid: alpha_bar_n = prod_{i<=n} (1 - beta_i)) with
gamma_max = its DDPM level 1000 and gamma_min = -13.3, so t = 0 is a sharp decoder level and
t = n / T lands 0.0186 (1 - n / T) steps past DDPM's level n: 0.020 in gamma at n = 1, below 3.4e-4
from n = 100 on, exact at n = T (alpha_bar within 1e-4 relative everywhere).
`--config.sample.ddpm_variance=posterior` picks the posterior variance instead of beta_t.
"""

import pathlib
import runpy

_digits = runpy.run_path(str(pathlib.Path(__file__).with_name("digits.py")))


def get_config():
  c = _digits["get_config"]()
  c.model.schedule = "beta_linear"
  c.model.gamma_min = -13.3
  # DDPM's level T = 1000 (beta 1e-4 -> 0.02): schedules.BetaLinear().endpoints[1], equal to
  # log((1 - alpha_bar_T) / alpha_bar_T) with alpha_bar_T = prod(1 - beta_i) = 4.036e-5.
  c.model.gamma_max = 10.117673183300669
  c.model.num_steps = 1000
  c.model.objective = "simple"
  c.optim.schedule_lr_multiplier = 1.0
  c.eval.num_steps = 1000
  c.sample.sampler = "ddpm"
  c.sample.num_steps = 1000
  return c
