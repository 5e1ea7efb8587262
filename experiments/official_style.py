"""Our train step vs the official VDM code's training structure, on the same network and loss.

The official implementation (github.com/google-research/vdm, experiment.py and train_state.py)
trains with `jax.pmap` over the local devices of a `jax.lax.scan` over `substeps` train steps
(1000 in its CIFAR-10 config): the train state is replicated with a leading device axis, each
outer call takes host batches [devices, substeps, B / devices, H, W, C] (`jnp.asarray` of the
input pipeline's arrays), and each step computes value_and_grad of the loss, `pmean`s the
gradients over "batch", applies AdamW with the scheduled learning rate, updates the EMA
x + (1 - rate)(y - x) and `pmean`s the metrics. Everything float32.

Here that structure is re-created around OUR task (network, ELBO loss, optimiser; written from
the description above, not copied), so only the structure differs, and it runs side by side with
our step (`jax.jit` with NamedShardings over the same devices, state donated, no loop over
steps inside the program) on the same batch size and machine. Both are timed per train step:
the official-style call runs k steps, each timed call ends in block_until_ready, the median over
calls divided by k.

  python experiments/official_style.py --config digits --substeps 0 1 4 --calls 5
  python experiments/official_style.py --config cifar10 --batch 8 --substeps 0 1 --calls 1

Writes experiments/out/official_style_<config>.json and prints a markdown table.
"""

from __future__ import annotations

import functools
import json
import pathlib
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vdm_jax.apps import bench, bench_report
from vdm_jax.core import parallel
from vdm_jax.training import state as state_lib, steps as steps_lib, tasks

import common
from common import ROOT


def official_step_fn(task, tx, *, ema_rate: float):
  """One step in the official structure: (state, batch) -> (state, metrics), inside pmap."""

  def step(base_rng, state, batch):
    rng = jax.random.fold_in(base_rng, jax.lax.axis_index("batch"))
    rng = jax.random.fold_in(rng, state["step"])
    loss_fn = lambda p: task.loss(p, {}, batch, rng)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    grads = jax.lax.pmean(grads, "batch")
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = jax.tree.map(lambda e, p: e + (1.0 - ema_rate) * (p - e), state["ema_params"], params)
    metrics = jax.lax.pmean(metrics, "batch")
    return dict(step=state["step"] + 1, params=params, ema_params=ema,
                opt_state=opt_state), metrics

  return step


def official_train(task, tx, *, ema_rate: float, seed: int, scan: bool = True):
  """pmap over devices of lax.scan over the leading (substeps) axis of the batch.

  scan=False: pmap of a single step (batch without the substeps axis), to separate the cost of
  pmap from the cost of the loop over steps.
  """
  step = functools.partial(official_step_fn(task, tx, ema_rate=ema_rate),
                           jax.random.PRNGKey(seed + 7))
  return jax.pmap(functools.partial(jax.lax.scan, step) if scan else step, axis_name="batch")


def _time_calls(fn, state, make_batch, calls: int):
  times = []
  for _ in range(calls):
    batch = make_batch()
    start = time.perf_counter()
    state, out = jax.block_until_ready(fn(state, batch))
    times.append(time.perf_counter() - start)
  return statistics.median(times), times, state


def bench_official(task, tx, info, *, batch_size: int, substeps: int, calls: int, seed: int,
                   ema_rate: float) -> dict:
  n = jax.local_device_count()
  params, _ = jax.jit(task.init)(jax.random.PRNGKey(seed))
  state = dict(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
               opt_state=tx.init(params))
  state = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), state)
  state = jax.pmap(lambda s: s, axis_name="batch")(state)   # replicated on the devices
  host = bench.random_batch(info, batch_size)
  shaped = {k: v.reshape((n, batch_size // n) + v.shape[1:]) for k, v in host.items()}
  if substeps:   # [devices, substeps, B / devices, ...]
    shaped = {k: np.repeat(v[:, None], substeps, axis=1) for k, v in shaped.items()}
  make_batch = lambda: jax.tree.map(jnp.asarray, shaped)   # the official loop's host->device copy
  fn = official_train(task, tx, ema_rate=ema_rate, seed=seed, scan=bool(substeps))
  start = time.perf_counter()
  state, _ = jax.block_until_ready(fn(state, make_batch()))   # compile + first call
  first = time.perf_counter() - start
  median, times, _ = _time_calls(fn, state, make_batch, calls)
  k = max(substeps, 1)
  return {"impl": f"official-style pmap(scan({substeps}))" if substeps else "pmap(step), no scan",
          "substeps": substeps, "first_call_s": first, "step_s": median / k, "call_s_all": times,
          "train_images_per_s": batch_size * k / median}


def bench_ours(config, task, optimizer, info, *, batch_size: int, calls: int) -> dict:
  mesh = parallel.make_mesh()
  state = jax.jit(lambda: state_lib.init_state(task, optimizer.tx, seed=config.seed),
                  out_shardings=parallel.replicated(mesh))()
  step = steps_lib.jit_train_step(config, task, optimizer, mesh)
  host = bench.random_batch(info, batch_size)
  make_batch = lambda: parallel.shard_batch(host, mesh)
  start = time.perf_counter()
  state, _ = jax.block_until_ready(step(state, make_batch()))
  first = time.perf_counter() - start
  median, times, _ = _time_calls(step, state, make_batch, calls)
  return {"impl": "ours jit + NamedSharding", "substeps": 1, "first_call_s": first,
          "step_s": median, "call_s_all": times, "train_images_per_s": batch_size / median}


def main() -> None:
  p = common.parser(__doc__)
  p.add_argument("--config", default="digits")
  p.add_argument("--batch", type=int, default=0, help="default: the config's batch size")
  p.add_argument("--substeps", type=int, nargs="+", default=[0, 1, 4],
                 help="steps per official-style call; 0 = pmap of one step without the scan")
  p.add_argument("--calls", type=int, default=5, help="timed calls of each after the first")
  p.add_argument("--rounds", type=int, default=1, help="alternate ours / official this often")
  p.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
  p.add_argument("--name", default="", help="output name (default: the config name)")
  p.add_argument("--out", default="")
  args = p.parse_args()
  config = common.load_config(args.config, args.set)
  config.model.dtype = "float32"   # the official code trains in float32
  info, _ = bench.load_info(config)
  task, optimizer = tasks.build_task(config, info), state_lib.build_optimizer(config)
  tx = optimizer.tx
  batch = args.batch or config.training.batch_size
  rows = []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")   # donation on CPU
    for r in range(args.rounds):
      rows.append(dict(bench_ours(config, task, optimizer, info, batch_size=batch,
                                  calls=args.calls), round=r))
      print(json.dumps(rows[-1]), flush=True)
      for k in args.substeps:
        rows.append(dict(bench_official(task, tx, info, batch_size=batch, substeps=k,
                                        calls=args.calls, seed=config.seed,
                                        ema_rate=config.optim.ema_decay), round=r))
        print(json.dumps(rows[-1]), flush=True)
  name = args.name or args.config
  print(markdown(rows, name, batch))
  out = pathlib.Path(args.out or ROOT / "experiments" / "out" / f"official_style_{name}.json")
  bench_report.write_json(out, rows, config=args.config, overrides=args.set, batch_size=batch,
                          blocks=tasks.block_impl(config), devices=jax.local_device_count(),
                          table=markdown(rows, name, batch))
  print(f"wrote {out}")


def markdown(rows: list[dict], name: str, batch: int) -> str:
  """Median step time per implementation over rounds, and our speed-up over each."""
  by_impl: dict[str, list[float]] = {}
  for r in rows:
    by_impl.setdefault(r["impl"], []).append(r["step_s"])
  med = {k: statistics.median(v) for k, v in by_impl.items()}
  ours = med["ours jit + NamedSharding"]
  return common.table(
      [f"{name}, batch {batch}, {jax.local_device_count()} device(s)", "step (s)", "images/s",
       "ours is faster by"],
      [[impl, f"{s:.4g}", f"{batch / s:.4g}", f"{s / ours:.2f}x"] for impl, s in med.items()])


if __name__ == "__main__":
  main()
