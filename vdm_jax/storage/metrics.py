"""Metric writers, a progress bar and image grids for the trainer.

- `MetricWriter`: one JSON object per line in `workdir/metrics.jsonl` (`{"step": s, ...}`,
  appended to on resume, as in big_vision) and TensorBoard event files in `workdir/tb`
  (tensorboardX's event format, no TensorFlow needed), local or in object storage
  (`rundir.AppendFile`), both written in the caller's thread so that a failing disk raises
  (JSONL) or turns TensorBoard off with one warning, never a hang. Only process 0 writes by
  default.
- `ProgressBar`: step, bpd, steps/s and ETA; a single updating line on a terminal, plain log
  lines every `log_every` steps otherwise (log files, pods).
- `image_grid` / `save_image_grid`: integer images in {0..K-1} -> one uint8 PNG.
"""

from collections.abc import Mapping
import json
import logging
import math
import os
import socket
import struct
import sys
import time
from typing import Any, TextIO

import jax
import numpy as np
from tensorboardX import summary as tb_summary
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from vdm_jax.storage import rundir

__all__ = ["MetricWriter", "MetricsWriteError", "ProgressBar", "image_grid", "save_image_grid"]

_log = logging.getLogger(__name__)

JSONL_NAME = rundir.METRICS
TB_SUBDIR = rundir.TB


def _now() -> float:
  return time.perf_counter()


class MetricsWriteError(OSError):
  """metrics.jsonl could not be written (e.g. the disk is full); the message names the file."""


class _EventFile:
  """TensorBoard scalar events in one event file of `directory` (tensorboardX's protos in
  TFRecord framing: length, its masked CRC-32C, the event, its masked CRC-32C), written through
  `rundir.AppendFile` so that the file lands wherever the run directory is."""

  def __init__(self, directory: str, *, flush_secs: float):
    file_name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self._file = rundir.AppendFile(rundir.join(directory, file_name), flush_secs=flush_secs)
    self.write_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def write_event(self, event: event_pb2.Event) -> None:
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    self._file.write(header + struct.pack("<I", masked_crc32c(header)) + data
                     + struct.pack("<I", masked_crc32c(data)))

  def flush(self, *, force: bool = True) -> None:
    self._file.flush(force=force)

  def close(self) -> None:
    self._file.close()


class MetricWriter:
  """Writes scalar metrics to `workdir/metrics.jsonl` and TensorBoard files in `workdir/tb`,
  wherever the run directory is (`rundir.AppendFile`: appended on a local disk, uploaded whole
  to object storage at most every `remote_flush_secs` / `tb_flush_secs` and at every `flush`).

  Values are converted to Python floats; a NaN / Inf is written as JSON `NaN` / `Infinity`
  (read back by Python's `json` and pandas). On a local disk each JSONL line is flushed as it is
  written, so the file is complete up to the last call even after a crash; in object storage up
  to the last upload (the trainer flushes at every checkpoint, and `close` always does).

  Both files are written in the calling thread (no background writer whose death could leave a
  caller blocked on its queue), so a failure surfaces where it happens: a JSONL write error
  raises `MetricsWriteError`; a TensorBoard write error (e.g. "No space left on device" under
  `tb/`) turns the TensorBoard events off with one warning, and metrics.jsonl goes on.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None,
               tb_flush_secs: float = 30.0, remote_flush_secs: float = 10.0):
    """Opens the writers.

    Args:
      workdir: run directory (created if needed).
      enabled: write anything at all; None means "on process 0 only".
      tb_flush_secs: the TensorBoard file is flushed at most this often (and on `flush` /
        `close`).
      remote_flush_secs: in object storage, metrics.jsonl is uploaded at most this often (and
        on `flush` / `close`).
    """
    self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
    self.workdir = rundir.normalize(workdir)
    self.tb_dir = rundir.join(self.workdir, TB_SUBDIR)
    self._jsonl: rundir.AppendFile | None = None
    self._tb: _EventFile | None = None
    self._tb_flush_secs, self._tb_flushed = tb_flush_secs, _now()
    self.tb_error: OSError | None = None   # why TensorBoard events were turned off, if they were
    if self.enabled:
      self._jsonl = rundir.AppendFile(rundir.join(self.workdir, JSONL_NAME),
                                      flush_secs=remote_flush_secs)
      try:
        self._tb = _EventFile(self.tb_dir, flush_secs=tb_flush_secs)
      except OSError as e:
        self._drop_tb(e)

  def _drop_tb(self, error: OSError) -> None:
    """Turns TensorBoard events off after a write error, with one warning."""
    self.tb_error = error
    _log.warning("TensorBoard events in %s turned off after a write error (%s); metrics.jsonl "
                 "is still written", self.tb_dir, error)
    tb, self._tb = self._tb, None
    if tb is not None:
      try:
        tb.close()
      except OSError:
        pass

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes `{"step": step, **scalars}` as one JSONL line and one TB scalar per name.

    Args:
      step: global training step.
      scalars: name -> number (Python, NumPy or 0-d jax values).

    Raises:
      MetricsWriteError: metrics.jsonl could not be written.
    """
    if not self.enabled:
      return
    values = {str(name): float(value) for name, value in scalars.items()}
    if "step" in values:
      raise ValueError("scalars may not contain the reserved name 'step'.")
    if self._jsonl is None:
      raise ValueError("write_scalars on a closed MetricWriter.")
    try:
      self._jsonl.write((json.dumps({"step": int(step), **values}) + "\n").encode("utf-8"))
      self._jsonl.flush(force=False)
    except OSError as e:
      path = rundir.join(self.workdir, JSONL_NAME)
      raise MetricsWriteError(e.errno, f"writing metrics to {path} failed at step {step}: "
                              f"{e.strerror or e}") from e
    if self._tb is not None:
      try:
        for name, value in values.items():
          self._tb.write_event(event_pb2.Event(
              wall_time=time.time(), step=int(step),
              summary=tb_summary.scalar(name, value)))
        if _now() - self._tb_flushed >= self._tb_flush_secs:
          self._tb.flush()
          self._tb_flushed = _now()
      except OSError as e:
        self._drop_tb(e)

  def flush(self) -> None:
    """Writes everything buffered (uploads to object storage); a TensorBoard failure turns its
    events off.

    Raises:
      MetricsWriteError: metrics.jsonl could not be written.
    """
    if not self.enabled or self._jsonl is None:
      return
    try:
      self._jsonl.flush()
    except OSError as e:
      raise MetricsWriteError(e.errno, f"writing metrics to "
                              f"{rundir.join(self.workdir, JSONL_NAME)} failed: "
                              f"{e.strerror or e}") from e
    if self._tb is not None:
      try:
        self._tb.flush()
        self._tb_flushed = _now()
      except OSError as e:
        self._drop_tb(e)

  def close(self) -> None:
    """Flushes and closes both writers; further writes are errors. Idempotent; a failure to
    flush while closing is logged, not raised (the lines written before were flushed)."""
    jsonl, tb, self._jsonl, self._tb = self._jsonl, self._tb, None, None
    for name, f in (("metrics.jsonl", jsonl), ("TensorBoard events", tb)):
      if f is None:
        continue
      try:
        f.close()
      except OSError as e:
        _log.warning("closing %s in %s failed: %s", name, self.workdir, e)

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def say(command: str, message: str) -> None:
  """One progress line of a command, `command: message`, on stderr (stdout keeps the results)."""
  print(f"{command}: {message}", file=sys.stderr, flush=True)


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar:
  """Training progress: step, scalars (e.g. bpd), steps/s and ETA.

  The rate is measured from the first `update` (so the compilation of step 1 does not count):
  steps/s = (step - first_step) / (now - first_time), shown as seconds per step below one a
  second; ETA = (total - step) / rate. `unit` names what is counted ("step", "batch", ...).
  Interactive streams (a terminal) get one line redrawn with `\\r` (at most 10 times a second,
  and always at the last step); other streams get one line per `log_every` steps.
  """

  def __init__(self, *, total: int, initial: int = 0, enabled: bool | None = None,
               interactive: bool | None = None, log_every: int = 100,
               stream: TextIO = sys.stderr, unit: str = "step"):
    if total < 0 or initial < 0:
      raise ValueError(f"total and initial must be >= 0, got total={total}, initial={initial}.")
    if log_every < 1:
      raise ValueError(f"log_every must be >= 1, got {log_every}.")
    self.total, self.log_every, self.stream, self.unit = total, log_every, stream, unit
    self.units = unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")   # plural
    self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
    if interactive is None:
      interactive = bool(getattr(stream, "isatty", lambda: False)())
    self.interactive = interactive
    self.initial = initial
    self._first: tuple[int, float] | None = None  # (step, time) of the first update
    self._last_draw = -math.inf
    self._width = 0

  def format(self, step: int, **scalars: float) -> str:
    """The progress line for `step` (without line ending)."""
    first_step, first_time = self._first or (self.initial, _now())
    elapsed = _now() - first_time
    rate = (step - first_step) / elapsed if step > first_step and elapsed > 0 else float("nan")
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    percent = 100.0 * step / self.total if self.total else 100.0
    parts = [f"{self.unit} {step}/{self.total} ({percent:.1f}%)"]
    parts += [f"{name} {float(value):.4f}" for name, value in scalars.items()]
    if not math.isfinite(rate):
      parts.append(f"- {self.units}/s")
    elif rate >= 1.0 or rate == 0.0:
      parts.append(f"{rate:.2f} {self.units}/s")
    else:   # slow units (a long evaluation batch): seconds each reads better than 0.00/s
      parts.append(f"{1.0 / rate:.1f} s/{self.unit}")
    parts.append(f"ETA {_format_duration(eta)}")
    return " | ".join(parts)

  def update(self, step: int, **scalars: float) -> None:
    """Reports that `step` is done, with e.g. `bpd=3.05`."""
    if not self.enabled:
      return
    if self._first is None:  # time from the first report, after compilation
      self._first = (step, _now())
    last = step >= self.total
    if self.interactive:
      if last or _now() - self._last_draw >= 0.1:
        line = self.format(step, **scalars)
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width, self._last_draw = len(line), _now()
    elif step % self.log_every == 0 or last:
      self.stream.write(self.format(step, **scalars) + "\n")
      self.stream.flush()

  def close(self) -> None:
    """Ends the updating line (interactive mode). Idempotent."""
    if self.enabled and self.interactive and self._width:
      self.stream.write("\n")
      self.stream.flush()
      self._width = 0


def _to_display_channels(images: np.ndarray) -> np.ndarray:
  """[N, H, W, C] -> [N, H, W, 1] (C in {1, 2}: first channel) or [N, H, W, 3] (C >= 3)."""
  channels = images.shape[-1]
  if channels in (1, 3):
    return images
  return images[..., :1] if channels == 2 else images[..., :3]


def image_grid(images: np.ndarray, *, vocab_size: int, num_cols: int | None = None,
               padding: int = 1, pad_value: int = 255) -> np.ndarray:
  """Tiles integer images into one uint8 picture.

  Pixel k in {0..K-1} becomes round(255 k / (K - 1)), so 0 -> 0 and K - 1 -> 255 for any K.
  Channels: C = 1 stays grayscale and C = 3 RGB; C = 2 shows its first channel (grayscale)
  and C > 3 its first three (RGB).

  Args:
    images: integers in [0, K), shape [N, H, W, C].
    vocab_size: K >= 2.
    num_cols: images per row; default ceil(sqrt(N)).
    padding: pixels of `pad_value` between the images and around the grid.
    pad_value: colour of the padding, 0..255.

  Returns:
    uint8 array [rows * (H + p) + p, cols * (W + p) + p, C'] with C' in {1, 3}.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"images must have shape [N, H, W, C] with N >= 1, got {images.shape}.")
  if vocab_size < 2:
    raise ValueError(f"vocab_size must be >= 2, got {vocab_size}.")
  if images.min() < 0 or images.max() >= vocab_size:
    raise ValueError(f"image values must lie in [0, {vocab_size}), got "
                     f"[{images.min()}, {images.max()}].")
  if padding < 0:
    raise ValueError(f"padding must be >= 0, got {padding}.")
  n, h, w, _ = images.shape
  cols = math.ceil(math.sqrt(n)) if num_cols is None else num_cols
  if cols < 1:
    raise ValueError(f"num_cols must be >= 1, got {num_cols}.")
  rows = math.ceil(n / cols)
  pixels = np.round(images.astype(np.float64) * 255.0 / (vocab_size - 1)).astype(np.uint8)
  pixels = _to_display_channels(pixels)
  p = padding
  grid = np.full((rows * (h + p) + p, cols * (w + p) + p, pixels.shape[-1]), pad_value, np.uint8)
  for i, image in enumerate(pixels):
    top, left = p + (i // cols) * (h + p), p + (i % cols) * (w + p)
    grid[top:top + h, left:left + w] = image
  return grid


def save_image_grid(path: str | os.PathLike, images: np.ndarray, *, vocab_size: int,
                    num_cols: int | None = None) -> None:
  """Writes `image_grid(images, ...)` as a PNG (grayscale or RGB) at `path`, local or in object
  storage (`rundir.write_bytes`)."""
  grid = image_grid(images, vocab_size=vocab_size, num_cols=num_cols)
  rundir.write_bytes(path, rundir.png_bytes(grid))
