"""`vdm-jax launch`: the commands that start a config on a TPU pod, a SLURM cluster or one
machine. Nothing here contacts a cloud: the printed commands are parsed and checked, and the
command every SLURM task runs is run for real under SLURM's variables in test_multiprocess.py."""

import shlex
import subprocess
import sys

import pytest

from vdm_jax.apps import launch

SPEC = launch.LaunchSpec(config="configs/cifar10.py", workdir="gs://bucket/runs/cifar10",
                         overrides=("training.batch_size=256",), name="pod", zone="z",
                         accelerator="v4-64")


def _commands(text):
  return [line for line in text.splitlines() if line and not line.startswith("#")]


def _train(spec):
  return ["vdm-jax", "train", f"--config={spec.config}", f"--workdir={spec.workdir}",
          *[f"--config.{o}" for o in spec.overrides]]


def test_tpu_pod_installs_then_runs_the_same_train_command_on_every_worker():
  text = launch.recipe("tpu-pod", SPEC)
  install, train = _commands(text)
  for line in (install, train):
    argv = shlex.split(line)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
    assert "--zone=z" in argv and "--worker=all" in argv
  command = lambda line: shlex.split(next(a for a in shlex.split(line)
                                          if a.startswith("--command="))[len("--command="):])
  assert command(install) == ["pip", "install", "-U", "jax[tpu]", "vdm-jax"]
  assert command(train) == _train(SPEC) + ["--config.distributed.initialize=auto"]
  assert "# gcloud compute tpus tpu-vm create pod --zone=z --accelerator-type=v4-64" in text


@pytest.mark.parametrize("per, tasks, gpus", [("gpu", 8, "--gpus-per-task=1"),
                                              ("node", 1, "--gpus-per-node=8")])
def test_slurm_script_runs_one_task_per_gpu_or_per_node(tmp_path, per, tasks, gpus):
  text = launch.recipe("slurm", SPEC._replace(nodes=4, per=per))
  script = tmp_path / "job.sbatch"
  script.write_text(text)
  assert subprocess.run(["bash", "-n", str(script)]).returncode == 0   # valid shell
  sbatch = [line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH ")]
  assert {"--nodes=4", f"--ntasks-per-node={tasks}", gpus, "--signal=TERM@120",
          "--requeue"} <= set(sbatch)
  (srun,) = [line for line in _commands(text) if line.startswith("srun ")]
  assert shlex.split(srun)[1:] == _train(SPEC) + ["--config.distributed.initialize=auto"]


def test_one_machine_runs_one_process_without_distributed_flags():
  commands = _commands(launch.recipe("local", SPEC._replace(workdir="runs/cifar10")))
  assert shlex.split(commands[-1]) == _train(SPEC._replace(workdir="runs/cifar10"))


def test_bad_requests_name_the_problem():
  with pytest.raises(ValueError, match="'runs/x' is a local path, but a tpu-pod run spans"):
    launch.recipe("tpu-pod", SPEC._replace(workdir="runs/x"))
  with pytest.raises(ValueError, match="a slurm run spans"):
    launch.recipe("slurm", SPEC._replace(workdir="runs/x", nodes=2))
  launch.recipe("slurm", SPEC._replace(workdir="runs/x", nodes=1))   # one node: its own disk
  launch.recipe("slurm", SPEC._replace(workdir="file:///shared/runs/x", nodes=2))
  with pytest.raises(ValueError, match="expected FIELD=VALUE"):
    launch.recipe("local", SPEC._replace(overrides=("training.batch_size",)))
  with pytest.raises(ValueError, match="per='core'"):
    launch.recipe("slurm", SPEC._replace(per="core"))
  with pytest.raises(ValueError, match="launch target 'k8s'"):
    launch.recipe("k8s", SPEC)


def test_the_cli_prints_the_recipe_and_refuses_in_one_line():
  args = ["tpu-pod", "--config", SPEC.config, "--workdir", SPEC.workdir,
          "--config.training.batch_size=256", "--name", "pod", "--zone", "z",
          "--accelerator", "v4-64"]
  run = lambda *a: subprocess.run([sys.executable, "-m", "vdm_jax.cli", "launch", *a],
                                  capture_output=True, text=True, timeout=120)
  ok = run(*args)
  assert ok.returncode == 0 and ok.stdout == launch.recipe("tpu-pod", SPEC), ok.stderr
  bad = run("tpu-pod", "--config", "c.py", "--workdir", "runs/local")
  assert bad.returncode == 2 and bad.stderr.count("error: ") == 1 and not bad.stdout
