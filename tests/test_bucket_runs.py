"""Run directories in a GCS bucket (the emulator on loopback, `vdm_jax.testing.gcs_emulator`): the
same commands as on a local disk, unchanged, with `--workdir gs://...`.

- `vdm-jax train / eval / sample / compress / decompress` on a bucket, the trainer under strace:
  every connection it opens goes to loopback (no credential or metadata look-up leaves);
- two trainers started together on one bucket run: exactly one trains;
- a trainer killed with kill -9 leaves a lease that expires, and the next trainer takes it over
  with a warning naming the old holder;
- the bucket going away during training: one `error:` line and a non-zero exit; the same command,
  once the bucket is back, resumes from the newest complete checkpoint;
- TFDS data prepared under gs:// read by a training run.

Multi-host runs on a bucket (two processes, SIGTERM on both) are in test_multiprocess.py, the
lock's protocol in test_run_lock.py, checkpoints on a bucket in test_checkpoint_integrity.py.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import patience
from test_metrics import tb_scalars
from vdm_jax.testing import gcs_emulator

from vdm_jax.storage import checkpointing, rundir
from vdm_jax.datasets import data
from vdm_jax.training import run_control, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.py")
TIMEOUT = patience(1200)


def _cli(*args, env, timeout=TIMEOUT, prefix=()):
  return subprocess.run([*prefix, sys.executable, "-m", "vdm_jax.cli", *args], env=env,
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _popen(*args, env):
  return subprocess.Popen([sys.executable, "-m", "vdm_jax.cli", *args], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _env(emulator):
  return {**os.environ, **emulator.env}


def _ok(proc):
  assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
  return proc


_CONNECT = re.compile(r"connect\(\d+, \{sa_family=(?P<family>\w+)(?P<rest>[^}]*)\}")


def _outside_connections(trace: str) -> list[str]:
  """The connect() calls of an strace log to anything but loopback or a local socket."""
  outside = []
  for match in _CONNECT.finditer(trace):
    family, rest = match["family"], match["rest"]
    if family in ("AF_UNIX", "AF_NETLINK"):
      continue
    if family == "AF_INET" and 'inet_addr("127.' in rest:
      continue
    if family == "AF_INET6" and ('"::1"' in rest or '"::ffff:127.' in rest):
      continue
    outside.append(match.group(0))
  return outside


@pytest.mark.slow
def test_the_commands_on_a_bucket_and_no_connection_leaves_loopback(gcs, gs_dir, tmp_path):
  strace = shutil.which("strace")
  assert strace, "strace is needed to watch the trainer's connections (apt-get install strace)"
  env, run = _env(gcs), gs_dir + "/run"
  trace = tmp_path / "connect.trace"
  train_run = _ok(_cli("train", "--config", SMOKE, "--workdir", run, env=env,
                       prefix=(strace, "-f", "-qq", "-e", "trace=connect", "-o", str(trace))))
  assert re.search(r"step 4: test bpd \d+\.\d+", train_run.stdout)
  connects = trace.read_text()
  assert "connect(" in connects and f"htons({gcs.port})" in connects   # it did talk to the bucket
  assert not _outside_connections(connects), _outside_connections(connects)[:5]
  # (no train.lock: the lease was released, and a folder of no objects does not exist)
  assert rundir.list_names(run) == ["checkpoints", "config.json", "eval.json", "metrics.jsonl",
                                    "samples", "tb"]
  assert checkpointing.complete_steps(rundir.join(run, "checkpoints")) == [4, 2]
  rows = [json.loads(line) for line in rundir.read_text(run + "/metrics.jsonl").splitlines()]
  assert [r["step"] for r in rows if "train/bpd" in r] == [2, 4] and "eval/bpd" in rows[-1]
  events = rundir.list_names(run + "/tb")
  assert len(events) == 1 and events[0].startswith("events.out.tfevents.")
  tb = tb_scalars(rundir.read_bytes(run + "/tb/" + events[0]))
  assert [step for step, _ in tb["train/bpd"]] == [2, 4] and tb["eval/bpd"][0][0] == 4
  assert rundir.read_json(run + "/eval.json")["step"] == 4
  assert rundir.list_names(run + "/samples") == ["step_00000004.png"]

  _ok(_cli("eval", "--workdir", run, "--num_steps", "10", "--max_examples", "16", env=env))
  assert rundir.read_json(run + "/eval/step4_T10_K1_test.json")["num_examples"] == 16
  _ok(_cli("sample", "--workdir", run, "--steps", "2", "--num", "2", env=env))
  assert {"ancestral_steps2_n2_ckpt4.png", "ancestral_steps2_n2_ckpt4.npz"} <= set(
      rundir.list_names(run + "/samples"))

  images = np.stack([data.get_source("digits", split="test")[i]["image"] for i in range(3)])
  rundir.write_bytes(gs_dir + "/in.npz", rundir.npz_bytes(images=images))
  _ok(_cli("compress", "--workdir", run, "--input", gs_dir + "/in.npz", "--out",
           gs_dir + "/x.vdmz", "--num_steps", "4", env=env))
  _ok(_cli("decompress", "--workdir", run, gs_dir + "/x.vdmz", "--out", gs_dir + "/dec",
           env=env))
  with rundir.read_array(gs_dir + "/dec/images.npz") as out:
    np.testing.assert_array_equal(out["images"], images)
  assert rundir.list_names(gs_dir + "/dec") == ["00000.png", "00001.png", "00002.png",
                                                "images.npz"]


@pytest.mark.slow
def test_two_trainers_started_together_on_a_bucket_run(gcs, gs_dir):
  env, run = _env(gcs), gs_dir + "/run"
  args = ("train", "--config", SMOKE, "--workdir", run, "--config.training.num_steps=40",
          "--config.training.log_every=10", "--config.training.checkpoint_every=20")
  procs = [_popen(*args, env=env) for _ in range(2)]
  outs = [p.communicate(timeout=TIMEOUT) for p in procs]
  codes = sorted(p.returncode for p in procs)
  assert codes == [0, 2], [(p.returncode, o[1][-2000:]) for p, o in zip(procs, outs)]
  loser = outs[[p.returncode for p in procs].index(2)][1]
  errors = [line for line in loser.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "is being trained by another process (pid " in errors[0], loser
  assert "Traceback" not in loser
  assert checkpointing.complete_steps(run + "/checkpoints") == [40, 20]


@pytest.mark.slow
def test_the_lease_of_a_killed_trainer_expires_and_is_taken_over(gcs, gs_dir):
  env, run = _env(gcs), gs_dir + "/run"
  args = ("train", "--config", SMOKE, "--workdir", run, "--config.training.lock_expiry_secs=4")
  first = _popen(*args, "--config.training.num_steps=100000",
                 "--config.training.checkpoint_every=100000", env=env)
  try:
    deadline, held = time.monotonic() + TIMEOUT, None
    while time.monotonic() < deadline and held is None and first.poll() is None:
      claims = [rundir.read_json(run + "/train.lock/" + n)
                for n in rundir.list_names(run + "/train.lock")]
      held = next((c for c in claims if c["held"]), None)
      time.sleep(0.2)
    assert held is not None, "the first trainer never held the lock"
    first.send_signal(signal.SIGKILL)   # a lost VM: no cleanup
    first.wait(timeout=60)
  finally:
    if first.poll() is None:
      first.kill()
  left = rundir.list_names(run + "/train.lock")
  assert len(left) == 1   # its lease stays behind
  # The lease expires 4 s after its last heartbeat (the emulator's clock is this machine's); a
  # trainer starting sooner is refused, which test_run_lock shows without timing a start-up.
  while time.time() - rundir.mtime(run + "/train.lock/" + left[0]) <= 4.5:
    time.sleep(0.2)
  second = _ok(_cli(*args, "--config.training.num_steps=4", env=env))
  taken = [line for line in second.stderr.splitlines() if "taking over the lock" in line]
  assert len(taken) == 1 and held["holder"] in taken[0], second.stderr[-3000:]
  assert re.search(r"step 4: test bpd", second.stdout)


@pytest.mark.slow
def test_the_bucket_going_away_during_training_then_the_same_command_resumes(tmp_path):
  """The storage server is killed while the trainer checkpoints every 10 steps: one `error:` line
  and exit status 1; once it is back (its disk kept the objects), the same command resumes from
  the newest complete checkpoint and finishes (taking over the lease the failed trainer could
  not release, once it expired)."""
  emulator = gcs_emulator.Emulator(storage_dir=str(tmp_path / "disk")).start()
  run = f"gs://{gcs_emulator.BUCKET}/run"
  args = ("train", "--config", SMOKE, "--workdir", run, "--config.training.lock_expiry_secs=5",
          "--config.training.checkpoint_every=10", "--config.training.log_every=10",
          "--config.training.keep_checkpoints=2", "--config.training.num_steps=100000")
  env = _env(emulator)
  proc = _popen(*args, env=env)
  try:
    with emulator.environment():
      deadline = time.monotonic() + TIMEOUT
      while (time.monotonic() < deadline and proc.poll() is None and
             len(checkpointing.complete_steps(run + "/checkpoints")) < 2):
        time.sleep(0.2)
      complete = checkpointing.complete_steps(run + "/checkpoints")
    assert len(complete) >= 2, (complete, proc.poll())
    emulator.stop()
    out, err = proc.communicate(timeout=TIMEOUT)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    emulator.stop()
  assert proc.returncode == 1, err[-3000:]
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
  assert run in errors[0] or "storage" in errors[0], errors
  emulator.start()
  try:
    with emulator.environment():
      newest = checkpointing.complete_steps(run + "/checkpoints")[0]
      # The dead trainer could not release its lease: after lock_expiry_secs it is taken over.
      resumed = _ok(_cli(*args[:-1], f"--config.training.num_steps={newest + 3}", env=env))
      assert f"resumed from step {newest}" in resumed.stderr
      assert "taking over the lock" in resumed.stderr
      assert checkpointing.complete_steps(run + "/checkpoints")[0] == newest + 3
  finally:
    emulator.stop()


def _prepare_tiny_tfds(data_dir: str) -> None:
  """A TFDS data set (8x8x1 uint8 images, 10 classes, 20 train / 6 test) prepared in array_record
  format without TensorFlow (a Tensor feature: TFDS's Image encoder needs TensorFlow)."""
  import tensorflow_datasets as tfds

  class VdmTestTiny(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(20), "test": self._generate_examples(6)}

    def _generate_examples(self, n):
      rng = np.random.default_rng(n)
      for i in range(n):
        yield i, {"image": rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), "label": i % 10}

  VdmTestTiny(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_tfds_data_prepared_in_a_bucket_feeds_a_training_run(gs_dir, tmp_path, registered,
                                                             smoke_config):
  """Prepared where it can be (a local disk), copied into the bucket as `gsutil cp -r` would,
  then read from gs:// by TFDS (its metadata through gcsfs, the array_record files through
  array_record's own GCS client) for training and evaluation."""
  local = tmp_path / "tfds"
  _prepare_tiny_tfds(str(local))
  bucket = gs_dir + "/tfds"
  for path in sorted((local / "vdm_test_tiny").rglob("*")):
    if path.is_file():
      rundir.write_bytes(rundir.join(bucket, str(path.relative_to(local))), path.read_bytes())
  shutil.rmtree(local)   # only the bucket has it now
  registered(data.DATASETS, data.register_dataset, "vdm_test_tiny",
             data.DatasetSpec((8, 8, 1), 256, 10, ("train", "test")))
  info = data.get_info("vdm_test_tiny", data_dir=bucket)
  assert info.num_examples == {"train": 20, "test": 6}
  config = smoke_config
  config.data.name, config.data.data_dir = "vdm_test_tiny", bucket
  result = train.train_and_evaluate(config, gs_dir + "/run")
  assert result["num_examples"] == 6 and np.isfinite(result["bpd"])
