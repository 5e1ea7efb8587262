"""Device mesh, shardings and multi-host start: one code path from 1 CPU to a TPU pod.

The trainer jits its step over a 1-D mesh with axis "data": the batch is split over it, the train
state is replicated. Each process feeds only its own rows of the global batch
(`jax.make_array_from_process_local_data`), so the same code runs on N hosts.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed(*, coordinator_address: str, num_processes: int, process_id: int,
                           cpu_collectives: str = "gloo") -> None:
  """Starts multi-process JAX (`jax.distributed.initialize`); a no-op if already started.

  On CPU the cross-process collectives need an implementation ("gloo"); accelerators ignore it.
  """
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"expected 0 <= process_id < num_processes, got process_id={process_id}, "
                     f"num_processes={num_processes}")
  if jax.distributed.is_initialized():
    return
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over the first `num_devices` global devices (all by default), axis "data"."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if not 1 <= n <= len(devices):
    raise ValueError(f"expected 1 <= num_devices <= {len(devices)}, got {num_devices}")
  return Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the "data" axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global arrays from this process's rows of the batch (rows ordered by process index)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree of host arrays replicated on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))
