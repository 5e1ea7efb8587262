"""The wheel: `pip install .` (not editable) gives a package that works without the source tree.

The wheel is built from this checkout and unpacked into a folder that comes first on the
subprocesses' path (its dependencies are this environment's; nothing is downloaded). Outside the
source tree: every module imports, the configs ship inside it (`vdm_jax.configs`), the official
config's defaults come from the shipped paper config, and `vdm-jax` finds a shipped config by
name. From the source tree with the wheel: the README's training command trains.
"""

import json
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

from conftest import patience

ROOT = pathlib.Path(__file__).resolve().parents[1]
OFFICIAL = ROOT / "tests" / "data" / "official_parity" / "vdm_loss_4x32_learned_linear.npz"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(folder the wheel was installed into, the wheel's file names)."""
  tmp = tmp_path_factory.mktemp("wheel")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(tmp / "dist"), str(ROOT)], check=True, cwd=tmp,
                 timeout=patience(600), capture_output=True)
  (wheel,) = (tmp / "dist").glob("vdm_jax-*.whl")
  target = tmp / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                  "--target", str(target), str(wheel)], check=True, timeout=patience(600),
                 capture_output=True)
  return target, zipfile.ZipFile(wheel).namelist()


def _python(code_or_args, *, target, cwd, timeout=patience(600)):
  env = {**os.environ, "PYTHONPATH": str(target), "JAX_PLATFORMS": "cpu"}
  args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
  return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True,
                        text=True, timeout=timeout)


def test_the_wheel_holds_every_module_and_config(installed):
  _, names = installed
  sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "vdm_jax").rglob("*.py")}
  configs = {f"vdm_jax/configs/{p.name}" for p in (ROOT / "configs").glob("*.py")}
  assert sources | configs <= set(names), sorted((sources | configs) - set(names))
  assert any(n.endswith("entry_points.txt") for n in names)


def test_without_the_source_tree(installed, tmp_path):
  target, _ = installed
  import numpy as np
  official = json.loads(str(np.load(OFFICIAL)["T0_config"]))
  code = f"""
import importlib, json, pathlib, pkgutil
import vdm_jax
assert vdm_jax.__file__.startswith({str(target)!r}), vdm_jax.__file__
for m in pkgutil.walk_packages(vdm_jax.__path__, "vdm_jax."):
  if not m.name.endswith("gcs_emulator_server"):
    importlib.import_module(m.name)
from vdm_jax import configs
from vdm_jax.official import convert
assert configs.path("cifar10").startswith({str(target)!r})
config = convert.project_config(json.loads({json.dumps(json.dumps(official))}))
print("channels", config.model.channels, "eval", config.eval.batch_size)
"""
  run = _python(code, target=target, cwd=tmp_path)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "channels 32" in run.stdout   # the official net's width, over the paper config's 128
  # `--config cifar10` is the shipped config: the command gets as far as the checkpoint.
  cli = _python(["-m", "vdm_jax.cli", "import-official", "--checkpoint", str(tmp_path / "none"),
                 "--config", "cifar10", "--workdir", str(tmp_path / "run")], target=target,
                cwd=tmp_path)
  assert cli.returncode == 2 and "error: " in cli.stderr, cli.stderr[-3000:]
  assert str(tmp_path / "none") in cli.stderr and "config" not in cli.stderr.split("error:")[1][:40]


@pytest.mark.slow
def test_the_readme_training_command_from_the_source_tree(installed, tmp_path):
  target, _ = installed
  run = _python(["-m", "vdm_jax.cli", "train", "--config", "configs/smoke.py", "--workdir",
                 str(tmp_path / "run")], target=target, cwd=ROOT)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "step 4: test bpd" in run.stdout
