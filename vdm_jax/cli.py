"""`vdm-jax train | eval | sample | bench | import-official | compress | decompress`: flag
parsing and a call, nothing else::

  vdm-jax train --config configs/digits.py --workdir runs/digits [--config.training.num_steps=100]
  vdm-jax eval --workdir runs/digits [--checkpoint 3000] [--num_steps 1000] [--t_samples 4]
  vdm-jax sample --workdir runs/digits --sampler ddim --steps 100 --num 64 [--out DIR]
      [--label 3 --guidance 1.0] [--classifier_workdir runs/digits_classifier]
  vdm-jax bench --config configs/smoke.py [--batch 8] [--steps 10] [--sample_steps 2]
  vdm-jax import-official --checkpoint PATH --config configs/cifar10.py --workdir DIR
  vdm-jax compress --workdir runs/digits [--checkpoint S] [--num_steps T] [--coder float]
      --input test --out F
  vdm-jax decompress --workdir runs/digits F --out DIR
  vdm-jax launch tpu-pod|slurm|local --config C --workdir gs://B/R [--config.F=V] [--name ...]

Exit status: 0 done; 2 bad input (a ValueError: `ConfigError`, `RunError`, ...), printed as one
`error: ...` line on stderr without a traceback, by every command; 1 any other failure (with its
traceback). `train` stopped by a signal: 3 after SIGTERM (`run_control.EXIT_PREEMPTED`: the
state was saved, or there was nothing new to save before the first step; rerun the same command
to resume) and 130 after SIGINT / Ctrl-C (`run_control.EXIT_INTERRUPTED`, saved likewise).
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples.")
# eval
flags.DEFINE_integer("checkpoint", None, "eval/sample: checkpoint step (default: the newest).")
flags.DEFINE_string("official_checkpoint", None, "import-official: the official checkpoint "
                    "(also accepted as --checkpoint PATH).")
flags.DEFINE_integer("num_steps", None, "eval: T of the bound (0 = continuous; default: config); "
                     "compress: T of the coded chain (default: the model's T, else 1000).")
flags.DEFINE_integer("t_samples", None, "eval: time samples per image (default: config).")
flags.DEFINE_integer("max_examples", None, "eval: evaluate only the first N examples.")
flags.DEFINE_string("split", None, "eval: data split (default: test, or validation where the "
                    "data set has no test split).")
flags.DEFINE_integer("batch_size", None, "eval: batch size; sample: images per compiled batch; "
                     "compress: the largest batch coded together (default 256).")
flags.DEFINE_bool("ode", False, "eval: also the probability-flow ODE bound (slower).")
flags.DEFINE_string("ode_method", "rk45", "eval --ode: rk45 | rk23 (adaptive) | heun | euler.")
flags.DEFINE_integer("ode_max_examples", 200, "eval --ode: examples for the ODE bound.")
flags.DEFINE_integer("seed", 0, "eval/sample: random seed.")
# sample
flags.DEFINE_string("sampler", "ancestral", "sample: ancestral | ddim | ode | langevin | pc | ...")
flags.DEFINE_integer("steps", None, "sample: reverse steps (langevin: noise levels; default "
                     "1000); bench: timed train steps (default 10).")
flags.DEFINE_integer("num", 64, "sample: number of samples.")
flags.DEFINE_string("out", None, "eval: JSON path; sample: output directory "
                    "(default: inside the workdir); compress: the file; decompress: a new folder.")
flags.DEFINE_integer("label", None, "sample: class to draw (conditional model or classifier).")
flags.DEFINE_float("guidance", 0.0, "sample: guidance weight w >= 0.")
flags.DEFINE_enum("ddpm_variance", "beta", ["beta", "posterior"],
                  "sample --sampler ddpm: sigma_t^2 = beta_t or the posterior variance.")
flags.DEFINE_string("classifier_workdir", None, "sample: a classifier run for classifier guidance.")
# bench
flags.DEFINE_integer("batch", None, "bench: batch size (default: the config's).")
flags.DEFINE_integer("sample_steps", None, "bench: ancestral sampling steps timed, then scaled "
                     "to 1000 (default: bench.SAMPLE_STEPS, a few).")
# compress
flags.DEFINE_string("input", None, "compress: 'test' (the run's test split; any split name), a "
                    ".npy / .npz of integer images, a PNG photograph of any size (tiled into "
                    "the model's patches) or a folder of them.")
flags.DEFINE_integer("grid_bits", 4, "compress: latents on a grid of 2^-grid_bits of each level's "
                     "smallest standard deviation.")
flags.DEFINE_integer("window", 6, "compress: coding windows of +- window standard deviations.")
flags.DEFINE_enum("coder", "portable", ["portable", "float"], "compress: 'portable' (an integer "
                  "network, made and stored in the run directory on first use: the file decodes "
                  "on any machine) or 'float' (a little smaller; decodes only on a machine that "
                  "computes the network's float bits exactly as this one).")

# logging
flags.DEFINE_bool("library_logs", False, "Show the INFO logs of the libraries (orbax's dozens of "
                  "lines per checkpoint, jax's backend probing); their warnings always show.")

# Loggers of the libraries whose INFO records drown the trainer's own lines (orbax logs through
# absl's logger "absl"; jax through "jax.*"). This project's modules log through the root logger.
LIBRARY_LOGGERS = ("absl", "jax")
# Object-storage clients log each request they give up on, with a traceback, at ERROR level; the
# command reports the failure itself in one line (`rundir.StorageError`), so theirs are hidden
# unless --library_logs. google.auth warns of each credential source it does not find (no
# metadata server off Google Cloud) before gcsfs goes on anonymously; a request that then needs
# credentials fails with its own error.
STORAGE_CLIENT_LOGGERS = ("gcsfs", "fsspec", "s3fs", "aiohttp", "google.auth")

COMMANDS = ("train", "eval", "sample", "bench", "import-official", "compress", "decompress",
            "launch")


def _need(command: str, *names: str) -> None:
  missing = [n for n in names if getattr(FLAGS, n) is None]
  if missing:
    raise app.UsageError(f"{command} needs " + " and ".join(f"--{n}" for n in missing))


def _train(argv):
  del argv
  _need("train", "config", "workdir")
  from vdm_jax.training import train
  result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if "exit_status" in result:   # stopped by SIGTERM / SIGINT
    if result.get("abandoned_compilation"):
      # A compilation is still running in another thread: the interpreter cannot shut down
      # cleanly around it (a crash at exit), and there is nothing left to save or flush.
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(result["exit_status"])
    sys.exit(result["exit_status"])


def _eval(argv):
  del argv
  _need("eval", "workdir")
  from vdm_jax.apps import evaluation
  evaluation.run_eval(FLAGS.workdir, checkpoint=FLAGS.checkpoint, num_steps=FLAGS.num_steps,
                      t_samples=FLAGS.t_samples, max_examples=FLAGS.max_examples,
                      split=FLAGS.split, batch_size=FLAGS.batch_size, out=FLAGS.out,
                      seed=FLAGS.seed, ode=FLAGS.ode, ode_method=FLAGS.ode_method,
                      ode_max_examples=FLAGS.ode_max_examples)


def _sample(argv):
  del argv
  _need("sample", "workdir")
  from vdm_jax.apps import evaluation
  evaluation.run_sample(FLAGS.workdir, sampler=FLAGS.sampler,
                        steps=1000 if FLAGS.steps is None else FLAGS.steps, num=FLAGS.num,
                        out=FLAGS.out, label=FLAGS.label, guidance=FLAGS.guidance,
                        classifier_workdir=FLAGS.classifier_workdir,
                        checkpoint=FLAGS.checkpoint, seed=FLAGS.seed,
                        batch_size=256 if FLAGS.batch_size is None else FLAGS.batch_size,
                        **({"variance": FLAGS.ddpm_variance} if FLAGS.sampler == "ddpm" else {}))


def _bench(argv):
  del argv
  _need("bench", "config")
  from vdm_jax.apps import bench
  sample = {} if FLAGS.sample_steps is None else {"sample_steps": FLAGS.sample_steps}
  bench.main(FLAGS.config, batch_size=FLAGS.batch, steps=10 if FLAGS.steps is None else FLAGS.steps,
             out_path=FLAGS.out, **sample)


def _import_official(argv):
  del argv
  _need("import-official", "official_checkpoint", "config", "workdir")
  from vdm_jax.official import official_import
  out = official_import.import_official(FLAGS.official_checkpoint, FLAGS.config, FLAGS.workdir)
  print(f"imported step {out['step']} ({out['num_params']:,} parameters) into {out['workdir']}; "
        f"next: vdm-jax eval --workdir {out['workdir']}", flush=True)


def _compress(argv):
  if len(argv) > 1:
    raise app.UsageError(f"compress takes no positional arguments, got {argv[1:]}")
  _need("compress", "workdir", "input", "out")
  from vdm_jax.compression import compress_app
  compress_app.compress_run(FLAGS.workdir, source=FLAGS.input, out=FLAGS.out,
                            checkpoint=FLAGS.checkpoint, num_steps=FLAGS.num_steps,
                            grid_bits=FLAGS.grid_bits, window=FLAGS.window,
                            max_batch=256 if FLAGS.batch_size is None else FLAGS.batch_size,
                            coder=FLAGS.coder)


def _decompress(argv):
  if len(argv) != 2:
    raise app.UsageError("decompress takes one file: vdm-jax decompress --workdir RUN FILE --out "
                         "DIR")
  _need("decompress", "workdir", "out")
  from vdm_jax.compression import compress_app
  compress_app.decompress_run(FLAGS.workdir, argv[1], out=FLAGS.out, checkpoint=FLAGS.checkpoint)


def _shipped_config(argv: list[str]) -> list[str]:
  """`--config NAME` (no such file, but a config shipped in `vdm_jax.configs`, e.g. "cifar10")
  -> that config's file, so a machine without the source tree can name it."""
  from vdm_jax import configs   # pylint: disable=import-outside-toplevel
  from vdm_jax.storage import rundir   # pylint: disable=import-outside-toplevel
  out = list(argv)
  for i, arg in enumerate(out):
    value = arg[len("--config="):] if arg.startswith("--config=") else (
        out[i + 1] if arg == "--config" and i + 1 < len(out) else None)
    if value is None or rundir.exists(value) or value.split(".py")[0] not in configs.names():
      continue
    if arg == "--config":
      out[i + 1] = configs.path(value)
    else:
      out[i] = "--config=" + configs.path(value)
  return out


def _official_checkpoint_flag(argv: list[str]) -> list[str]:
  """import-official takes a path in --checkpoint (an integer flag for eval/sample)."""
  out = []
  for arg in argv:
    if arg.startswith("--checkpoint="):
      out.append("--official_checkpoint=" + arg.split("=", 1)[1])
    elif arg == "--checkpoint":
      out.append("--official_checkpoint")
    else:
      out.append(arg)
  return out


def _friendly(fn):
  """Runs a command with the libraries' INFO logs hidden unless --library_logs; bad input
  (ValueError and its subclasses: ConfigError, RunError) -> one `error:` line on stderr and
  exit 2, no traceback; a failing storage (`rundir.StorageError`: a disk, a bucket) -> one
  `error:` line and exit 1."""
  def wrapped(argv):
    for name in LIBRARY_LOGGERS:
      std_logging.getLogger(name).setLevel(
          std_logging.NOTSET if FLAGS.library_logs else std_logging.WARNING)
    for name in STORAGE_CLIENT_LOGGERS:
      std_logging.getLogger(name).setLevel(
          std_logging.NOTSET if FLAGS.library_logs else std_logging.CRITICAL)
    from vdm_jax.storage import rundir
    try:
      fn(argv)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except rundir.StorageError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
  return wrapped


def _launch(argv: list[str]) -> None:
  """`vdm-jax launch TARGET --config C --workdir W [--config.FIELD=VALUE ...] [settings]`:
  prints the commands that start the config on TARGET (`vdm_jax.apps.launch`)."""
  import argparse  # pylint: disable=import-outside-toplevel
  from vdm_jax.apps import launch
  parser = argparse.ArgumentParser(prog="vdm-jax launch", description=launch.__doc__.split(
      "\n\n")[0])
  parser.add_argument("target", choices=launch.TARGETS)
  parser.add_argument("--config", required=True,
                      help="the config file as the hosts see it, or a packaged config's name")
  parser.add_argument("--workdir", required=True, help="the run directory (gs://... for pods)")
  defaults = launch.LaunchSpec("", "")
  for field in ("name", "zone", "accelerator", "version", "package", "nodes", "gpus_per_node",
                "per", "hours"):
    default = getattr(defaults, field)
    parser.add_argument(f"--{field}", type=type(default), default=default,
                        help=f"(default {default!r})")
  known, rest = parser.parse_known_args(argv)
  overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  spec = launch.LaunchSpec(**{k: v for k, v in vars(known).items() if k != "target"},
                           overrides=tuple(overrides))
  try:
    print(launch.recipe(known.target, spec), end="")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) >= 2 and argv[1] == "launch":   # prints commands: no JAX, no absl flags
    _launch(argv[2:])
    return
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print(f"usage: vdm-jax {{{'|'.join(COMMANDS)}}} [flags]   (vdm-jax COMMAND --help)",
          file=sys.stderr)
    sys.exit(2)
  command = argv.pop(1)
  if command == "import-official":
    argv = _official_checkpoint_flag(argv)
  argv = _shipped_config(argv)
  logging.set_verbosity(logging.INFO)
  commands = {"train": _train, "eval": _eval, "sample": _sample, "bench": _bench,
              "import-official": _import_official, "compress": _compress,
              "decompress": _decompress}
  app.run(_friendly(commands[command]), argv=argv)


if __name__ == "__main__":
  main()
