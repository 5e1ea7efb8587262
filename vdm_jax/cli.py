"""`vdm-jax train | eval | sample | bench`: flag parsing and a call, nothing else.

  vdm-jax train --config configs/digits.py --workdir runs/digits [--config.training.num_steps=100]
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples.")

COMMANDS = ("train",)


def _train(argv):
  del argv
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError("train needs --config and --workdir")
  from vdm_jax import train   # imported late: keeps `--help` fast
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def main(argv=None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print(f"usage: vdm-jax {{{'|'.join(COMMANDS)}}} [flags]   (vdm-jax COMMAND --help)",
          file=sys.stderr)
    sys.exit(2)
  command = argv.pop(1)
  logging.set_verbosity(logging.INFO)
  app.run({"train": _train}[command], argv=argv)


if __name__ == "__main__":
  main()
