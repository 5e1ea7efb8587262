"""The benchmark's report: what XLA reports about a compiled program (FLOPs, memory), progress
lines while `bench.run_benchmark` runs (stderr), a markdown table of its results and a JSON record
(results with the date, versions and machine)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import sys
from typing import Any, Sequence

import jax
import numpy as np

from vdm_jax.storage import metrics, rundir

_COLUMNS = (  # (header, key, format)
    ("config", "name", "{}"), ("backend", "backend", "{}"), ("dtype", "dtype", "{}"),
    ("blocks", "block_impl", "{}"), ("params", "params", "{:,}"), ("batch", "batch_size", "{}"),
    ("compile (s)", "compile_s", "{:.1f}"), ("step (ms)", "step_s", "{:,.1f}"),
    ("train img/s", "train_images_per_s", "{:.4g}"), ("GFLOP/step", "flops_per_step", "{:.4g}"),
    ("GFLOP/s", "flops_per_s", "{:.3g}"), ("of conv ceiling", "fraction_of_conv_ceiling", "{:.0%}"),
    ("MFU", "mfu", "{:.1%}"), ("step mem (MiB)", "step_memory_mib", "{:,.0f}"),
    ("peak RSS (MiB)", "process_peak_rss_mib", "{:,.0f}"),
    ("data-fed / constant", "data_fed_fraction", "{:.2f}"), ("eval img/s", "eval_images_per_s",
                                                              "{:.4g}"),
    ("sample img/s (1000 steps)", "sample_images_per_s_1000", "{:.3g}"))
_SCALE = {"step_s": 1e3, "flops_per_step": 1e-9, "flops_per_s": 1e-9}


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs of a compiled program from XLA's cost analysis (a dict, or a list of dicts in some
  jax versions); None where the backend does not report them."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops is not None and flops > 0 else None


def compiled_memory(compiled: Any) -> dict[str, float | None]:
  """The compiled program's footprint (MiB) and the process / device peaks seen so far."""
  out: dict[str, float | None] = {"step_memory_mib": None, "step_temp_mib": None}
  try:
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    out.update(step_memory_mib=total / 2**20, step_temp_mib=m.temp_size_in_bytes / 2**20)
  except Exception:  # pylint: disable=broad-except
    pass
  out["process_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  out["device_peak_mib"] = None if peak is None else peak / 2**20
  return out


def say(message: str) -> None:
  """One progress line, `bench: <message>`, on stderr (stdout is left to the table)."""
  metrics.say("bench", message)


def progress_bar(total: int, *, unit: str = "step") -> metrics.ProgressBar:
  """The trainer's progress bar over `total` timed calls of `unit` (a train step, an eval
  batch, ...): one line per call in a log, an updating line on a terminal (the calls of the
  benchmark take up to seconds each)."""
  return metrics.ProgressBar(total=total, enabled=True, log_every=1, stream=sys.stderr,
                             unit=unit)


def format_markdown(results: dict | Sequence[dict]) -> str:
  """A markdown table, one row per result of `run_benchmark` (missing values shown as "-")."""
  rows = [results] if isinstance(results, dict) else list(results)
  cols = [c for c in _COLUMNS if any(r.get(c[1]) is not None for r in rows)]
  lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    cells = []
    for _, key, fmt in cols:
      v = r.get(key)
      cells.append("-" if v is None else fmt.format(v * _SCALE[key] if key in _SCALE else v))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def environment() -> dict[str, Any]:
  """Date, versions and machine, for the JSON next to the numbers."""
  return {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
          "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
          "num_devices": jax.device_count(), "cpu_count": os.cpu_count(),
          "machine": platform.machine(), "python": platform.python_version(),
          "command": " ".join(sys.argv)}


def write_json(path: str | os.PathLike, results: Any, **extra) -> rundir.Path:
  """Writes `{"environment", **extra, "results"}` as JSON to `path` (local or object storage)."""
  rundir.write_text(path, json.dumps({"environment": environment(), **extra, "results": results},
                                     indent=1, default=_jsonable))
  return rundir.as_path(path)


def _jsonable(x: Any) -> Any:
  return np.asarray(x).tolist() if isinstance(x, (np.generic, jax.Array)) else str(x)
