"""`vdm-jax eval` / `vdm-jax sample` on tiny trained runs: JSON and files written, every sampler,
both kinds of guidance, the classifier task, and a clear error for each bad input."""

import json
import os
import pathlib
import re
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import patience

from vdm_jax.training import config_checks, runs as runs_lib, train
from vdm_jax.apps import evaluation

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(name="smoke", **overrides):
  c = runpy.run_path(str(ROOT / "configs" / f"{name}.py"))["get_config"]()
  c.training.num_steps = 2
  c.training.checkpoint_every = 1
  c.sample.num_steps = 4
  c.sample.num_images = 4
  for key, value in overrides.items():
    section, field = key.split("__")
    c[section][field] = value
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("runs")
  out = {"uncond": str(base / "uncond"), "cond": str(base / "cond"),
         "classifier": str(base / "classifier")}
  train.train_and_evaluate(_config(), out["uncond"])
  # 5 steps: the zero-initialised output convs let the label reach eps only from step 4 on.
  train.train_and_evaluate(_config(model__conditional=True, training__num_steps=5), out["cond"])
  clf = _config(model__channels=8, model__num_blocks=1)
  clf.task = "classifier"
  train.train_and_evaluate(clf, out["classifier"])
  return out


def test_eval_writes_bound_and_terms(runs, tmp_path):
  out = str(tmp_path / "e.json")
  result = evaluation.run_eval(runs["uncond"], num_steps=10, t_samples=2, max_examples=16,
                               out=out)
  with open(out) as f:
    stored = json.load(f)
  for key in ("bpd", "bpd_se", "prior_bpd", "reconstruction_bpd", "diffusion_bpd"):
    assert np.isfinite(stored[key]) and stored[key] == result[key]
  assert stored["num_steps"] == 10 and stored["t_samples"] == 2 and stored["num_examples"] == 16
  terms = stored["prior_bpd"] + stored["reconstruction_bpd"] + stored["diffusion_bpd"]
  assert abs(terms - stored["bpd"]) < 1e-4
  assert stored["checkpoint"] == 2 and stored["bpd_se"] > 0


def test_eval_with_ode_bound_side_by_side(runs, tmp_path):
  result = evaluation.run_eval(runs["uncond"], max_examples=8, batch_size=8, ode=True,
                               ode_method="heun", out=str(tmp_path / "o.json"))
  assert result["ode_num_examples"] == 8 and result["ode_method"] == "heun"
  assert np.isfinite(result["bpd"]) and result["ode_bpd_se"] > 0
  # The same ODE solved another way (Heun with 4x the steps, same seed: the same dequantisation
  # and trace probes) gives the same likelihood up to the 100-step solver's error.
  fine = evaluation.ode_eval(runs_lib.load_run(runs["uncond"]), method="heun", num_steps=400,
                             max_examples=8)
  assert fine["ode_num_examples"] == 8
  np.testing.assert_allclose(result["ode_bpd"], fine["ode_bpd"], rtol=0.02)
  with pytest.raises(ValueError, match="needs a pixel-space VDM run"):
    evaluation.run_eval(runs["classifier"], max_examples=8, batch_size=8, ode=True)


def test_eval_default_path_and_older_checkpoint(runs):
  result = evaluation.run_eval(runs["uncond"], checkpoint=1, max_examples=16)
  assert result["checkpoint"] == 1 and result["num_steps"] == 0
  assert os.path.exists(os.path.join(runs["uncond"], "eval", "step1_T0_K1_test.json"))


def test_classifier_task_reports_accuracy(runs):
  """accuracy_clean is the classifier's top-1 accuracy at gamma_min, recomputed here from its
  logits on z = alpha x + sigma eps at gamma_min: the argmax of every image is the same for 32
  noise draws, so the evaluation's own draw must give this accuracy too."""
  import jax
  import jax.numpy as jnp
  from vdm_jax.nets import classifier as classifier_lib
  from vdm_jax.maths import diffusion, elbo
  from vdm_jax.datasets import pipeline
  result = evaluation.run_eval(runs["classifier"], max_examples=16)
  assert result["task"] == "classifier" and np.isfinite(result["nll"])
  run = runs_lib.load_run(runs["classifier"])
  model = run.task.model
  batch = next(pipeline.eval_iterator("digits", split="test", global_batch_size=16))
  x = elbo.encode(jnp.asarray(batch["image"]), vocab_size=model.vocab_size)
  gamma = jnp.full((16,), model.gamma_min)
  logits_of = jax.jit(lambda z: model.apply({"params": run.params}, z, gamma,
                                            method=classifier_lib.NoisyClassifierModel.logits))
  keys = jax.random.split(jax.random.PRNGKey(1), 32)
  predicted = np.stack([np.argmax(logits_of(diffusion.q_sample(
      x, gamma, jax.random.normal(k, x.shape))), axis=-1) for k in keys])
  assert (predicted == predicted[:1]).all()
  expected = np.mean(predicted[0] == np.asarray(batch["label"]))
  assert result["accuracy_clean"] == pytest.approx(expected, abs=1e-9)
  assert result["num_examples"] == 16 and result["accuracy"] * 16 == pytest.approx(
      round(result["accuracy"] * 16), abs=1e-6)   # a mean over the 16 examples


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "ode", "langevin", "pc", "ddpm"])
def test_every_sampler_writes_png_and_npz(runs, tmp_path, sampler):
  out = evaluation.run_sample(runs["uncond"], sampler=sampler, steps=3, num=5, batch_size=4,
                              out=str(tmp_path))
  assert os.path.exists(out["png"])
  samples = np.load(out["npz"])["samples"]
  assert samples.shape == (5, 8, 8, 1) and samples.dtype == np.int32
  assert samples.min() >= 0 and samples.max() < 17
  np.testing.assert_array_equal(samples, out["samples"])


def test_guided_eps_is_the_guidance_formula(runs):
  """eps_w = (1 + w) eps(z, y) - w eps(z, null) (classifier-free); eps - w sigma grad log p(y|z)
  (classifier); checked against the task's own closures on random z."""
  import jax
  import jax.numpy as jnp
  from vdm_jax.maths import diffusion
  run, clf = runs_lib.load_run(runs["cond"]), runs_lib.load_run(runs["classifier"])
  z = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  g = jnp.full((4,), 1.0)
  y, null = jnp.full((4,), 3, jnp.int32), jnp.full((4,), 10, jnp.int32)
  cond = run.task.sampler_fns(run.params, run.frozen, y)[0](z, g)
  uncond = run.task.sampler_fns(run.params, run.frozen, null)[0](z, g)
  assert float(jnp.max(jnp.abs(cond - uncond))) > 0   # the label matters after training
  guided = evaluation.guided_fns(run, labels=y, guidance=3.0)[0](z, g)
  np.testing.assert_allclose(guided, 4.0 * cond - 3.0 * uncond, rtol=1e-5, atol=1e-6)
  plain = evaluation.guided_fns(run, labels=y, guidance=0.0)[0](z, g)
  np.testing.assert_allclose(plain, cond, rtol=1e-6, atol=1e-7)
  clf_eps = evaluation.guided_fns(run, labels=y, guidance=2.0, classifier=clf)[0](z, g)
  grad = jax.grad(lambda zz: jnp.sum(clf.task.log_prob_fn(clf.params, y)(zz, g)))(z)
  sigma = diffusion.alpha_sigma(1.0)[1]
  np.testing.assert_allclose(clf_eps, uncond - 2.0 * sigma * grad, rtol=1e-4, atol=1e-6)


def test_classifier_free_guidance_sample_files(runs, tmp_path):
  out = evaluation.run_sample(runs["cond"], sampler="ddim", steps=4, num=4, label=3,
                              guidance=3.0, out=str(tmp_path), seed=1)
  assert out["samples"].shape == (4, 8, 8, 1) and "label3_w3" in out["png"]


def test_classifier_guidance_on_unconditional_model(runs, tmp_path):
  out = evaluation.run_sample(runs["uncond"], sampler="ancestral", steps=4, num=4, label=2,
                              guidance=1.0, classifier_workdir=runs["classifier"],
                              out=str(tmp_path))
  assert out["samples"].shape == (4, 8, 8, 1) and out["png"].endswith("_clf.png")


@pytest.mark.parametrize("kwargs, match", [
    (dict(sampler="euler_maruyama"), r"unknown sampler 'euler_maruyama'"),
    (dict(steps=0), r"expected steps to be an integer >= 1, got 0"),
    (dict(num=-1), r"expected num to be an integer >= 1, got -1"),
    (dict(label=10), r"label 10 is outside the classes of 'digits'.*\[0, 10\)"),
    (dict(label=-1, guidance=1.0), r"label -1 is outside"),
    (dict(label=3, guidance=1.0), r"unconditional"),
    (dict(label=3), r"needs a class-conditional model"),
    (dict(guidance=-1.0), r"guidance must be a finite number >= 0, got -1.0"),
    (dict(batch_size=0), r"expected batch_size to be an integer >= 1, got 0"),
])
def test_sample_bad_input(runs, kwargs, match):
  with pytest.raises(ValueError, match=match):
    evaluation.run_sample(runs["uncond"], **dict(dict(steps=2, num=2), **kwargs))


def test_classifier_run_cannot_sample_and_must_be_a_classifier(runs):
  with pytest.raises(ValueError, match="cannot sample"):
    evaluation.run_sample(runs["classifier"], steps=2, num=2)
  with pytest.raises(runs_lib.RunError, match="expected a 'classifier' run"):
    evaluation.run_sample(runs["uncond"], steps=2, num=2, label=1, guidance=1.0,
                          classifier_workdir=runs["cond"])


def test_missing_run_or_checkpoint(runs, tmp_path):
  with pytest.raises(runs_lib.RunError, match="not a vdm-jax run directory"):
    evaluation.run_eval(str(tmp_path / "nothing"))
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text(
      (pathlib.Path(runs["uncond"]) / "config.json").read_text())
  with pytest.raises(runs_lib.RunError, match="holds no checkpoint"):
    evaluation.run_sample(str(empty), steps=2, num=2)
  assert not (empty / "checkpoints").exists()   # nothing created as a side effect
  with pytest.raises(runs_lib.RunError, match=r"no checkpoint for step 7.*\[1, 2\]"):
    evaluation.run_eval(runs["uncond"], checkpoint=7)


def test_cli_errors_are_one_line(runs, tmp_path):
  """Bad input through the CLI: exit 2, the message, no traceback."""
  for args, match in [
      (["sample", "--workdir", runs["uncond"], "--sampler", "nope"], "unknown sampler 'nope'"),
      (["eval", "--workdir", str(tmp_path / "none")], "not a vdm-jax run directory"),
      (["sample", "--workdir", runs["uncond"], "--steps", "0"], "expected steps to be an integer >= 1"),
      # 0 is not "the default" (it once silently meant 256)
      (["sample", "--workdir", runs["uncond"], "--steps", "2", "--num", "2", "--batch_size", "0",
        "--out", str(tmp_path / "s0")], "expected batch_size to be an integer >= 1, got 0"),
  ]:
    proc = subprocess.run([sys.executable, "-m", "vdm_jax.cli", *args], capture_output=True,
                          text=True, timeout=patience(900))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert match in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_cli_eval_and_sample(runs, tmp_path):
  out = tmp_path / "cli.json"
  proc = subprocess.run([sys.executable, "-m", "vdm_jax.cli", "eval", "--workdir", runs["uncond"],
                         "--num_steps", "5", "--t_samples", "1", "--max_examples", "16",
                         "--out", str(out)], capture_output=True, text=True, timeout=patience(900))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "bpd" in proc.stdout and json.loads(out.read_text())["num_steps"] == 5
  # What it does, while it does it (stderr): a line, then one per batch.
  assert "eval: checkpoint 2, test: 16 examples in 1 batches of" in proc.stderr
  assert re.search(r"batch 1/1 \(100.0%\) \| bpd \d", proc.stderr), proc.stderr[-2000:]
  proc = subprocess.run([sys.executable, "-m", "vdm_jax.cli", "sample", "--workdir",
                         runs["cond"], "--sampler", "ddim", "--steps", "3", "--num", "4",
                         "--label", "7", "--guidance", "1", "--out", str(tmp_path / "s")],
                        capture_output=True, text=True, timeout=patience(900))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len(list((tmp_path / "s").glob("*.npz"))) == 1
  assert "sample: 4 images, ddim, 3 steps, checkpoint" in proc.stderr
  assert "batch 1/1 (100.0%)" in proc.stderr


def test_eval_prints_the_bound_before_a_failed_write(runs, tmp_path, capsys):
  """A run whose eval/ directory cannot be created (here a file stands in its way; a read-only
  run directory fails the same way): the bound is printed, then one error names the file."""
  run = tmp_path / "read_only"
  shutil.copytree(runs["uncond"], run, ignore=shutil.ignore_patterns("eval"))
  (run / "eval").write_text("not a directory")
  with pytest.raises(runs_lib.RunError,
                     match=r"the result above was not saved: cannot write .*step2_T0_K1_test"):
    evaluation.run_eval(str(run), max_examples=16)
  out = capsys.readouterr().out
  assert re.search(r"checkpoint 2, test \(16 examples, T=continuous, 1 t-samples\): bpd \d", out), out


def test_eval_bad_batch_size_and_max_examples(runs):
  with pytest.raises(ValueError, match="expected batch_size to be an integer >= 1, got 0"):
    evaluation.run_eval(runs["uncond"], batch_size=0)
  with pytest.raises(ValueError, match="expected max_examples to be an integer >= 1, got -1"):
    evaluation.run_eval(runs["uncond"], max_examples=-1)


def test_a_damaged_config_json_is_named(runs, tmp_path):
  run = tmp_path / "damaged"
  shutil.copytree(runs["uncond"], run)
  path = run / "config.json"
  path.write_text(path.read_text()[:200])   # truncated
  for call in (lambda: evaluation.run_eval(str(run)),
               lambda: evaluation.run_sample(str(run), steps=2, num=2, out=str(tmp_path / "s"))):
    with pytest.raises(config_checks.ConfigError, match=rf"{re.escape(str(path))} is damaged"):
      call()


def test_sample_out_an_existing_file_is_refused_before_sampling(runs, tmp_path, monkeypatch):
  taken = tmp_path / "taken.png"
  taken.write_bytes(b"mine")
  monkeypatch.setattr(evaluation.steps_lib, "draw_samples",
                      lambda *a, **k: pytest.fail("sampled before checking --out"))
  with pytest.raises(runs_lib.RunError, match="exists and is not a directory"):
    evaluation.run_sample(runs["uncond"], steps=2, num=2, out=str(taken))
  assert taken.read_bytes() == b"mine"
