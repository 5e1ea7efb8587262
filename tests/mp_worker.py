"""Worker for tests/test_multiprocess.py: trains the smoke config in one of several processes.

usage: python mp_worker.py WORKDIR NUM_STEPS DEVICES_PER_PROCESS [PORT NUM_PROCESSES PROCESS_ID]
"""

import os
import pathlib
import runpy
import sys

workdir, num_steps, local_devices = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

from vdm_jax.training import train

root = pathlib.Path(__file__).resolve().parents[1]
config = runpy.run_path(str(root / "configs" / "smoke.py"))["get_config"]()
config.training.num_steps = num_steps
if len(sys.argv) > 4:
  port, num_processes, process_id = sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
  config.distributed.initialize = "explicit"
  config.distributed.coordinator_address = f"127.0.0.1:{port}"
  config.distributed.num_processes = num_processes
  config.distributed.process_id = process_id
result = train.train_and_evaluate(config, workdir)
print("RESULT", result["bpd"], flush=True)
