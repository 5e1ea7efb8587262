"""A real GCS JSON API on loopback: `gcp-storage-emulator` (the `test` extra) in a subprocess.

Everything that reads or writes `gs://` here is pointed at it, and every credential look-up is
switched off, so that nothing leaves the machine and nothing waits on a metadata server:

  STORAGE_EMULATOR_HOST            gcsfs (hence fsspec, etils.epath, vdm_jax.storage.rundir, tfds)
  TENSORSTORE_GCS_HTTP_URL         TensorStore (what Orbax writes arrays with)
  CLOUD_STORAGE_EMULATOR_ENDPOINT  the C++ GCS client of array_record (TFDS data read by grain)
  NO_GCE_CHECK=true                google-auth and gcsfs: no GCE metadata server probe
  GOOGLE_AUTH_TOKEN_FOR_TESTING    TensorStore: a fixed token, no credential search
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false   gcsfs: no gRPC probe of each bucket

It is started through `gcs_emulator_server.py`, which adds what TensorStore needs of the real
API (generation headers on downloads, enforced upload preconditions). The run lock needs neither
(only strongly consistent writes and listings, which a single-threaded server has).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

from vdm_jax.testing import storage_env

BUCKET = "vdm-test"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  """gcp-storage-emulator on 127.0.0.1:`port`, in memory or on disk under `storage_dir` (which
  survives `stop` / `start`, as a bucket survives a network outage)."""

  def __init__(self, *, storage_dir: str | None = None, port: int | None = None):
    self.storage_dir, self.port = storage_dir, port or free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._proc: subprocess.Popen | None = None

  @property
  def env(self) -> dict[str, str]:
    """The variables that point every client at this emulator and off the cloud."""
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url, "NO_GCE_CHECK": "true",
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "GOOGLE_CLOUD_PROJECT": "vdm-test"}

  def start(self, timeout: float = 60.0) -> "Emulator":
    args = [sys.executable, "-m", "vdm_jax.testing.gcs_emulator_server", str(self.port), BUCKET]
    env = dict(os.environ)
    if self.storage_dir is None:
      args.append("--in-memory")
    else:
      env["STORAGE_BASE"] = self.storage_dir
    self._proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}", timeout=1).read()
        return self
      except OSError:
        if self._proc.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"the GCS emulator did not start on {self.url}") from None
        time.sleep(0.05)

  def stop(self) -> None:
    proc, self._proc = self._proc, None
    if proc is not None and proc.poll() is None:
      proc.kill()
      proc.wait()

  @contextlib.contextmanager
  def environment(self):
    """Within: this process's clients use the emulator (and the file systems of
    vdm_jax.storage.rundir are made anew for it)."""
    with storage_env.client_environment(self.env):
      yield self
