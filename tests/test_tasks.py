"""The trainer's other tasks end to end on tiny configs: the VAE, latent diffusion on its frozen
latents (composed bound in bpd of the data, sampling, frozen parameters), and their errors."""

import dataclasses
import json
import pathlib
import runpy
import shutil

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vdm_jax.training import config_checks, runs as runs_lib, tasks, train
from vdm_jax.datasets import data
from vdm_jax.apps import evaluation

import tiny_net

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(task, **vae):
  """The smoke config for `task`, with a tiny VAE and, for the latent VDM, a tiny score network
  (tests/tiny_net.py; registered while the module's tests run): the subject here is the tasks'
  composition, not the networks."""
  c = runpy.run_path(str(ROOT / "configs" / "smoke.py"))["get_config"]()
  c.task = task
  c.model.network = "test_tasks_tiny_net"
  c.vae.channels = 8
  c.vae.latent_channels = 2
  c.vae.num_blocks = 0
  for k, v in vae.items():
    c.vae[k] = v
  c.training.num_steps = 3
  c.training.checkpoint_every = 3
  c.sample.num_steps = 4
  c.sample.num_images = 4
  return c


@pytest.fixture(scope="module", autouse=True)
def _tiny_score_net():
  with tiny_net.registered("test_tasks_tiny_net"):
    yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("tasks")
  vae_dir, latent_dir = str(base / "vae"), str(base / "latent")
  vae_result = train.train_and_evaluate(_config("vae"), vae_dir)
  config = _config("latent_vdm")
  config.latent.vae_workdir = vae_dir
  latent_result = train.train_and_evaluate(config, latent_dir)
  return {"vae": vae_dir, "latent": latent_dir, "vae_result": vae_result,
          "latent_result": latent_result, "base": base}


def test_vae_reports_its_bound(runs):
  """The VAE run's reported bound and standard error against a direct Monte-Carlo estimate: the
  task's own per-example values on the same 32 test images, 64 latent draws each (float64).
  The reported mean has one draw per image: tolerance 5 standard errors of the two estimates
  given the images. Its SE estimates sqrt(variance of one draw over images and draws / 32):
  tolerance a factor 1.5 (an SE from 32 values spreads by ~13%)."""
  r = runs["vae_result"]
  np.testing.assert_allclose(r["reconstruction_bpd"] + r["kl_bpd"], r["bpd"], rtol=1e-5)
  assert (pathlib.Path(runs["vae"]) / "samples" / "step_00000003.png").exists()
  run = runs_lib.load_run(runs["vae"])
  source = data.get_source("digits", split="test")
  n = r["num_examples"]
  assert n == 32
  batch = {"image": jnp.asarray(source.images[:n], jnp.int32),
           "label": jnp.asarray(source.labels[:n], jnp.int32)}
  draws = jax.jit(jax.vmap(lambda key: run.task.eval_terms(
      run.params, run.frozen, batch, key, num_steps=0)["bpd"]))(
          jax.random.split(jax.random.PRNGKey(7), 64))
  draws = np.asarray(draws, np.float64)                   # [64 draws, 32 images]
  within = draws.var(axis=0, ddof=1).mean()               # latent noise, per image
  se_reported_mean = np.sqrt(within / n)
  se_mc = np.sqrt(within / draws.size)
  assert abs(r["bpd"] - draws.mean()) < 5 * np.hypot(se_reported_mean, se_mc) + 1e-5, (
      r["bpd"], draws.mean(), se_reported_mean)
  se = np.sqrt((draws.mean(axis=0).var(ddof=1) + within) / n)
  assert 1 / 1.5 < r["bpd_se"] / se < 1.5, (r["bpd_se"], se)


def test_latent_bound_composes_in_bpd_of_the_data(runs):
  r = runs["latent_result"]
  parts = ("data_reconstruction_bpd", "neg_entropy_bpd", "latent_prior_bpd",
           "latent_reconstruction_bpd", "latent_diffusion_bpd")
  np.testing.assert_allclose(sum(r[p] for p in parts), r["bpd"], rtol=1e-4)
  assert np.isfinite(r["bpd"]) and r["num_examples"] == 32


def test_latent_run_keeps_the_vae_frozen(runs):
  vae = runs_lib.load_run(runs["vae"])
  latent = runs_lib.load_run(runs["latent"])
  chex.assert_trees_all_equal(latent.frozen["vae"]["autoencoder"], vae.params)
  assert "vae" not in latent.params   # the optimiser never saw it


def test_latent_eval_and_sample_without_the_vae_run(runs, tmp_path):
  """A latent run is self-contained: its checkpoint holds the VAE."""
  copy = tmp_path / "latent_copy"
  shutil.copytree(runs["latent"], copy)
  stored = json.loads((copy / "config.json").read_text())
  stored["config"]["latent"]["vae_workdir"] = str(tmp_path / "gone")   # the VAE run is gone
  (copy / "config.json").write_text(json.dumps(stored))
  result = evaluation.run_eval(str(copy), max_examples=16, num_steps=10)
  assert result["task"] == "latent_vdm"
  # The same bound as the original run's, whose VAE run still exists (same seed, same draws).
  original = evaluation.run_eval(runs["latent"], max_examples=16, num_steps=10,
                                 out=str(tmp_path / "original.json"))
  for k in ("bpd", "bpd_se", "latent_diffusion_bpd", "data_reconstruction_bpd"):
    np.testing.assert_allclose(result[k], original[k], rtol=1e-6, err_msg=k)
  out = evaluation.run_sample(str(copy), sampler="ddim", steps=3, num=4, out=str(tmp_path))
  assert out["samples"].shape == (4, 8, 8, 1) and out["samples"].max() < 17


def test_vae_samples_through_any_sampler(runs, tmp_path):
  out = evaluation.run_sample(runs["vae"], sampler="ancestral", steps=3, num=3, out=str(tmp_path))
  assert out["samples"].shape == (3, 8, 8, 1) and out["samples"].dtype == np.int32


def test_latent_task_errors(runs, tmp_path):
  config = _config("latent_vdm")
  with pytest.raises(config_checks.ConfigError, match="latent.vae_workdir=''"):
    config_checks.check_config(config)
  config.latent.vae_workdir = runs["latent"]   # not a VAE run
  with pytest.raises(ValueError, match="is a 'latent_vdm' run on 'digits'; expected a 'vae'"):
    train.train_and_evaluate(config, str(tmp_path / "bad"))
  config = _config("latent_vdm", latent_channels=3)
  config.latent.vae_workdir = runs["vae"]
  with pytest.raises(ValueError, match="differs from the VAE run's"):
    train.train_and_evaluate(config, str(tmp_path / "bad2"))


def test_tasks_are_registered_and_built_by_name(registered, smoke_config):
  """config.task names a registered builder; the built task satisfies the Task protocol; an
  unknown name lists the registered ones; a builder returning something else is refused."""
  info = data.get_info("digits")
  assert set(tasks.TASKS.names()) >= {"vdm", "classifier", "vae", "latent_vdm"}
  for name in ("vdm", "classifier", "vae"):
    config = ml_collections.ConfigDict(smoke_config.to_dict())
    config.task = name
    task = tasks.build_task(config, info)
    assert isinstance(task, tasks.Task) and task.name == name and task.info == info

  @dataclasses.dataclass(frozen=True)
  class Echo(tasks.VDMTask):
    name: str = "echo"

  registered(tasks.TASKS, tasks.register_task, "echo",
             lambda config, info, vae_params=None: Echo(tasks.build_vdm(config, info), info))
  smoke_config.task = "echo"
  config_checks.check_config(smoke_config)   # the rule knows the registered names
  assert tasks.build_task(smoke_config, info).name == "echo"
  smoke_config.task = "no_such_task"
  with pytest.raises(ValueError, match=r"unknown task 'no_such_task'; expected one of .*'echo'"):
    tasks.build_task(smoke_config, info)
  with pytest.raises(config_checks.ConfigError, match="task='no_such_task'"):
    config_checks.check_config(smoke_config)
  registered(tasks.TASKS, tasks.register_task, "broken", lambda config, info, vae_params=None: 3)
  smoke_config.task = "broken"
  with pytest.raises(ValueError, match="task 'broken' returned int, which lacks part of the Task"):
    tasks.build_task(smoke_config, info)
