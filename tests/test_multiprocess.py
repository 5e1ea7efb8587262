"""Two real processes on localhost (jax.distributed, CPU collectives): training, checkpointing
and restoring give the same parameters as one process with the same number of devices."""

import os
import pathlib
import runpy
import socket
import subprocess
import sys

import chex
import jax
import pytest

from conftest import patience

from vdm_jax import checkpointing, data, parallel, state as state_lib, tasks

HERE = pathlib.Path(__file__).resolve().parent
TIMEOUT = patience(1800)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(procs_args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, str(HERE / "mp_worker.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
           for args in procs_args]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT)[0].decode())
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def _restore(workdir):
  config = runpy.run_path(str(HERE.parent / "configs" / "smoke.py"))["get_config"]()
  info = data.get_info("digits")
  model, tx = tasks.build_vdm(config, info), state_lib.build_optimizer(config).tx
  abstract = state_lib.abstract_state(
      lambda: state_lib.init_state(model, tx, seed=config.seed, info=info), parallel.make_mesh(1))
  with checkpointing.CheckpointManager(os.path.join(workdir, "checkpoints")) as ckpt:
    step, state, _ = ckpt.restore(abstract)
  return step, jax.device_get(state)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  multi, single = tmp_path / "multi", tmp_path / "single"
  port = _free_port()
  # 2 processes x 1 device, 3 steps; then both restart from the checkpoint and train 2 more.
  for steps in (3, 5):
    _run([(multi, steps, 1, port, 2, i) for i in range(2)])
    port = _free_port()
  _run([(single, 5, 2)])   # 1 process x 2 devices, straight
  s_multi, st_multi = _restore(str(multi))
  s_single, st_single = _restore(str(single))
  assert s_multi == s_single == 5
  chex.assert_trees_all_close(st_multi.params, st_single.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(st_multi.ema_params, st_single.ema_params, rtol=1e-5, atol=1e-6)
