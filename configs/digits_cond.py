"""Class-conditional VDM on digits, for classifier-free guidance (labels dropped with p = 0.1).

The main job's recipe (configs/digits.py) with a label embedding that has a null label.

Launch:
  vdm-jax train --config configs/digits_cond.py --workdir runs/digits_cond
  vdm-jax sample --workdir runs/digits_cond --sampler ddim --steps 100 --num 64 --label 3 --guidance 1

Expected: a test bound a little above the unconditional one of configs/digits.py (about 1.9 bpd;
it is reported with the null label, which the label-dropping leaves 10% of the steps), measured
by the trainer's final evaluation or `vdm-jax eval --workdir runs/digits_cond`; and guided samples
of the requested digit, measured by python experiments/guidance_digits.py
(docs/results/index.md, "Guidance").
"""

import pathlib
import runpy

_digits = runpy.run_path(str(pathlib.Path(__file__).with_name("digits.py")))


def get_config():
  c = _digits["get_config"]()
  c.model.conditional = True
  c.model.p_uncond = 0.1
  return c
