"""The environment that points this process's storage clients at a local server."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping


@contextlib.contextmanager
def client_environment(env: Mapping[str, str]) -> Iterator[None]:
  """Within: os.environ updated with `env`, and the file systems of vdm_jax.storage.rundir made
  anew for it (fsspec caches its clients); afterwards both as they were."""
  from vdm_jax.storage import rundir  # pylint: disable=import-outside-toplevel
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  rundir.reset_filesystems()
  try:
    yield
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    rundir.reset_filesystems()
