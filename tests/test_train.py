"""Trainer tests: end to end on digits and mock CIFAR-10, resumption, 1 vs 4 devices, config
validation, workdir safety, and the README's main command (slow)."""

import json
import os
import pathlib
import runpy
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import patience

from vdm_jax.training import config_checks, state as state_lib, stored_config
from vdm_jax.datasets import data, pipeline
from vdm_jax.core import parallel
from vdm_jax.training import steps as steps_lib, tasks, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name):
  return runpy.run_path(str(ROOT / "configs" / f"{name}.py"))["get_config"]()


def _steps_logged(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f if '"train/bpd"' in line]


def test_smoke_trains_checkpoints_and_resumes(tmp_path):
  config = load_config("smoke")
  workdir = str(tmp_path / "run")
  result = train.train_and_evaluate(config, workdir)
  assert np.isfinite(result["bpd"]) and result["num_examples"] == 32
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "4"
  assert os.path.exists(os.path.join(workdir, "samples", "step_00000004.png"))
  assert os.path.exists(os.path.join(workdir, "eval.json"))
  config.training.num_steps = 6
  train.train_and_evaluate(config, workdir)
  steps = _steps_logged(workdir)
  assert steps == [2, 4, 6], steps   # the second run started at step 4, not 0
  assert "6" in os.listdir(os.path.join(workdir, "checkpoints"))


def test_the_config_chooses_the_xla_cpu_fusions_of_everything_the_run_compiles(tmp_path,
                                                                              monkeypatch):
  """config.xla.cpu_ynn_fusion_type reaches every program the trainer compiles (train step,
  evaluation, samples) and, through the stored config, those of `vdm-jax eval` / `sample`."""
  from vdm_jax.apps import evaluation
  monkeypatch.delenv(parallel.CPU_OPTIONS_ENV, raising=False)
  seen, jit = [], parallel.jit
  monkeypatch.setattr(parallel, "jit", lambda f, **kw: seen.append(parallel.compiler_options())
                      or jit(f, **kw))
  config = load_config("smoke")
  config.xla.cpu_ynn_fusion_type = "LIBRARY_FUSION_TYPE_DOT"
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  expected = ({"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
              if jax.default_backend() == "cpu" else None)
  assert len(seen) >= 3 and all(options == expected for options in seen), seen
  assert parallel.compiler_options("cpu")["xla_cpu_experimental_ynn_fusion_type"] == (
      parallel.CPU_YNN_FUSION_TYPE)   # only within the run
  seen.clear()
  evaluation.run_eval(workdir, max_examples=8)
  evaluation.run_sample(workdir, steps=2, num=2, out=str(tmp_path / "samples"))
  assert len(seen) >= 2 and all(options == expected for options in seen), seen


def test_mock_cifar10_end_to_end(tmp_path):
  import tensorflow_datasets as tfds
  config = load_config("smoke")
  config.data.name = "cifar10"
  config.eval.max_examples = 16
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    result = train.train_and_evaluate(config, str(tmp_path / "cifar"))
  assert np.isfinite(result["bpd"])
  assert result["num_examples"] == 16
  assert "4" in os.listdir(tmp_path / "cifar" / "checkpoints")
  assert (tmp_path / "cifar" / "samples" / "step_00000004.png").exists()


def _one_step(num_devices):
  config = load_config("smoke")
  info = data.get_info("digits")
  task, tx = tasks.build_task(config, info), state_lib.build_optimizer(config).tx
  mesh = parallel.make_mesh(num_devices)
  rep = parallel.replicated(mesh)
  state = jax.jit(lambda: state_lib.init_state(task, tx, seed=0), out_shardings=rep)()
  step = jax.jit(steps_lib.make_train_step(task, tx, ema_decay=0.9),
                 in_shardings=(rep, parallel.batch_sharding(mesh)), out_shardings=(rep, rep))
  batch = next(pipeline.train_iterator("digits", global_batch_size=8, seed=0))
  for _ in range(2):
    state, out = step(state, parallel.shard_batch(batch, mesh))
  return jax.device_get(state.params), jax.device_get(out)


def test_same_step_on_one_and_four_devices():
  assert jax.device_count() >= 4
  p1, m1 = _one_step(1)
  p4, m4 = _one_step(4)
  chex.assert_trees_all_close(m1["bpd"], m4["bpd"], rtol=1e-5)
  chex.assert_trees_all_close(p1, p4, rtol=1e-4, atol=1e-6)


def test_config_errors_name_every_bad_field():
  config = load_config("smoke")
  config.optim.learning_rate = -1.0
  config.training.num_steps = 0
  config.model.gamma_min = 6.0
  config.data.name = "imagenet"
  config.model.schedule = "sqrt"
  config.training.batch_size = 6
  with pytest.raises(config_checks.ConfigError) as err:
    config_checks.check_config(config, num_devices=4)
  msg = str(err.value)
  for field in ("optim.learning_rate=-1.0", "training.num_steps=0", "model.gamma_min=6.0",
                "data.name='imagenet'", "model.schedule='sqrt'", "training.batch_size=6"):
    assert field in msg, (field, msg)


def test_bad_config_rejected_before_compiling(tmp_path):
  config = load_config("smoke")
  config.training.batch_size = 6      # not divisible by the 4 devices
  with pytest.raises(ValueError, match="batch_size=6"):
    train.train_and_evaluate(config, str(tmp_path / "bad"))
  assert not os.path.exists(tmp_path / "bad" / "checkpoints")


def test_workdir_refuses_a_different_model(tmp_path):
  config = load_config("smoke")
  stored_config.check_workdir_config(config, str(tmp_path))
  config.model.channels = 16
  config.data.flip = True
  with pytest.raises(config_checks.ConfigError, match=r"model.channels: 8 -> 16") as err:
    stored_config.check_workdir_config(config, str(tmp_path))
  assert "data.flip: False -> True" in str(err.value)
  config.training.allow_config_change = True
  stored_config.check_workdir_config(config, str(tmp_path))   # allowed explicitly
  config.training.num_steps = 99                               # not a pinned field
  config.training.allow_config_change = False
  stored_config.check_workdir_config(config, str(tmp_path))


@pytest.mark.slow
def test_readme_main_command(tmp_path):
  """The README's main job, with fewer steps: the `vdm-jax train` entry point on digits."""
  workdir = tmp_path / "digits"
  cmd = [sys.executable, "-m", "vdm_jax.cli", "train", "--config", str(ROOT / "configs/digits.py"),
         "--workdir", str(workdir), "--config.training.num_steps=150", "--config.optim.warmup_steps=10",
         "--config.training.log_every=20", "--config.sample.num_steps=20",
         "--config.eval.t_samples=1"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=patience(1800), cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "test bpd" in proc.stdout
  # Readable: the trainer's own log lines, not orbax's dozens per checkpoint (--library_logs).
  assert "compiling the train step" in proc.stderr, proc.stderr[-3000:]
  assert "checkpoint_manager.py" not in proc.stderr, proc.stderr[-3000:]
  result = json.loads((workdir / "eval.json").read_text())
  assert result["bpd"] < np.log2(17)        # already below the uniform baseline
  task = tasks.build_task(load_config("digits"), data.get_info("digits"))
  shapes = jax.eval_shape(task.init, jax.random.PRNGKey(0))[0]
  assert result["num_params"] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert f"({result['num_params']:,} parameters)" in proc.stdout
  assert (workdir / "samples" / "step_00000150.png").exists()
  assert (workdir / "checkpoints" / "150").exists()


def test_cli_rejects_a_typo_in_an_override(tmp_path):
  cmd = [sys.executable, "-m", "vdm_jax.cli", "train", "--config", str(ROOT / "configs/smoke.py"),
         "--workdir", str(tmp_path / "w"), "--config.training.num_stepz=3"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=patience(600))
  assert proc.returncode != 0
  assert "num_stepz" in proc.stderr
  assert not (tmp_path / "w").exists()


def test_cli_usage_without_a_command():
  proc = subprocess.run([sys.executable, "-m", "vdm_jax.cli"], capture_output=True, text=True,
                        timeout=patience(300))
  assert proc.returncode == 2 and "usage: vdm-jax" in proc.stderr


def test_simple_objective_trains_and_reports_the_unweighted_bound(tmp_path):
  """DDPM's L_simple through the same trainer: the logged loss is L_simple (about 1 at init,
  not a bound), while eval.json holds the unweighted T-step bound in bpd."""
  config = load_config("smoke")
  config.model.schedule = "beta_linear"
  config.model.gamma_max = 10.0
  config.model.objective = "simple"
  config.model.num_steps = 50   # eval.num_steps = -1 (default): the bound at the model's T
  config.sample.sampler = "ddpm"
  result = train.train_and_evaluate(config, str(tmp_path / "ddpm"))
  with open(tmp_path / "ddpm" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f if '"train/simple_loss"' in line]
  assert rows and all(0.3 < r["train/simple_loss"] < 3.0 for r in rows)
  assert np.isfinite(result["bpd"]) and result["num_steps"] == 50
  assert result["bpd"] > 1.0   # a bound in bpd, not the L_simple value


@pytest.mark.parametrize("overrides, match", [
    ({"objective": "simple"}, r"model.schedule='learned_linear': expected a fixed schedule"),
    ({"objective": "simple", "schedule": "fixed_linear"}, r"model.num_steps=0: expected >= 1"),
    ({"objective": "l2"}, r"model.objective='l2': expected one of"),
])
def test_objective_config_errors(overrides, match):
  config = load_config("smoke")
  for k, v in overrides.items():
    config.model[k] = v
  with pytest.raises(config_checks.ConfigError, match=match):
    config_checks.check_config(config)


def test_bfloat16_switch_keeps_state_schedule_and_losses_in_float32():
  """model.dtype = bfloat16: the network computes in bf16; parameters, optimiser state, gamma,
  the loss terms and eps_hat stay float32, and a train step through the trainer's jit is finite
  and close to the float32 step."""
  outs = {}
  for dtype in ("float32", "bfloat16"):
    config = load_config("smoke")
    config.model.dtype = dtype
    info = data.get_info("digits")
    task, tx = tasks.build_task(config, info), state_lib.build_optimizer(config).tx
    state = state_lib.init_state(task, tx, seed=0)
    leaves = jax.tree.leaves((state.params, state.opt_state, state.ema_params))
    floating = {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floating == {jnp.dtype("float32")}
    eps_fn, gamma_fn, shape, _ = task.sampler_fns(state.params, state.frozen)
    assert eps_fn(jnp.zeros((2,) + tuple(shape)), jnp.zeros((2,))).dtype == jnp.float32
    assert gamma_fn(jnp.zeros((2,))).dtype == jnp.float32
    batch = next(pipeline.train_iterator("digits", global_batch_size=8, seed=0))
    loss, terms = task.loss(state.params, state.frozen, batch, jax.random.PRNGKey(0))
    assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in terms.values())
    step = parallel.jit(steps_lib.make_train_step(task, tx, ema_decay=0.9))
    for _ in range(3):   # eps_hat is exactly 0 at init: the bf16 path shows from the 2nd step on
      state, out = step(state, batch)
    chex.assert_tree_all_finite((state.params, out))
    outs[dtype] = float(out["bpd"])
  assert outs["bfloat16"] != outs["float32"]   # bf16 really ran
  np.testing.assert_allclose(outs["bfloat16"], outs["float32"], rtol=0.02)


# One value per field of configs/base.py that check_config must refuse: the
# table covers every field, so a field added without a rule fails here.
BAD_VALUES = {
    "seed": -1, "task": "gan",
    "data.name": "imagenet", "data.data_dir": None, "data.flip": None, "data.rot90": None,
    "model.schedule": "sqrt", "model.gamma_min": 6.0, "model.gamma_max": float("nan"),
    "model.schedule_hidden": 0, "model.channels": 0, "model.num_blocks": 0,
    "model.fourier_exponents": (6.5,), "model.attention_everywhere": None,
    "model.norm_groups": 3, "model.conditioning_input": None, "model.dropout": 1.0,
    "model.block_impl": "loop", "model.remat": None, "model.dtype": "float16",
    "model.num_steps": -1, "model.objective": "l2", "model.weighting": "cosine",
    "model.weighting_bias": float("inf"), "model.schedule_objective": "l2",
    "model.conditional": None, "model.p_uncond": 1.0,
    "vae.channels": 0, "vae.latent_channels": 0, "vae.num_down": -1, "vae.num_blocks": -1,
    "latent.vae_workdir": None, "latent.vae_checkpoint": -1,
    "optim.learning_rate": 0.0, "optim.warmup_steps": -1, "optim.lr_decay": "linear",
    "optim.b1": 1.0, "optim.b2": -0.1,
    "optim.eps": 0.0, "optim.weight_decay": -0.01, "optim.grad_clip_norm": -1.0,
    "optim.schedule_lr_multiplier": 0.0, "optim.weight_decay_rule": "all",
    "optim.ema_decay": 1.0, "optim.ema_warmup": None,
    "training.batch_size": 0, "training.num_steps": 0, "training.log_every": 0,
    "training.eval_every": 0, "training.sample_every": 0, "training.checkpoint_every": 0,
    "training.keep_checkpoints": 0, "training.max_nonfinite_steps": -1,
    "training.allow_config_change": None, "training.lock_expiry_secs": 0.0,
    "eval.batch_size": 0, "eval.max_examples": -1, "eval.num_steps": -2, "eval.t_samples": 0,
    "sample.num_steps": 0, "sample.num_images": 0, "sample.sampler": "euler",
    "sample.ddpm_variance": "fixed",
    "distributed.initialize": None, "distributed.coordinator_address": None,
    "distributed.num_processes": 0, "distributed.process_id": -1,
    "xla.cpu_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT, LIBRARY_FUSION_TYPE_REDUCE",
}


def test_a_cosine_decay_needs_more_steps_than_the_warmup():
  config = load_config("smoke")
  config.optim.lr_decay = "cosine"
  config.optim.warmup_steps = config.training.num_steps
  with pytest.raises(config_checks.ConfigError, match="optim.lr_decay='cosine'"):
    config_checks.check_config(config)
  config.optim.warmup_steps = config.training.num_steps - 1
  config_checks.check_config(config)


def test_every_field_of_the_base_config_has_a_rule():
  base = load_config("base")
  fields = set(config_checks.flat_config(base))
  assert fields == set(BAD_VALUES), sorted(fields ^ set(BAD_VALUES))
  assert not fields - config_checks.checked_fields(base)


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_each_field_refuses_a_bad_value(name):
  config = load_config("smoke")
  *sections, field = name.split(".")
  target = config[sections[0]] if sections else config
  target[field] = BAD_VALUES[name]
  with pytest.raises(config_checks.ConfigError) as err:
    config_checks.check_config(config)
  assert f"\n  {name}=" in str(err.value), str(err.value)
