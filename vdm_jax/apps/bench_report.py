"""The benchmark's report: a markdown table of `bench.run_benchmark` results and a JSON record
(results with the date, versions and machine)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from typing import Any, Sequence

import jax
import numpy as np

from vdm_jax.storage import rundir

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
