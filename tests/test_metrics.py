"""Tests for vdm_jax.storage.metrics: JSONL + TensorBoard writer, progress bar, image grids, NaN
guard."""

import errno
import glob
import io
import json
import logging
import os
import struct
import threading

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from conftest import patience
from tensorboardX.proto import event_pb2

from vdm_jax.storage import metrics


def tb_scalars(data: bytes, scalars: dict | None = None) -> dict:
  """{tag: [(step, value)]} of the events in the bytes of an event file (TFRecord framing, read
  without TensorFlow; each record's CRCs checked as TensorBoard does)."""
  from tensorboardX.record_writer import masked_crc32c
  scalars = {} if scalars is None else scalars
  offset = 0
  while offset < len(data):
    header = data[offset:offset + 8]
    (length,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[offset + 8:offset + 12])[0] == masked_crc32c(header)
    payload = data[offset + 12:offset + 12 + length]
    assert struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])[0] == (
        masked_crc32c(payload))
    event = event_pb2.Event.FromString(payload)
    offset += 16 + length
    for value in event.summary.value:
      scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def _read_tb_scalars(logdir):
  """`tb_scalars` of every event file in `logdir`."""
  files = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
  assert files, f"no event file in {logdir}"
  scalars = {}
  for path in files:
    with open(path, "rb") as f:
      tb_scalars(f.read(), scalars)
  return scalars


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
  with metrics.MetricWriter(tmp_path, enabled=True) as writer:
    writer.write_scalars(1, {"train/bpd": 3.5, "train/lr": np.float32(1e-4)})
    writer.write_scalars(2, {"train/bpd": jnp.asarray(3.25)})
    writer.flush()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line) for line in lines] == [
      {"step": 1, "train/bpd": 3.5, "train/lr": pytest.approx(1e-4)},
      {"step": 2, "train/bpd": 3.25},
  ]
  tb = _read_tb_scalars(tmp_path / "tb")
  assert tb["train/bpd"] == [(1, 3.5), (2, 3.25)]
  assert tb["train/lr"] == [(1, pytest.approx(1e-4))]


def test_metric_writer_appends_on_resume(tmp_path):
  with metrics.MetricWriter(tmp_path, enabled=True) as writer:
    writer.write_scalars(1, {"a": 1.0})
  with metrics.MetricWriter(tmp_path, enabled=True) as writer:
    writer.write_scalars(2, {"a": 2.0})
  steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2]


def test_metric_writer_rejects_reserved_step_name(tmp_path):
  with metrics.MetricWriter(tmp_path, enabled=True) as writer:
    with pytest.raises(ValueError, match="step"):
      writer.write_scalars(1, {"step": 3.0})


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with metrics.MetricWriter(workdir, enabled=False) as writer:
    writer.write_scalars(1, {"a": 1.0})
    writer.flush()
  assert not workdir.exists()


def test_default_enabled_on_process_zero(tmp_path):
  with metrics.MetricWriter(tmp_path) as writer:  # tests run as process 0
    assert writer.enabled


class _FakeTTY(io.StringIO):

  def isatty(self):
    return True


class _Clock:

  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


@pytest.fixture
def clock(monkeypatch):
  fake = _Clock()
  monkeypatch.setattr(metrics, "_now", fake)
  return fake


def test_progress_bar_log_lines(clock):
  stream = io.StringIO()
  bar = metrics.ProgressBar(total=400, initial=0, log_every=100, stream=stream, enabled=True)
  assert not bar.interactive
  for step in range(1, 401):
    clock.t += 0.1  # 10 steps/s
    bar.update(step, bpd=3.0)
  bar.close()
  lines = stream.getvalue().splitlines()
  assert len(lines) == 4 and "\r" not in stream.getvalue()
  assert lines[0].startswith("step 100/400 (25.0%) | bpd 3.0000 | 10.00 steps/s | ETA 0:30")
  assert lines[-1].startswith("step 400/400 (100.0%)") and lines[-1].endswith("ETA 0:00")


def test_progress_bar_interactive_single_line(clock):
  stream = _FakeTTY()
  bar = metrics.ProgressBar(total=50, initial=10, stream=stream, enabled=True)
  assert bar.interactive
  for step in range(11, 51):
    clock.t += 0.5  # 2 steps/s, slower than the 0.1 s redraw limit: every step is drawn
    bar.update(step, bpd=2.5)
  bar.close()
  out = stream.getvalue()
  assert out.count("\r") == 40 and out.count("\n") == 1 and out.endswith("\n")
  assert out.rstrip("\n").split("\r")[-1].startswith("step 50/50 (100.0%) | bpd 2.5000 | 2.00")
  assert "step 30/50 (60.0%) | bpd 2.5000 | 2.00 steps/s | ETA 0:10" in out


def test_progress_bar_interactive_throttles_redraws(clock):
  stream = _FakeTTY()
  bar = metrics.ProgressBar(total=1000, stream=stream, enabled=True)
  for step in range(1, 1001):
    clock.t += 0.001
    bar.update(step)
  assert stream.getvalue().count("\r") == 11  # first draw, one per 0.1 s, and the last step


def test_progress_bar_disabled_writes_nothing(clock):
  stream = _FakeTTY()
  bar = metrics.ProgressBar(total=10, stream=stream, enabled=False, log_every=1)
  bar.update(10, bpd=1.0)
  bar.close()
  assert stream.getvalue() == ""


def test_image_grid_shape_and_scaling():
  k = 17
  images = np.zeros((5, 4, 3, 1), np.int32)
  images[1] = k - 1
  images[2] = 8
  grid = metrics.image_grid(images, vocab_size=k, num_cols=3, padding=1)
  assert grid.dtype == np.uint8 and grid.shape == (2 * 5 + 1, 3 * 4 + 1, 1)
  np.testing.assert_array_equal(grid[1:5, 1:4], 0)
  np.testing.assert_array_equal(grid[1:5, 5:8], 255)
  np.testing.assert_array_equal(grid[1:5, 9:12], 128)  # round(8 * 255 / 16) = 127.5 -> 128
  assert grid[0, 0, 0] == 255 and grid[6, 5, 0] == 0  # padding, then image 3 at row 1, col 0


@pytest.mark.parametrize("channels, expected", [(1, 1), (2, 1), (3, 3), (4, 3)])
def test_image_grid_channels(channels, expected):
  images = np.arange(2 * 2 * 2 * channels).reshape(2, 2, 2, channels) % 256
  grid = metrics.image_grid(images, vocab_size=256, padding=0)
  assert grid.shape == (2, 4, expected)  # default: ceil(sqrt(2)) = 2 columns
  np.testing.assert_array_equal(grid[:, :2], images[0, ..., :expected])


def test_image_grid_rejects_bad_input():
  with pytest.raises(ValueError, match="shape"):
    metrics.image_grid(np.zeros((4, 4, 1)), vocab_size=2)
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    metrics.image_grid(np.full((1, 2, 2, 1), 4), vocab_size=4)


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_save_image_grid_png(tmp_path, channels, mode):
  images = np.random.default_rng(0).integers(0, 256, (6, 5, 4, channels))
  path = tmp_path / "samples" / "grid.png"
  metrics.save_image_grid(path, jnp.asarray(images), vocab_size=256, num_cols=3)
  with Image.open(path) as picture:
    assert picture.format == "PNG" and picture.mode == mode
    read = np.asarray(picture)
  expected = metrics.image_grid(images, vocab_size=256, num_cols=3)
  np.testing.assert_array_equal(read.reshape(expected.shape), expected)


def _no_space(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


def test_tensorboard_write_failure_is_one_warning_and_never_a_hang(tmp_path, monkeypatch, caplog):
  """A full disk under tb/: the events are turned off with one warning, metrics.jsonl goes on,
  and no write ever blocks (events are written in the caller's thread: no writer thread whose
  death would leave a caller blocked on its queue)."""
  caplog.set_level(logging.WARNING, logger="vdm_jax.storage.metrics")
  writer = metrics.MetricWriter(tmp_path, enabled=True)
  monkeypatch.setattr(metrics._EventFile, "write_event", _no_space)
  done = threading.Event()

  def write_many():
    for step in range(100):
      writer.write_scalars(step, {"a": float(step), "b": 1.0})
    done.set()

  threading.Thread(target=write_many, daemon=True).start()
  assert done.wait(timeout=patience(600)), "write_scalars blocked on a failing TensorBoard writer"
  writer.close()
  warned = [r for r in caplog.records if "TensorBoard events" in r.getMessage()]
  assert len(warned) == 1 and "No space left on device" in warned[0].getMessage()
  assert isinstance(writer.tb_error, OSError) and writer.tb_error.errno == errno.ENOSPC
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == list(range(100))


class _FullFile:
  def write(self, text):
    raise OSError(errno.ENOSPC, "No space left on device")

  def flush(self):
    pass

  def close(self):
    pass


def test_jsonl_write_failure_raises_naming_the_file(tmp_path, monkeypatch):
  writer = metrics.MetricWriter(tmp_path, enabled=True)
  monkeypatch.setattr(writer, "_jsonl", _FullFile())
  with pytest.raises(metrics.MetricsWriteError,
                     match=r"metrics.jsonl failed at step 7: No space left on device") as err:
    writer.write_scalars(7, {"a": 1.0})
  assert err.value.errno == errno.ENOSPC and str(tmp_path) in str(err.value)
  writer.close()   # closing after a failure does not raise


def test_progress_bar_names_its_unit(clock):
  """Another unit than steps: its name and plural in the line, seconds each when slow (the
  rate counts from the first update)."""
  stream = io.StringIO()
  bar = metrics.ProgressBar(total=4, log_every=1, stream=stream, enabled=True, unit="batch")
  bar.update(1)
  clock.t += 0.25
  bar.update(2)
  clock.t += 4.0
  bar.update(3)
  lines = stream.getvalue().splitlines()
  assert lines[0] == "batch 1/4 (25.0%) | - batches/s | ETA ?", lines
  assert lines[1].startswith("batch 2/4 (50.0%) | 4.00 batches/s | ETA 0:00"), lines
  assert lines[2].startswith("batch 3/4 (75.0%) | 2.1 s/batch"), lines
