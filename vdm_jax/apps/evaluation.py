"""What a user does with a trained run: `vdm-jax eval` and `vdm-jax sample`::

  run_eval(workdir, ...)   -> bound (bpd mean, standard error, three terms), written to JSON
  run_sample(workdir, ...) -> a PNG grid and an .npz of integer samples, with any sampler and
                              optional classifier-free or classifier guidance

Every bad input (unknown sampler, steps <= 0, batch_size <= 0, a label outside the classes,
guidance on an unconditional model, a directory without checkpoints, a damaged config.json, a
sample --out that is a file) raises `runs.RunError`, `ConfigError` or `ValueError` with a message
naming the problem, before anything is compiled. `run_eval` prints the bound before writing it,
so a read-only run still shows it (the write failure is then a `RunError`). Runs are read by
`vdm_jax.training.runs` (`load_run`: the EMA parameters only, never the optimiser state).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.datasets import data
from vdm_jax.maths import guidance as guidance_lib, likelihood
from vdm_jax.storage import metrics
from vdm_jax.core import parallel
from vdm_jax.datasets import pipeline
from vdm_jax.storage import rundir
from vdm_jax.maths import sampling
from vdm_jax.training import steps as steps_lib, stored_config
from vdm_jax.core.checks import check_number
from vdm_jax.training.runs import Run, RunError, compiled_as_configured, load_run


@compiled_as_configured
def run_eval(workdir: str, *, checkpoint: int | None = None, num_steps: int | None = None,
             t_samples: int | None = None, max_examples: int | None = None,
             split: str | None = None, batch_size: int | None = None, out: str | None = None,
             seed: int = 0, ode: bool = False, ode_method: str = "rk45",
             ode_max_examples: int = 200) -> dict[str, Any]:
  """The task's evaluation (for a VDM: the bound with EMA parameters) on `split`.

  num_steps: T of the bound (0 = continuous time; None = the config's, `steps.eval_num_steps`);
  t_samples: time samples per image. Writes JSON to `out` (default
  workdir/eval/step{S}_T{T}_K{K}_{split}.json) and returns the result. With `ode`, the
  probability-flow ODE bound (`ode_eval`) is added side by side ("ode_bpd", "ode_bpd_se").
  """
  if num_steps is not None:
    check_number("num_steps (0 = continuous time)", num_steps, integer=True, low=0)
  if t_samples is not None:
    check_number("t_samples", t_samples, integer=True, low=1)
  if batch_size is not None:
    check_number("batch_size", batch_size, integer=True, low=1)
  if max_examples is not None:
    check_number("max_examples", max_examples, integer=True, low=1)
  stored_config.read_stored_config(workdir)   # a damaged config.json is named as such
  run = load_run(workdir, step=checkpoint, eval_batch_size=batch_size)
  split = split or data.default_eval_split(run.config.data.name)
  if run.config.eval.batch_size % run.mesh.size:
    raise ValueError(f"eval batch size {run.config.eval.batch_size} is not a multiple of the "
                     f"{run.mesh.size} devices; pass --batch_size")
  n, batches = steps_lib.eval_batches(run.task, run.config, split=split,
                                      max_examples=max_examples)
  t = steps_lib.eval_num_steps(run.config) if num_steps is None else num_steps
  metrics.say("eval", f"checkpoint {run.step}, {split}: {n} examples in {batches} batches of "
                      f"{run.config.eval.batch_size}, T={t or 'continuous'}; the first batch "
                      f"compiles the evaluation")
  result = steps_lib.evaluate(run.task, run.params, run.config, run.mesh,
                              num_steps=num_steps, t_samples=t_samples,
                              max_examples=max_examples, split=split, frozen=run.frozen,
                              seed=seed, progress=_bar(batches or 0, "batch"))
  result = {"workdir": workdir, "checkpoint": run.step, "split": split, "task": run.task.name,
            **result}
  if ode:
    result.update(ode_eval(run, method=ode_method, split=split, seed=seed,
                           max_examples=min(ode_max_examples, max_examples or ode_max_examples)))
  print(f"checkpoint {run.step}, {split} ({result['num_examples']} examples, T="
        f"{result['num_steps'] or 'continuous'}, {result['t_samples']} t-samples): "
        f"{steps_lib.summary_line(result, run.task.headline)}", flush=True)   # first: then write
  if out is None:
    out = rundir.join(workdir, rundir.EVAL, f"step{run.step}_T{result['num_steps']}_"
                      f"K{result['t_samples']}_{split}.json")
  try:
    rundir.write_json(out, result)
  except OSError as e:
    raise RunError(f"the result above was not saved: cannot write {out} ({e.strerror or e}); "
                   f"pass --out with a writable path") from e
  print(f"-> {out}", flush=True)
  return result


def ode_eval(run: Run, *, method: str = "rk45", num_steps: int = 100, max_examples: int = 200,
             split: str = "test", seed: int = 0, **ode_options) -> dict[str, float]:
  """The probability-flow ODE bound of the run's model (`likelihood.ode_bpd`: variational
  dequantization through q(z_0|x) and the ELBO's discrete decoder), mean and standard error in
  bpd, on the first `max_examples` examples of `split`. Slower than the ELBO (an adaptive solver
  takes hundreds of network evaluations), hence the small default."""
  if run.task.name != "vdm":
    raise ValueError(f"the ODE likelihood needs a pixel-space VDM run; {run.workdir!r} is a "
                     f"{run.task.name!r} run")
  eps_fn, gamma_fn, _, _ = run.task.sampler_fns(run.params, run.frozen, None)
  bound = parallel.jit(lambda k, images: likelihood.ode_bpd(
      k, images, eps_fn=eps_fn, gamma_fn=gamma_fn, vocab_size=run.info.vocab_size,
      method=method, num_steps=num_steps, **ode_options))
  it = pipeline.eval_iterator(
      run.config.data.name, split=split, global_batch_size=run.config.eval.batch_size,
      data_dir=run.config.data.data_dir or None, max_examples=max_examples)
  values, nfe, key = [], [], jax.random.PRNGKey(seed + 7)
  batches = math.ceil(min(max_examples, run.info.num_examples.get(split, max_examples))
                      / run.config.eval.batch_size)
  metrics.say("eval", f"the probability-flow ODE bound ({method}) of {batches} batches; each "
                      f"solve takes hundreds of network evaluations")
  bar = _bar(batches, "batch")
  for i, batch in enumerate(it):
    out = jax.device_get(bound(jax.random.fold_in(key, i), batch["image"]))
    values.append(np.asarray(out["bpd"], np.float64)[np.asarray(batch["mask"], bool)])
    nfe.append(float(out["nfe"]))
    bar.update(i + 1, ode_bpd=float(np.concatenate(values).mean()), nfe=nfe[-1])
  bar.close()
  values = np.concatenate(values)
  if not np.all(np.isfinite(values)):
    raise FloatingPointError(f"the ODE solver did not reach t = 1 for "
                             f"{int(np.sum(~np.isfinite(values)))} examples; raise max_steps or "
                             f"loosen rtol/atol")
  return {"ode_bpd": float(values.mean()),
          "ode_bpd_se": (float(values.std(ddof=1) / math.sqrt(len(values)))
                         if len(values) > 1 else float("nan")),
          "ode_num_examples": int(len(values)), "ode_method": method,
          "ode_nfe_mean": float(np.mean(nfe))}


def _bar(total: int, unit: str) -> metrics.ProgressBar:
  """A progress bar on stderr over `total` units, about 20 lines at most in a log."""
  return metrics.ProgressBar(total=total, enabled=True, unit=unit,
                             log_every=max(1, total // 20))


def _labels(run: Run, label: int | None, num: int, classifier: Run | None) -> jax.Array | None:
  if label is None:
    return None
  num_classes = run.info.num_classes
  if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not (
      0 <= label < num_classes):
    raise ValueError(f"label {label!r} is outside the classes of {run.info.name!r}: expected an "
                     f"integer in [0, {num_classes})")
  if not getattr(run.task, "num_classes", 0) and classifier is None:
    raise ValueError(f"--label needs a class-conditional model (model.conditional=True) or a "
                     f"classifier (--classifier_workdir); {run.workdir!r} is unconditional")
  return jnp.full((num,), int(label), jnp.int32)


def guided_fns(run: Run, *, labels: jax.Array | None, guidance: float,
               classifier: Run | None = None):
  """(eps_fn, gamma_fn, shape, decode) of `run`, with guidance towards `labels`.

  Conditional model, no classifier: classifier-free guidance (1 + w) eps(z, y) - w eps(z, null).
  With a classifier run: classifier guidance eps - w sigma grad log p(y | z_t) on the model's
  unconditional eps (the null label for a conditional model).
  """
  conditional = bool(getattr(run.task, "num_classes", 0))
  if guidance and labels is None:
    raise ValueError(f"guidance {guidance} needs --label (the class to guide towards)")
  if guidance and not conditional and classifier is None:
    raise ValueError(f"guidance on an unconditional model ({run.workdir!r}) needs a classifier: "
                     f"pass --classifier_workdir, or train a conditional model "
                     f"(configs/digits_cond.py)")
  null = None if labels is None else jnp.full_like(labels, run.info.num_classes)
  if classifier is not None:
    if classifier.task.name != "classifier" or classifier.info.name != run.info.name:
      raise RunError(f"--classifier_workdir {classifier.workdir!r} is a {classifier.task.name!r} "
                     f"run on {classifier.info.name!r}; expected a 'classifier' run on "
                     f"{run.info.name!r}")
    eps_fn, gamma_fn, shape, decode = run.task.sampler_fns(
        run.params, run.frozen, null if conditional else None)
    log_prob = classifier.task.log_prob_fn(classifier.params, labels)
    return (guidance_lib.classifier_guided_eps_fn(eps_fn, log_prob, guidance=guidance), gamma_fn,
            shape, decode)
  if labels is None or not guidance:
    return run.task.sampler_fns(run.params, run.frozen, labels if conditional else None)
  cond, gamma_fn, shape, decode = run.task.sampler_fns(run.params, run.frozen, labels)
  uncond = run.task.sampler_fns(run.params, run.frozen, null)[0]
  return (guidance_lib.classifier_free_eps_fn(cond, uncond, guidance=guidance), gamma_fn, shape,
          decode)


def _check_output_directory(path: str) -> None:
  """Raises RunError unless `path` is a writable directory or can be created as one."""
  try:
    rundir.check_writable_folder(path, what="the samples (a PNG and an .npz)")
  except OSError as e:
    raise RunError(f"--out {path!r}: {e.strerror or e}; pass --out with a new or existing, "
                   f"writable directory") from e


@compiled_as_configured
def run_sample(workdir: str, *, sampler: str = "ancestral", steps: int = 1000, num: int = 64,
               out: str | None = None, label: int | None = None, guidance: float = 0.0,
               classifier_workdir: str | None = None, checkpoint: int | None = None,
               seed: int = 0, batch_size: int = 256, **sampler_kwargs) -> dict[str, Any]:
  """Draws `num` samples with `sampler` in `steps` steps; writes a PNG grid and an .npz.

  Returns {"png": path, "npz": path, "samples": int array [num, H, W, C]}.
  """
  sampling.get_sampler(sampler)   # unknown names fail here, before loading anything
  steps = check_number("steps", steps, integer=True, low=1)
  num = check_number("num", num, integer=True, low=1)
  batch_size = check_number("batch_size", batch_size, integer=True, low=1)
  if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
    raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")
  out = out or rundir.join(workdir, rundir.SAMPLES)
  _check_output_directory(out)   # before sampling, not after
  stored_config.read_stored_config(workdir)   # a damaged config.json is named as such
  run = load_run(workdir, step=checkpoint)
  classifier = None if classifier_workdir is None else load_run(classifier_workdir)
  labels = _labels(run, label, num, classifier)
  key, chunks = jax.random.PRNGKey(seed), []
  starts = range(0, num, batch_size)
  metrics.say("sample", f"{num} images, {sampler}, {steps} steps, checkpoint {run.step}, in "
                        f"{len(starts)} batch(es) of up to {batch_size}: each batch is one compiled "
                        f"loop over the steps (the first batch compiles it)")
  bar = _bar(len(starts), "batch")
  for i, start in enumerate(starts):
    n = min(batch_size, num - start)
    fns = guided_fns(run, labels=None if labels is None else labels[start:start + n],
                     guidance=float(guidance), classifier=classifier)
    chunks.append(steps_lib.draw_samples(fns, sampler=sampler, key=jax.random.fold_in(key, i),
                                         num_images=n, num_steps=steps, info=run.info,
                                         **sampler_kwargs))
    bar.update(i + 1)
  bar.close()
  samples = np.concatenate(chunks)
  stem = f"{sampler}_steps{steps}_n{num}_ckpt{run.step}"
  if label is not None:
    stem += f"_label{label}_w{guidance:g}" + ("_clf" if classifier is not None else "")
  png, npz = rundir.join(out, stem + ".png"), rundir.join(out, stem + ".npz")
  try:
    metrics.save_image_grid(png, samples, vocab_size=run.info.vocab_size)
    rundir.write_bytes(npz, rundir.npz_bytes(
        samples=samples, label=-1 if label is None else label, guidance=guidance,
        sampler=sampler, steps=steps, checkpoint=run.step))
  except OSError as e:
    raise RunError(f"cannot write the samples to {out} ({e.strerror or e})") from e
  print(f"{num} samples ({sampler}, {steps} steps) from checkpoint {run.step} -> {png}, {npz}",
        flush=True)
  return {"png": png, "npz": npz, "samples": samples}
