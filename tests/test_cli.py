"""`vdm-jax` entry points: bad input gives one `error:` line on stderr and exit status 2 for every
command; nothing is created by a refused command."""

import pathlib
import subprocess
import sys

import pytest

from conftest import patience

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.py")


def _cli(*args, cwd):
  return subprocess.run([sys.executable, "-m", "vdm_jax.cli", *args], capture_output=True,
                        text=True, timeout=patience(1200), cwd=cwd)


@pytest.mark.parametrize("command, args, message", [
    ("train", ["--config.seed=-1"], "seed=-1: expected an integer in [0, 2147483648)"),
    ("train", ["--config.eval.max_examples=-1"], "eval.max_examples=-1: expected"),
    ("bench", ["--config.training.log_every=0"], "training.log_every=0: expected"),
    ("bench", ["--steps", "0"], "expected steps >= 1"),
    ("import-official", ["--checkpoint", "nowhere"], "data.name: 'digits' has vocab_size 17"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, command, args, message):
  workdir = tmp_path / "run"
  proc = _cli(command, "--config", SMOKE, "--workdir", str(workdir), *args, cwd=tmp_path)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and message in proc.stderr, proc.stderr[-3000:]
  assert not workdir.exists()


def test_library_logs_are_quiet_unless_asked_for(tmp_path):
  """orbax logs dozens of INFO lines per checkpoint through absl's logger: hidden by default
  (the README command's output is the trainer's lines; test_train.test_readme_main_command),
  shown with --library_logs, while the trainer's own INFO lines show either way."""
  workdir = tmp_path / "run"
  proc = _cli("train", "--config", SMOKE, "--workdir", str(workdir), "--library_logs",
              cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "compiling the train step" in proc.stderr
  assert "checkpoint_manager.py" in proc.stderr
  proc = _cli("eval", "--workdir", str(workdir), cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoint_manager.py" not in proc.stderr and "test" in proc.stdout
