"""`vdm-jax launch tpu-pod | slurm | local`: the commands that start a config where experiments
run, printed (not run), ready to paste.

Every host of a multi-host run executes the same `vdm-jax train` with
`--config.distributed.initialize=auto` (JAX finds the coordinator, the process count and its own
id on TPU pods and under SLURM) and one shared run directory, which on a pod is a bucket: a
multi-host checkpoint is written by all processes into one directory, and each host's own disk
would hold only its part. Rerunning the same command resumes from the newest complete
checkpoint (after a preemption too: SIGTERM on every host saves one checkpoint together)::

  tpu-pod  gcloud: create the TPU VM pod (commented out), install jax[tpu] and this package on
           every worker, then the same train command on every worker (`--worker=all`).
  slurm    an sbatch script: one task per GPU (default) or one per node, `srun` starting the
           same command in every task.
  local    one machine, any number of GPUs: one process drives them all.
"""

from __future__ import annotations

import shlex
from typing import NamedTuple, Sequence

from vdm_jax.storage import rundir

TARGETS = ("tpu-pod", "slurm", "local")


class LaunchSpec(NamedTuple):
  """What to start: the config (a path, or the name of a config shipped with the package, e.g.
  "cifar10"), the run directory, config overrides ("training.batch_size=256"), and the target's
  settings."""
  config: str
  workdir: str
  overrides: Sequence[str] = ()
  name: str = "vdm"                     # tpu-pod: the TPU VM's name; slurm: the job's name
  zone: str = "us-central2-b"           # tpu-pod
  accelerator: str = "v4-32"            # tpu-pod: --accelerator-type
  version: str = "tpu-ubuntu2204-base"  # tpu-pod: the TPU VM image
  package: str = "vdm-jax"              # a pip requirement for this project on every host: a
                                        # wheel copied there, a git URL, a package index name
  nodes: int = 2                        # slurm
  gpus_per_node: int = 8                # slurm
  per: str = "gpu"                      # slurm: one task per "gpu" or per "node"
  hours: int = 24                       # slurm: --time


def train_command(spec: LaunchSpec, *, distributed: bool) -> list[str]:
  """The `vdm-jax train` argv every process runs."""
  args = ["vdm-jax", "train", f"--config={spec.config}", f"--workdir={spec.workdir}"]
  args += [f"--config.{o}" for o in spec.overrides]
  if distributed:
    args.append("--config.distributed.initialize=auto")
  return args


def _check(spec: LaunchSpec, target: str) -> None:
  if target not in TARGETS:
    raise ValueError(f"launch target {target!r}: expected one of {TARGETS}")
  bad = [o for o in spec.overrides if "=" not in o or o.startswith("-")]
  if bad:
    raise ValueError(f"config overrides {bad}: expected FIELD=VALUE, e.g. training.batch_size=256")
  multi_host = target == "tpu-pod" or (target == "slurm" and spec.nodes > 1)
  if multi_host and not (rundir.is_remote(spec.workdir) or spec.workdir.startswith("file://")):
    raise ValueError(
        f"--workdir {spec.workdir!r} is a local path, but a {target} run spans several hosts, "
        f"each with its own disk: every host writes its part of each checkpoint into the one run "
        f"directory, so it must be shared, e.g. gs://BUCKET/runs/NAME (a shared file system "
        f"mounted at the same path on every node works too: pass it as file:///path)")
  if target == "slurm" and (spec.per not in ("gpu", "node") or spec.nodes < 1
                            or spec.gpus_per_node < 1 or spec.hours < 1):
    raise ValueError(f"slurm: per={spec.per!r} (expected 'gpu' or 'node'), nodes={spec.nodes}, "
                     f"gpus_per_node={spec.gpus_per_node}, hours={spec.hours} (expected >= 1)")


def _tpu_pod(spec: LaunchSpec) -> str:
  pod = f"{shlex.quote(spec.name)} --zone={shlex.quote(spec.zone)}"
  install = f"pip install -U 'jax[tpu]' {shlex.quote(spec.package)}"
  train = shlex.join(train_command(spec, distributed=True))
  return "\n".join([
      f"# TPU pod {spec.name} ({spec.accelerator}): every worker runs the same command; the run "
      f"directory is the bucket {spec.workdir}.",
      "# Once, if the pod does not exist yet:",
      f"# gcloud compute tpus tpu-vm create {pod} --accelerator-type={spec.accelerator} "
      f"--version={spec.version}",
      f"# Every worker installs JAX for TPUs and this project ({spec.package}; --package: a wheel "
      f"copied to the workers, a git URL, ...):",
      f"gcloud compute tpus tpu-vm ssh {pod} --worker=all --command={shlex.quote(install)}",
      f"gcloud compute tpus tpu-vm ssh {pod} --worker=all --command={shlex.quote(train)}",
      "# Preempted (exit status 3 on every worker) or stopped: run the last line again to resume.",
  ])


def _slurm(spec: LaunchSpec) -> str:
  per_gpu = spec.per == "gpu"
  tasks = spec.gpus_per_node if per_gpu else 1
  gpus = ([f"#SBATCH --gpus-per-task=1"] if per_gpu
          else [f"#SBATCH --gpus-per-node={spec.gpus_per_node}"])
  train = shlex.join(train_command(spec, distributed=True))
  return "\n".join([
      "#!/bin/bash",
      f"# sbatch this file: {spec.nodes} node(s) x {spec.gpus_per_node} GPU(s), one JAX process "
      f"per {spec.per}; JAX reads SLURM's variables (distributed.initialize=auto).",
      f"#SBATCH --job-name={spec.name}",
      f"#SBATCH --nodes={spec.nodes}",
      f"#SBATCH --ntasks-per-node={tasks}",
      *gpus,
      f"#SBATCH --time={spec.hours}:00:00",
      "# SIGTERM to every task 2 minutes before the time limit (save and stop), and a preempted",
      "# job queued again (it resumes from the newest checkpoint).",
      "#SBATCH --signal=TERM@120",
      "#SBATCH --requeue",
      "set -euo pipefail",
      f"# Once, on a login node: pip install -U 'jax[cuda12]' {shlex.quote(spec.package)}",
      f"srun {train}",
  ])


def _local(spec: LaunchSpec) -> str:
  return "\n".join([
      "# One machine: a single process drives all of its GPUs (one mesh over every device).",
      f"pip install -U 'jax[cuda12]' {shlex.quote(spec.package)}",
      shlex.join(train_command(spec, distributed=False)),
  ])


def recipe(target: str, spec: LaunchSpec) -> str:
  """The commands (a shell script for slurm) that start `spec` on `target`.

  Raises:
    ValueError: an unknown target, a malformed override, a local run directory for several
      hosts, or slurm settings out of range.
  """
  _check(spec, target)
  return {"tpu-pod": _tpu_pod, "slurm": _slurm, "local": _local}[target](spec) + "\n"
