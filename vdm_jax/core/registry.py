"""Named registries: where users plug in their own schedules, networks, samplers and data sets.

A registry maps a name (as written in a config, e.g. `model.schedule = "cosine"`) to an object.
Each kind has one, with a `register_*` / `get_*` pair in its own module:

  schedules.register_schedule / get_schedule      gamma(t) families (model.schedule)
  networks.register_network / get_network         score networks (model.network)
  sampling.register_sampler / get_sampler         reverse-process samplers (sample.sampler)
  data.register_dataset / get_dataset             data sets (data.name)

so a new one is one file (the object) and one line (its registration), as score_sde's
`register_predictor` and big_vision's model-by-name. An unknown name is a ValueError naming the
value and every registered name. Imports nothing from the library.
"""

from __future__ import annotations

from typing import Any, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """Objects of one kind by name, in registration order.

  Attributes:
    kind: what the names denote, for messages ("schedule", "sampler", ...).
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, T] = {}

  def register(self, name: str, value: T, *, replace: bool = False) -> T:
    """Registers `value` under `name` and returns it.

    Raises:
      ValueError: `name` is not a non-empty string, or is taken and `replace` is False.
    """
    if not isinstance(name, str) or not name:
      raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
    if name in self._entries and not replace:
      raise ValueError(f"{self.kind} {name!r} is already registered; pass replace=True to "
                       f"replace it")
    self._entries[name] = value
    return value

  def unregister(self, name: str) -> T:
    """Removes `name` (e.g. at the end of a test) and returns what it held."""
    return self._entries.pop(self._check(name))

  def get(self, name: Any) -> T:
    """The object registered under `name`.

    Raises:
      ValueError: no such name (the message lists the registered names).
    """
    return self._entries[self._check(name)]

  def names(self) -> tuple[str, ...]:
    return tuple(self._entries)

  def _check(self, name: Any) -> str:
    if not isinstance(name, str) or name not in self._entries:
      raise ValueError(f"unknown {self.kind} {name!r}; expected one of {self.names()}")
    return name

  def __contains__(self, name: Any) -> bool:
    return isinstance(name, str) and name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(tuple(self._entries))

  def __len__(self) -> int:
    return len(self._entries)

  def __repr__(self) -> str:
    return f"Registry({self.kind!r}, {list(self._entries)})"
