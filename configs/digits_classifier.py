"""Noise-conditional classifier p(y | z_t, gamma_t) on digits, for classifier guidance.

Trained by the same trainer (task "classifier"): cross-entropy on z_t = alpha_t x + sigma_t eps
with gamma ~ Uniform(gamma_min, gamma_max), a range a bit wider than the diffusion model's
(-7, 5 for digits), so that its gradient is meaningful wherever the sampler asks for it.

Launch:
  vdm-jax train --config configs/digits_classifier.py --workdir runs/digits_classifier
  vdm-jax sample --workdir runs/digits --sampler ancestral --steps 200 --num 64 --label 3 \
      --guidance 1 --classifier_workdir runs/digits_classifier

Expected: test accuracy at the cleanest level ("accuracy_clean") about 0.95 or more; averaged over
noise levels ("accuracy") much lower, since pure noise carries no label. Measured by the
trainer's final evaluation (eval.json) or:
  vdm-jax eval --workdir runs/digits_classifier
The guided samples' agreement with the label: python experiments/guidance_digits.py
(docs/results/index.md, "Guidance").
"""

import pathlib
import runpy

_digits = runpy.run_path(str(pathlib.Path(__file__).with_name("digits.py")))


def get_config():
  c = _digits["get_config"]()
  c.task = "classifier"
  c.model.gamma_min = -8.0
  c.model.gamma_max = 6.0
  c.model.channels = 32
  c.model.num_blocks = 2
  c.optim.learning_rate = 2e-3
  c.optim.schedule_lr_multiplier = 1.0
  # configs/digits.py trains its schedule's interior on the bound's variance, which only a
  # continuous-time VDM has: this task keeps the learned-endpoints schedule.
  c.model.schedule = "learned_linear"
  c.model.schedule_objective = "elbo"
  c.training.num_steps = 2000
  c.training.eval_every = 1000
  c.eval.t_samples = 1
  return c
