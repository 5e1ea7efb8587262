"""Starts gcp-storage-emulator with two behaviours of the real GCS JSON API that it lacks and that
TensorStore (Orbax's array store) relies on:

- a media download answers with the object's generation in `x-goog-generation` (and
  `x-goog-metageneration`): TensorStore reads it back to update OCDBT manifests, and fails with
  "Malformed StorageGeneration" without it (any checkpoint of more than a few dozen arrays);
- uploads and deletes honour the preconditions `ifGenerationMatch` / `ifGenerationNotMatch`
  (412 Precondition Failed otherwise), as GCS does: OCDBT's manifest updates are
  compare-and-swap writes.

usage: python -m vdm_jax.testing.gcs_emulator_server PORT BUCKET [--in-memory]
       (STORAGE_BASE: the folder of the objects when not in memory)
"""

import functools
from http import HTTPStatus
import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _generation(storage, bucket, name):
  try:
    return str(storage.get_file_obj(bucket, name).get("generation"))
  except NotFound:
    return None


def _preconditions_hold(request, storage, bucket, name) -> bool:
  current = _generation(storage, bucket, name)
  match = request.query.get("ifGenerationMatch")
  if match and match[0] != (current or "0"):
    return False
  not_match = request.query.get("ifGenerationNotMatch")
  return not (not_match and not_match[0] == (current or "0"))


def _object_name(request):
  name = request.params.get("object_id")
  if name is None:
    name = (request.query.get("name") or [None])[0]
  return name


def _with_preconditions(handler):
  @functools.wraps(handler)
  def wrapped(request, response, storage, *args, **kwargs):
    name = _object_name(request)
    if name is not None and not _preconditions_hold(request, storage,
                                                    request.params["bucket_name"], name):
      response.status = HTTPStatus.PRECONDITION_FAILED
      response.json({"error": {"code": 412, "message": "Precondition Failed"}})
      return None
    return handler(request, response, storage, *args, **kwargs)
  return wrapped


def _with_generation_headers(handler):
  @functools.wraps(handler)
  def wrapped(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
      obj = None
    if obj is not None:
      response["x-goog-generation"] = str(obj.get("generation"))
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return handler(request, response, storage, *args, **kwargs)
  return wrapped


def main():
  port, bucket = int(sys.argv[1]), sys.argv[2]
  in_memory = "--in-memory" in sys.argv[3:]
  patched = {objects.download: _with_generation_headers(_with_preconditions(objects.download)),
             objects.insert: _with_preconditions(objects.insert),
             objects.delete: _with_preconditions(objects.delete)}
  for original, replacement in patched.items():   # the module attribute (used as a fallback)
    setattr(objects, original.__name__, replacement)
  # The routing table holds the handler functions themselves.
  server.HANDLERS = tuple((regex, {method: patched.get(fn, fn) for method, fn in table.items()})
                          for regex, table in server.HANDLERS)
  server.create_server("127.0.0.1", port, in_memory=in_memory, default_bucket=bucket).run()


if __name__ == "__main__":
  main()
