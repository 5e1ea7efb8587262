"""Multi-host runs as pods and clusters start them, with real processes on localhost
(jax.distributed, gloo CPU collectives), each process running the unchanged `vdm-jax train`:

- two processes on a gs:// run directory (the GCS emulator) equal one process with as many
  devices on a local directory (to 1e-5 in the parameters after the same steps);
- SIGTERM to both processes, as a TPU pod's preemption sends it to every host: both stop after
  the same step, that step's checkpoint is complete, and rerunning both resumes to a state
  bit-identical to an uninterrupted two-process run;
- `distributed.initialize=auto` under SLURM's variables: the processes find each other without a
  coordinator flag.
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import pytest

from conftest import patience
from test_metrics import tb_scalars

from vdm_jax.storage import checkpointing, rundir
from vdm_jax.datasets import data
from vdm_jax.apps import launch
from vdm_jax.core import parallel
from vdm_jax.training import state as state_lib, tasks

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.py")
TIMEOUT = patience(1800)
STEPS = 120


def _free_port(ports=(0,)):
  """The first port of `ports` free on loopback (0: any the system picks)."""
  for port in ports:
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
      return s.getsockname()[1]
  raise RuntimeError("no free port")


def _env(devices: int, extra: dict | None = None) -> dict:
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu", **(extra or {})}
  return env


def _train_args(workdir, steps=STEPS, *more):
  return [sys.executable, "-m", "vdm_jax.cli", "train", "--config", SMOKE, "--workdir",
          str(workdir), f"--config.training.num_steps={steps}", "--config.training.log_every=1",
          "--config.training.checkpoint_every=100000", "--config.training.eval_every=100000",
          "--config.training.sample_every=100000", *more]


def _explicit(port, i):
  return ["--config.distributed.initialize=explicit",
          f"--config.distributed.coordinator_address=127.0.0.1:{port}",
          "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]


def _start(commands_envs):
  return [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for cmd, env in commands_envs]


def _finish(procs, codes=(0,)):
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode in codes, "\n".join(f"--- process {j}:\n{o[-3000:]}"
                                             for j, o in enumerate(outs))
  return outs


class _WriteRecorder:
  """An HTTP proxy in front of the GCS emulator that records the object names of the writes
  (uploads, deletes, copies) it forwards: what one process wrote into the bucket."""

  _NAME = re.compile(rb'"name"\s*:\s*"([^"]+)"')

  def __init__(self, upstream: str):
    import http.client
    import http.server
    import threading
    import urllib.parse
    self.names, recorder = [], self
    target = urllib.parse.urlparse(upstream)

    class Handler(http.server.BaseHTTPRequestHandler):
      def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command != "GET":
          recorder.record(self.path, body)
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=300)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
          if key.lower() not in ("transfer-encoding", "connection", "content-length"):
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

      def log_message(self, *args):
        del args

    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
    threading.Thread(target=self._server.serve_forever, daemon=True).start()

  def record(self, path: str, body: bytes) -> None:
    import urllib.parse
    query = urllib.parse.parse_qs(urllib.parse.urlparse(path).query)
    names = query.get("name") or [urllib.parse.unquote(m.decode())
                                  for m in self._NAME.findall(body[:8192])]
    if not names and "/o/" in path:   # delete / copy / patch: the name is in the path
      names = [urllib.parse.unquote(path.split("?")[0].split("/o/", 1)[1])]
    self.names += names or [f"? {path}"]

  def close(self):
    self._server.shutdown()


def _two_processes(workdir, env_extra, *more, env_extras=None):
  port = _free_port()
  return _start([(_train_args(workdir, STEPS, *more, *_explicit(port, i)),
                  _env(1, {**env_extra, **((env_extras or {}).get(i, {}))}))
                 for i in range(2)])


def _restore(workdir):
  config = __import__("runpy").run_path(SMOKE)["get_config"]()
  info = data.get_info("digits")
  task, tx = tasks.build_task(config, info), state_lib.build_optimizer(config).tx
  abstract = state_lib.abstract_state(lambda: state_lib.init_state(task, tx, seed=config.seed),
                                      parallel.make_mesh(1))
  with checkpointing.CheckpointManager(rundir.join(workdir, "checkpoints")) as ckpt:
    step, state, meta = ckpt.restore(abstract)
  return step, jax.device_get(state), meta


@pytest.mark.slow
def test_two_processes_on_a_bucket_stop_together_and_resume_exactly(gcs, gs_dir, tmp_path):
  straight, stopped, single = gs_dir + "/straight", gs_dir + "/stopped", tmp_path / "single"
  recorder = _WriteRecorder(gcs.url)   # process 1 reaches the bucket through it
  through = {1: {"STORAGE_EMULATOR_HOST": recorder.url, "TENSORSTORE_GCS_HTTP_URL": recorder.url}}
  try:
    _finish(_two_processes(straight, gcs.env, env_extras=through))
  finally:
    recorder.close()
  # Process 1 wrote only its part of the checkpoints; never config.json, metrics, events,
  # samples, eval.json or the lock (process 0's).
  prefix = straight.split("/", 3)[3] + "/"
  assert recorder.names, "process 1 wrote nothing (not even its checkpoint shards)"
  assert all(n.startswith(prefix + "checkpoints/") for n in recorder.names), sorted(
      set(recorder.names))[:20]
  _finish(_start([(_train_args(single), _env(2))]))   # 1 process x 2 devices, local

  procs = _two_processes(stopped, gcs.env)
  try:   # SIGTERM to both hosts once process 0 has logged a few steps
    for line in procs[0].stdout:
      match = re.match(r"step (\d+)/", line)
      if match and int(match[1]) >= 3:
        break
    for p in procs:
      p.send_signal(signal.SIGTERM)
    outs = [line + out for line, out in zip(["", ""], _finish(procs, codes=(3,)))]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  saved = [re.search(r"SIGTERM received: saved step (\d+)", out) for out in outs]
  assert all(saved), outs[1][-3000:]
  steps = {int(m[1]) for m in saved}
  assert len(steps) == 1, steps   # both processes stopped after the same step
  (step,) = steps
  assert 3 <= step < STEPS
  assert checkpointing.complete_steps(stopped + "/checkpoints") == [step]
  assert _restore(stopped)[0] == step   # complete: every process's part is there
  # The metrics and TensorBoard events of every step up to the stop are in the bucket.
  logged = [json.loads(line)["step"] for line in
            rundir.read_text(stopped + "/metrics.jsonl").splitlines()]
  (events,) = rundir.list_names(stopped + "/tb")
  tb = tb_scalars(rundir.read_bytes(stopped + "/tb/" + events))
  assert logged == list(range(1, step + 1)) == [s for s, _ in tb["train/bpd"]]

  _finish(_two_processes(stopped, gcs.env))   # the same command resumes
  s_straight, st_straight, meta_straight = _restore(straight)
  s_stopped, st_stopped, meta_stopped = _restore(stopped)
  s_single, st_single, _ = _restore(str(single))
  assert s_straight == s_stopped == s_single == STEPS
  assert meta_straight["data_position"] == meta_stopped["data_position"] == STEPS
  chex.assert_trees_all_equal(st_stopped, st_straight)   # bit for bit, optimiser state included
  chex.assert_trees_all_close(st_straight.params, st_single.params, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(st_straight.ema_params, st_single.ema_params, rtol=1e-5, atol=1e-5)
  # Only process 0 wrote the run's bookkeeping; both took part in the checkpoint.
  assert sorted(rundir.list_names(straight)) == ["checkpoints", "config.json", "eval.json",
                                                  "metrics.jsonl", "samples", "tb"]


def test_auto_initialize_finds_a_slurm_job_without_coordinator_flags(tmp_path):
  """Two processes with the variables SLURM sets for `srun --ntasks=2` on one node, and
  `distributed.initialize=auto`: JAX's SLURM detection gives the coordinator (the first node,
  a port derived from the job id), the process count and each process's id."""
  port = _free_port(range(61440, 65536))   # where JAX puts the coordinator of a SLURM job
  slurm = {"SLURM_JOB_ID": str(port - 61440 + 4096), "SLURM_STEP_NODELIST": "localhost",
           "SLURM_NTASKS": "2", "SLURM_STEP_NUM_NODES": "1"}
  # What every task of `vdm-jax launch slurm` runs.
  spec = launch.LaunchSpec(config=SMOKE, workdir=str(tmp_path / "run"), nodes=1,
                           overrides=("training.num_steps=4",))
  argv = launch.train_command(spec, distributed=True)
  assert argv[:2] == ["vdm-jax", "train"] and argv[-1] == "--config.distributed.initialize=auto"
  procs = _start([([sys.executable, "-m", "vdm_jax.cli", *argv[1:]],
                   _env(1, {**slurm, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)}))
                  for i in range(2)])
  outs = _finish(procs)
  for i, out in enumerate(outs):
    assert f"process {i} of 2, 2 devices (1 here)" in out, out[-3000:]
  assert re.search(r"step 4: test bpd", outs[0]) and "test bpd" not in outs[1]
