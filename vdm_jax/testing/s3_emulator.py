"""A local S3 server on loopback: moto's server mode (`moto[server]`, the `test` extra), in this
process, for `s3://` paths. The S3 counterpart of `gcs_emulator`, with the same API.

Everything that reads or writes `s3://` through botocore (s3fs, hence fsspec, etils.epath and
vdm_jax.storage.rundir) is pointed at it by the environment alone, and every credential look-up
beyond the environment is switched off, so that nothing leaves the machine:

  AWS_ENDPOINT_URL                 botocore (>= 1.31): the endpoint of every client, s3fs's too
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   fixed fake credentials: no credential search
  AWS_DEFAULT_REGION, AWS_REGION   a fixed region: no region look-up
  AWS_EC2_METADATA_DISABLED=true   no probe of the EC2 metadata server (IMDS)
  AWS_CONFIG_FILE, AWS_SHARED_CREDENTIALS_FILE   /dev/null: no profile in ~/.aws applies

TensorStore (what Orbax writes checkpoint arrays with) does not read AWS_ENDPOINT_URL: its `s3`
kvstore takes a custom endpoint only as the `endpoint` member of a spec, and for an
`s3://bucket/...` URL resolves the bucket's region at amazonaws.com. And Orbax (0.12.8) builds
no `s3` spec at all: checkpoints cannot be written to or read from `s3://`, here or on AWS
(docs/pods_and_clusters.md, tests/test_s3_runs.py).
"""

from __future__ import annotations

import contextlib
import os

from vdm_jax.testing import storage_env
from vdm_jax.testing.gcs_emulator import free_port

BUCKET = "vdm-test"
REGION = "us-east-1"


class Emulator:
  """moto's S3 on 127.0.0.1:`port` (a thread of this process, objects in memory), with the
  bucket `BUCKET`."""

  def __init__(self, *, port: int | None = None):
    self.port = port or free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._server = None

  @property
  def env(self) -> dict[str, str]:
    """The variables that point every botocore client at this server and off the cloud."""
    return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "vdm-test",
            "AWS_SECRET_ACCESS_KEY": "vdm-test", "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

  def start(self) -> "Emulator":
    import boto3  # pylint: disable=import-outside-toplevel
    from moto.server import ThreadedMotoServer  # pylint: disable=import-outside-toplevel
    self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
    self._server.start()   # returns once it listens
    boto3.client("s3", endpoint_url=self.url, region_name=REGION, aws_access_key_id="vdm-test",
                 aws_secret_access_key="vdm-test").create_bucket(Bucket=BUCKET)
    return self

  def stop(self) -> None:
    server, self._server = self._server, None
    if server is not None:
      server.stop()

  @contextlib.contextmanager
  def environment(self):
    """Within: this process's clients use the server (and the file systems of
    vdm_jax.storage.rundir are made anew for it)."""
    with storage_env.client_environment(self.env):
      yield self
