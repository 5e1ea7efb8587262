"""Device mesh, shardings and multi-host start: one code path from 1 CPU to a TPU pod.

The trainer jits its step over a 1-D mesh with axis "data": the batch is split over it, the train
state is replicated. Each process feeds only its own rows of the global batch
(`jax.make_array_from_process_local_data`), so the same code runs on N hosts. `jit` adds the
backend's XLA compiler options (`compiler_options`: on CPU, convolutions outside YNNPACK).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import warnings
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

# XLA:CPU hands some fusions to the YNNPACK library. Its convolution kernel-gradient runs at about
# a quarter of XLA's own (Eigen) one on x86 (60 vs 240 GFLOP/s on the U-Net's 3x3, 128-channel
# layer), so the library's programs keep YNNPACK for dots and reductions only: the paper
# CIFAR-10 train step goes from 12.5 s to 6.2 s at batch 8 (experiments/conv_libraries.py,
# docs/performance.md). The best list depends on the network (the 32-channel digits net is faster
# without REDUCE), so a config chooses it (config.xla.cpu_ynn_fusion_type, applied with
# `cpu_ynn_fusions`).
CPU_YNN_FUSION_TYPE = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
CPU_OPTIONS_ENV = "VDM_JAX_XLA_CPU_YNN_FUSION_TYPE"
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_FUSION_LIST = re.compile(r"LIBRARY_FUSION_TYPE_[A-Z_]+(,LIBRARY_FUSION_TYPE_[A-Z_]+)*")
FUSION_LIST_EXPECTED = ("'default' (XLA's choice) or a comma-separated list of "
                        f"LIBRARY_FUSION_TYPE_* names, e.g. {CPU_YNN_FUSION_TYPE!r}")
_chosen_fusions: list[str] = []   # innermost `cpu_ynn_fusions` last; process-wide (any thread)


DISTRIBUTED_MODES = ("off", "auto", "explicit")


def initialize_distributed(mode: str = "explicit", *, coordinator_address: str = "",
                           num_processes: int = 1, process_id: int = 0,
                           cpu_collectives: str = "gloo") -> None:
  """Starts multi-process JAX (`jax.distributed.initialize`); a no-op if already started or
  `mode` is "off".

  "auto": `jax.distributed.initialize()` with no arguments, so that JAX finds the coordinator,
  the process count and this process's id itself, on TPU pods, SLURM, Open MPI and Kubernetes
  (what every host of a pod or a cluster job runs unchanged). "explicit": the given
  `coordinator_address` ("host:port"), `num_processes` and `process_id`. On CPU the
  cross-process collectives need an implementation ("gloo"); accelerators ignore it.
  """
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f"distributed mode {mode!r}: expected one of {DISTRIBUTED_MODES}")
  if mode == "explicit" and (num_processes < 1 or not 0 <= process_id < num_processes):
    raise ValueError(f"expected 0 <= process_id < num_processes, got process_id={process_id}, "
                     f"num_processes={num_processes}")
  if mode == "off" or jax.distributed.is_initialized():
    return
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  if mode == "auto":
    jax.distributed.initialize()
  else:
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


@functools.cache
def _checked_cpu_options(value: str, explicit: bool) -> dict[str, str] | None:
  options = {_YNN_OPTION: value}
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
  except Exception as e:  # pylint: disable=broad-except
    if explicit:
      raise ValueError(f"the YNNPACK fusion list {value!r} ({CPU_OPTIONS_ENV} or "
                       f"xla.cpu_ynn_fusion_type) is not accepted by this XLA:CPU ({e}); "
                       f"expected 'default' (XLA's own choice) or a comma-separated list of "
                       f"LIBRARY_FUSION_TYPE_* names, e.g. {CPU_YNN_FUSION_TYPE!r}") from None
    warnings.warn(f"this jaxlib does not accept the XLA:CPU option {_YNN_OPTION} ({e}); the "
                  f"library's jits use XLA's defaults (slower convolution gradients on CPU)")
    return None
  return options


def default_cpu_options() -> dict[str, str] | None:
  """The library's XLA:CPU options, whatever the environment says (None if jaxlib rejects them)."""
  return _checked_cpu_options(CPU_YNN_FUSION_TYPE, False)


def is_cpu_ynn_fusion_type(value: object) -> bool:
  """Whether `value` reads as a YNNPACK fusion list: "default" (XLA's own choice) or
  comma-separated LIBRARY_FUSION_TYPE_* names, no spaces (XLA itself judges the names)."""
  return isinstance(value, str) and (value == "default" or bool(_FUSION_LIST.fullmatch(value)))


@contextlib.contextmanager
def cpu_ynn_fusions(value: str):
  """Within: the library's programs compiled for CPU (`jit`) hand fusions of the kinds in
  `value` to YNNPACK ("default": XLA's own choice), unless VDM_JAX_XLA_CPU_YNN_FUSION_TYPE is
  set. Process-wide (a compilation in another thread sees it too); nests. The trainer, the
  benchmark and the commands on a run directory apply their config's xla.cpu_ynn_fusion_type.

  Raises:
    ValueError: `value` is not a fusion list (`is_cpu_ynn_fusion_type`).
  """
  if not is_cpu_ynn_fusion_type(value):
    raise ValueError(f"xla.cpu_ynn_fusion_type={value!r}: expected {FUSION_LIST_EXPECTED}")
  _chosen_fusions.append(value)
  try:
    yield
  finally:
    _chosen_fusions.pop()


def compiler_options(backend: str | None = None) -> dict[str, str] | None:
  """XLA compiler options for the library's jitted programs on `backend` (default: JAX's).

  On CPU, the YNNPACK fusion list: the environment variable VDM_JAX_XLA_CPU_YNN_FUSION_TYPE if
  set, else the innermost `cpu_ynn_fusions`, else `CPU_YNN_FUSION_TYPE` (dots and reductions,
  not convolutions); "default" keeps XLA's own choice. None (XLA's defaults) on GPU/TPU. A list
  XLA rejects is a ValueError when chosen (environment, config), a warning for the built-in one.
  """
  if (backend or jax.default_backend()) != "cpu":
    return None
  value = os.environ.get(CPU_OPTIONS_ENV)
  explicit = value is not None or bool(_chosen_fusions)
  if value is None:
    value = _chosen_fusions[-1] if _chosen_fusions else CPU_YNN_FUSION_TYPE
  if value == "default":
    return None
  return _checked_cpu_options(value, explicit)


def jit(fun: Callable, **kwargs) -> Any:
  """`jax.jit(fun, **kwargs)` with this backend's `compiler_options()`.

  The library's train, eval and sampling programs use it. The forward passes gain less than the
  train step (on CPU, digits net: eval 1.5x, sampling 1.5x; CIFAR-10 net: eval 1.0x, sampling
  0.93x; experiments/benchmark.py with and without the options).
  """
  return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
