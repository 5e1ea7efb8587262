"""Benchmark harness: compile time, train / eval / sampling throughput, FLOPs, memory, roofline.

    vdm-jax bench --config configs/digits.py [--batch 64] [--steps 10]

It prints a line as each part starts and ends, and a progress bar over its timed calls, on
stderr; the table on stdout.

For one config it times exactly what the trainer runs (`runs.training_task`,
`state.init_state`, `steps.jit_train_step` / `steps.jit_eval_step`: jitted with NamedShardings
over the mesh, state donated):

- train: lower + compile time; median of `steps` timed steps after `warmup` (each ended by
  block_until_ready) as images/s; FLOPs per step from XLA's cost analysis, FLOP/s, MFU on GPU/TPU;
- memory: `compiled.memory_analysis()` (arguments + outputs + temporaries - aliased), the
  process's peak RSS (`getrusage`: a high-water mark of the whole process) and, where reported,
  the device's peak bytes in use;
- data: steps/s of the trainer's loop shape fed by the input pipeline vs by a constant batch, and
  with vs without fetching each step's metrics;
- eval: images/s of the bound; sample: images/s of ancestral sampling (one `lax.scan`), timed at
  `sample_steps` (default SAMPLE_STEPS, a few) and scaled to 1000 (every step runs the same body,
  so time is linear in steps: 1000 steps of the paper's CIFAR-10 net would take hours on a CPU).
  The timed call also holds the sampler's fixed costs (initial noise, decoding, dispatch): on a
  small net, where a step takes milliseconds, a few steps overstate the 1000-step time, and a
  larger `sample_steps` (`--sample_steps`) measures it;
- roofline: this machine's FLOP/s on a large float32 convolution, its gradient and a large
  matmul; the train step's FLOP/s as a fraction of each.

The markdown table and the JSON record of the results are written by `vdm_jax.apps.bench_report`.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import resource
import statistics
import time
import warnings
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdm_jax.apps import bench_report
from vdm_jax.training import config_checks, runs
from vdm_jax.datasets import data, pipeline
from vdm_jax.core import parallel
from vdm_jax.maths import sampling
from vdm_jax.apps.bench_report import say
from vdm_jax.training import state as state_lib
from vdm_jax.core.checks import check_number
from vdm_jax.training import steps as steps_lib, tasks

PARTS = ("train", "data", "eval", "sample", "roofline")
# Defaults that keep `vdm-jax bench` within minutes on a CPU for the paper's CIFAR-10 net (a
# forward pass of 64 images takes seconds there; 1000 sampling steps would take hours).
SAMPLE_STEPS = 2      # ancestral steps timed (the result is scaled to 1000 steps)
EVAL_BATCHES = 1      # eval batches timed, after one untimed
# Dense peak FLOP/s per chip, from the vendors' data sheets: (float32 matmuls, bfloat16).
# float32 on NVIDIA is the TF32 tensor-core peak (XLA's default precision for f32 dots there).
PEAK_FLOPS = {
    "H100": (494.7e12, 989.4e12), "H200": (494.7e12, 989.4e12), "A100": (156e12, 312e12),
    "TPU v4": (275e12, 275e12), "TPU v5 lite": (197e12, 197e12), "TPU v5": (459e12, 459e12),
}


def _compile(jitted: Any, *args) -> tuple[Any, float, float]:
  """(compiled, lower seconds, compile seconds)."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, t1 - t0, time.perf_counter() - t1


def _median_time(fn: Callable[[], Any], n: int) -> float:
  """Median wall time of n calls of fn, each run to completion (block_until_ready)."""
  times = []
  for _ in range(n):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def peak_flops(dtype: str = "float32") -> float | None:
  """The device's dense peak FLOP/s from PEAK_FLOPS (None on CPU or an unknown chip)."""
  kind = jax.devices()[0].device_kind
  for name, peaks in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return peaks[1] if dtype == "bfloat16" else peaks[0]
  return None


# ----------------------------------------------------------------------------------------------
# Roofline: this machine's own ceiling.


def roofline(*, conv_batch: int = 32, size: int = 32, channels: int = 128, matmul_size: int = 2048,
             repeats: int = 5, dtype: Any = jnp.float32) -> dict[str, Any]:
  """FLOP/s of a large 3x3 convolution, of its gradient and of a large matmul on this machine.

  The convolution has the shape of the VDM net's main layer ([conv_batch, size, size, channels]
  3x3 -> channels, SAME), 2 B H W 9 C^2 FLOPs; its forward + backward (`jax.grad`: the
  input- and weight-gradient convolutions) is 3 times that; the matmul [N, N] @ [N, N] 2 N^3.
  Each is compiled with XLA's default options and, on CPU, with the library's options
  (`parallel.CPU_YNN_FUSION_TYPE`, whatever the environment says); the ceiling
  `<name>_flops_per_s` is the faster of the two, and `<name>_flops_per_s_xla_default` /
  `..._library_options` are both.
  """
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((conv_batch, size, size, channels)), dtype)
  w = jnp.asarray(rng.standard_normal((3, 3, channels, channels)) * 0.05, dtype)
  a = jnp.asarray(rng.standard_normal((matmul_size, matmul_size)), dtype)
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  fns = {"conv": (conv, (x, w), 1),
         "conv_grad": (jax.grad(lambda x, w: jnp.vdot(conv(x, w), x), (0, 1)), (x, w), 3),
         "matmul": (lambda a, b: a @ b, (a, a), None)}
  conv_flops = 2.0 * conv_batch * size * size * 9 * channels * channels
  out: dict[str, Any] = {"conv_shape": [conv_batch, size, size, channels],
                         "matmul_size": matmul_size}
  variants = {"xla_default": None}
  if jax.default_backend() == "cpu" and parallel.default_cpu_options() is not None:
    variants["library_options"] = parallel.default_cpu_options()
  for name, (fn, args, n_convs) in fns.items():
    flops = 2.0 * matmul_size**3 if n_convs is None else n_convs * conv_flops
    for variant, options in variants.items():
      say(f"roofline: {name} ({variant}), {repeats} timed calls")
      jitted = jax.jit(fn, compiler_options=options)
      jax.block_until_ready(jitted(*args))   # compile and warm up
      seconds = _median_time(functools.partial(jitted, *args), repeats)
      out[f"{name}_flops_per_s_{variant}"] = flops / seconds
    out[name + "_flops_per_s"] = max(out[f"{name}_flops_per_s_{v}"] for v in variants)
  return out


# ----------------------------------------------------------------------------------------------
# Set-up: data set description, model, state, batches.


def load_info(config: ml_collections.ConfigDict) -> tuple[data.DatasetInfo, bool]:
  """(DatasetInfo, prepared). An unprepared TFDS data set is described from TFDS mock data
  (shape, vocab size, classes are right; the counts are not), so its model can still be timed."""
  try:
    return data.get_info(config.data.name, data_dir=config.data.data_dir or None), True
  except data.DatasetNotPreparedError:
    import tensorflow_datasets as tfds   # pylint: disable=g-import-not-at-top  (slow; lazy)
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
      return data.get_info(config.data.name, data_dir=config.data.data_dir or None), False


def random_batch(info: data.DatasetInfo, batch_size: int, *, seed: int = 0,
                 mask: bool = False) -> dict[str, np.ndarray]:
  """{"image": int32 [B, H, W, C] uniform in [0, K), "label": int32 [B] (, "mask": bool [B])}."""
  rng = np.random.default_rng(seed)
  batch = {"image": rng.integers(0, info.vocab_size, (batch_size,) + tuple(info.shape),
                                 dtype=np.int32),
           "label": rng.integers(0, max(info.num_classes, 1), (batch_size,), dtype=np.int32)}
  if mask:
    batch["mask"] = np.ones((batch_size,), bool)
  return batch


def _check_batch(name: str, batch_size: int, num_devices: int) -> int:
  if not isinstance(batch_size, int) or batch_size < 1 or batch_size % num_devices:
    raise ValueError(f"{name} must be a positive multiple of the {num_devices} devices, got "
                     f"{batch_size!r}")
  return batch_size


# ----------------------------------------------------------------------------------------------
# The parts.


def bench_train(setup: dict, *, steps: int, warmup: int) -> dict[str, Any]:
  """Compile time, FLOPs, memory and the median step time of the trainer's step."""
  state, batch = setup["state"], setup["batch"]
  say(f"train: compiling the train step (batch {setup['batch_size']})")
  compiled, lower_s, compile_s = _compile(setup["step"], state, batch)
  setup["compiled_step"] = compiled
  say(f"train: compiled in {lower_s + compile_s:.1f} s; {warmup} warm-up + {steps} timed steps")
  times, bar = [], bench_report.progress_bar(warmup + steps)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")   # "donated buffers were not usable" on CPU
    for i in range(warmup + steps):
      start = time.perf_counter()
      state, _ = jax.block_until_ready(compiled(state, batch))
      times += [time.perf_counter() - start] if i >= warmup else []
      bar.update(i + 1)
  bar.close()
  setup["state"] = state
  step_s = statistics.median(times)
  say(f"train: {1e3 * step_s:,.1f} ms per step (median)")
  flops = bench_report.compiled_flops(compiled)
  out = {"lower_s": lower_s, "compile_s": lower_s + compile_s, "step_s": step_s,
         "step_s_all": times, "train_images_per_s": setup["batch_size"] / step_s,
         "flops_per_step": flops, "flops_per_s": None if flops is None else flops / step_s}
  peak = peak_flops(setup["config"].model.dtype)
  out["mfu"] = None if (peak is None or flops is None) else flops / step_s / peak
  out.update(bench_report.compiled_memory(compiled))
  return out


def _loop_steps_per_s(compiled, state, batches: Iterable[dict], n: int, mesh, *,
                      fetch: bool = True) -> tuple[float, Any]:
  """steps/s of the trainer's loop shape: dispatch step i + 1, then fetch step i's metrics
  (fetch=False: metrics never fetched, only the final state awaited)."""
  pending = None
  it = iter(batches)
  state, _ = jax.block_until_ready(compiled(state, parallel.shard_batch(next(it), mesh)))
  start = time.perf_counter()
  for _ in range(n):
    state, out = compiled(state, parallel.shard_batch(next(it), mesh))
    if pending is not None and fetch:
      jax.device_get(pending)
    pending = out
  jax.block_until_ready((state, pending))
  return n / (time.perf_counter() - start), state


def bench_data(setup: dict, *, steps: int, rounds: int = 3) -> dict[str, Any]:
  """Input-pipeline starvation: loop steps/s fed by the pipeline vs by a constant host batch.

  `rounds` alternating triples of loops (constant batch; pipeline; constant batch without
  fetching metrics), medians reported, so that a change of machine load hits all three.
  pipeline_batches_per_s is the pipeline alone, afterwards. Needs the data set prepared.
  """
  config, compiled, state, mesh = (setup[k] for k in ("config", "compiled_step", "state", "mesh"))
  if not setup["prepared"]:
    say(f"data: skipped ({config.data.name} is not prepared)")
    return {"data_source": "not prepared: skipped"}
  say(f"data: {rounds} rounds of 3 loops of {steps} steps (constant batch, pipeline, no fetch)")
  host = random_batch(setup["info"], setup["batch_size"])
  batches = pipeline.train_iterator(config.data.name, global_batch_size=setup["batch_size"],
                                    seed=config.seed, data_dir=config.data.data_dir or None)
  const, fed, no_fetch = [], [], []
  bar = bench_report.progress_bar(3 * rounds, unit="loop")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for _ in range(rounds):
      for rates, source_it, fetch in ((const, itertools.repeat(host), True), (fed, batches, True),
                                      (no_fetch, itertools.repeat(host), False)):
        rate, state = _loop_steps_per_s(compiled, state, source_it, steps, mesh, fetch=fetch)
        rates.append(rate)
        bar.update(len(const) + len(fed) + len(no_fetch))
  bar.close()
  setup["state"] = state
  for _ in range(16):   # drain what was prefetched while the loop ran
    next(batches)
  start = time.perf_counter()
  for _ in range(steps):
    next(batches)
  pipeline_rate = steps / (time.perf_counter() - start)
  const_rate, data_rate = statistics.median(const), statistics.median(fed)
  return {"data_source": "real", "pipeline_batches_per_s": pipeline_rate,
          "loop_steps_per_s_constant": const_rate, "loop_steps_per_s_data": data_rate,
          "data_fed_fraction": data_rate / const_rate,
          "loop_steps_per_s_no_fetch": statistics.median(no_fetch),
          "fetch_every_step_fraction": const_rate / statistics.median(no_fetch),
          "data_fed_fractions": [d / c for d, c in zip(fed, const)]}


def bench_eval(setup: dict, *, eval_images: int, eval_batch_size: int) -> dict[str, Any]:
  """images/s of the bound on `eval_images` images (pre-sharded batches, one block at the end)."""
  config, info, mesh = setup["config"], setup["info"], setup["mesh"]
  fn = steps_lib.jit_eval_step(setup["task"], mesh, num_steps=steps_lib.eval_num_steps(config),
                               t_samples=config.eval.t_samples)
  batch = parallel.shard_batch(random_batch(info, eval_batch_size, mask=True), mesh)
  state, key = setup["state"], jax.random.PRNGKey(1)
  args = (state.params, state.frozen)
  say(f"eval: compiling the eval step (batch {eval_batch_size})")
  compiled, lower_s, compile_s = _compile(fn, *args, batch, key)
  n = math.ceil(eval_images / eval_batch_size)
  say(f"eval: compiled in {lower_s + compile_s:.1f} s; 1 warm-up + {n} timed batches")
  bar = bench_report.progress_bar(1 + n, unit="batch")
  jax.block_until_ready(compiled(*args, batch, key))
  bar.update(1)
  start = time.perf_counter()
  outs = [compiled(*args, batch, jax.random.fold_in(key, i)) for i in range(n)]
  for i, out in enumerate(outs):   # all dispatched at once; the bar follows their completion
    jax.block_until_ready(out)
    bar.update(i + 2)
  elapsed = time.perf_counter() - start
  bar.close()
  return {"eval_compile_s": lower_s + compile_s, "eval_batch_size": eval_batch_size,
          "eval_images": n * eval_batch_size, "eval_images_per_s": n * eval_batch_size / elapsed}


def bench_sample(setup: dict, *, sample_images: int, sample_steps: int) -> dict[str, Any]:
  """images/s of ancestral sampling (one compiled lax.scan), scaled to 1000 steps."""
  task, info, state = setup["task"], setup["info"], setup["state"]
  labels = (jnp.arange(sample_images) % info.num_classes
            if getattr(task, "num_classes", 0) and task.name == "vdm" else None)
  eps_fn, gamma_fn, shape, decode = task.sampler_fns(state.params, state.frozen, labels)

  def run(key):
    out = sampling.ancestral_sample(key, eps_fn=eps_fn, gamma_fn=gamma_fn,
                                    shape=(sample_images,) + tuple(shape), num_steps=sample_steps,
                                    vocab_size=None if decode else info.vocab_size)
    return decode(out) if decode else out

  run = parallel.jit(run)
  key = jax.random.PRNGKey(2)
  say(f"sample: compiling ancestral sampling, {sample_images} images x {sample_steps} steps")
  compiled, lower_s, compile_s = _compile(run, key)
  say(f"sample: compiled in {lower_s + compile_s:.1f} s; one timed call")
  seconds = _median_time(lambda: compiled(key), 1)
  say(f"sample: {seconds:.2f} s; scaled to 1000 steps {seconds * 1000 / sample_steps:,.0f} s")
  return {"sample_compile_s": lower_s + compile_s, "sample_images": sample_images,
          "sample_steps": sample_steps, "sample_s": seconds,
          "sample_images_per_s": sample_images / seconds,
          "sample_images_per_s_1000": sample_images / (seconds * 1000 / sample_steps)}


# ----------------------------------------------------------------------------------------------
# Driver, table, JSON.


def _setup(config, batch_size: int | None, mesh) -> dict[str, Any]:
  mesh = parallel.make_mesh() if mesh is None else mesh
  batch_size = _check_batch("batch_size", batch_size or config.training.batch_size, mesh.size)
  say(f"setup: {config.data.name}: the data set's description, the model, its initial state")
  info, prepared = load_info(config)
  task, optimizer = runs.training_task(config, info), state_lib.build_optimizer(config)
  state = jax.jit(lambda: state_lib.init_state(task, optimizer.tx, seed=config.seed),
                  out_shardings=parallel.replicated(mesh))()
  return {"config": config, "info": info, "prepared": prepared, "task": task,
          "optimizer": optimizer, "mesh": mesh, "state": state, "batch_size": batch_size,
          "step": steps_lib.jit_train_step(config, task, optimizer, mesh),
          "batch": parallel.shard_batch(random_batch(info, batch_size), mesh)}


def run_benchmark(config: ml_collections.ConfigDict, *, batch_size: int | None = None,
                  steps: int = 10, warmup: int = 2, data_steps: int | None = None,
                  eval_images: int | None = None,
                  eval_batch_size: int | None = None, sample_images: int | None = None,
                  sample_steps: int = SAMPLE_STEPS, parts: Sequence[str] = PARTS,
                  roofline_kwargs: dict | None = None, mesh=None) -> dict[str, Any]:
  """Benchmarks one config; see the module docstring for what each part measures.

  Args:
    config: a trainer config (`configs/*.py`).
    batch_size: global train batch (default config.training.batch_size); a multiple of the
      number of devices.
    steps, warmup: timed and untimed train steps.
    data_steps: loop length of each "data" measurement (default `steps`).
    eval_images: images in the timed evaluation (default EVAL_BATCHES eval batches).
    eval_batch_size: default min(config.eval.batch_size, eval_images).
    sample_images: images sampled at once (default config.sample.num_images).
    sample_steps: ancestral steps timed (default SAMPLE_STEPS; the result is also scaled to
      1000 steps, the time being linear in the steps).
    parts: a subset of PARTS; "data" needs "train".
    roofline_kwargs: keyword arguments of `roofline` (e.g. smaller shapes in tests).
    mesh: the device mesh (default all devices).

  Returns:
    A flat dict of numbers (seconds, images/s, FLOPs, MiB) and a few strings describing the run.
  """
  unknown = set(parts) - set(PARTS)
  if unknown or ("data" in parts and "train" not in parts):
    raise ValueError(f"parts must be a subset of {PARTS} ('data' needs 'train'), got {parts!r}")
  if steps < 1 or warmup < 0 or sample_steps < 1:
    raise ValueError(f"expected steps >= 1, warmup >= 0 and sample_steps >= 1, got steps={steps}"
                     f", warmup={warmup}, sample_steps={sample_steps}")
  with parallel.cpu_ynn_fusions(config.xla.cpu_ynn_fusion_type):   # as the trainer compiles
    start = time.perf_counter()
    setup = _setup(config, batch_size, mesh)
    n_dev = setup["mesh"].size
    leaves = jax.tree.leaves(setup["state"].params)
    result: dict[str, Any] = {
        "data": config.data.name, "batch_size": setup["batch_size"], "num_devices": n_dev,
        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
        "dtype": config.model.dtype, "block_impl": tasks.block_impl(config),
        "remat": bool(config.model.remat), "num_blocks": config.model.num_blocks,
        "channels": config.model.channels, "params": int(sum(x.size for x in leaves)),
        "compiler_options": parallel.compiler_options()}
    say(f"setup: {result['params']:,} parameters, batch {setup['batch_size']} over {n_dev} "
        f"{result['backend']} device(s) ({time.perf_counter() - start:.1f} s)")
    if "train" in parts:
      result.update(bench_train(setup, steps=steps, warmup=warmup))
    if "data" in parts:
      result.update(bench_data(setup, steps=data_steps or steps))
    if "eval" in parts:
      eval_images = eval_images or EVAL_BATCHES * config.eval.batch_size
      eb = eval_batch_size or min(config.eval.batch_size, eval_images)
      eb = _check_batch("eval_batch_size", max(n_dev, eb - eb % n_dev), n_dev)
      result.update(bench_eval(setup, eval_images=eval_images, eval_batch_size=eb))
    if "sample" in parts:
      result.update(bench_sample(setup, sample_images=sample_images or config.sample.num_images,
                                 sample_steps=sample_steps))
    if "roofline" in parts:
      roof = roofline(**(roofline_kwargs or {}))
      result.update({"roofline_" + k: v for k, v in roof.items()})
      for name in ("conv", "conv_grad", "matmul") if result.get("flops_per_s") else ():
        result[f"fraction_of_{name}_ceiling"] = result["flops_per_s"] / roof[name + "_flops_per_s"]
    result["process_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return result


def main(config: ml_collections.ConfigDict, *, batch_size: int | None = None, steps: int = 10,
         out_path: str | os.PathLike | None = None, name: str | None = None,
         **kwargs) -> dict[str, Any]:
  """`vdm-jax bench`: runs `run_benchmark`, prints the markdown table, writes JSON to out_path.

  Extra keyword arguments go to `run_benchmark` (warmup, eval_images, sample_steps, parts, ...).

  Raises:
    ConfigError: an invalid config field (all are listed), before anything is compiled.
    ValueError: `steps` or `batch_size` < 1 (and what `run_benchmark` refuses).
  """
  config_checks.check_config(config)
  if batch_size is not None:
    check_number("batch", batch_size, integer=True, low=1)
  start = time.perf_counter()
  result = run_benchmark(config, batch_size=batch_size, steps=steps, **kwargs)
  say(f"done in {time.perf_counter() - start:.0f} s")
  result["name"] = name or config.data.name
  print(bench_report.format_markdown(result), flush=True)
  if out_path:
    print(f"wrote {bench_report.write_json(out_path, [result])}", flush=True)
  return result
