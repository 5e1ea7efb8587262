"""Argument validators shared by the whole library (each check written once).

Every public function validates its hyperparameters on the host, before tracing, and raises a
ValueError that names the argument, the expectation and the value received. Imports NumPy only,
so the maths modules can use it.
"""

from __future__ import annotations

import math
from typing import Any, Collection

import numpy as np


def check_number(name: str, value: Any, *, integer: bool = False, low: float | None = None,
                 high: float | None = None, strict: bool = False) -> Any:
  """`value` as int (integer=True) or float, if it is a finite number in [low, high].

  Args:
    name: the argument's name, for the message.
    value: a Python or NumPy number (bools are refused).
    integer: require an integer.
    low, high: inclusive bounds (None: unbounded); `strict` makes the lower bound exclusive.

  Raises:
    ValueError: "expected {name} to be an integer >= 1, got 0" and the like.
  """
  kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
  ok = isinstance(value, kinds) and not isinstance(value, bool) and bool(np.isfinite(value))
  ok = ok and (low is None or value > low or (not strict and value == low))
  if not (ok and (high is None or value <= high)):
    bounds = "" if low is None else (f" > {low}" if strict else f" >= {low}")
    bounds += "" if high is None else f" and <= {high}"
    kind = "an integer" if integer else "a finite number"
    raise ValueError(f"expected {name} to be {kind}{bounds}, got {value!r}")
  return int(value) if integer else float(value)


def check_choice(kind: str, value: Any, allowed: Collection[str]) -> str:
  """`value` if it is one of `allowed`.

  Raises:
    ValueError: "unknown {kind} {value!r}; expected one of {allowed}".
  """
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(f"unknown {kind} {value!r}; expected one of {tuple(allowed)}")
  return value


# Predicates for values read from configs (no exception: the config checks collect every field).


def is_bool(value: Any) -> bool:
  return isinstance(value, bool)


def is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def int_at_least(value: Any, low: int) -> bool:
  return is_int(value) and value >= low


def number_in(value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
              high_open: bool = True) -> bool:
  """A finite number in the interval from `low` to `high` (open or closed ends)."""
  if not is_number(value):
    return False
  above = value > low if low_open else value >= low
  below = value < high if high_open else value <= high
  return above and below
