"""A tiny configuration for tests and smoke runs: seconds on a CPU.

Launch:
  vdm-jax train --config configs/smoke.py --workdir runs/smoke
Expected: a few steps, a checkpoint, a sample grid; the bpd is meaningless (near the uniform
baseline, log2(17) = 4.09 on digits). It is what the end-to-end tests train:
  python -m pytest tests/test_train.py
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
  c = _base["get_config"]()
  c.data.name = "digits"
  c.model.gamma_min = -7.0
  c.model.channels = 8
  c.model.num_blocks = 1
  c.model.fourier_exponents = (6,)
  c.model.dropout = 0.0
  c.model.schedule_hidden = 16
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 2
  c.optim.ema_decay = 0.99
  c.training.batch_size = 8
  c.training.num_steps = 4
  c.training.log_every = 2
  c.training.eval_every = 4
  c.training.sample_every = 4
  c.training.checkpoint_every = 2
  c.eval.batch_size = 16
  c.eval.max_examples = 32
  c.sample.num_steps = 8
  c.sample.num_images = 8
  return c
