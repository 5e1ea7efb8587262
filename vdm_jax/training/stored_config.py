"""A run directory's memory of its config: stored, compared on resume, checked against the
checkpoint's train state.

`check_workdir_config` refuses to resume a run directory with a different model or data config
(listing the fields that differ) unless `training.allow_config_change` is set; `store_config`
writes the config into the run directory, and `read_stored_config` reads it back (a damaged
file is named as such). `check_state_fits` is the restore's dry run: the new config's train
state against the checkpoint's tree of shapes, before anything in the run directory changes.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np

from vdm_jax.training import config_checks
from vdm_jax.storage import rundir

# Tasks whose score network changed in vdm_jax 0.2 (the official network: Fourier features
# sin/cos(2^n 2 pi z), output skip eps_hat = NN(z) + z); their runs from 0.1 are refused.
NETWORK_TASKS = ("vdm", "latent_vdm")
OLD_NETWORK = ("{workdir} was trained by vdm_jax 0.1, whose score network computes another "
               "function than this version's (0.2 made it the official VDM network: Fourier "
               "features sin/cos(2^n 2 pi z) and the output skip eps_hat = NN(z) + z), so its "
               "parameters cannot be used here; retrain it, or use vdm_jax 0.1 for this run")



CONFIG_FILE = rundir.CONFIG


def read_stored_config(workdir: str) -> dict[str, Any] | None:
  """The JSON stored in `workdir/config.json` ({"config_checks.pinned": ..., "config": ...}), or
  None where there is no such file.

  Raises:
    config_checks.ConfigError: the file exists but is damaged (not JSON, truncated, or without
      a "config" object); the message names the file.
  """
  path = rundir.join(workdir, CONFIG_FILE)
  if not rundir.exists(path):
    return None
  try:
    stored = json.loads(rundir.read_text(path))
  except (ValueError, UnicodeDecodeError) as e:   # JSONDecodeError is a ValueError
    raise config_checks.ConfigError(f"{path} is damaged (not valid JSON: {e}); restore it from a copy of the "
                      f"run, or train in a new --workdir") from e
  if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict):
    raise config_checks.ConfigError(f"{path} is damaged (no \"config\" object in it); restore it from a copy "
                      f"of the run, or train in a new --workdir")
  return stored


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """"field: old -> new" for each differing field of two flattened configs."""
  return [f"{k}: {old.get(k, '<missing>')!r} -> {new.get(k, '<missing>')!r}"
          for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str, *,
                         write: bool = True) -> dict[str, Any] | None:
  """Compares `config` with the one stored in `workdir/config.json`; stores it if `write`.

  The trainer calls it with write=False and stores the config (`store_config`) only once the
  first checkpoint under it is written, so that a refused or failed start never changes what the
  run directory says about its checkpoints.

  Returns:
    The stored JSON (see `read_stored_config`), or None for a directory without config.json.

  Raises:
    config_checks.ConfigError: config.json is damaged, or the stored run used different
      model/data fields (each listed with both values) and `training.allow_config_change` is
      False.
  """
  stored = read_stored_config(workdir)
  if stored is not None:
    old, new = stored.get("config_checks.pinned", {}), config_checks.pinned(config)
    if old.get("task", "vdm") in NETWORK_TASKS and "model.norm_groups" not in old:
      raise config_checks.ConfigError(OLD_NETWORK.format(workdir=workdir))
    diff = config_diff(old, new)
    if diff and not config.training.allow_config_change:
      raise config_checks.ConfigError(
          f"{workdir} holds a run with a different config; differing fields:\n  "
          + "\n  ".join(diff)
          + "\nUse another --workdir, or pass --config.training.allow_config_change=True.")
  if write:
    store_config(config, workdir)
  return stored


def store_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes `workdir/config.json` atomically (`rundir.write_json`)."""
  rundir.write_json(rundir.join(workdir, CONFIG_FILE),
                    {"config_checks.pinned": config_checks.pinned(config),
                     "config": json.loads(config.to_json())})


# The config sections whose fields can change the train state's structure (and so are named when
# a state does not fit a run's checkpoint).
STATE_SECTIONS = ("task", "data", "model", "vae", "latent", "optim")
Leaves = dict[tuple[str, ...], tuple[tuple[int, ...], str]]   # key path -> (shape, dtype)


def leaf_table(tree: Any) -> Leaves:
  """{key path as strings: (shape, dtype name)} of a tree of arrays, abstract arrays or orbax
  array metadata (dict keys, attribute names and sequence indices all become strings)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      keys = tuple(str(next((getattr(k, a) for a in ("key", "idx", "name") if hasattr(k, a)), k))
                   for k in path)
      out[keys] = (tuple(int(n) for n in leaf.shape), _dtype_name(leaf.dtype))
  return out


def _dtype_name(dtype: Any) -> str:
  try:
    return np.dtype(dtype).name
  except TypeError:   # extended dtypes (PRNG keys)
    return str(dtype)


def _leaf_line(path: tuple[str, ...], old: Any, new: Any) -> str:
  name = "/".join(path)
  if old is None:
    return f"{name}: only in the new config's state {new[0]} {new[1]}"
  if new is None:
    return f"{name}: only in the checkpoint {old[0]} {old[1]}"
  return f"{name}: checkpoint {old[0]} {old[1]}, new config {new[0]} {new[1]}"


def check_state_fits(new: Leaves, stored: Leaves, *, step: int, config: ml_collections.ConfigDict,
                     stored_config: dict[str, Any] | None, workdir: str,
                     max_lines: int = 8) -> None:
  """Refuses a config whose train state does not fit the run's checkpoint: the same key paths,
  shapes and dtypes (the dry run of a restore, before anything in the run directory changes).

  Args:
    new: the new config's abstract train state, as {key path: (shape, dtype name)}.
    stored: the same for the checkpoint of `step`.
    config: the new config; stored_config: the run's config.json (None if there is none).

  Raises:
    config_checks.ConfigError: naming the config fields that differ from config.json (model, optimiser, data)
      and the first `max_lines` leaves that differ.
  """
  diff = [_leaf_line(k, stored.get(k), new.get(k)) for k in sorted(set(stored) | set(new))
          if stored.get(k) != new.get(k)]
  if not diff:
    return
  shown = diff[:max_lines] + ([f"... and {len(diff) - max_lines} more"]
                              if len(diff) > max_lines else [])
  if stored_config is None:
    fields = ["(the run has no config.json to compare with)"]
  else:
    old, now = config_checks.flat_config(stored_config["config"]), config_checks.flat_config(config)
    fields = [line for line in config_diff(old, now)
              if line.split(".")[0].split(":")[0] in STATE_SECTIONS] or [
                  "(none of the model / optimiser / data fields differ from config.json)"]
  raise config_checks.ConfigError(
      f"{workdir}: the train state of this config does not fit the run's checkpoint of step "
      f"{step}, so the run cannot continue with it (nothing was changed). Config fields that "
      f"differ from the run's config.json:\n  " + "\n  ".join(fields)
      + f"\nTrain state leaves that differ ({len(diff)}):\n  " + "\n  ".join(shown)
      + "\nRevert these fields, or train in a new --workdir.")
