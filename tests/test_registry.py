"""Tests for vdm_jax.core.registry: names in, objects out, errors that list what is registered."""

import pytest

from vdm_jax.core import registry


def test_register_get_iterate_and_unregister():
  r = registry.Registry("widget")
  marker = object()
  assert r.register("a", marker) is marker
  r.register("b", 2)
  assert r.get("a") is marker and r.get("b") == 2
  assert r.names() == ("a", "b") and list(r) == ["a", "b"] and len(r) == 2
  assert "a" in r and "c" not in r and 3 not in r
  assert r.unregister("a") is marker
  assert r.names() == ("b",)


def test_unknown_name_lists_the_registered_ones():
  r = registry.Registry("widget")
  r.register("alpha", 1)
  r.register("beta", 2)
  with pytest.raises(ValueError,
                     match=r"unknown widget 'gamma'; expected one of \('alpha', 'beta'\)"):
    r.get("gamma")
  with pytest.raises(ValueError, match="unknown widget None"):
    r.get(None)
  with pytest.raises(ValueError, match="unknown widget 'gamma'"):
    r.unregister("gamma")


def test_a_name_is_taken_until_replaced():
  r = registry.Registry("widget")
  r.register("a", 1)
  with pytest.raises(ValueError, match="'a' is already registered; pass replace=True"):
    r.register("a", 2)
  assert r.get("a") == 1
  r.register("a", 2, replace=True)
  assert r.get("a") == 2
  for bad in ("", None, 3):
    with pytest.raises(ValueError, match="non-empty string"):
      r.register(bad, 1)
