"""The configs of vdm_jax, `get_config()` files, installed with the package as `vdm_jax.configs`:
a machine without the source tree (a pod's host, a wheel install) has them too, and
`vdm-jax train --config cifar10` names one.

Each file's docstring says what it is, its launch command and its expected result.
"""

from __future__ import annotations

import importlib.resources
import runpy

import ml_collections


def names() -> list[str]:
  """The names of the shipped configs ("base", "cifar10", "digits", ...)."""
  return sorted(entry.name[:-3] for entry in importlib.resources.files(__name__).iterdir()
                if entry.name.endswith(".py") and not entry.name.startswith("_"))


def path(name: str) -> str:
  """The file of the shipped config `name` ("cifar10" or "cifar10.py").

  Raises:
    ValueError: no shipped config has that name (the message lists them).
  """
  stem = name[:-3] if name.endswith(".py") else name
  if stem not in names():
    raise ValueError(f"no config named {name!r} ships with vdm_jax; expected one of {names()} "
                     f"or the path of a config file")
  return str(importlib.resources.files(__name__).joinpath(stem + ".py"))


def get(name: str) -> ml_collections.ConfigDict:
  """`get_config()` of the shipped config `name`."""
  return runpy.run_path(path(name))["get_config"]()
