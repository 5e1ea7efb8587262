"""`vdm-jax import-official`: an official clu checkpoint -> a run directory that eval and sample
use.

The checkpoint holds the official parity model (4 blocks x 32 channels, learned linear schedule;
tests/data/official_parity): its EMA parameters are the official ones, so the imported run must
reproduce the official loss terms; its (non-EMA) parameters are shifted, so a mix-up of the two
fails.
"""

import json
import pathlib
import runpy
import subprocess
import sys

import flax
import jax
import numpy as np
import optax
import pytest

from conftest import patience
import tensorflow_datasets as tfds
from flax import traverse_util

from vdm_jax.official import convert, official_import
from vdm_jax.maths import elbo
from vdm_jax.apps import evaluation
from vdm_jax.nets import model as model_lib
from vdm_jax.training import runs

from test_official_checkpoint import _OfficialTrainState, _write_clu_save  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "official_parity" / "vdm_loss_4x32_learned_linear.npz"


def _official():
  d = np.load(DATA)
  tree = traverse_util.unflatten_dict(
      {tuple(k.split("/")[1:]): d[k] for k in d.files if k.startswith("param/")})
  return d, tree


def _state(tree, step=1234):
  params = flax.core.freeze({"params": jax.tree.map(lambda x: x + 0.5, tree)})
  ema = flax.core.freeze({"params": tree})
  tx = optax.adamw(1e-3)
  return _OfficialTrainState(step=np.asarray(step, np.int32), params=params, ema_params=ema,
                             opt_state=tx.init(params), tx_fn=tx)


def _config(d):
  config = convert.project_config(json.loads(str(d["T0_config"])))
  config.model.block_impl = "unrolled"
  config.eval.batch_size = 4
  return config


def _check_run(workdir, d):
  """The imported run's EMA parameters reproduce the official loss terms (official draws)."""
  with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
    run = runs.load_run(str(workdir))   # opens the (mock) CIFAR-10 splits
  assert run.step == 1234
  module = run.task.model
  gamma_fn = lambda t: module.apply({"params": run.params}, t, method=model_lib.VDM.gamma)
  eps_fn = lambda z, g: module.apply({"params": run.params}, z, g, method=model_lib.VDM.eps)
  terms = elbo.elbo_terms(jax.random.PRNGKey(0), d["x"], eps_fn=eps_fn, gamma_fn=gamma_fn,
                          vocab_size=256, t=d["t_continuous"], eps=d["eps"], eps_0=d["eps_0"])
  for ours, key in ((terms.prior, "klz"), (terms.reconstruction, "recon"),
                    (terms.diffusion, "diff")):
    ref = d[f"T0_loss_{key}"]
    assert (np.abs(np.asarray(ours) - ref) / np.abs(ref)).max() < 1e-4, key


@pytest.mark.slow
def test_import_then_eval_and_sample(tmp_path):
  d, tree = _official()
  ckpt = tmp_path / "official" / "checkpoints-0"
  _write_clu_save(str(ckpt), 1, _state(tree))
  workdir = tmp_path / "run"
  out = official_import.import_official(str(ckpt), _config(d), str(workdir))
  assert out["step"] == 1234 and out["num_params"] == 337_155 + 2
  _check_run(workdir, d)
  with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
    result = evaluation.run_eval(str(workdir), max_examples=4, num_steps=0,
                                 out=str(tmp_path / "eval.json"))
    sample = evaluation.run_sample(str(workdir), steps=3, num=2, out=str(tmp_path / "samples"),
                                   batch_size=4)
  assert result["num_examples"] == 4 and np.isfinite(result["bpd"])
  assert sample["samples"].shape == (2, 32, 32, 3)
  # A second import into the same run directory is refused, nothing overwritten.
  with pytest.raises(ValueError, match="already holds checkpoints"):
    official_import.import_official(str(ckpt), _config(d), str(workdir))


def test_import_errors_name_the_problem(tmp_path):
  d, tree = _official()
  ckpt = tmp_path / "official" / "checkpoints-0"
  _write_clu_save(str(ckpt), 1, _state(tree))
  wrong = _config(d)
  wrong.model.channels = 64                      # not the checkpoint's network
  with pytest.raises(ValueError, match=r"official parameter '[^']+' has shape .*expects"):
    official_import.import_official(str(ckpt), wrong, str(tmp_path / "a"))
  assert not (tmp_path / "a" / "checkpoints").exists()   # nothing written on failure
  digits = runpy.run_path(str(ROOT / "configs" / "digits.py"))["get_config"]()
  with pytest.raises(ValueError, match="8-bit RGB"):
    official_import.import_official(str(ckpt), digits, str(tmp_path / "b"))
  with pytest.raises(ValueError, match="does not exist"):
    official_import.import_official(str(tmp_path / "nowhere"), _config(d), str(tmp_path / "c"))


def test_cli_import_official_bad_input_is_one_error_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "vdm_jax.cli", "import-official", "--checkpoint",
       str(tmp_path / "nowhere"), "--config", str(ROOT / "configs" / "cifar10.py"),
       "--workdir", str(tmp_path / "run")], capture_output=True, text=True, timeout=patience(900))
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "nowhere" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_import_of_what_clu_writes(tmp_path):
  pytest.importorskip("tensorflow")
  checkpoint = pytest.importorskip("clu.checkpoint")
  d, tree = _official()
  base = tmp_path / "official" / "checkpoints"
  checkpoint.MultihostCheckpoint(str(base), max_to_keep=2).save(_state(tree))
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "vdm_jax.cli", "import-official", "--checkpoint", str(base),
       "--config", str(ROOT / "configs" / "cifar10.py"), "--workdir", str(workdir),
       "--config.model.channels=32", "--config.model.num_blocks=4",
       "--config.model.block_impl=unrolled"], capture_output=True, text=True,
      timeout=patience(1800))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "imported step 1234" in proc.stdout
  _check_run(workdir, d)


def test_import_from_a_bucket_into_a_bucket_without_tensorflow(gs_dir, tmp_path, monkeypatch):
  """The official checkpoint read straight from gs:// (as the released one is, at
  gs://gresearch/vdm/...), into a run directory in a bucket; no TensorFlow is imported."""
  from vdm_jax.storage import rundir
  d, tree = _official()
  local = tmp_path / "official" / "checkpoints-0"
  _write_clu_save(str(local), 1, _state(tree))
  ckpt = gs_dir + "/official/checkpoints-0"
  for path in local.iterdir():
    rundir.write_bytes(rundir.join(ckpt, path.name), path.read_bytes())
  workdir = gs_dir + "/run"
  with monkeypatch.context() as m:
    m.setitem(sys.modules, "tensorflow", None)   # any import of TensorFlow fails
    out = official_import.import_official(ckpt, _config(d), workdir)
  assert out["step"] == 1234
  _check_run(workdir, d)
  assert rundir.read_json(workdir + "/config.json")["config"]["model"]["channels"] == 32
