"""What the experiment scripts share: their argument parsers, configs and runs loaded as the
package loads them, and the tails that write their results (markdown tables, CSV, JSON, figures).

A script imports it as a sibling module, `import common`: Python puts the folder of the script it
runs (`python experiments/x.py`) first on the module search path.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
from typing import Any, Iterable, Mapping, Sequence

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from vdm_jax.datasets import data
from vdm_jax.training import runs

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---- argument parsers ----


def parser(doc: str, *, paragraph: bool = False, whole: bool = False) -> argparse.ArgumentParser:
  """An argument parser described by the script's docstring: its first line (default), its
  first paragraph (`paragraph`), or all of it, laid out as written (`whole`)."""
  if whole:
    return argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawTextHelpFormatter)
  return argparse.ArgumentParser(
      description=doc.split("\n\n")[0] if paragraph else doc.splitlines()[0])


def add_run_args(p: argparse.ArgumentParser, *, workdir: str | None = "runs/digits",
                 checkpoint: bool = False) -> argparse.ArgumentParser:
  """--workdir (a run directory; required where `workdir` is None) and, with `checkpoint`,
  --checkpoint (a step of it; default: the newest)."""
  if workdir is None:
    p.add_argument("--workdir", required=True)
  else:
    p.add_argument("--workdir", default=workdir)
  if checkpoint:
    p.add_argument("--checkpoint", type=int, default=None)
  return p


# ---- configs and runs ----


def config_file(name: str) -> str:
  """configs/<name>.py of this repository for a bare name ("digits"); a path as given."""
  if name.endswith(".py") or os.sep in name:
    return name
  return str(ROOT / "configs" / f"{name}.py")


def load_config(name: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config as `vdm-jax train --config FILE --config.a.b=v ...` loads it (the same
  ml_collections config-file flag, locked: fields can be changed, not added).

  Args:
    name: a config name ("digits": configs/digits.py) or a path to a config file.
    overrides: "a.b=v" strings, each parsed by the type of field a.b as on the command line.
  """
  argv = ["experiment", f"--config={config_file(name)}", *(f"--config.{o}" for o in overrides)]
  values = flags.FlagValues()   # the flag reads its overrides from argv when it is parsed
  config_flags.DEFINE_config_file("config", None, "a config file", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def load_run(workdir: str, *, checkpoint: int | None = None) -> runs.Run:
  """The run in `workdir` at `checkpoint` (default: its newest), as `vdm-jax eval` loads it."""
  return runs.load_run(workdir, step=checkpoint)


def split_images(name: str, *, split: str = "test", max_examples: int | None = None) -> np.ndarray:
  """int32 [N, H, W, C] images of a data set's split (the first `max_examples` if given)."""
  images = np.asarray(data.get_source(name, split=split).images, np.int32)
  return images[:max_examples] if max_examples else images


def per_image_bound(model, images: np.ndarray, steps: int, *, t_samples: int,
                    seed: int = 0) -> np.ndarray:
  """[N] the T-step bound (`elbo.elbo_terms`) of each integer image [N, H, W, C] in bits: the
  mean of t_samples one-sample estimates. `model`: a `compress_app.Model` (eps_fn, gamma_fn,
  vocab_size)."""
  import jax   # pylint: disable=g-import-not-at-top  (not every script needs jax)
  from vdm_jax.maths import elbo   # pylint: disable=g-import-not-at-top
  x = jax.numpy.asarray(images, jax.numpy.int32)
  fn = jax.jit(lambda key: elbo.elbo_terms(
      key, x, eps_fn=model.eps_fn, gamma_fn=model.gamma_fn, vocab_size=model.vocab_size,
      num_steps=steps).total)
  keys = jax.random.split(jax.random.PRNGKey(seed), t_samples)
  return np.asarray(jax.lax.map(fn, keys), np.float64).mean(0) / np.log(2.0)


def denoiser(run: runs.Run):
  """(eps_fn, gamma_fn) of an unconditional run: eps_hat(z, gamma) and its schedule."""
  eps_fn, gamma_fn, _, _ = run.task.sampler_fns(run.params, run.frozen, None)
  return eps_fn, gamma_fn


# ---- output tails ----


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  """A markdown table: the header, the separator and one line per row of cells."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], *,
              fieldnames: Sequence[str] | None = None, **writer_options) -> None:
  """rows as CSV with a header (default fields: the first row's keys); makes the folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(fieldnames or rows[0]), **writer_options)
    writer.writeheader()
    writer.writerows(rows)


def write_text(path: str | os.PathLike, text: str) -> None:
  """text to a file; makes the folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def write_json(path: str | os.PathLike, value: Any, **dump_options) -> None:
  """value as JSON (json.dump options, e.g. indent); makes the folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(value, f, **dump_options)


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend (imported late: it is slow to import)."""
  import matplotlib   # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt   # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 120, close: bool = False) -> None:
  """tight_layout, then the figure to `path` (closed after, with `close`); makes the folder."""
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi)
  if close:
    pyplot().close(fig)
