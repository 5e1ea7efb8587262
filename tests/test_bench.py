"""Benchmark harness tests: every reported number is finite and positive on the smoke config, a
progress line per part and a few timed sampling steps by default, the JSON / markdown output, and
the training loop's step makes no implicit host transfers."""

import contextlib
import io
import json
import math
import pathlib
import runpy

import flax.linen as nn
import jax
import numpy as np
import pytest

from vdm_jax.apps import bench, bench_report
from vdm_jax.datasets import data
from vdm_jax.nets import networks
from vdm_jax.core import parallel
from vdm_jax.maths import sampling
from vdm_jax.training import state as state_lib
from vdm_jax.training import steps as steps_lib, tasks

import tiny_net

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL_ROOF = dict(conv_batch=2, size=8, channels=8, matmul_size=64, repeats=1)
NUMERIC_KEYS = (
    "params", "lower_s", "compile_s", "step_s", "train_images_per_s", "flops_per_step",
    "flops_per_s", "step_memory_mib", "process_peak_rss_mib", "pipeline_batches_per_s",
    "loop_steps_per_s_constant", "loop_steps_per_s_data", "data_fed_fraction",
    "loop_steps_per_s_no_fetch", "fetch_every_step_fraction", "eval_compile_s",
    "eval_images_per_s", "sample_compile_s", "sample_images_per_s", "sample_images_per_s_1000",
    "roofline_conv_flops_per_s", "roofline_conv_grad_flops_per_s", "roofline_matmul_flops_per_s",
    "fraction_of_conv_ceiling", "fraction_of_conv_grad_ceiling", "fraction_of_matmul_ceiling")


def smoke_config():
  return runpy.run_path(str(ROOT / "configs" / "smoke.py"))["get_config"]()


@pytest.fixture(scope="module")
def smoke_run():
  """(result, stderr, sampled) of the benchmark on the smoke config, with a tiny network (the
  harness does not depend on it) and the default sampling settings: its result, what it printed
  on stderr, and the num_steps of every ancestral_sample call it made."""
  sampled, real = [], sampling.ancestral_sample

  def spy(*args, num_steps, **kwargs):
    sampled.append(num_steps)
    return real(*args, num_steps=num_steps, **kwargs)

  err, config = io.StringIO(), smoke_config()
  with (pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err),
        tiny_net.registered() as config.model.network):
    mp.setattr(sampling, "ancestral_sample", spy)
    result = bench.run_benchmark(config, batch_size=8, steps=2, warmup=1, eval_images=16,
                                 sample_images=4, roofline_kwargs=SMALL_ROOF)
  return result, err.getvalue(), sampled


@pytest.fixture(scope="module")
def smoke_result(smoke_run):
  return smoke_run[0]


def test_progress_line_per_part_and_a_few_sampling_steps(smoke_run):
  """Every part announces itself on stderr (a compilation or a loop of the paper's net takes
  minutes on a CPU); the timed loops show a progress bar; sampling is timed at a few steps
  (bench.SAMPLE_STEPS) and scaled, not run for 1000 steps."""
  r, err, sampled = smoke_run
  lines = err.splitlines()
  for part in ("setup",) + bench.PARTS:
    assert any(line.startswith(f"bench: {part}: ") for line in lines), (part, err)
  assert "step 3/3 (100.0%)" in err          # train: 1 warm-up + 2 timed steps
  assert "loop 9/9 (100.0%)" in err          # data: 3 rounds of 3 loops
  assert "batch 2/2 (100.0%)" in err         # eval: 1 warm-up + one batch of 16 images
  assert sampled == [r["sample_steps"]] == [bench.SAMPLE_STEPS], sampled
  assert 1 <= bench.SAMPLE_STEPS <= 10
  assert r["sample_images_per_s_1000"] == pytest.approx(
      r["sample_images_per_s"] * bench.SAMPLE_STEPS / 1000)


def test_run_benchmark_reports_every_number(smoke_result):
  r = smoke_result
  missing = [k for k in NUMERIC_KEYS if k not in r]
  assert not missing, missing
  bad = {k: r[k] for k in NUMERIC_KEYS if not (np.isfinite(r[k]) and r[k] > 0)}
  assert not bad, bad
  assert r["batch_size"] == 8 and r["num_devices"] == 4 and len(r["step_s_all"]) == 2
  assert r["train_images_per_s"] == pytest.approx(8 / r["step_s"])
  assert r["flops_per_s"] == pytest.approx(r["flops_per_step"] / r["step_s"])
  assert r["data_fed_fraction"] == pytest.approx(
      r["loop_steps_per_s_data"] / r["loop_steps_per_s_constant"])
  assert r["fetch_every_step_fraction"] == pytest.approx(
      r["loop_steps_per_s_constant"] / r["loop_steps_per_s_no_fetch"])
  assert r["fraction_of_conv_ceiling"] == pytest.approx(
      r["flops_per_s"] / r["roofline_conv_flops_per_s"])
  assert r["mfu"] is None   # no peak is known for a CPU
  assert r["data_source"] == "real"


def test_roofline_counts_flops(monkeypatch):
  """With every timing replaced by 1 s, each reported FLOP/s is the FLOP count of its program,
  which must be the hand count: 2 B H W 9 C^2 for the 3x3 convolution (padding taps included),
  3 times that for its gradient (input and weight gradients), 2 N^3 for the matmul."""
  monkeypatch.setattr(bench, "_median_time", lambda fn, n: 1.0)
  r = bench.roofline(**SMALL_ROOF)
  assert r["conv_shape"] == [2, 8, 8, 8] and r["matmul_size"] == 64
  conv = 2 * 2 * 8 * 8 * 9 * 8 * 8
  assert r["conv_flops_per_s"] == conv
  assert r["conv_grad_flops_per_s"] == 3 * conv
  assert r["matmul_flops_per_s"] == 2 * 64**3
  for name in ("conv", "conv_grad", "matmul"):   # each variant is timed and reported
    assert r[name + "_flops_per_s_xla_default"] == r[name + "_flops_per_s"]


def _valid_taps(size, kernel=3):
  """Multiply-adds per (input, output) channel pair of a SAME convolution over a size x size
  image that touch the image (not the zero padding): per axis, kernel - (overhang) taps."""
  per_axis = sum(min(i + kernel // 2, size - 1) - max(i - kernel // 2, 0) + 1 for i in range(size))
  return per_axis**2


def test_cost_analysis_flops_against_hand_counts():
  """`bench_report.compiled_flops` (XLA's count) on programs counted by hand: a matmul is
  2 M K N; a SAME 3x3 convolution is 2 B C_in C_out x (taps inside the image): XLA does not
  count the padding taps, 484 of the 576 on an 8x8 image (so the roofline's nominal
  2 B H W 9 C^2 is 19% above XLA's count there, 4% at 32x32)."""
  compiled = jax.jit(lambda a, b: a @ b).lower(np.ones((32, 16), np.float32),
                                               np.ones((16, 8), np.float32)).compile()
  assert bench_report.compiled_flops(compiled) == pytest.approx(2 * 32 * 16 * 8, rel=0.01)
  assert _valid_taps(8) == 22**2 and _valid_taps(32) == 94**2
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  for b, size, c_in, c_out in ((2, 8, 8, 8), (1, 16, 3, 32), (4, 5, 2, 1)):
    compiled = jax.jit(conv).lower(np.ones((b, size, size, c_in), np.float32),
                                   np.ones((3, 3, c_in, c_out), np.float32)).compile()
    assert bench_report.compiled_flops(compiled) == pytest.approx(
        2 * b * c_in * c_out * _valid_taps(size), rel=0.01), (b, size, c_in, c_out)


class _TwoConvs(nn.Module):
  """A tiny score network of two bias-free 3x3 convolutions, 1 -> C -> 1 channels."""
  num_classes: int = 0
  channels: int = 256

  @nn.compact
  def __call__(self, z, t, label=None, conditioning=None, *, train):
    del t, label, conditioning, train
    h = nn.Conv(self.channels, (3, 3), use_bias=False, name="a")(z)
    return nn.Conv(z.shape[-1], (3, 3), use_bias=False, name="b")(h)


@pytest.mark.parametrize("schedule,num_convs", [("fixed_linear", 5), ("learned_linear", 6)])
def test_train_step_flops_against_a_hand_count(registered, schedule, num_convs):
  """The benchmark's FLOPs per step of a network of two convolutions (8 images of 8x8, 256
  hidden channels, one device): the forward convolutions (2), their weight gradients (2) and the
  input gradient of the second (1); with a learned schedule z_t depends on the parameters and
  the first one's input gradient is computed too (6). Each costs 2 B 256 x 484 (XLA's count,
  see above); the rest of the step (the bound's elementwise terms, Adam on 4,610 parameters) adds
  less than 10% (measured 4-5%)."""
  registered(networks.NETWORKS, networks.register_network, "test_two_convs",
             lambda **kwargs: _TwoConvs())
  config = smoke_config()
  config.model.network, config.model.schedule = "test_two_convs", schedule
  r = bench.run_benchmark(config, batch_size=8, steps=1, warmup=0, parts=("train",),
                          mesh=parallel.make_mesh(1))
  assert r["params"] == 9 * 256 * 2 + (2 if schedule == "learned_linear" else 0)
  one_conv = 2 * 8 * 256 * _valid_taps(8)
  assert num_convs * one_conv <= r["flops_per_step"] <= 1.1 * num_convs * one_conv, (
      r["flops_per_step"] / one_conv)


def test_bad_arguments():
  with pytest.raises(ValueError, match="parts"):
    bench.run_benchmark(smoke_config(), parts=("train", "gpu"))
  with pytest.raises(ValueError, match="'data' needs 'train'"):
    bench.run_benchmark(smoke_config(), parts=("data",))
  with pytest.raises(ValueError, match="batch_size must be a positive multiple of the 4"):
    bench.run_benchmark(smoke_config(), batch_size=6, parts=("train",))


def test_markdown_and_json(tmp_path, smoke_result, capsys, monkeypatch):
  rows = [dict(smoke_result, name="smoke"), {"name": "other", "params": 5, "step_s": 0.5}]
  table = bench_report.format_markdown(rows).splitlines()
  assert table[0].startswith("| config | backend |") and len(table) == 4
  assert "| smoke | cpu |" in table[2] and "| other | - |" in table[3]
  assert "500" in table[3]   # step time shown in ms
  path = bench_report.write_json(tmp_path / "out" / "b.json", rows, note="x")
  loaded = json.loads(path.read_text())
  assert loaded["note"] == "x" and loaded["results"][0]["params"] == smoke_result["params"]
  assert {"date", "jax", "backend", "cpu_count"} <= set(loaded["environment"])
  # `vdm-jax bench` (bench.main): its arguments to run_benchmark (measured above), the table on
  # stdout and the JSON record of what run_benchmark returned.
  out, calls = tmp_path / "main.json", []
  monkeypatch.setattr(bench, "run_benchmark",
                      lambda config, **kwargs: calls.append(kwargs) or dict(smoke_result))
  result = bench.main(smoke_config(), batch_size=4, steps=1, warmup=0, out_path=out,
                      parts=("train",))
  assert calls == [dict(batch_size=4, steps=1, warmup=0, parts=("train",))]
  assert "| digits | cpu |" in capsys.readouterr().out
  assert json.loads(out.read_text())["results"][0]["step_s"] == pytest.approx(result["step_s"])


def test_train_steps_make_no_implicit_host_transfers():
  """Jitted steps on pre-sharded device batches, under transfer_guard("disallow"). The network
  is the tiny one of the benchmark above (its compiled step is reused): what crosses to the
  device is the step's arguments, whatever the network."""
  config = smoke_config()
  mesh = parallel.make_mesh()
  info = data.get_info("digits")
  with tiny_net.registered() as config.model.network:
    task, optimizer = tasks.build_task(config, info), state_lib.build_optimizer(config)
  state = jax.jit(lambda: state_lib.init_state(task, optimizer.tx, seed=0),
                  out_shardings=parallel.replicated(mesh))()
  step = steps_lib.jit_train_step(config, task, optimizer, mesh)
  host = [bench.random_batch(info, 8, seed=i) for i in range(3)]
  batches = [parallel.shard_batch(b, mesh) for b in host]   # explicit transfers, before
  with jax.transfer_guard("disallow"):
    for batch in batches:
      state, out = step(state, batch)
    jax.block_until_ready((state, out))
    with pytest.raises(Exception, match="[Dd]isallowed"):   # the guard is live: a host batch
      step(state, host[0])
  assert int(jax.device_get(state.step)) == 3
  assert all(math.isfinite(float(v)) for v in jax.device_get(out).values())


def test_unprepared_data_set_is_described_from_mock_data(tmp_path):
  config = smoke_config()
  config.data.name, config.data.data_dir = "cifar10", str(tmp_path / "no_data_here")
  info, prepared = bench.load_info(config)
  assert not prepared
  assert (info.shape, info.vocab_size, info.num_classes) == ((32, 32, 3), 256, 10)
